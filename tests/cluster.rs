//! Cluster mode on one Redis server, with real Redis and real nodes: three `causeloop-stream`
//! servers in this process, each on its own ports, sharing nothing but Redis.

mod common;

use common::redis::Redis;
use common::*;
use std::time::Duration;

fn node(redis: &Redis) -> TestServer {
    let bus = redis.bus();
    TestServer::with(move |c| c.bus = bus)
}

#[test]
fn a_publish_to_one_node_reaches_every_node_with_identical_bytes() {
    let Some(redis) = Redis::start("a_publish_to_one_node_reaches_every_node_with_identical_bytes")
    else {
        return;
    };
    let nodes = [node(&redis), node(&redis), node(&redis)];
    // `connected` arrives only once the node's subscription is in force.
    let mut subs: Vec<Ws> = nodes.iter().map(|n| n.subscribe("ws_c", "u1")).collect();
    let (status, body) = nodes[0].publish(
        r#"{"workspace_id":"ws_c","type":"issue.created","payload":{ "id": "iss_1", "n": [1, 2] }}"#,
    );
    assert_eq!(status, 202, "{body}");
    let got: Vec<String> = subs.iter_mut().map(read_event).collect();
    assert!(
        got[0].starts_with(r#"{"type":"issue.created","payload":{"id":"iss_1","n":[1,2]},"ts":""#),
        "{}",
        got[0]
    );
    assert_eq!(got[0], got[1]);
    assert_eq!(got[0], got[2]);
    // The library handle on another node: same path, same result everywhere.
    nodes[2]
        .server()
        .publisher()
        .publish("ws_c", "issue.updated", &serde_json::json!({"id": "iss_1"}))
        .unwrap();
    let got: Vec<String> = subs.iter_mut().map(read_event).collect();
    assert!(got[0].contains(r#""type":"issue.updated""#));
    assert!(got.iter().all(|g| *g == got[0]));
}

#[test]
fn publish_order_from_one_publisher_holds_on_every_node() {
    let Some(redis) = Redis::start("publish_order_from_one_publisher_holds_on_every_node") else {
        return;
    };
    let nodes = [node(&redis), node(&redis)];
    let mut subs: Vec<Ws> = nodes.iter().map(|n| n.subscribe("ws_o", "u")).collect();
    let p = nodes[0].server().publisher();
    for n in 0..200 {
        p.publish("ws_o", "seq.step", &serde_json::json!({ "n": n }))
            .unwrap();
    }
    for ws in subs.iter_mut() {
        for n in 0..200 {
            let v = json(&read_event(ws));
            assert_eq!(v["payload"]["n"], n);
        }
    }
}

#[test]
fn user_scoped_events_reach_that_user_on_every_node_and_no_one_else() {
    let Some(redis) =
        Redis::start("user_scoped_events_reach_that_user_on_every_node_and_no_one_else")
    else {
        return;
    };
    let nodes = [node(&redis), node(&redis)];
    let mut alice: Vec<Ws> = nodes.iter().map(|n| n.subscribe("ws_u", "alice")).collect();
    let mut bob = nodes[1].subscribe("ws_u", "bob");
    let (status, _) = nodes[0].publish(
        r#"[{"workspace_id":"ws_u","user_id":"alice","type":"note.private","payload":{}},
            {"workspace_id":"ws_u","type":"note.public","payload":{}}]"#,
    );
    assert_eq!(status, 202);
    for a in alice.iter_mut() {
        assert!(read_event(a).contains("note.private"));
        assert!(read_event(a).contains("note.public"));
    }
    // Bob's first event is the public one: the private one never reached him.
    assert!(read_event(&mut bob).contains("note.public"));
}

#[test]
fn a_node_subscribes_only_to_the_workspaces_it_serves() {
    let Some(redis) = Redis::start("a_node_subscribes_only_to_the_workspaces_it_serves") else {
        return;
    };
    let a = node(&redis);
    let b = node(&redis);
    let mut on_a = a.subscribe("ws_only_a", "u");
    let on_b = b.subscribe("ws_both", "u");
    let on_a2 = a.subscribe("ws_both", "u");
    assert_eq!(redis.subscribers("ws_only_a"), 1);
    assert_eq!(redis.subscribers("ws_both"), 2);
    assert_eq!(redis.subscribers("ws_nobody"), 0);
    // A publish to a workspace no node serves reaches Redis and no node.
    let (status, _) = a.publish(r#"{"workspace_id":"ws_nobody","type":"a","payload":{}}"#);
    assert_eq!(status, 202);
    // When the last subscriber of a workspace leaves a node, the node lets go of the channel.
    drop(on_b);
    assert!(eventually(Duration::from_secs(5), || redis
        .subscribers("ws_both")
        == 1));
    drop(on_a2);
    assert!(eventually(Duration::from_secs(5), || redis
        .subscribers("ws_both")
        == 0));
    assert_eq!(redis.subscribers("ws_only_a"), 1);
    let (status, _) = b.publish(r#"{"workspace_id":"ws_only_a","type":"still.here","payload":{}}"#);
    assert_eq!(status, 202);
    assert!(read_event(&mut on_a).contains("still.here"));
}

#[test]
fn redis_lost_and_back_mid_stream() {
    let Some(mut redis) = Redis::start("redis_lost_and_back_mid_stream") else {
        return;
    };
    let nodes = [
        {
            let bus = redis.bus();
            TestServer::with(move |c| {
                c.bus = bus;
                c.heartbeat_interval = Duration::from_millis(200);
            })
        },
        node(&redis),
    ];
    let mut subs: Vec<Ws> = nodes.iter().map(|n| n.subscribe("ws_r", "u")).collect();
    redis.kill();
    // Publishes are refused, with the reason, instead of vanishing.
    assert!(eventually(Duration::from_secs(5), || nodes[0]
        .publish(r#"{"workspace_id":"ws_r","type":"a","payload":{}}"#)
        .0
        == 503));
    let (_, body) = nodes[0].publish(r#"{"workspace_id":"ws_r","type":"a","payload":{}}"#);
    assert!(body.contains("cluster bus"), "{body}");
    assert!(nodes[1]
        .server()
        .publisher()
        .publish("ws_r", "a", &serde_json::json!({}))
        .is_err());
    // Local connections stay up and keep their heartbeats.
    for _ in 0..3 {
        assert!(read_text(&mut subs[0]).contains("heartbeat"));
    }
    redis.restart();
    // Each node reconnects and subscribes again. Publishing resumes after a short settle
    // period (so that no node is still re-subscribing when publishers resend their backlog);
    // meanwhile the 503 says so.
    assert!(eventually(Duration::from_secs(15), || redis
        .subscribers("ws_r")
        == 2));
    let (status, body) =
        nodes[1].publish(r#"{"workspace_id":"ws_r","type":"too.early","payload":{}}"#);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("publishes resume in"), "{body}");
    let mut answer = (0, String::new());
    assert!(
        eventually(Duration::from_secs(10), || {
            answer =
                nodes[1].publish(r#"{"workspace_id":"ws_r","type":"back.again","payload":{}}"#);
            answer.0 == 202
        }),
        "{answer:?}"
    );
    for s in subs.iter_mut() {
        assert!(read_event(s).contains("back.again"));
    }
}

#[test]
fn a_node_started_before_redis_waits_then_serves() {
    let Some(mut redis) = Redis::start("a_node_started_before_redis_waits_then_serves") else {
        return;
    };
    redis.kill();
    // The default --handshake-timeout (10 s) outlasts the longest reconnect backoff (1 s, +50%).
    let n = node(&redis);
    let (status, body) = n.publish(r#"{"workspace_id":"ws_s","type":"a","payload":{}}"#);
    assert_eq!(status, 503, "{body}");
    // Upgraded and authenticated, but `connected` waits for the subscription, which needs
    // Redis. Once Redis is there, the node connects by itself and serves as usual.
    let mut waiting = connect(&n.url(&token("ws_s", "u2", 60), "ws_s"));
    waiting
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        waiting.read().is_err(),
        "a frame arrived before Redis was up"
    );
    let pending = || {
        common::process::metric(n.internal, "causeloop_bus_pending_subscriptions ")
            .expect("the gauge is exported")
    };
    assert_eq!(pending(), 1);
    redis.restart();
    waiting
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(read_text(&mut waiting).starts_with(r#"{"type":"connected""#));
    assert_eq!(pending(), 0);
    // The node's first connection to Redis: no settle period, publishing works at once.
    let (status, body) = n.publish(r#"{"workspace_id":"ws_s","type":"hello.again","payload":{}}"#);
    assert_eq!(status, 202, "{body}");
    assert!(read_event(&mut waiting).contains("hello.again"));
}

#[test]
fn a_killed_node_leaves_the_others_serving() {
    let Some(redis) = Redis::start("a_killed_node_leaves_the_others_serving") else {
        return;
    };
    let survivor = node(&redis);
    let bus = format!("redis://127.0.0.1:{}", redis.port);
    let mut doomed = common::process::spawn(&["--bus", &bus], &common::process::secret_env());
    let mut on_doomed = connect(&format!(
        "ws://{}/v1/stream?token={}&workspace=ws_k",
        doomed.public,
        token("ws_k", "u1", 60)
    ));
    assert!(read_text(&mut on_doomed).contains("connected"));
    let mut on_survivor = survivor.subscribe("ws_k", "u2");
    assert_eq!(redis.subscribers("ws_k"), 2);
    // SIGKILL: no drain, no UNSUBSCRIBE; Redis notices the closed socket.
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    assert!(eventually(Duration::from_secs(5), || redis
        .subscribers("ws_k")
        == 1));
    let (status, body) =
        survivor.publish(r#"{"workspace_id":"ws_k","type":"still.serving","payload":{}}"#);
    assert_eq!(status, 202, "{body}");
    assert!(read_event(&mut on_survivor).contains("still.serving"));
}

#[test]
fn the_redis_password_comes_from_the_environment_and_never_shows() {
    const PASSWORD: &str = "bus-password-7f3a9c";
    let Some(redis) = Redis::start_with_password(
        "the_redis_password_comes_from_the_environment_and_never_shows",
        Some(PASSWORD),
    ) else {
        return;
    };
    let bus = format!("redis://127.0.0.1:{}", redis.port);
    let mut env = common::process::secret_env();
    env.push(("CAUSELOOP_BUS_PASSWORD", PASSWORD));
    let good = common::process::spawn(&["--bus", &bus], &env);
    let mut ws = connect(&format!(
        "ws://{}/v1/stream?token={}&workspace=ws_pw",
        good.public,
        token("ws_pw", "u1", 60)
    ));
    assert!(read_text(&mut ws).contains("connected"));
    let (status, body) = publish_with_key(
        good.internal,
        Some(PUBLISH_KEY),
        r#"{"workspace_id":"ws_pw","type":"a","payload":{}}"#,
    );
    assert_eq!(status, 202, "{body}");

    // The wrong password: the node runs, refuses publishes with the reason, and logs why, but
    // never the password itself.
    let mut env = common::process::secret_env();
    env.push(("CAUSELOOP_BUS_PASSWORD", "not-the-password"));
    let mut bad = common::process::spawn(&["--bus", &bus], &env);
    let bad_log = bad.log();
    let (status, body) = publish_with_key(
        bad.internal,
        Some(PUBLISH_KEY),
        r#"{"workspace_id":"ws_pw","type":"a","payload":{}}"#,
    );
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("not-the-password"), "{body}");
    // A URL carrying a password is refused outright.
    let out = std::process::Command::new(common::process::BIN)
        .args([
            "--bus",
            &format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port),
        ])
        .envs(common::process::secret_env())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAUSELOOP_BUS_PASSWORD") && !err.contains(PASSWORD),
        "{err}"
    );
    // The bus thread's first attempt fails at once (WRONGPASS) and says so.
    let (found, log) = bad_log.wait_for("WRONGPASS");
    let _ = bad.child.kill();
    let _ = bad.child.wait();
    assert!(found, "{log}");
    assert!(!log.contains("not-the-password"), "{log}");
}

#[test]
fn without_redis_a_new_connection_is_told_to_come_back_later() {
    let Some(mut redis) = Redis::start("without_redis_a_new_connection_is_told_to_come_back_later")
    else {
        return;
    };
    redis.kill();
    let bus = redis.bus();
    let n = TestServer::with(move |c| {
        c.bus = bus;
        c.handshake_timeout = Duration::from_secs(1);
    });
    // No subscription can be confirmed: at the handshake deadline the client gets 1013 as its
    // only frame (the seed client reconnects with backoff).
    let mut early = connect(&n.url(&token("ws_s", "u1", 60), "ws_s"));
    assert_eq!(
        expect_close(&mut early, true),
        (1013, "try again later".into())
    );
}
