//! The public listener's HTTP edge: statuses, bounds, probes and the handshake timeout.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn get(s: &TestServer, req: &str) -> String {
    raw_http(s.public, req.as_bytes())
}

#[test]
fn edge_statuses_each_with_connection_close() {
    let s = TestServer::start();
    let cases = [
        ("GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        ("POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 426),
        ("GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ("\x16\x03\x01\x02\x00 not http\r\n\r\n", 400),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        ("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ];
    for (req, want) in cases {
        let resp = get(&s, req);
        assert_eq!(status_of(&resp), want, "{req:?} -> {resp}");
        assert!(resp.contains("Connection: close\r\n"), "{resp}");
    }
}

#[test]
fn oversized_head_is_431() {
    let s = TestServer::start();
    let req = format!(
        "GET /v1/stream?token={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(17_000)
    );
    let resp = get(&s, &req);
    assert_eq!(status_of(&resp), 431, "{resp}");
    // The response never echoes the request (and so never the token).
    assert!(!resp.contains("aaaa"));
    let mut many = String::from("GET /healthz HTTP/1.1\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status_of(&get(&s, &many)), 431);
}

#[test]
fn a_silent_socket_is_closed_at_the_handshake_timeout() {
    let s = TestServer::with(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut sock = TcpStream::connect(s.public).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"GET /v1/stream HTTP/1.1\r\nHost").unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = sock.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the socket");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Honest clients are still served.
    let mut ws = connect(&s.url(&token("w", "u", 60), "w"));
    assert!(read_text(&mut ws).contains("connected"));
}

#[test]
fn an_upgrade_dribbled_byte_by_byte_still_authenticates() {
    let s = TestServer::start();
    let mut sock = TcpStream::connect(s.public).unwrap();
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let req = format!(
        "GET /v1/stream?token={}&workspace=ws_drip HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("ws_drip", "u", 600)
    );
    for chunk in req.as_bytes().chunks(7) {
        sock.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains("\"connected\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}
