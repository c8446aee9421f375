//! Floods: publishing far faster than clients read, and faster than a shard can deliver.
//!
//! - A full shard inbox makes publishers wait (counted in `causeloop_publish_inbox_waits_total`);
//!   nothing is dropped, and every reading subscriber gets every event in publish order.
//! - A publisher flood against the binary keeps its RSS under the bound docs/operations.md
//!   ("Sizing notes") states from the flags, readers that keep up lose nothing, and every stalled reader is closed 1008.
//! - A publish flood to 10,000 workspaces keeps the history inside `--history-max-bytes` and
//!   the process inside the same bound.

mod common;

use common::process::*;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reads events until `want` of them arrived; checks each publisher's sequence is gap-free and
/// in order. Returns how many arrived.
fn read_sequences(ws: &mut Ws, publishers: usize, want: usize) -> usize {
    let mut next = vec![0u64; publishers];
    let mut got = 0;
    while got < want {
        let v = json(&read_event(ws));
        let p = v["payload"]["p"].as_u64().unwrap() as usize;
        let n = v["payload"]["n"].as_u64().unwrap();
        assert_eq!(n, next[p], "publisher {p}: expected {} got {n}", next[p]);
        next[p] += 1;
        got += 1;
    }
    got
}

#[test]
fn a_full_shard_inbox_slows_publishers_and_loses_nothing() {
    const PUBLISHERS: usize = 4;
    const EACH: u64 = 500;
    let s = TestServer::with(|c| {
        c.shards = 1;
        c.shard_inbox = 2;
    });
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let mut ws = s.subscribe("ws_inbox", &format!("u{i}"));
            std::thread::spawn(move || {
                read_sequences(&mut ws, PUBLISHERS, PUBLISHERS * EACH as usize)
            })
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let handle = s.server().publisher();
            std::thread::spawn(move || {
                for n in 0..EACH {
                    handle
                        .publish("ws_inbox", "seq.step", &serde_json::json!({"p": p, "n": n}))
                        .expect("a full inbox waits, it does not refuse");
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), PUBLISHERS * EACH as usize);
    }
    let waits: u64 = s
        .server()
        .stats()
        .shards
        .iter()
        .map(|st| st.inbox_waits.load(Ordering::Relaxed))
        .sum();
    assert!(
        waits > 0,
        "the inbox never filled: the test did not test back-pressure"
    );
    let metrics = raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains(&format!(
            "causeloop_publish_inbox_waits_total{{shard=\"0\"}} {waits}"
        )),
        "{metrics}"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples `pid`'s RSS every 20 ms until `stop`; the thread returns the peak.
fn peak_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// A keep-alive publish connection: one request at a time, status checked.
struct PublishConn {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl PublishConn {
    fn new(addr: SocketAddr) -> PublishConn {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        PublishConn {
            sock,
            buf: Vec::new(),
        }
    }

    fn publish(&mut self, body: &str) -> u16 {
        let req = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.sock.write_all(req.as_bytes()).unwrap();
        // Every answer here is short and has a Content-Length; read exactly one.
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    self.buf.drain(..end + 4 + len);
                    return status_of(&head);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.sock.read(&mut chunk).unwrap();
            assert!(n > 0, "publish connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn a_publisher_flood_stays_under_the_memory_bound_and_only_stalled_readers_go() {
    // Flags chosen so the bound is small enough to mean something.
    const OUTBOUND: u64 = 64 << 10;
    const EVENT: u64 = 4 << 10;
    const INBOX: u64 = 16;
    const PUBLISH: u64 = 256 << 10;
    const INTERNAL: u64 = 8;
    const SHARDS: u64 = 2;
    const STALLED: usize = 100;
    const READERS: usize = 10;
    const HISTORY: u64 = 8 << 20;
    let mut p = spawn(
        &[
            "--history-max-bytes",
            &HISTORY.to_string(),
            "--shards",
            &SHARDS.to_string(),
            "--max-outbound-bytes",
            &OUTBOUND.to_string(),
            "--socket-send-buffer",
            "16384",
            "--max-event-bytes",
            &EVENT.to_string(),
            "--shard-inbox",
            &INBOX.to_string(),
            "--max-publish-bytes",
            &PUBLISH.to_string(),
            "--max-internal-connections",
            &INTERNAL.to_string(),
        ],
        &secret_env(),
    );
    let pid = p.child.id();
    let public = p.public;
    // Stalled readers: subscribed, then never read again, with a small receive buffer.
    let stalled: Vec<TcpStream> = (0..STALLED)
        .map(|_| {
            let sock = silent_subscriber(public, "ws_flood");
            socket2::SockRef::from(&sock)
                .set_recv_buffer_size(4096)
                .unwrap();
            sock
        })
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let mut ws = connect(&format!(
                "ws://{public}/v1/stream?token={}&workspace=ws_read",
                token("ws_read", &format!("r{i}"), 600)
            ));
            assert!(read_text(&mut ws).contains("connected"));
            ws
        })
        .collect();
    let baseline = rss_bytes(pid);

    // The flood: batches of 60 events of ~3.5 KiB for the stalled workspace (about 210 KiB a
    // request), each with one sequenced event for the readers' workspace.
    let stop = Arc::new(AtomicBool::new(false));
    let pad = "x".repeat(3500);
    let flooders: Vec<_> = (0..2)
        .map(|f| {
            let stop = stop.clone();
            let pad = pad.clone();
            let internal = p.internal;
            std::thread::spawn(move || {
                let mut conn = PublishConn::new(internal);
                let mut n = 0u64;
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(4) {
                    let mut items: Vec<String> = (0..60)
                        .map(|_| {
                            format!(
                                r#"{{"workspace_id":"ws_flood","type":"flood","payload":{{"pad":"{pad}"}}}}"#
                            )
                        })
                        .collect();
                    items.push(format!(
                        r#"{{"workspace_id":"ws_read","type":"seq.step","payload":{{"p":{f},"n":{n}}}}}"#
                    ));
                    assert_eq!(conn.publish(&format!("[{}]", items.join(","))), 202);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let sampler = peak_rss(pid, stop.clone());
    let sent: Vec<u64> = flooders.into_iter().map(|f| f.join().unwrap()).collect();
    let total: u64 = sent.iter().sum();
    // Readers keep up: every sequenced event, in order per publisher.
    let counts: Vec<usize> = readers
        .into_iter()
        .map(|mut ws| {
            let mut next = [0u64; 2];
            let mut got = 0;
            while (got as u64) < total {
                let v = json(&read_event(&mut ws));
                let f = v["payload"]["p"].as_u64().unwrap() as usize;
                assert_eq!(v["payload"]["n"].as_u64().unwrap(), next[f]);
                next[f] += 1;
                got += 1;
            }
            got
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert!(total > 20, "only {total} batches published: not a flood");
    assert!(
        counts.iter().all(|&c| c as u64 == total),
        "{counts:?} of {total}"
    );

    // The bound docs/operations.md states, from the flags: every connection's queue (the outbound
    // limit plus the one event that crossed it), every shard inbox full of the largest batches
    // (events are encoded at most twice their body bytes), every internal connection holding a
    // whole body, over the RSS before the flood, plus a fixed 16 MiB for allocator slack.
    let conns = (STALLED + READERS) as u64;
    let bound = baseline
        + conns * (OUTBOUND + EVENT)
        + INBOX * 2 * PUBLISH
        + INTERNAL * PUBLISH
        + HISTORY
        + (16 << 20);
    eprintln!(
        "flood: {total} batches; RSS {} KiB before, peak {} KiB, bound {} KiB",
        baseline >> 10,
        peak >> 10,
        bound >> 10
    );
    assert!(
        peak > 0 && peak <= bound,
        "peak RSS {peak} over the bound {bound}"
    );

    // Every stalled reader was closed 1008 (it reads the close frame once it reads again).
    let slow_closes = eventually(Duration::from_secs(10), || {
        metric(
            p.internal,
            r#"causeloop_closes_sent_total{code="1008",reason="SlowConsumer"}"#,
        ) == Some(STALLED as u64)
    });
    assert!(
        slow_closes,
        "1008 closes: {:?}",
        metric(p.internal, r#"causeloop_closes_sent_total{code="1008""#)
    );
    drop(stalled);
    let _ = p.child.kill();
}

#[test]
fn a_publish_flood_to_ten_thousand_workspaces_keeps_the_history_inside_its_bytes() {
    // No subscriber anywhere: everything the flood leaves behind is the history's.
    const HISTORY: u64 = 8 << 20;
    const INBOX: u64 = 16;
    const PUBLISH: u64 = 256 << 10;
    const INTERNAL: u64 = 8;
    const WORKSPACES: u64 = 10_000;
    let mut p = spawn(
        &[
            "--shards",
            "2",
            "--history-max-bytes",
            &HISTORY.to_string(),
            "--history-size",
            "100000",
            "--shard-inbox",
            &INBOX.to_string(),
            "--max-publish-bytes",
            &PUBLISH.to_string(),
            "--max-internal-connections",
            &INTERNAL.to_string(),
        ],
        &secret_env(),
    );
    let pid = p.child.id();
    let baseline = rss_bytes(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let pad = "x".repeat(1000);
    let flooders: Vec<_> = (0..2u64)
        .map(|f| {
            let pad = pad.clone();
            let internal = p.internal;
            std::thread::spawn(move || {
                let mut conn = PublishConn::new(internal);
                let mut sent = 0u64;
                // Every workspace several times over: 100 events a request, round robin.
                for round in 0..((WORKSPACES * 6) / 200) {
                    let items: Vec<String> = (0..100)
                        .map(|i| {
                            let w = (round * 200 + f * 100 + i) % WORKSPACES;
                            format!(
                                r#"{{"workspace_id":"ws_{w}","type":"flood","payload":{{"pad":"{pad}"}}}}"#
                            )
                        })
                        .collect();
                    assert_eq!(conn.publish(&format!("[{}]", items.join(","))), 202);
                    sent += 100;
                }
                sent
            })
        })
        .collect();
    let sampler = peak_rss(pid, stop.clone());
    let sent: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let held = metric(p.internal, "causeloop_history_bytes ").unwrap();
    let workspaces = metric(p.internal, "causeloop_history_workspaces ").unwrap();
    let evicted = metric(
        p.internal,
        r#"causeloop_history_evictions_total{cause="bytes"}"#,
    )
    .unwrap();
    // The flood is 60 MB of frames: far past the bound, which must have evicted.
    assert_eq!(sent, WORKSPACES * 6);
    assert!(evicted > sent / 2, "only {evicted} evicted of {sent}");
    assert!(held <= HISTORY, "the history holds {held} bytes");
    assert!(workspaces <= WORKSPACES);
    // The operations.md bound with no connection: the inboxes, the bodies being read, and
    // the history, plus the allocator's slack.
    let bound = baseline + INBOX * 2 * PUBLISH + INTERNAL * PUBLISH + HISTORY + (16 << 20);
    eprintln!(
        "history flood: {sent} events to {WORKSPACES} workspaces; history {} KiB in {workspaces} workspaces; RSS {} KiB before, peak {} KiB, bound {} KiB",
        held >> 10,
        baseline >> 10,
        peak >> 10,
        bound >> 10
    );
    assert!(
        peak > 0 && peak <= bound,
        "peak RSS {peak} over the bound {bound}"
    );
    let _ = p.child.kill();
}
