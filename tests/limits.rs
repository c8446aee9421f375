//! Every input bound is a flag, and each one is enforced where the docs say, with the documented
//! answer, at exactly the configured value: one below the bound passes, one above is refused.
//! All through real sockets (raw HTTP, tungstenite clients) against a server started here.

mod common;

use causeloop_stream::auth::jwt;
use causeloop_stream::server::Server;
use common::*;
use std::io::Write;
use std::time::Duration;
use tungstenite::Message;

/// A request head with `n` header fields in all (Host included).
fn head_with_headers(path: &str, n: usize) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for i in 1..n {
        req.push_str(&format!("X-Extra-{i}: 1\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

#[test]
fn header_count_follows_the_flag_on_both_listeners() {
    let s = TestServer::with(|c| c.max_request_headers = 8);
    // Connection: close is one more field: 7 + 1 = 8 fields is the limit.
    for addr in [s.public, s.internal] {
        let ok = raw_http(addr, head_with_headers("/healthz", 7).as_bytes());
        assert_eq!(status_of(&ok), 200, "{ok}");
        let over = raw_http(addr, head_with_headers("/healthz", 8).as_bytes());
        assert_eq!(status_of(&over), 431, "{over}");
    }
}

/// A payload of one string of `n` bytes: the event text is 63 + n bytes (see below).
fn event_with(ws: &str, n: usize) -> String {
    format!(
        r#"{{"workspace_id":"{ws}","type":"a","payload":{{"p":"{}"}}}}"#,
        "x".repeat(n)
    )
}

#[test]
fn event_size_is_bounded_at_the_flag_all_or_nothing() {
    let s = TestServer::with(|c| c.max_event_bytes = 1024);
    let mut sub = s.subscribe("ws_size", "u1");
    // `{"type":"a","payload":{"p":"…"},"ts":"YYYY-MM-DDTHH:MM:SS.mmmZ"}` is 63 + n bytes, and a
    // text of 126 to 65535 bytes has a 4-byte frame header: n = 957 makes exactly 1024.
    let (status, body) = s.publish(&format!(
        "[{},{}]",
        event_with("ws_size", 10),
        event_with("ws_size", 958)
    ));
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("item 1: event is 1025 bytes encoded, over the limit of 1024 bytes"),
        "{body}"
    );
    let (status, body) = s.publish(&event_with("ws_size", 957));
    assert_eq!(status, 202, "{body}");
    // The refused batch's first (small) event never went out: the next frame is the 1024-byte one.
    let got = read_event(&mut sub);
    assert_eq!(got.len() + 4, 1024, "{got}");

    // The library handle applies the same bound.
    let p = s.server().publisher();
    let err = p
        .publish("ws_size", "a", &serde_json::json!({ "p": "x".repeat(958) }))
        .unwrap_err();
    assert!(err.to_string().contains("--max-event-bytes"), "{err}");
    assert!(p
        .publish("ws_size", "a", &serde_json::json!({ "p": "x".repeat(957) }))
        .is_ok());
}

#[test]
fn an_event_limit_above_the_outbound_limit_is_refused_at_start() {
    let mut c = config();
    c.max_outbound_bytes = 64 << 10;
    c.max_event_bytes = (64 << 10) + 1;
    let err = Server::start(c).err().expect("must refuse");
    assert!(err.to_string().contains("--max-event-bytes"), "{err}");
}

fn nested(depth: usize) -> String {
    // depth counts the payload object itself.
    let mut inner = String::from("1");
    for _ in 1..depth {
        inner = format!("[{inner}]");
    }
    format!(r#"{{"workspace_id":"ws_d","type":"a","payload":{{"x":{inner}}}}}"#)
}

#[test]
fn payload_depth_follows_the_flag() {
    let s = TestServer::with(|c| c.max_json_depth = 4);
    let (status, body) = s.publish(&nested(4));
    assert_eq!(status, 202, "{body}");
    let (status, body) = s.publish(&nested(5));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("payload nested deeper than 4 levels"),
        "{body}"
    );
    let (status, body) = s.publish(&format!("[{},{}]", nested(1), nested(5)));
    assert_eq!(status, 400, "{body}");
}

#[test]
fn id_length_follows_the_flag_in_publishes_and_tokens() {
    let s = TestServer::with(|c| c.max_id_bytes = 8);
    let (status, body) = s.publish(r#"{"workspace_id":"ws_12345","type":"a","payload":{}}"#);
    assert_eq!(status, 202, "{body}");
    let (status, body) = s.publish(r#"{"workspace_id":"ws_123456","type":"a","payload":{}}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("workspace_id must be 1 to 8 bytes"), "{body}");
    let (status, body) =
        s.publish(r#"{"workspace_id":"ws_1","user_id":"user_5678","type":"a","payload":{}}"#);
    assert_eq!(status, 400, "{body}");

    // The same rule for the ids a token carries: 8 bytes subscribe, 9 are refused 4401.
    let mut ok = connect(&s.url(&token("ws_12345", "u_345678", 60), "ws_12345"));
    assert!(read_text(&mut ok).starts_with(r#"{"type":"connected""#));
    let mut long_ws = connect(&s.url(&token("ws_123456", "u1", 60), "ws_123456"));
    assert_eq!(
        expect_close(&mut long_ws, true),
        (4401, "invalid token".into())
    );
    let mut long_sub = connect(&s.url(&token("ws_1", "u_3456789", 60), "ws_1"));
    assert_eq!(
        expect_close(&mut long_sub, true),
        (4401, "invalid token".into())
    );
    // A control character in a signed claim is refused as well.
    let bell = jwt::sign_hs256(
        SECRET,
        format!(
            r#"{{"sub":"u\u0007","workspace_id":"ws_1","exp":{}}}"#,
            now() + 60
        )
        .as_bytes(),
    );
    let mut bad = connect(&s.url(&bell, "ws_1"));
    assert_eq!(expect_close(&mut bad, true), (4401, "invalid token".into()));
}

#[test]
fn client_frames_past_the_rate_are_closed_1008() {
    // 10 a second over a 1-second heartbeat interval: 10 frames between heartbeats.
    let s = TestServer::with(|c| {
        c.max_client_frames_per_sec = 10;
        c.heartbeat_interval = Duration::from_secs(1);
    });
    let mut ws = s.subscribe("ws_rate", "u1");
    // Within the allowance, twice over, with a heartbeat (which resets the count) in between:
    // every ping is answered and the connection stays up.
    for round in 0..2 {
        for _ in 0..5 {
            ws.send(Message::Ping(b"p".to_vec())).unwrap();
        }
        let mut pongs = 0;
        let mut heartbeat = false;
        while pongs < 5 || !heartbeat {
            match ws.read().expect("still open") {
                Message::Pong(_) => pongs += 1,
                Message::Text(t) if t.starts_with(r#"{"type":"heartbeat""#) => heartbeat = true,
                other => panic!("round {round}: unexpected {other:?}"),
            }
        }
    }
    // Then a burst well past it in one write: closed 1008, and not every ping is answered.
    let mut burst = Vec::new();
    for _ in 0..40 {
        burst.extend_from_slice(&[0x89, 0x80, 1, 2, 3, 4]); // masked ping, empty payload
    }
    ws.get_mut().write_all(&burst).unwrap();
    let mut pongs = 0;
    let start = std::time::Instant::now();
    let close = loop {
        assert!(start.elapsed() < WAIT, "no close frame within {WAIT:?}");
        match ws.read() {
            Ok(Message::Pong(_)) => pongs += 1,
            Ok(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
            Ok(_) => {}
            Err(e) => panic!("ended without a close frame: {e}"),
        }
    };
    assert_eq!(close, (1008, "too many frames".into()));
    assert!(pongs <= 10, "{pongs} pongs answered past the allowance");
}

#[test]
fn a_key_file_over_the_flag_is_refused_with_its_name() {
    let dir = std::env::temp_dir().join(format!("causeloop-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.jwks");
    let keys: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"kty":"oct","kid":"k{i}","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQ"}}"#))
        .collect();
    std::fs::write(&path, format!(r#"{{"keys":[{}]}}"#, keys.join(","))).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 1024);

    let mut c = config();
    c.jwt.jwks_file = Some(path.clone());
    c.jwt.max_key_file_bytes = 1024;
    let err = Server::start(c).err().expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("big.jwks") && msg.contains("--max-key-file-bytes"),
        "{msg}"
    );

    let mut c = config();
    c.jwt.jwks_file = Some(path);
    c.jwt.max_key_file_bytes = size;
    assert!(Server::start(c).is_ok(), "a file at the limit is read");
    std::fs::remove_dir_all(&dir).ok();
}
