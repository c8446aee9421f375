//! Slowloris: 2,000 sockets that dribble a request head one byte at a time are all closed at
//! `--handshake-timeout` (a deadline from accept, which trickling bytes do not push back), and
//! honest clients connecting meanwhile subscribe as usual.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DRIBBLERS: usize = 2000;

#[test]
fn two_thousand_dribbling_sockets_are_closed_on_time_and_honest_clients_get_through() {
    let s = TestServer::with(|c| c.handshake_timeout = Duration::from_secs(1));
    let head = b"GET /v1/stream?token=x&workspace=w HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let started = Instant::now();
    let mut socks: Vec<TcpStream> = (0..DRIBBLERS)
        .map(|_| {
            let sock = TcpStream::connect(s.public).unwrap();
            sock.set_nonblocking(true).unwrap();
            sock
        })
        .collect();
    let opened = started.elapsed();

    // The dribble: one more byte on every open socket every 100 ms; a socket is done once the
    // server has closed it (EOF or reset on read, or a failed write). The period is the
    // attacker's cadence; it is paced by a stop channel, which also ends the dribbler at once.
    let (stop, stopped) = mpsc::channel::<()>();
    let (report, closed) = mpsc::channel::<Vec<Option<Duration>>>();
    std::thread::spawn(move || {
        let mut closed_at: Vec<Option<Duration>> = vec![None; socks.len()];
        let mut i = 0usize;
        while closed_at.iter().any(Option::is_none) {
            for (k, sock) in socks.iter_mut().enumerate() {
                if closed_at[k].is_some() {
                    continue;
                }
                let mut b = [0u8; 64];
                let gone = match sock.read(&mut b) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => true,
                };
                let gone = gone || sock.write(&[head[i % head.len()]]).is_err();
                if gone {
                    closed_at[k] = Some(started.elapsed());
                }
            }
            i += 1;
            match stopped.recv_timeout(Duration::from_millis(100)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        }
        let _ = report.send(closed_at);
    });

    // Honest clients while the dribblers hold their sockets.
    let mut honest = Vec::new();
    for i in 0..20 {
        let url = s.url(&token("ws_honest", &format!("u{i}"), 60), "ws_honest");
        let mut ws = try_connect_within(&url, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("honest client {i} was not served: {e}"));
        assert!(read_text(&mut ws).contains(r#""type":"connected""#));
        honest.push(ws);
    }
    let (status, body) = s.publish(r#"{"workspace_id":"ws_honest","type":"a","payload":{}}"#);
    assert_eq!(status, 202, "{body}");
    for ws in honest.iter_mut() {
        assert!(read_event(ws).contains(r#""type":"a""#));
    }

    // Every dribbler is gone within the timeout plus the time it took to open them all, the
    // 100 ms dribble period and a second of slack for a loaded machine.
    let limit = Duration::from_secs(1) + opened + Duration::from_secs(3);
    // The dribbler reports once every socket is closed; past the deadline it is stopped and
    // reports what it saw.
    let closed_at = match closed.recv_timeout(limit + Duration::from_secs(5)) {
        Ok(c) => c,
        Err(_) => {
            let _ = stop.send(());
            closed
                .recv_timeout(WAIT)
                .expect("the dribbler reports when stopped")
        }
    };
    let open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{open} dribbling sockets were still open");
    let latest = closed_at.iter().flatten().max().copied().unwrap();
    assert!(
        latest <= limit,
        "the last dribbler closed after {latest:?} (limit {limit:?})"
    );
    let earliest = closed_at.iter().flatten().min().copied().unwrap();
    assert!(
        earliest >= Duration::from_millis(900),
        "a dribbler was closed after {earliest:?}, before its handshake timeout"
    );
}
