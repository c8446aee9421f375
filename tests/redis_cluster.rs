//! Cluster mode on a Redis Cluster (`--bus redis-cluster://`), with a real three-master cluster
//! and real nodes: sharded pub/sub, each workspace's channel on the master that owns its hash
//! slot, slots moving under a live stream, a master lost and back.

mod common;

use common::redis::RedisCluster;
use common::*;
use std::time::Duration;

fn node(cluster: &RedisCluster) -> TestServer {
    let bus = cluster.bus();
    TestServer::with(move |c| c.bus = bus)
}

fn channel(ws: &str) -> String {
    format!("causeloop:v1:ws:{ws}")
}

fn scrape(s: &TestServer) -> String {
    raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

fn metric(s: &TestServer, name: &str) -> u64 {
    let text = scrape(s);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

fn publish_until_accepted(n: &TestServer, body: &str) -> (u16, String) {
    let mut answer = (0, String::new());
    assert!(
        eventually(Duration::from_secs(15), || {
            answer = n.publish(body);
            answer.0 == 202
        }),
        "{answer:?}"
    );
    answer
}

#[test]
fn sharded_pubsub_reaches_every_node_with_identical_bytes_from_the_owning_master_only() {
    let Some(cluster) = RedisCluster::start(
        "sharded_pubsub_reaches_every_node_with_identical_bytes_from_the_owning_master_only",
        3,
    ) else {
        return;
    };
    let nodes = [node(&cluster), node(&cluster), node(&cluster)];
    let spaces = cluster.one_workspace_per_master();
    // Every node subscribes to every workspace; `connected` arrives once each subscription is
    // in force at the workspace's master.
    let mut subs: Vec<Vec<Ws>> = spaces
        .iter()
        .map(|ws| nodes.iter().map(|n| n.subscribe(ws, "u1")).collect())
        .collect();
    for (owner, ws) in spaces.iter().enumerate() {
        // Sharded subscriptions, each only on the master that owns the channel's slot; no
        // classic (broadcast) subscription anywhere.
        let mut want = vec![0; 3];
        want[owner] = 3;
        assert_eq!(cluster.shard_subscribers(&channel(ws)), want, "{ws}");
        assert_eq!(cluster.classic_subscribers(&channel(ws)), [0, 0, 0]);
    }
    // One HTTP publish to node 0 with an event for each workspace: three masters, one request.
    let body = format!(
        "[{}]",
        spaces
            .iter()
            .map(|ws| format!(
                r#"{{"workspace_id":"{ws}","type":"issue.created","payload":{{ "ws": "{ws}" }}}}"#
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (status, answer) = nodes[0].publish(&body);
    assert_eq!(status, 202, "{answer}");
    for (ws, on_nodes) in spaces.iter().zip(subs.iter_mut()) {
        let got: Vec<String> = on_nodes.iter_mut().map(read_event).collect();
        assert!(
            got[0].starts_with(&format!(
                r#"{{"type":"issue.created","payload":{{"ws":"{ws}"}},"ts":"#
            )),
            "{}",
            got[0]
        );
        assert!(got.iter().all(|g| *g == got[0]), "{got:?}");
    }
    // The library handle on another node, user-scoped: only that user, on every node.
    let mut other_user = nodes[1].subscribe(&spaces[2], "u2");
    nodes[2]
        .server()
        .publisher()
        .publish_user(
            &spaces[2],
            "u2",
            "note.private",
            &serde_json::json!({"n": 1}),
        )
        .unwrap();
    assert!(read_event(&mut other_user).contains("note.private"));
    nodes[0]
        .server()
        .publisher()
        .publish(&spaces[2], "note.public", &serde_json::json!({}))
        .unwrap();
    for s in subs[2].iter_mut() {
        // u1 never saw the private event: the next event is the public one.
        assert!(read_event(s).contains("note.public"));
    }
    assert!(read_event(&mut other_user).contains("note.public"));
}

#[test]
fn publish_order_and_interest_hold_on_a_cluster() {
    let Some(cluster) = RedisCluster::start("publish_order_and_interest_hold_on_a_cluster", 3)
    else {
        return;
    };
    let a = node(&cluster);
    let b = node(&cluster);
    let spaces = cluster.one_workspace_per_master();
    let owner_of_0 = cluster.owner(cluster.slot(&channel(&spaces[0])));
    assert_eq!(
        cluster.shard_subscribers(&channel(&spaces[0]))[owner_of_0],
        0
    );
    let mut on_a = a.subscribe(&spaces[0], "u");
    let on_b = b.subscribe(&spaces[0], "u");
    assert_eq!(
        cluster.shard_subscribers(&channel(&spaces[0]))[owner_of_0],
        2
    );
    // Nobody serves the other workspaces: no subscription to them anywhere.
    for ws in &spaces[1..] {
        assert_eq!(cluster.shard_subscribers(&channel(ws)), [0, 0, 0]);
    }
    // Order per publisher per workspace, interleaved with publishes to other masters.
    let p = b.server().publisher();
    for n in 0..300 {
        p.publish(&spaces[n % 3], "seq.step", &serde_json::json!({ "n": n }))
            .unwrap();
    }
    for n in (0..300).step_by(3) {
        assert_eq!(json(&read_event(&mut on_a))["payload"]["n"], n);
    }
    // The last subscriber of a node leaves: the node lets go of the channel at its master.
    drop(on_b);
    assert!(eventually(Duration::from_secs(5), || cluster
        .shard_subscribers(&channel(&spaces[0]))[owner_of_0]
        == 1));
}

#[test]
fn a_slot_moved_under_a_live_stream_is_followed() {
    let Some(cluster) = RedisCluster::start("a_slot_moved_under_a_live_stream_is_followed", 3)
    else {
        return;
    };
    let a = node(&cluster);
    let b = node(&cluster);
    // A node that only publishes: nothing tells it the slot moved until Redis redirects it.
    let publisher = node(&cluster);
    let ws = &cluster.one_workspace_per_master()[0];
    let slot = cluster.slot(&channel(ws));
    let mut subs = [a.subscribe(ws, "u"), b.subscribe(ws, "u")];
    for (i, n) in [&a, &b, &publisher].iter().enumerate() {
        let (status, body) = n.publish(&format!(
            r#"{{"workspace_id":"{ws}","type":"before.move","payload":{{"from":{i}}}}}"#
        ));
        assert_eq!(status, 202, "{body}");
        for s in subs.iter_mut() {
            assert!(read_event(s).contains("before.move"));
        }
    }
    let from = cluster.owner(slot);
    let to = (from + 1) % 3;
    let layouts_before = metric(&a, "causeloop_bus_layout_reads_total");
    // Published the instant the old master lets go, before the nodes can have subscribed at
    // the new one: the publishing node still has the old layout, Redis redirects it, and it
    // holds the event back until the nodes are there. Every subscriber gets it.
    assert_eq!(metric(&publisher, "causeloop_bus_redirects_total"), 0);
    let (status, body) = cluster.move_slot_and(slot, to, || {
        publisher.publish(&format!(
            r#"{{"workspace_id":"{ws}","type":"after.move","payload":{{}}}}"#
        ))
    });
    assert_eq!(status, 202, "{body}");
    assert_eq!(metric(&publisher, "causeloop_bus_redirects_total"), 1);
    for s in subs.iter_mut() {
        assert!(read_event(s).contains("after.move"));
    }
    // Redis ended the subscriptions at the old master; each node read the layout again and
    // subscribed at the new one. The open connections never noticed.
    let mut want = vec![0; 3];
    want[to] = 2;
    assert_eq!(cluster.shard_subscribers(&channel(ws)), want);
    assert!(metric(&a, "causeloop_bus_layout_reads_total") > layouts_before);
    // And back, this time published at once by a subscribing node, whose own layout read
    // may already have told its publisher where the slot went: the event waits the same way.
    let (status, body) = cluster.move_slot_and(slot, from, || {
        a.publish(&format!(
            r#"{{"workspace_id":"{ws}","type":"moved.back","payload":{{}}}}"#
        ))
    });
    assert_eq!(status, 202, "{body}");
    for s in subs.iter_mut() {
        assert!(read_event(s).contains("moved.back"));
    }
    let mut want = vec![0; 3];
    want[from] = 2;
    assert_eq!(cluster.shard_subscribers(&channel(ws)), want);
    // A node that connects a new subscriber after the move subscribes at the new master.
    let c = node(&cluster);
    let mut late = c.subscribe(ws, "u");
    assert_eq!(cluster.shard_subscribers(&channel(ws))[from], 3);
    let (status, body) = c.publish(&format!(
        r#"{{"workspace_id":"{ws}","type":"late","payload":{{}}}}"#
    ));
    assert_eq!(status, 202, "{body}");
    assert!(read_event(&mut late).contains("late"));
    for s in subs.iter_mut() {
        assert!(read_event(s).contains("late"));
    }
}

#[test]
fn a_master_lost_and_back_stops_only_its_slots() {
    let Some(mut cluster) = RedisCluster::start("a_master_lost_and_back_stops_only_its_slots", 3)
    else {
        return;
    };
    let n = {
        let bus = cluster.bus();
        TestServer::with(move |c| {
            c.bus = bus;
            c.heartbeat_interval = Duration::from_millis(200);
        })
    };
    let spaces = cluster.one_workspace_per_master();
    let mut subs: Vec<Ws> = spaces.iter().map(|ws| n.subscribe(ws, "u")).collect();
    assert_eq!(metric(&n, "causeloop_bus_up"), 1);
    cluster.kill(0);
    // The lost master's slots answer 503 with the reason; the others keep working.
    let dead = format!(
        r#"{{"workspace_id":"{}","type":"a","payload":{{}}}}"#,
        spaces[0]
    );
    assert!(eventually(Duration::from_secs(5), || n.publish(&dead).0 == 503));
    let (_, body) = n.publish(&dead);
    assert!(body.contains("master of hash slot"), "{body}");
    assert!(eventually(Duration::from_secs(5), || metric(
        &n,
        "causeloop_bus_up"
    ) == 0));
    let (status, body) = n.publish(&format!(
        r#"{{"workspace_id":"{}","type":"still.flowing","payload":{{}}}}"#,
        spaces[1]
    ));
    assert_eq!(status, 202, "{body}");
    assert!(read_event(&mut subs[1]).contains("still.flowing"));
    // Every connection stays open with its heartbeats, including those on the lost master.
    for _ in 0..3 {
        assert!(read_text(&mut subs[0]).contains("heartbeat"));
    }
    cluster.restart(0);
    // The node reconnects, subscribes again, and after the settle period publishes resume.
    assert!(eventually(Duration::from_secs(15), || cluster
        .shard_subscribers(&channel(&spaces[0]))[0]
        == 1));
    publish_until_accepted(
        &n,
        &format!(
            r#"{{"workspace_id":"{}","type":"back.again","payload":{{}}}}"#,
            spaces[0]
        ),
    );
    // Heartbeats may come first; the event follows.
    assert!(read_event(&mut subs[0]).contains("back.again"));
    assert_eq!(metric(&n, "causeloop_bus_up"), 1);
    assert!(metric(&n, "causeloop_bus_reconnects_total") >= 1);
}

#[test]
fn a_frozen_master_is_given_up_while_the_others_keep_delivering() {
    let Some(cluster) = RedisCluster::start(
        "a_frozen_master_is_given_up_while_the_others_keep_delivering",
        3,
    ) else {
        return;
    };
    let n = node(&cluster);
    let spaces = cluster.one_workspace_per_master();
    let mut frozen_ws = n.subscribe(&spaces[0], "u");
    let mut live_ws = n.subscribe(&spaces[1], "u");
    // A hung master: its sockets stay open, nothing answers, no FIN ever comes.
    cluster.nodes[0].signal("STOP");
    // The bus notices by its PING going unanswered (within 10 s), drops the connection and
    // tries again; all the while, events on the other masters are delivered, each of them, and
    // at once (the probes and the other masters' publishes never wait on the frozen one).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    let mut after_reconnect = 0;
    while after_reconnect < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the frozen master was never given up"
        );
        let (status, body) = n.publish(&format!(
            r#"{{"workspace_id":"{}","type":"tick","payload":{{"n":{sent}}}}}"#,
            spaces[1]
        ));
        assert_eq!(status, 202, "{body}");
        assert_eq!(json(&read_event(&mut live_ws))["payload"]["n"], sent);
        sent += 1;
        // Paced by the condition itself: each round waits (briefly) for the reconnect.
        if eventually(Duration::from_millis(250), || {
            metric(&n, "causeloop_bus_reconnects_total") > 0
        }) {
            after_reconnect += 1;
        }
    }
    // Its slots answer 503 (the node's publish connection times out on it).
    let (status, body) = n.publish(&format!(
        r#"{{"workspace_id":"{}","type":"lost","payload":{{}}}}"#,
        spaces[0]
    ));
    assert_eq!(status, 503, "{body}");
    // Thawed, it serves again: the node subscribes there anew.
    cluster.nodes[0].signal("CONT");
    publish_until_accepted(
        &n,
        &format!(
            r#"{{"workspace_id":"{}","type":"thawed","payload":{{}}}}"#,
            spaces[0]
        ),
    );
    assert!(read_event(&mut frozen_ws).contains("thawed"));
}

#[test]
fn a_cluster_with_a_password_is_used_with_it_on_every_master() {
    const PASSWORD: &str = "cluster-pw-0123456789";
    let Some(cluster) = RedisCluster::start_with_password(
        "a_cluster_with_a_password_is_used_with_it_on_every_master",
        3,
        Some(PASSWORD),
    ) else {
        return;
    };
    let n = node(&cluster);
    let spaces = cluster.one_workspace_per_master();
    let mut subs: Vec<Ws> = spaces.iter().map(|ws| n.subscribe(ws, "u")).collect();
    for (ws, sub) in spaces.iter().zip(subs.iter_mut()) {
        let (status, body) = n.publish(&format!(
            r#"{{"workspace_id":"{ws}","type":"authed","payload":{{}}}}"#
        ));
        assert_eq!(status, 202, "{body}");
        assert!(read_event(sub).contains("authed"));
    }
    // Without the password, the node never gets in: publishes are refused, not lost.
    let wrong = {
        let mut bus = cluster.bus();
        if let causeloop_stream::config::BusConfig::Redis(r) = &mut bus {
            r.password = Some(causeloop_stream::config::Secret::from(b"wrong".to_vec()));
        }
        TestServer::with(move |c| c.bus = bus)
    };
    // It has tried, and been refused.
    assert!(eventually(WAIT, || metric(
        &wrong,
        "causeloop_bus_connect_failures_total"
    ) > 0));
    let (status, body) = wrong.publish(&format!(
        r#"{{"workspace_id":"{}","type":"a","payload":{{}}}}"#,
        spaces[0]
    ));
    assert_eq!(status, 503, "{body}");
    assert_eq!(metric(&wrong, "causeloop_bus_up"), 0);
}

#[test]
fn a_backend_spublishing_straight_to_the_cluster_reaches_subscribers() {
    let Some(cluster) = RedisCluster::start(
        "a_backend_spublishing_straight_to_the_cluster_reaches_subscribers",
        3,
    ) else {
        return;
    };
    let n = node(&cluster);
    let spaces = cluster.one_workspace_per_master();
    let mut sub = n.subscribe(&spaces[2], "u");
    // As docs/cluster.md shows: SPUBLISH through any master, redis-cli following the MOVED.
    let out = cluster.nodes[0].cli(&[
        "-c",
        "SPUBLISH",
        &channel(&spaces[2]),
        r#"{"v":1,"type":"issue.created","ts":1764373560123,"payload":{"id":"iss_1"}}"#,
    ]);
    assert_eq!(out.trim(), "1", "one node subscribes: {out}");
    assert_eq!(
        read_event(&mut sub),
        r#"{"type":"issue.created","payload":{"id":"iss_1"},"ts":"2025-11-28T23:46:00.123Z"}"#
    );
    // A classic PUBLISH on a cluster reaches no node: the nodes listen with SSUBSCRIBE.
    let out = cluster.nodes[0].cli(&[
        "-c",
        "PUBLISH",
        &channel(&spaces[2]),
        r#"{"v":1,"type":"classic","ts":1764373560123,"payload":{}}"#,
    ]);
    assert_eq!(out.trim(), "0", "{out}");
}

#[test]
fn a_node_started_before_its_cluster_waits_then_serves() {
    let Some(mut cluster) =
        RedisCluster::start("a_node_started_before_its_cluster_waits_then_serves", 3)
    else {
        return;
    };
    let spaces = cluster.one_workspace_per_master();
    for i in 0..3 {
        cluster.kill(i);
    }
    let n = node(&cluster);
    // Authenticated, but `connected` waits for the subscription, which needs the cluster.
    let mut waiting = connect(&n.url(&token(&spaces[1], "u", 60), &spaces[1]));
    waiting
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        waiting.read().is_err(),
        "a frame arrived before Redis was up"
    );
    let (status, body) = n.publish(&format!(
        r#"{{"workspace_id":"{}","type":"a","payload":{{}}}}"#,
        spaces[1]
    ));
    assert_eq!(status, 503, "{body}");
    cluster.restart_all();
    waiting
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(read_text(&mut waiting).starts_with(r#"{"type":"connected""#));
    // The node's first connection to the cluster: no settle period.
    let (status, body) = n.publish(&format!(
        r#"{{"workspace_id":"{}","type":"hello","payload":{{}}}}"#,
        spaces[1]
    ));
    assert_eq!(status, 202, "{body}");
    assert!(read_event(&mut waiting).contains("hello"));
}

#[test]
fn a_plain_redis_given_as_a_cluster_is_refused_with_the_reason() {
    let Some(redis) =
        common::redis::Redis::start("a_plain_redis_given_as_a_cluster_is_refused_with_the_reason")
    else {
        return;
    };
    let bus = format!("redis-cluster://127.0.0.1:{}", redis.port);
    let mut p = common::process::spawn(&["--bus", &bus], &common::process::secret_env());
    let p_log = p.log();
    let (status, body) = publish_with_key(
        p.internal,
        Some(PUBLISH_KEY),
        r#"{"workspace_id":"w","type":"a","payload":{}}"#,
    );
    assert_eq!(status, 503, "{body}");
    // The first attempt fails at once and says why.
    let (found, log) = p_log.wait_for("retrying in");
    let _ = p.child.kill();
    let _ = p.child.wait();
    assert!(found, "{log}");
    assert!(log.contains("cluster support disabled"), "{log}");
    assert!(log.contains("retrying in"), "{log}");
}
