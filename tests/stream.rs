//! The stream's frames and WebSocket behaviour, through real sockets.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

#[test]
fn connected_frame_bytes_are_exact() {
    let s = TestServer::start();
    let mut ws = connect(&s.url(&token("ws_01abc123", "usr_01abc456", 600), "ws_01abc123"));
    let first = read_text(&mut ws);
    let ts = json(&first)["ts"].as_str().unwrap().to_string();
    assert_eq!(
        first,
        format!(
            r#"{{"type":"connected","payload":{{"workspace_id":"ws_01abc123","user_id":"usr_01abc456"}},"ts":"{ts}"}}"#
        )
    );
    // ts is UTC with milliseconds: YYYY-MM-DDTHH:MM:SS.mmmZ
    assert_eq!(ts.len(), 24);
    assert!(ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".");
}

#[test]
fn ids_are_json_escaped_in_connected() {
    let s = TestServer::start();
    let ws_id = r#"ws "quoted" \ x"#;
    let tok = causeloop_stream::auth::jwt::sign_hs256(
        SECRET,
        serde_json::json!({"sub": "usr\"é\\", "workspace_id": ws_id, "exp": now() + 60})
            .to_string()
            .as_bytes(),
    );
    let url = format!(
        "ws://{}/v1/stream?token={tok}&workspace={}",
        s.public, "ws%20%22quoted%22%20%5C%20x"
    );
    let mut ws = connect(&url);
    let v = json(&read_text(&mut ws));
    assert_eq!(v["payload"]["workspace_id"], ws_id);
    assert_eq!(v["payload"]["user_id"], "usr\"é\\");
}

#[test]
fn heartbeats_arrive_at_the_configured_cadence() {
    let s = TestServer::with(|c| c.heartbeat_interval = Duration::from_millis(200));
    let mut ws = s.subscribe("ws_hb", "usr_1");
    let start = Instant::now();
    let mut stamps = Vec::new();
    for _ in 0..5 {
        let t = read_text(&mut ws);
        assert_eq!(
            t,
            format!(
                r#"{{"type":"heartbeat","payload":{{"ok":true}},"ts":"{}"}}"#,
                json(&t)["ts"].as_str().unwrap()
            )
        );
        stamps.push(start.elapsed());
    }
    // Five heartbeats at 200 ms take about a second; far fewer or far more means a wrong cadence.
    let total = stamps[4];
    assert!(
        total >= Duration::from_millis(800),
        "5 heartbeats in {total:?}"
    );
    assert!(
        total < Duration::from_millis(3000),
        "5 heartbeats in {total:?}"
    );
}

#[test]
fn ping_gets_pong_with_the_same_payload() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_p", "u");
    ws.send(Message::Ping(b"are you there".to_vec())).unwrap();
    expect_pong(&mut ws, b"are you there");
}

#[test]
fn client_close_gets_the_closing_handshake() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_c", "u");
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: 1000u16.into(),
        reason: "bye".into(),
    }))
    .unwrap();
    let (code, _) = expect_close(&mut ws, false);
    assert_eq!(code, 1000);
    finish_close(&mut ws);
}

#[test]
fn client_data_frames_are_ignored_up_to_the_bound() {
    let s = TestServer::start();
    let mut ws = s.subscribe("ws_d", "u");
    ws.send(Message::Text("x".repeat(4096))).unwrap();
    ws.send(Message::Binary(vec![1u8; 100])).unwrap();
    // Still subscribed: an event arrives.
    let (status, _) =
        s.publish(r#"{"workspace_id":"ws_d","type":"issue.created","payload":{"n":1}}"#);
    assert_eq!(status, 202);
    assert!(read_event(&mut ws).contains(r#""n":1"#));
    // Over the bound: 1009.
    ws.send(Message::Text("x".repeat(4097))).unwrap();
    let (code, reason) = expect_close(&mut ws, false);
    assert_eq!(code, 1009);
    assert_eq!(reason, "message too big");
}

/// Writes a hand-made upgrade and returns the raw socket positioned after the 101 response
/// and the `connected` frame.
fn read_close_code(sock: &mut TcpStream) -> u16 {
    loop {
        let mut hdr = [0u8; 2];
        sock.read_exact(&mut hdr).unwrap();
        let mut len = (hdr[1] & 0x7f) as usize;
        if len == 126 {
            let mut l = [0u8; 2];
            sock.read_exact(&mut l).unwrap();
            len = u16::from_be_bytes(l) as usize;
        }
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).unwrap();
        if hdr[0] == 0x88 {
            return u16::from_be_bytes([body[0], body[1]]);
        }
    }
}

#[test]
fn unmasked_client_frame_is_a_protocol_error() {
    let s = TestServer::start();
    let mut sock = raw_subscribe(&s, "ws_raw");
    sock.write_all(&[0x89, 0x00]).unwrap(); // ping, no mask bit
    assert_eq!(read_close_code(&mut sock), 1002);
}

#[test]
fn unknown_opcode_and_reserved_bits_are_protocol_errors() {
    let s = TestServer::start();
    let mut sock = raw_subscribe(&s, "ws_raw2");
    sock.write_all(&[0x83, 0x80, 1, 2, 3, 4]).unwrap(); // opcode 3, masked, empty
    assert_eq!(read_close_code(&mut sock), 1002);
    let mut sock = raw_subscribe(&s, "ws_raw2");
    sock.write_all(&[0xC9, 0x80, 1, 2, 3, 4]).unwrap(); // ping with RSV1
    assert_eq!(read_close_code(&mut sock), 1002);
}

#[test]
fn fragmented_messages_count_against_the_bound() {
    let s = TestServer::start();
    let mut sock = raw_subscribe(&s, "ws_frag");
    let mask = [9u8, 8, 7, 6];
    let frame = |fin: bool, op: u8, len: usize| {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | op, 0x80 | 126];
        f.extend_from_slice(&(len as u16).to_be_bytes());
        f.extend_from_slice(&mask);
        f.extend(std::iter::repeat_n(0u8, len));
        f
    };
    sock.write_all(&frame(false, 0x1, 3000)).unwrap();
    sock.write_all(&frame(true, 0x0, 1200)).unwrap();
    assert_eq!(read_close_code(&mut sock), 1009);
}

#[test]
fn a_ping_flood_without_reading_is_bounded_as_a_slow_consumer() {
    let s = TestServer::with(|c| {
        c.max_outbound_bytes = 8 * 1024;
        c.max_event_bytes = 8 * 1024;
        // This test is about the outbound bound, not the frame-rate one.
        c.max_client_frames_per_sec = 1_000_000;
    });
    let mut sock = raw_subscribe(&s, "ws_flood");
    // Never read, and ping far more than the bound.
    let mask = [1u8, 2, 3, 4];
    let mut ping = vec![0x89, 0x80 | 125];
    ping.extend_from_slice(&mask);
    ping.extend(std::iter::repeat_n(0u8, 125));
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4000)
        .collect();
    // The server may close the socket while we are still writing; that is the point.
    let _ = sock.write_all(&burst);
    let _ = sock.write_all(&burst);
    // Everything the server queued is bounded; it ends with a 1008 close frame.
    assert_eq!(read_close_code(&mut sock), 1008);
}

#[test]
fn a_peer_that_resets_mid_write_or_half_closes_harms_no_one_else() {
    let s = TestServer::with(|c| {
        c.shards = 1;
        c.max_event_bytes = 256 << 10;
    });
    let mut bystander = s.subscribe("ws_fault2", "ok");
    // A peer that resets (SO_LINGER 0) while a large frame is on its way to it.
    let resetter = raw_subscribe(&s, "ws_fault2");
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200_000));
    let publisher = s.server().publisher();
    let v: serde_json::Value = serde_json::from_str(&big).unwrap();
    publisher.publish("ws_fault2", "job.updated", &v).unwrap();
    socket2::SockRef::from(&resetter)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(resetter);
    // A peer that half-closes: FIN without a close frame.
    let half = raw_subscribe(&s, "ws_fault2");
    half.shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..20 {
        publisher
            .publish("ws_fault2", "job.updated", &serde_json::json!({ "i": i }))
            .unwrap();
    }
    // The bystander on the same shard receives everything, in order.
    assert!(read_event(&mut bystander).contains("\"pad\""));
    for i in 0..20 {
        assert!(read_event(&mut bystander).contains(&format!("{{\"i\":{i}}}")));
    }
    // Both faulty sockets are gone from the server (counted as dropped, not open).
    let stats = &s.server().stats().shards[0];
    assert!(eventually(Duration::from_secs(5), || stats
        .open
        .load(std::sync::atomic::Ordering::Relaxed)
        == 1));
    drop(half);
}

/// Reads server frames from a raw socket until the close frame; returns (events, close code).
fn read_until_close(sock: &mut TcpStream) -> (usize, Option<u16>) {
    let mut events = 0;
    loop {
        let mut hdr = [0u8; 2];
        if sock.read_exact(&mut hdr).is_err() {
            return (events, None);
        }
        let len = match hdr[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                sock.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                sock.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut body = vec![0u8; len];
        if sock.read_exact(&mut body).is_err() {
            return (events, None);
        }
        match hdr[0] & 0x0f {
            0x8 => {
                return (
                    events,
                    body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                )
            }
            0x1 if body.starts_with(br#"{"type":"bulk""#) => events += 1,
            _ => {}
        }
    }
}

#[test]
fn a_client_close_waits_for_its_echo_to_flush_past_heartbeats() {
    // The echo of a client's close sits behind frames the client has not read yet; heartbeats
    // keep falling due meanwhile. The connection must wait out --close-timeout for the flush, not
    // end at the next heartbeat tick.
    let s = TestServer::with(|c| {
        c.heartbeat_interval = Duration::from_millis(50);
        c.socket_send_buffer = 16 * 1024;
    });
    let mut clock = s.subscribe("ws_clock", "u");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.public.into()).unwrap();
    let mut sock: TcpStream = sock.into();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let req = format!(
        "GET /v1/stream?token={}&workspace=ws_echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("ws_echo", "u", 600)
    );
    sock.write_all(req.as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        s.server()
            .stats()
            .shards
            .iter()
            .map(|st| st.open.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
            == 2
    }));
    // Far more than the kernel buffers hold, far less than --max-outbound-bytes.
    let publisher = s.server().publisher();
    let pad = "x".repeat(1000);
    for n in 0..300 {
        publisher
            .publish("ws_echo", "bulk", &serde_json::json!({"n": n, "pad": pad}))
            .unwrap();
    }
    // Every event is queued on the connection (the shard has handed each batch to its outbox).
    assert!(eventually(WAIT, || fanouts(&s) == 300));
    // Masked close 1000 from the client, then several heartbeat intervals before reading, as
    // another connection's heartbeats count them.
    sock.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .unwrap();
    for _ in 0..10 {
        assert!(read_text(&mut clock).contains("heartbeat"));
    }
    // Skip the response head, then every frame up to the echo.
    let mut b = [0u8; 1];
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        sock.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let (events, code) = read_until_close(&mut sock);
    assert_eq!(
        code,
        Some(1000),
        "the connection ended without its echo after {events} events"
    );
    assert_eq!(events, 300);
}

/// Event batches the shards have handed to their connections' queues.
fn fanouts(s: &TestServer) -> u64 {
    s.server()
        .stats()
        .shards
        .iter()
        .map(|st| st.fanout.count())
        .sum()
}
