//! `POST /v1/publish`: every answer of the contract, batch atomicity, and the probes of the
//! internal listener.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const OK_EVENT: &str = r#"{"workspace_id":"ws_p","type":"issue.created","payload":{"id":"iss_1"}}"#;

#[test]
fn single_event_is_accepted_and_delivered() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_p", "u");
    assert_eq!(s.publish(OK_EVENT), (202, r#"{"accepted":1}"#.to_string()));
    let f = read_event(&mut ws);
    assert!(
        f.starts_with(r#"{"type":"issue.created","payload":{"id":"iss_1"},"ts":""#),
        "{f}"
    );
}

#[test]
fn bad_or_missing_key_is_401() {
    let s = TestServer::start();
    assert_eq!(publish_with_key(s.internal, None, OK_EVENT).0, 401);
    assert_eq!(publish_with_key(s.internal, Some("wrong"), OK_EVENT).0, 401);
    assert_eq!(
        publish_with_key(s.internal, Some(&format!("{PUBLISH_KEY}x")), OK_EVENT).0,
        401
    );
    let (st, body) = publish_with_key(s.internal, Some("wrong"), OK_EVENT);
    assert_eq!(st, 401);
    assert!(
        !body.contains("wrong") && !body.contains(PUBLISH_KEY),
        "{body}"
    );
}

#[test]
fn invalid_bodies_are_400_naming_the_item_and_publish_nothing() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_p", "u");
    let cases = [
        ("not json", "{oops", "invalid event: key must be a string"),
        ("array of junk", "[1]", "item 0"),
        (
            "bad type",
            r#"{"workspace_id":"ws_p","type":"Issue","payload":{}}"#,
            "type",
        ),
        (
            "reserved type",
            r#"{"workspace_id":"ws_p","type":"heartbeat","payload":{}}"#,
            "heartbeat",
        ),
        (
            "payload not an object",
            r#"{"workspace_id":"ws_p","type":"a","payload":"x"}"#,
            "payload must be a JSON object",
        ),
        (
            "missing workspace",
            r#"{"type":"a","payload":{}}"#,
            "workspace_id",
        ),
        (
            "empty user",
            r#"{"workspace_id":"ws_p","user_id":"","type":"a","payload":{}}"#,
            "user_id",
        ),
        (
            "unknown field",
            r#"{"workspace_id":"ws_p","type":"a","payload":{},"tpye":"b"}"#,
            "tpye",
        ),
    ];
    for (name, body, needle) in cases {
        let (st, resp) = s.publish(body);
        assert_eq!(st, 400, "{name}");
        let err = json(&resp)["error"].as_str().unwrap().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    }
    // Batch atomicity: the third item is bad, so neither of the first two is published.
    let batch =
        format!(r#"[{OK_EVENT},{OK_EVENT},{{"workspace_id":"ws_p","type":"BAD","payload":{{}}}}]"#);
    let (st, resp) = s.publish(&batch);
    assert_eq!(st, 400);
    assert!(resp.contains("item 2"), "{resp}");
    // The next event the subscriber sees is this marker: nothing of the refused batch arrived.
    assert_eq!(
        s.publish(r#"{"workspace_id":"ws_p","type":"marker","payload":{}}"#)
            .0,
        202
    );
    assert!(read_event(&mut ws).starts_with(r#"{"type":"marker""#));
}

#[test]
fn oversized_body_is_413_before_it_is_read() {
    let s = TestServer::with(|c| c.max_publish_bytes = 1024);
    let mut sock = TcpStream::connect(s.internal).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Announce 10 MB and send only the head: the answer must come without the body.
    let head = format!("POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nContent-Length: 10000000\r\n\r\n");
    sock.write_all(head.as_bytes()).unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    assert_eq!(status_of(&resp), 413, "{resp}");
    assert!(resp.contains("over the limit of 1024 bytes"), "{resp}");
    // A body just over the limit, sent whole, is refused the same way.
    let body = format!(
        r#"{{"workspace_id":"w","type":"a","payload":{{"p":"{}"}}}}"#,
        "x".repeat(1024)
    );
    assert_eq!(s.publish(&body).0, 413);
}

#[test]
fn missing_length_is_411() {
    let s = TestServer::start();
    let req = format!("POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&raw_http(s.internal, req.as_bytes())), 411);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_p", "u");
    let mut sock = TcpStream::connect(s.internal).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut all = Vec::new();
    for i in 0..3 {
        let body =
            format!(r#"{{"workspace_id":"ws_p","type":"job.updated","payload":{{"i":{i}}}}}"#);
        all.extend_from_slice(
            format!("POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        );
    }
    all.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // Pipelined in one write.
    sock.write_all(&all).unwrap();
    let mut resp = String::new();
    sock.read_to_string(&mut resp).unwrap();
    assert_eq!(resp.matches("HTTP/1.1 202 Accepted").count(), 3, "{resp}");
    assert!(resp.ends_with("ok\n"), "{resp}");
    for i in 0..3 {
        assert!(read_event(&mut ws).contains(&format!(r#"{{"i":{i}}}"#)));
    }
}

#[test]
fn internal_probes_and_metrics() {
    let s = TestServer::start();
    let _ws = s.subscribe("ws_m", "u");
    let get = |path: &str| {
        raw_http(
            s.internal,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(status_of(&get("/healthz")), 200);
    assert_eq!(status_of(&get("/readyz")), 200);
    assert_eq!(status_of(&get("/nope")), 404);
    assert_eq!(s.publish(OK_EVENT).0, 202);
    let metrics = get("/metrics");
    assert_eq!(status_of(&metrics), 200);
    assert!(
        metrics.contains("causeloop_events_published_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("causeloop_connections_subscribed_total 1\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("ws_m"),
        "metrics must not carry workspace ids"
    );
    // A publish to the subscriber's workspace is timed on the shard that holds it (once its loop
    // turn ends, which may be just after the 202); the one above reached no shard.
    let to_ws_m = r#"{"workspace_id":"ws_m","type":"issue.created","payload":{}}"#;
    assert_eq!(s.publish(to_ws_m).0, 202);
    let fanouts = || -> u64 {
        get("/metrics")
            .lines()
            .filter(|l| l.starts_with("causeloop_fanout_seconds_count{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(
        eventually(Duration::from_secs(5), || fanouts() == 1),
        "fan-out count {}",
        fanouts()
    );
    assert!(metrics.contains("# TYPE causeloop_loop_iteration_seconds histogram"));
    assert!(metrics.contains("process_open_fds "));
}

#[test]
fn closed_connections_are_counted_by_code() {
    let s = TestServer::start();
    let metric = |name: &str| -> u64 {
        let text = raw_http(
            s.internal,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut ws = s.subscribe("ws_c", "u");
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: 1000u16.into(),
        reason: "".into(),
    }))
    .unwrap();
    let _ = expect_close(&mut ws, false);
    finish_close(&mut ws);
    drop(ws);
    let mut refused = connect(&s.url("not-a-token", "ws_c"));
    assert_eq!(expect_close(&mut refused, true).0, 4401);
    finish_close(&mut refused);
    drop(refused);
    assert!(eventually(Duration::from_secs(5), || metric(
        "causeloop_connections_closed_total{code=\"1000\"}"
    ) == 1
        && metric("causeloop_connections_closed_total{code=\"4401\"}")
            == 1));
    assert_eq!(
        metric("causeloop_connections_closed_total{code=\"none\"}"),
        0
    );
    // A probe is not a WebSocket connection and is not counted.
    assert_eq!(
        status_of(&raw_http(s.public, b"GET /healthz HTTP/1.1\r\n\r\n")),
        200
    );
    assert!(metric("causeloop_queued_outbound_bytes{shard=\"0\"}") == 0);
}
