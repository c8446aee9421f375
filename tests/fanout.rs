//! Fan-out through real sockets: identical bytes everywhere, isolation, order, back-pressure.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn every_subscriber_gets_identical_bytes_across_four_shards() {
    let s = TestServer::with(|c| c.shards = 4);
    let workspaces = ["ws_a", "ws_b", "ws_c", "ws_d", "ws_e"];
    let mut conns: Vec<(usize, Ws)> = Vec::new();
    for i in 0..240 {
        let w = i % workspaces.len();
        conns.push((w, s.subscribe(workspaces[w], &format!("usr_{i}"))));
    }
    // Each connection landed somewhere; with 240 connections every shard should hold some.
    let open: Vec<u64> = s
        .server()
        .stats()
        .shards
        .iter()
        .map(|st| st.open.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(open.iter().sum::<u64>(), 240, "{open:?}");
    assert!(
        open.iter().all(|&n| n > 0),
        "a shard got no connection: {open:?}"
    );

    let mut body = String::from("[");
    for (i, w) in workspaces.iter().enumerate() {
        for n in 0..3 {
            if body.len() > 1 {
                body.push(',');
            }
            body.push_str(&format!(r#"{{"workspace_id":"{w}","type":"issue.created","payload":{{"ws":{i},"n":{n}, "title":"spaced out"}}}}"#));
        }
    }
    body.push(']');
    let (status, resp) = s.publish(&body);
    assert_eq!((status, resp.as_str()), (202, r#"{"accepted":15}"#));

    let mut seen: HashMap<usize, Vec<String>> = HashMap::new();
    for (w, ws) in conns.iter_mut() {
        let frames: Vec<String> = (0..3).map(|_| read_event(ws)).collect();
        for (n, f) in frames.iter().enumerate() {
            let v = json(f);
            assert_eq!(v["payload"]["ws"], *w as u64, "isolation: {f}");
            assert_eq!(v["payload"]["n"], n as u64, "order: {f}");
            // The payload reached the client byte for byte, whitespace removed, keys in order.
            assert!(
                f.contains(&format!(
                    r#""payload":{{"ws":{w},"n":{n},"title":"spaced out"}}"#
                )),
                "{f}"
            );
        }
        match seen.get(w) {
            None => {
                seen.insert(*w, frames);
            }
            Some(first) => assert_eq!(
                first, &frames,
                "workspace {w}: bytes differ between subscribers"
            ),
        }
    }
    assert_eq!(seen.len(), workspaces.len());
}

#[test]
fn user_scoped_events_reach_only_that_user() {
    let s = TestServer::start();
    let mut alice1 = s.subscribe("ws_u", "alice");
    let mut alice2 = s.subscribe("ws_u", "alice");
    let mut bob = s.subscribe("ws_u", "bob");
    let mut alice_elsewhere = s.subscribe("ws_other", "alice");
    let (st, _) = s.publish(r#"{"workspace_id":"ws_u","user_id":"alice","type":"notification.created","payload":{"for":"alice"}}"#);
    assert_eq!(st, 202);
    let (st, _) =
        s.publish(r#"{"workspace_id":"ws_u","type":"issue.created","payload":{"for":"all"}}"#);
    assert_eq!(st, 202);
    let (st, _) = s
        .publish(r#"{"workspace_id":"ws_other","type":"issue.created","payload":{"for":"other"}}"#);
    assert_eq!(st, 202);
    for a in [&mut alice1, &mut alice2] {
        assert!(read_event(a).contains(r#"{"for":"alice"}"#));
        assert!(read_event(a).contains(r#"{"for":"all"}"#));
    }
    // Bob's first event is the workspace-wide one: the user-scoped one never reached him.
    assert!(read_event(&mut bob).contains(r#"{"for":"all"}"#));
    assert!(read_event(&mut alice_elsewhere).contains(r#"{"for":"other"}"#));
}

#[test]
fn library_handle_publishes_in_order() {
    let s = TestServer::start();
    let mut a = s.subscribe("ws_lib", "u1");
    let mut b = s.subscribe("ws_lib", "u2");
    let p = s.server().publisher();
    let p2 = p.clone();
    std::thread::spawn(move || {
        for i in 0..200 {
            p2.publish(
                "ws_lib",
                "job.updated",
                &serde_json::json!({"seq": i, "progress": 0.5}),
            )
            .unwrap();
        }
    })
    .join()
    .unwrap();
    p.publish_user(
        "ws_lib",
        "u2",
        "notification.created",
        &serde_json::json!({"last": true}),
    )
    .unwrap();
    for ws in [&mut a, &mut b] {
        for i in 0..200 {
            let f = read_event(ws);
            assert!(
                f.starts_with(&format!(
                    r#"{{"type":"job.updated","payload":{{"seq":{i},"progress":0.5}},"ts":""#
                )),
                "{f}"
            );
        }
    }
    assert!(read_event(&mut b).contains(r#""last":true"#));
    // Invalid events are refused by the library too.
    assert!(p
        .publish("ws_lib", "Bad Type", &serde_json::json!({}))
        .is_err());
    assert!(p
        .publish("ws_lib", "ok.type", &serde_json::json!([1, 2]))
        .is_err());
    assert!(p.publish("", "ok.type", &serde_json::json!({})).is_err());
}

#[test]
fn a_client_that_stops_reading_gets_1008_while_a_reader_keeps_up() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const EVENTS: usize = 600; // 600 x 16 KiB: far more than the kernel buffers plus the bound
    let s = TestServer::with(|c| {
        c.max_outbound_bytes = 256 * 1024;
        c.shards = 1;
    });
    let mut reader = s.subscribe("ws_slow", "reader");
    let mut stalled = s.subscribe("ws_slow", "stalled");
    let received = Arc::new(AtomicUsize::new(0));
    let got = received.clone();
    let reader_thread = std::thread::spawn(move || {
        for n in 0..EVENTS {
            let f = read_event(&mut reader);
            assert!(
                f.contains(&format!(r#""seq":{n},"#)),
                "reader lost or reordered an event at {n}"
            );
            got.store(n + 1, Ordering::Release);
        }
    });
    let publisher = s.server().publisher();
    let pad = "x".repeat(16 * 1024);
    for seq in 0..EVENTS {
        // Keep the reading client at most four events (64 KiB) behind, however slow this
        // machine is: it must never come near the bound. The stalled one falls behind freely.
        while seq >= received.load(Ordering::Acquire) + 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        publisher
            .publish(
                "ws_slow",
                "job.updated",
                &serde_json::json!({"seq": seq, "pad": pad}),
            )
            .unwrap();
    }
    reader_thread
        .join()
        .expect("the reading client received every event in order");
    // The stalled client's socket buffers filled, its outbox passed the bound, and it was closed
    // 1008. It now reads what the kernel held, then the close frame.
    let (code, reason) = expect_close(&mut stalled, false);
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    let closes = &s.server().stats().shards[0].closes;
    let i = causeloop_stream::ws::close::CloseReason::ALL
        .iter()
        .position(|r| *r == causeloop_stream::ws::close::CloseReason::SlowConsumer)
        .unwrap();
    assert_eq!(closes[i].load(Ordering::Relaxed), 1);
}

#[test]
fn max_connections_answers_1013() {
    let s = TestServer::with(|c| c.max_connections = 3);
    let _a = s.subscribe("ws_m", "a");
    let _b = s.subscribe("ws_m", "b");
    let _c = s.subscribe("ws_m", "c");
    let mut d = connect(&s.url(&token("ws_m", "d", 60), "ws_m"));
    assert_eq!(
        expect_close(&mut d, true),
        (1013, "try again later".to_string())
    );
    finish_close(&mut d);
    drop(_a);
    // Once a slot frees up, connections are accepted again.
    assert!(eventually(Duration::from_secs(5), || {
        let mut e = connect(&s.url(&token("ws_m", "e", 60), "ws_m"));
        matches!(e.read(), Ok(tungstenite::Message::Text(t)) if t.contains("connected"))
    }));
}
