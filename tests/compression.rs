//! `permessage-deflate` (RFC 7692) end to end, through real sockets with a raw client that
//! checks the bytes: the answer header, RSV1 on large event frames and not on heartbeats or small
//! events, the same compressed bytes on every connection, and that inflating them gives exactly
//! the frame a client without compression receives. A client that offers nothing, or a server
//! with `--compression off`, gets exactly the uncompressed bytes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A raw WebSocket client: the upgrade with `extensions` offered, then server frames as read.
struct Raw {
    sock: TcpStream,
    head: String,
}

/// A server frame: its first byte (FIN, RSV, opcode) and payload.
struct Frame {
    b0: u8,
    payload: Vec<u8>,
}

impl Raw {
    fn open(s: &TestServer, workspace: &str, extensions: Option<&str>) -> Raw {
        let sock = TcpStream::connect(s.public).unwrap();
        let t = token(workspace, "u", 600);
        Raw::open_on(sock, &t, workspace, extensions)
    }

    fn open_on(mut sock: TcpStream, token: &str, workspace: &str, extensions: Option<&str>) -> Raw {
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let offer = extensions.map_or(String::new(), |e| {
            format!("Sec-WebSocket-Extensions: {e}\r\n")
        });
        let head = raw_upgrade(&mut sock, token, workspace, &offer);
        let mut raw = Raw { sock, head };
        let connected = raw.frame();
        assert_eq!(connected.b0, 0x81, "connected is plain");
        assert!(connected.payload.starts_with(br#"{"type":"connected""#));
        raw
    }

    fn frame(&mut self) -> Frame {
        self.try_frame().expect("a frame")
    }

    /// The next frame, or `None` if the connection ended first.
    fn try_frame(&mut self) -> Option<Frame> {
        let mut hdr = [0u8; 2];
        self.sock.read_exact(&mut hdr).ok()?;
        let len = match hdr[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.sock.read_exact(&mut l).ok()?;
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.sock.read_exact(&mut l).ok()?;
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.sock.read_exact(&mut payload).ok()?;
        Some(Frame {
            b0: hdr[0],
            payload,
        })
    }

    /// The next frame that is not a heartbeat (heartbeats are checked to be plain).
    fn event(&mut self) -> Frame {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no event");
            let f = self.frame();
            if f.b0 == 0x81 && f.payload.starts_with(br#"{"type":"heartbeat""#) {
                continue;
            }
            if f.b0 & 0x0f == 0x9 {
                continue; // a ping
            }
            return f;
        }
    }
}

/// What any RFC 7692 client does with a compressed message.
fn inflate(body: &[u8]) -> Vec<u8> {
    let mut d = flate2::Decompress::new(false);
    let mut input = body.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .unwrap();
    out
}

fn server(compression: bool) -> TestServer {
    TestServer::with(move |c| {
        c.compression = compression;
        c.heartbeat_interval = Duration::from_millis(100);
    })
}

/// An event whose frame is well over `--compression-min-bytes` and compresses well.
fn big_event(ws: &str) -> String {
    let text = "the checkout page fails on Safari when the cart holds a gift card; ".repeat(12);
    format!(
        r#"{{"workspace_id":"{ws}","type":"issue.created","payload":{{"id":"iss_1","text":"{text}"}}}}"#
    )
}

#[test]
fn an_event_is_compressed_once_for_every_subscriber_that_offered_it() {
    let s = server(true);
    let mut a = Raw::open(
        &s,
        "ws_z",
        Some("permessage-deflate; client_max_window_bits"),
    );
    let mut b = Raw::open(&s, "ws_z", Some("permessage-deflate"));
    let mut plain = Raw::open(&s, "ws_z", None);
    assert!(a
        .head
        .contains("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"));
    assert!(
        !plain.head.contains("Sec-WebSocket-Extensions"),
        "{}",
        plain.head
    );
    let (status, body) = s.publish(&big_event("ws_z"));
    assert_eq!(status, 202, "{body}");
    let (fa, fb, fp) = (a.event(), b.event(), plain.event());
    assert_eq!(fa.b0, 0x80 | 0x40 | 0x1, "FIN, RSV1, text");
    assert_eq!(fp.b0, 0x81);
    assert_eq!(
        fa.payload, fb.payload,
        "the same compressed bytes on every connection"
    );
    assert!(
        fa.payload.len() < fp.payload.len() / 2,
        "{} vs {}",
        fa.payload.len(),
        fp.payload.len()
    );
    assert_eq!(
        inflate(&fa.payload),
        fp.payload,
        "inflates to exactly the plain frame"
    );
    // A small event stays plain for everyone; heartbeats are plain (checked by `event`).
    let (status, _) = s.publish(r#"{"workspace_id":"ws_z","type":"tiny","payload":{}}"#);
    assert_eq!(status, 202);
    let small = a.event();
    assert_eq!(small.b0, 0x81);
    assert!(small.payload.starts_with(br#"{"type":"tiny""#));
    // A client's compressed message (RSV1 on its first frame) is accepted, not a protocol
    // error: the connection goes on.
    let mut frame = vec![0x80 | 0x40 | 0x1, 0x80 | 5, 1, 2, 3, 4];
    frame.extend([0x4a ^ 1, 0xcd ^ 2, 0xc9 ^ 3, 0xc9 ^ 4, 0x07 ^ 1]);
    a.sock.write_all(&frame).unwrap();
    let (status, _) = s.publish(&big_event("ws_z"));
    assert_eq!(status, 202);
    assert_eq!(a.event().b0, 0xc1);
    let text = std::str::from_utf8(&body_of_metrics(&s))
        .unwrap()
        .to_string();
    assert!(
        metric_at_least(&text, "causeloop_compressed_frames_total ", 3),
        "{text}"
    );
    assert!(metric_at_least(
        &text,
        "causeloop_compression_bytes_total{stage=\"before\"} ",
        1
    ));
}

#[test]
fn without_an_offer_or_with_compression_off_the_bytes_are_the_plain_ones() {
    let s = server(false);
    let mut a = Raw::open(&s, "ws_off", Some("permessage-deflate"));
    assert!(!a.head.contains("Sec-WebSocket-Extensions"), "{}", a.head);
    let (status, _) = s.publish(&big_event("ws_off"));
    assert_eq!(status, 202);
    let f = a.event();
    assert_eq!(f.b0, 0x81);
    // A client that did not negotiate it may not send RSV1: a protocol error, as before.
    let frame = [0x80 | 0x40 | 0x1, 0x80, 1, 2, 3, 4];
    a.sock.write_all(&frame).unwrap();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT);
        let f = a.frame();
        if f.b0 == 0x88 {
            assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1002);
            break;
        }
    }
}

fn body_of_metrics(s: &TestServer) -> Vec<u8> {
    let response = raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    response.into_bytes()
}

fn metric_at_least(text: &str, line_start: &str, n: u64) -> bool {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|v| v >= n)
}

/// The `n` of a numbered event frame, plain or compressed.
fn number(f: &Frame) -> Option<u64> {
    let text = if f.b0 & 0x40 != 0 {
        inflate(&f.payload)
    } else {
        f.payload.clone()
    };
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    (v["type"] == "test.seq")
        .then(|| v["payload"]["n"].as_u64())
        .flatten()
}

#[test]
fn a_compressed_slow_consumer_closed_1008_is_resumed_with_nothing_lost() {
    let s = TestServer::with(|c| {
        // This client answers no acknowledgement ping: its record is where it started, and the
        // history must reach back that far.
        c.history_size = 100_000;
        c.max_outbound_bytes = 16 << 10;
        c.max_event_bytes = 4096;
        c.socket_send_buffer = 4096;
    });
    let token = token("ws_slowz", "u_slow", 3600);
    // A small receive buffer, so that a client that stops reading backs the server up soon.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.public.into()).unwrap();
    let mut a = Raw::open_on(sock.into(), &token, "ws_slowz", Some("permessage-deflate"));
    // Events large enough to be sent compressed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (stop, p) = (stop.clone(), s.server().publisher());
        std::thread::spawn(move || {
            let pad = "the same words again and again ".repeat(10);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.publish(
                    "ws_slowz",
                    "test.seq",
                    &serde_json::json!({ "n": n, "pad": pad }),
                )
                .unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            n
        })
    };
    let mut before = Vec::new();
    let mut compressed = 0;
    while before.len() < 100 {
        let f = a.event();
        compressed += usize::from(f.b0 & 0x40 != 0);
        before.extend(number(&f));
    }
    assert!(compressed > 50, "only {compressed} compressed");
    // Stop reading until the server has given up on it, then read what it had queued.
    assert!(eventually(WAIT, || process_metric(
        &s,
        "causeloop_closes_sent_total{code=\"1008\""
    ) > 0));
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "no close");
        // (The server shuts a slow consumer without waiting for its answer: the socket may end
        // before the close frame is read.)
        let Some(f) = a.try_frame() else { break };
        if f.b0 == 0x88 {
            assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1008);
            // Answer the close, as a browser does.
            let _ = a.sock.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xf0]);
            break;
        }
        before.extend(number(&f));
    }
    // Then come back with the same token.
    drop(a);
    let mut b = connect(&s.url(&token, "ws_slowz"));
    assert!(read_text(&mut b).starts_with(r#"{"type":"connected""#));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = publisher.join().unwrap();
    let mut after = Vec::new();
    while after.last().map_or(true, |&n| n + 1 < total) {
        let t = read_event(&mut b);
        let v = json(&t);
        assert_ne!(v["type"], "stream.gap", "{t}");
        after.push(v["payload"]["n"].as_u64().unwrap());
    }
    // Nothing lost: what came after starts at or before where what came before ends, and both
    // are in order without holes. (Repeats are allowed: the record came from an
    // acknowledgement, since compressed frames cannot be placed in the history by identity.)
    let first_after = after[0];
    assert!(
        first_after <= before.last().unwrap() + 1,
        "lost {}..{first_after}",
        before.last().unwrap() + 1
    );
    for w in before.windows(2).chain(after.windows(2)) {
        assert_eq!(w[1], w[0] + 1, "in order, no hole");
    }
}

fn process_metric(s: &TestServer, line_start: &str) -> u64 {
    common::process::metric(s.internal, line_start).unwrap_or(0)
}

#[test]
fn a_resumed_connection_is_replayed_the_same_compressed_bytes() {
    let s = server(true);
    let offer = Some("permessage-deflate");
    let token = token("ws_rz", "u_x", 600);
    let mut x = Raw::open_on(
        TcpStream::connect(s.public).unwrap(),
        &token,
        "ws_rz",
        offer,
    );
    let mut y = Raw::open(&s, "ws_rz", offer);
    let (status, _) = s.publish(&big_event("ws_rz"));
    assert_eq!(status, 202);
    let c1 = y.event();
    assert_eq!(c1.b0, 0xc1);
    assert_eq!(x.event().payload, c1.payload);
    // X closes (masked close frame, code 1000) and reads the answer to the end.
    x.sock
        .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
        .unwrap();
    while x.try_frame().is_some() {}
    let (status, _) = s.publish(&big_event("ws_rz").replace("iss_1", "iss_2"));
    assert_eq!(status, 202);
    let c2 = y.event();
    assert_eq!(c2.b0, 0xc1);
    // Back with the same token: both replayed (its record is where it started, as it
    // acknowledged nothing), as the very bytes the live subscribers were sent.
    let mut again = Raw::open_on(
        TcpStream::connect(s.public).unwrap(),
        &token,
        "ws_rz",
        offer,
    );
    let r1 = again.event();
    let r2 = again.event();
    assert_eq!((r1.b0, r2.b0), (0xc1, 0xc1));
    assert_eq!(r1.payload, c1.payload);
    assert_eq!(r2.payload, c2.payload);
    assert!(String::from_utf8(inflate(&r2.payload))
        .unwrap()
        .contains("iss_2"));
}

/// A masked client frame with first byte `b0` (FIN, RSV1, opcode).
fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc4, 0x7e];
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// A message compressed as a browser would (raw DEFLATE, sync flush, its tail removed).
fn deflated(text: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(text.len() + 1024);
    c.compress_vec(text, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    out.truncate(out.len() - 4);
    out
}

impl Raw {
    /// Reads until the server's close frame; its code.
    fn close_code(&mut self) -> u16 {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no close frame");
            let f = self.try_frame().expect("a close frame before the end");
            if f.b0 & 0x0f == 0x8 {
                return u16::from_be_bytes([f.payload[0], f.payload[1]]);
            }
        }
    }

    /// Pings with `payload` and reads until its pong: the connection is alive and has read
    /// everything sent before.
    fn ping_pong(&mut self, payload: &[u8]) {
        self.sock.write_all(&client_frame(0x89, payload)).unwrap();
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no pong");
            let f = self
                .try_frame()
                .expect("the connection ended instead of a pong");
            assert_ne!(f.b0 & 0x0f, 0x8, "closed: {:?}", f.payload);
            if f.b0 & 0x0f == 0xA && f.payload == payload {
                return;
            }
        }
    }
}

#[test]
fn compressed_client_messages_are_inflated_within_the_bound() {
    // --max-client-message-bytes (4 KiB by default) bounds what a message inflates to, not only
    // what it weighs compressed.
    let s = server(true);
    let offer = Some("permessage-deflate; client_max_window_bits");
    let text: Vec<u8> = b"a message a client may send, compressed. "
        .iter()
        .cycle()
        .take(3000)
        .copied()
        .collect();

    // Within the bound, whole and in two fragments, and with context takeover across them.
    let mut ok = Raw::open(&s, "ws_in", offer);
    let body = deflated(&text);
    ok.sock.write_all(&client_frame(0xC1, &body)).unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    ok.sock.write_all(&client_frame(0x41, a)).unwrap();
    ok.sock.write_all(&client_frame(0x80, b)).unwrap();
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    for _ in 0..3 {
        let mut m = Vec::with_capacity(4096);
        c.compress_vec(&text, &mut m, flate2::FlushCompress::Sync)
            .unwrap();
        m.truncate(m.len() - 4);
        ok.sock.write_all(&client_frame(0xC1, &m)).unwrap();
    }
    ok.ping_pong(b"still open");

    // A bomb: a few hundred bytes that inflate to a megabyte. Refused 1009 at the bound.
    let mut bomb = Raw::open(&s, "ws_in", offer);
    let zeros = deflated(&vec![0u8; 1 << 20]);
    assert!(zeros.len() < 4096, "{}", zeros.len());
    bomb.sock.write_all(&client_frame(0xC2, &zeros)).unwrap();
    assert_eq!(bomb.close_code(), 1009);

    // Not DEFLATE at all: 1007.
    let mut junk = Raw::open(&s, "ws_in", offer);
    junk.sock
        .write_all(&client_frame(0xC1, &[0xff, 0xff, 0xff, 0x00, 0x12, 0x34]))
        .unwrap();
    assert_eq!(junk.close_code(), 1007);

    // RSV1 without the extension negotiated is a protocol error: 1002.
    let mut plain = Raw::open(&s, "ws_in", None);
    plain.sock.write_all(&client_frame(0xC1, &body)).unwrap();
    assert_eq!(plain.close_code(), 1002);
}
