//! `causeloop-loadtest floor-server`: the bare-send floor.
//!
//! A stand-in server that speaks just enough of the contract for the load tester (the upgrade,
//! a `connected` frame, `POST /v1/publish`) and then does nothing but the unavoidable: for each
//! published event it builds the frame once and calls `send()` once per subscriber socket, one
//! frame per call, with no queues, timers, authentication or accounting. Its CPU per delivered
//! frame, measured by the same `fanout` run with `--server-pid`, is the floor that the real
//! server's CPU per frame is compared with.
//!
//! A subscriber whose socket would block loses that frame (counted on stderr at exit): the floor
//! is for runs where every reader keeps up.

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

const PUBLIC: Token = Token(usize::MAX - 1);
const INTERNAL: Token = Token(usize::MAX - 2);

enum Kind {
    /// A stream client before and after the upgrade.
    Stream { upgraded: bool },
    /// A publisher connection.
    Publish,
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    buf: Vec<u8>,
}

fn accept_key(key: &str) -> String {
    use base64::Engine;
    let mut input = key.as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(payload.len() as u8);
    } else if payload.len() <= 0xffff {
        f.push(126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

/// Runs the floor server until killed.
pub fn run(public: SocketAddr, internal: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut pl = TcpListener::bind(public)?;
    let mut il = TcpListener::bind(internal)?;
    poll.registry()
        .register(&mut pl, PUBLIC, Interest::READABLE)?;
    poll.registry()
        .register(&mut il, INTERNAL, Interest::READABLE)?;
    println!("listening public={}", pl.local_addr()?);
    println!("listening internal={}", il.local_addr()?);
    io::stdout().flush()?;
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut subscribers: HashMap<String, Vec<usize>> = HashMap::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let mut dropped: u64 = 0;
    loop {
        poll.poll(&mut events, None)?;
        for ev in events.iter() {
            match ev.token() {
                t @ (PUBLIC | INTERNAL) => loop {
                    let l = if t == PUBLIC { &pl } else { &il };
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nodelay(true);
                            let e = conns.vacant_entry();
                            poll.registry()
                                .register(&mut s, Token(e.key()), Interest::READABLE)?;
                            let kind = if t == PUBLIC {
                                Kind::Stream { upgraded: false }
                            } else {
                                Kind::Publish
                            };
                            e.insert(Conn {
                                stream: s,
                                kind,
                                buf: Vec::new(),
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                },
                Token(k) => {
                    let mut closed = false;
                    while let Some(c) = conns.get_mut(k) {
                        match c.stream.read(&mut scratch) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(n) => {
                                if !matches!(c.kind, Kind::Stream { upgraded: true }) {
                                    c.buf.extend_from_slice(&scratch[..n]);
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if closed {
                        if let Some(mut c) = conns.try_remove(k) {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                        for subs in subscribers.values_mut() {
                            subs.retain(|&s| s != k);
                        }
                        continue;
                    }
                    let Some(c) = conns.get_mut(k) else { continue };
                    match c.kind {
                        Kind::Stream { upgraded: false } => {
                            let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                                continue;
                            };
                            let head = String::from_utf8_lossy(&c.buf[..end]).into_owned();
                            let ws = head
                                .split(['?', '&', ' '])
                                .find_map(|p| p.strip_prefix("workspace="))
                                .unwrap_or("")
                                .to_string();
                            let key = head
                                .lines()
                                .find_map(|l| {
                                    l.strip_prefix("Sec-WebSocket-Key: ")
                                        .or_else(|| l.strip_prefix("sec-websocket-key: "))
                                })
                                .unwrap_or("")
                                .trim()
                                .to_string();
                            let mut resp = format!(
                                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                                accept_key(&key)
                            )
                            .into_bytes();
                            resp.extend(text_frame(
                                format!(r#"{{"type":"connected","payload":{{"workspace_id":"{ws}","user_id":"floor"}},"ts":"1970-01-01T00:00:00.000Z"}}"#)
                                    .as_bytes(),
                            ));
                            let _ = c.stream.write(&resp);
                            c.kind = Kind::Stream { upgraded: true };
                            c.buf = Vec::new();
                            subscribers.entry(ws).or_default().push(k);
                        }
                        Kind::Stream { upgraded: true } => {}
                        Kind::Publish => loop {
                            let c = &mut conns[k];
                            let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                                break;
                            };
                            let head = String::from_utf8_lossy(&c.buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if c.buf.len() < end + 4 + len {
                                break;
                            }
                            let body: Vec<u8> = c.buf[end + 4..end + 4 + len].to_vec();
                            c.buf.drain(..end + 4 + len);
                            let items: Vec<serde_json::Value> = match serde_json::from_slice(&body)
                            {
                                Ok(serde_json::Value::Array(a)) => a,
                                Ok(v) => vec![v],
                                Err(_) => Vec::new(),
                            };
                            for item in &items {
                                let ws = item["workspace_id"].as_str().unwrap_or("");
                                let frame = text_frame(
                                    format!(r#"{{"type":{},"payload":{},"ts":"1970-01-01T00:00:00.000Z"}}"#, item["type"], item["payload"]).as_bytes(),
                                );
                                for &s in subscribers.get(ws).map(|v| &v[..]).unwrap_or(&[]) {
                                    if let Some(sub) = conns.get_mut(s) {
                                        match sub.stream.write(&frame) {
                                            Ok(n) if n == frame.len() => {}
                                            _ => dropped += 1,
                                        }
                                    }
                                }
                            }
                            let body = format!("{{\"accepted\":{}}}", items.len());
                            let resp = format!(
                                "HTTP/1.1 202 Accepted\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = conns[k].stream.write(resp.as_bytes());
                            if dropped > 0 && dropped.is_power_of_two() {
                                eprintln!(
                                    "floor-server: {dropped} frame(s) dropped on full sockets"
                                );
                            }
                        },
                    }
                }
            }
        }
    }
}
