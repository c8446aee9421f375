//! Nothing lost across a reconnect (the contract's § "Delivery"), through real sockets with a
//! real WebSocket client: each way a connection can end, then a reconnect with the same token
//! while a publisher keeps sending numbered events at a steady rate. The union of what the
//! client read before and after must hold every event exactly once, in order; a repeat is
//! allowed only where the contract allows one (a record taken from an acknowledgement), and is
//! counted. Then the cases where the history cannot cover a record (`stream.gap`), a restart,
//! records that expire, two connections sharing a token, and history switched off.

mod common;

use causeloop_stream::config::Config;
use causeloop_stream::fault::{Faults, Point};
use common::*;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::Message;

const WS: &str = "ws_resume";

/// A publisher sending `{"n":0}`, `{"n":1}`, ... to one workspace, one event every `every`,
/// through the library handle, until stopped.
struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Flow {
    fn start(s: &TestServer, workspace: &'static str, every: Duration) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let publisher = s.server().publisher();
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                publisher
                    .publish(workspace, "test.seq", &serde_json::json!({ "n": n }))
                    .unwrap();
                n += 1;
                sent2.store(n, Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Flow {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stops and returns how many were published.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A frame as the test sees it.
#[derive(Debug)]
enum Got {
    Seq(u64),
    Gap(serde_json::Value),
    Close(u16),
}

fn next(ws: &mut Ws) -> Got {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "nothing within {WAIT:?}");
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v = json(&t);
                match v["type"].as_str() {
                    Some("test.seq") => return Got::Seq(v["payload"]["n"].as_u64().unwrap()),
                    Some("stream.gap") => return Got::Gap(v["payload"].clone()),
                    Some("heartbeat") => {}
                    other => panic!("unexpected frame {other:?}: {t}"),
                }
            }
            Ok(Message::Close(f)) => return Got::Close(f.map_or(1005, |f| u16::from(f.code))),
            Ok(_) => {}
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Reads events until `count` of them have arrived.
fn read_some(ws: &mut Ws, count: usize, into: &mut Vec<u64>) {
    let goal = into.len() + count;
    while into.len() < goal {
        match next(ws) {
            Got::Seq(n) => into.push(n),
            other => panic!("expected events, got {other:?}"),
        }
    }
}

/// Connects with `token`, starts the steady flow, and reads its first `count` events: the
/// opening of every test of a connection ending under a flow.
fn flowing(s: &TestServer, token: &str, count: usize) -> (Ws, Flow, Vec<u64>) {
    let mut ws = open(s, token);
    let flow = Flow::start(s, WS, EVERY);
    let mut before = Vec::new();
    read_some(&mut ws, count, &mut before);
    (ws, flow, before)
}

/// Reads events into `into` up to the server's close frame with `code`, and answers it.
fn read_to_close(ws: &mut Ws, into: &mut Vec<u64>, code: u16) {
    loop {
        match next(ws) {
            Got::Seq(n) => into.push(n),
            Got::Close(c) => {
                assert_eq!(c, code);
                break;
            }
            Got::Gap(g) => panic!("gap {g}"),
        }
    }
    // tungstenite queued the answer; this sends it.
    let _ = ws.flush();
}

/// The client closes: it sends its close frame and reads nothing but the echo after it (within
/// [`WAIT`]: heartbeats would keep a read timeout from ever firing).
fn client_close(ws: &mut Ws) {
    ws.close(None).unwrap();
    let start = Instant::now();
    while !matches!(ws.read(), Ok(Message::Close(_)) | Err(_)) {
        assert!(start.elapsed() < WAIT, "no close echo within {WAIT:?}");
    }
}

/// Opens a connection with `token` and reads its `connected`.
fn open(s: &TestServer, token: &str) -> Ws {
    let mut ws = connect(&s.url(token, WS));
    let first = read_text(&mut ws);
    assert!(first.starts_with(r#"{"type":"connected""#), "{first}");
    ws
}

/// After the reconnect: reads the replay and the live stream while the flow goes on for a
/// while, then stops it and reads up to its last event. Returns what was read.
fn finish(ws: &mut Ws, flow: Flow) -> Vec<u64> {
    let mut after = Vec::new();
    read_some(ws, 100, &mut after);
    let total = flow.stop();
    while after.last().map_or(true, |&n| n + 1 < total) {
        match next(ws) {
            Got::Seq(n) => after.push(n),
            other => panic!("expected events, got {other:?}"),
        }
    }
    assert_eq!(*after.last().unwrap() + 1, total);
    after
}

/// Checks that `before` then `after` hold every event of `0..total` exactly once in order,
/// apart from a repeat at the seam of at most `max_repeats` events; returns the repeats.
fn exactly_once(before: &[u64], after: &[u64], max_repeats: usize) -> usize {
    assert!(
        before.windows(2).all(|w| w[0] + 1 == w[1]),
        "before: {before:?}"
    );
    assert!(
        after.windows(2).all(|w| w[0] + 1 == w[1]),
        "after is not contiguous: {after:?}"
    );
    let last_before = *before.last().unwrap();
    let first_after = after[0];
    assert!(
        first_after <= last_before + 1,
        "lost {} event(s): read up to {last_before} before, resumed at {first_after}",
        first_after - last_before - 1
    );
    let repeats = (last_before + 1 - first_after) as usize;
    assert!(
        repeats <= max_repeats,
        "{repeats} events sent twice (at most {max_repeats} allowed here)"
    );
    assert_eq!(before[0], 0);
    repeats
}

fn server(f: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::with(|c| {
        c.shards = 2;
        c.ack_interval = Duration::from_millis(100);
        c.heartbeat_interval = Duration::from_millis(200);
        f(c);
    })
}

const EVERY: Duration = Duration::from_millis(2);

#[test]
fn a_client_close_resumes_from_its_acknowledgement() {
    let s = server(|_| {});
    let token = token(WS, "u1", 3600);
    let (mut a, flow, before) = flowing(&s, &token, 300);
    client_close(&mut a);
    let mut b = open(&s, &token);
    let after = finish(&mut b, flow);
    let repeats = exactly_once(&before, &after, 200);
    eprintln!("client close: {repeats} repeated (written after the last acknowledgement)");
}

#[test]
fn a_server_close_answered_by_the_client_resumes_with_nothing_twice() {
    let faults = Arc::new(Faults::default());
    let f2 = faults.clone();
    let s = server(move |c| c.faults = Some(f2));
    let token = token(WS, "u_drained", 3600);
    let (mut a, flow, mut before) = flowing(&s, &token, 200);
    // The server closes this one connection 1001 at its next timer, as a drain would.
    faults.plant(Point::Drain, Some("u_drained"));
    read_to_close(&mut a, &mut before, 1001);
    let mut b = open(&s, &token);
    let after = finish(&mut b, flow);
    assert_eq!(exactly_once(&before, &after, 0), 0);
}

#[test]
fn a_slow_consumer_closed_1008_is_replayed_what_was_dropped_and_nothing_twice() {
    let s = server(|c| {
        c.max_outbound_bytes = 16 << 10;
        c.max_event_bytes = 4096;
        c.socket_send_buffer = 4096;
    });
    let token = token(WS, "u_slow", 3600);
    // A small receive buffer, so that a client that stops reading backs up the server soon.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.public.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (mut a, _) = tungstenite::client(s.url(&token, WS), stream).unwrap();
    assert!(read_text(&mut a).starts_with(r#"{"type":"connected""#));
    let flow = Flow::start(&s, WS, Duration::from_micros(500));
    let mut before = Vec::new();
    read_some(&mut a, 100, &mut before);
    // Stop reading until the server has given up on it.
    assert!(
        eventually(WAIT, || metric(
            &s,
            r#"causeloop_closes_sent_total{code="1008""#
        ) > 0),
        "never closed 1008"
    );
    read_to_close(&mut a, &mut before, 1008);
    let mut b = open(&s, &token);
    let after = finish(&mut b, flow);
    assert_eq!(exactly_once(&before, &after, 0), 0);
}

#[test]
fn a_reset_connection_resumes_from_its_acknowledgement() {
    let s = server(|_| {});
    let token = token(WS, "u_reset", 3600);
    let (a, flow, before) = flowing(&s, &token, 300);
    // SO_LINGER 0: closing sends a reset, no close frame, no FIN.
    socket2::SockRef::from(a.get_ref())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(a);
    let mut b = open(&s, &token);
    let after = finish(&mut b, flow);
    let repeats = exactly_once(&before, &after, 300);
    eprintln!("reset: {repeats} repeated (written after the last acknowledgement)");
}

#[test]
fn a_client_gone_silent_is_found_by_the_probe_and_its_replacement_resumes() {
    let s = server(|_| {});
    let token = token(WS, "u_gone", 3600);
    let (a, flow, before) = flowing(&s, &token, 300);
    // It stops reading and never answers again; its socket stays open (the server sees no
    // end). The same token comes back on a new connection.
    let mut b = open(&s, &token);
    let after = finish(&mut b, flow);
    let repeats = exactly_once(&before, &after, 300);
    eprintln!("gone silent: {repeats} repeated (written after the last acknowledgement)");
    assert_eq!(
        metric(&s, r#"causeloop_twin_waits_total{ended="record"}"#),
        1,
        "the replacement did not resume from the silent connection's record"
    );
    drop(a);
}

#[test]
fn two_connections_sharing_a_token_each_resume_without_loss() {
    // The second tab waits out its twin's probe: a history deep enough for that wait.
    let s = server(|c| c.history_size = 10_000);
    let token = token(WS, "u_tabs", 3600);
    let mut a = open(&s, &token);
    let flow = Flow::start(&s, WS, EVERY);
    // The second tab: its twin answers the probe, so it starts where the stream stood when
    // it connected, as soon as the answer is in.
    let mut b = open(&s, &token);
    let (mut a_before, mut b_before) = (Vec::new(), Vec::new());
    read_some(&mut a, 200, &mut a_before);
    read_some(&mut b, 200, &mut b_before);
    client_close(&mut a);
    client_close(&mut b);
    // Records are taken oldest first: a's, then b's.
    let mut a2 = open(&s, &token);
    let mut b2 = open(&s, &token);
    let mut a_after = Vec::new();
    read_some(&mut a2, 100, &mut a_after);
    let b_after = finish(&mut b2, flow);
    let total = *b_after.last().unwrap() + 1;
    while *a_after.last().unwrap() + 1 < total {
        match next(&mut a2) {
            Got::Seq(n) => a_after.push(n),
            other => panic!("{other:?}"),
        }
    }
    exactly_once(&a_before, &a_after, 300);
    assert_eq!(
        metric(&s, r#"causeloop_twin_waits_total{ended="answered"}"#),
        1,
        "the second tab waited out its twin's probe instead of starting on the answer"
    );
    // b joined after the flow began: what it missed before its connect was never its own.
    let shift = b_before[0];
    let b_before: Vec<u64> = b_before.iter().map(|n| n - shift).collect();
    let b_after: Vec<u64> = b_after.iter().map(|n| n - shift).collect();
    exactly_once(&b_before, &b_after, 300);
}

/// The client reads some events and closes; `meanwhile` runs; the same token reconnects and
/// its first frame after `connected` must be `stream.gap` with `reason`, then live events.
fn expect_gap(s: &TestServer, user: &str, reason: &str, meanwhile: impl FnOnce()) {
    let token = token(WS, user, 3600);
    let publisher = s.server().publisher();
    let mut a = open(s, &token);
    for n in 0..3u64 {
        publisher
            .publish(WS, "test.seq", &serde_json::json!({ "n": n }))
            .unwrap();
    }
    let mut before = Vec::new();
    read_some(&mut a, 3, &mut before);
    // Read on (heartbeats, the acknowledgement ping) until the client's pong has acknowledged
    // the third event, so the record knows the `ts` it had.
    assert!(eventually(WAIT, || {
        let _ = a.read();
        metric(s, r#"causeloop_acks_total{result="taken"}"#) >= 1
    }));
    client_close(&mut a);
    meanwhile();
    let mut b = open(s, &token);
    match next(&mut b) {
        Got::Gap(g) => {
            assert_eq!(g["reason"], reason, "{g}");
            // `since` is the ts of the last event it had: a timestamp, not null.
            assert!(g["since"].is_string(), "{g}");
        }
        other => panic!("expected stream.gap, got {other:?}"),
    }
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 999_999 }))
        .unwrap();
    match next(&mut b) {
        Got::Seq(999_999) => {}
        other => panic!("expected the live event, got {other:?}"),
    }
}

fn metric(s: &TestServer, line_start: &str) -> u64 {
    causeloop_stream::metrics::render(s.server().stats())
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_record_beyond_the_history_size_gets_a_gap() {
    let s = server(|c| c.history_size = 5);
    expect_gap(&s, "u_size", "history_trimmed", || {
        let p = s.server().publisher();
        for n in 0..20u64 {
            p.publish(WS, "test.seq", &serde_json::json!({ "n": 100 + n }))
                .unwrap();
        }
    });
}

#[test]
fn a_record_beyond_the_history_ttl_gets_a_gap() {
    let s = server(|c| c.history_ttl = Duration::from_millis(300));
    expect_gap(&s, "u_ttl", "history_trimmed", || {
        let p = s.server().publisher();
        p.publish(WS, "test.seq", &serde_json::json!({ "n": 100 }))
            .unwrap();
        // Scraping ages the history out; wait until the TTL has taken that last event.
        assert!(eventually(WAIT, || {
            metric(&s, r#"causeloop_history_events "#) == 0
                && metric(&s, r#"causeloop_history_evictions_total{cause="ttl"}"#) >= 4
        }));
    });
}

#[test]
fn a_record_beyond_the_history_byte_bound_gets_a_gap() {
    let s = server(|c| {
        c.max_event_bytes = 1024;
        c.history_max_bytes = 8 << 10;
    });
    expect_gap(&s, "u_bytes", "history_trimmed", || {
        let p = s.server().publisher();
        let pad = "x".repeat(600);
        for n in 0..40u64 {
            p.publish(
                WS,
                "test.seq",
                &serde_json::json!({ "n": 100 + n, "pad": pad }),
            )
            .unwrap();
        }
        assert!(metric(&s, r#"causeloop_history_evictions_total{cause="bytes"}"#) > 0);
        assert!(metric(&s, "causeloop_history_bytes ") <= 8 << 10);
    });
}

#[test]
fn after_a_restart_an_older_token_gets_history_lost_and_a_fresh_one_nothing() {
    let s = server(|_| {});
    let old = token_issued(WS, "u_old", 3600, now() - 60);
    let mut a = connect(&s.url(&old, WS));
    assert!(read_text(&mut a).starts_with(r#"{"type":"connected""#));
    match next(&mut a) {
        Got::Gap(g) => {
            assert_eq!(g["reason"], "history_lost");
            assert!(g["since"].is_null(), "{g}");
        }
        other => panic!("expected stream.gap, got {other:?}"),
    }
    let mut fresh = open(&s, &token(WS, "u_new", 3600));
    s.server()
        .publisher()
        .publish(WS, "test.seq", &serde_json::json!({ "n": 7 }))
        .unwrap();
    // The fresh token's first frame after `connected` is the live event: no gap, no replay.
    match next(&mut fresh) {
        Got::Seq(7) => {}
        other => panic!("expected the live event, got {other:?}"),
    }
    match next(&mut a) {
        Got::Seq(7) => {}
        other => panic!("expected the live event, got {other:?}"),
    }
}

#[test]
fn records_expire_after_the_resume_window() {
    let s = server(|c| c.resume_window = Duration::from_millis(500));
    let token = token(WS, "u_late", 3600);
    let publisher = s.server().publisher();
    let mut a = open(&s, &token);
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 0 }))
        .unwrap();
    read_some(&mut a, 1, &mut Vec::new());
    client_close(&mut a);
    assert!(eventually(WAIT, || metric(&s, "causeloop_resume_records ") == 1));
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 1 }))
        .unwrap();
    assert!(eventually(WAIT, || {
        metric(&s, "causeloop_resume_records_expired_total") == 1
    }));
    // No record any more: a fresh start, n=1 is not replayed.
    let mut b = open(&s, &token);
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 2 }))
        .unwrap();
    match next(&mut b) {
        Got::Seq(2) => {}
        other => panic!("expected only the live event, got {other:?}"),
    }
}

#[test]
fn without_history_nothing_is_replayed_and_no_acknowledgement_is_asked() {
    let s = server(|c| c.history_size = 0);
    let token = token(WS, "u_none", 3600);
    let publisher = s.server().publisher();
    let mut a = open(&s, &token);
    for n in 0..50u64 {
        publisher
            .publish(WS, "test.seq", &serde_json::json!({ "n": n }))
            .unwrap();
    }
    let mut pings = 0;
    let mut got = 0;
    let start = Instant::now();
    while got < 50 {
        assert!(start.elapsed() < WAIT);
        match a.read().unwrap() {
            Message::Text(_) => got += 1,
            Message::Ping(p) if !p.is_empty() => pings += 1,
            _ => {}
        }
    }
    assert_eq!(pings, 0, "acknowledgement pings without history");
    client_close(&mut a);
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 50 }))
        .unwrap();
    let mut b = open(&s, &token);
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 51 }))
        .unwrap();
    match next(&mut b) {
        Got::Seq(51) => {}
        other => panic!("expected only the live event, got {other:?}"),
    }
    assert!(!causeloop_stream::metrics::render(s.server().stats()).contains("causeloop_history"));
}

#[test]
fn acknowledgement_pings_carry_positions_and_a_forged_pong_is_refused() {
    let s = server(|_| {});
    let publisher = s.server().publisher();
    let mut a = open(&s, &token(WS, "u_ack", 3600));
    let mut payloads = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while payloads.len() < 2 {
        assert!(start.elapsed() < WAIT, "no acknowledgement ping");
        publisher
            .publish(WS, "test.seq", &serde_json::json!({ "n": n }))
            .unwrap();
        n += 1;
        match a.read().unwrap() {
            Message::Ping(p) if !p.is_empty() => payloads.push(p.to_vec()),
            _ => {}
        }
    }
    for p in &payloads {
        assert_eq!(p.len(), 18);
        assert_eq!(&p[..2], b"cl");
    }
    // Pongs claiming a position of another epoch, or beyond anything sent, are refused and
    // counted (written raw: a client library keeps only its latest pong queued).
    let mut foreign = payloads[1].clone();
    foreign[2] ^= 0xff;
    let mut beyond = payloads[1].clone();
    beyond[10] = 0x7f;
    for forged in [foreign, beyond] {
        let mut frame = vec![0x8a, 0x80 | forged.len() as u8, 1, 2, 3, 4];
        frame.extend(
            forged
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        std::io::Write::write_all(a.get_mut(), &frame).unwrap();
    }
    assert!(
        eventually(WAIT, || {
            metric(&s, r#"causeloop_acks_total{result="refused"}"#) >= 2
        }),
        "{}",
        causeloop_stream::metrics::render(s.server().stats())
            .lines()
            .filter(|l| l.contains("acks"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(eventually(WAIT, || {
        let _ = a.flush();
        metric(&s, r#"causeloop_acks_total{result="taken"}"#) >= 1
    }));
}

#[test]
fn a_replay_larger_than_the_outbound_bound_is_paced_not_closed() {
    let s = server(|c| {
        c.max_outbound_bytes = 16 << 10;
        c.max_event_bytes = 4096;
    });
    let token = token(WS, "u_pace", 3600);
    let publisher = s.server().publisher();
    let mut a = open(&s, &token);
    publisher
        .publish(WS, "test.seq", &serde_json::json!({ "n": 0 }))
        .unwrap();
    let mut before = Vec::new();
    read_some(&mut a, 1, &mut before);
    assert!(eventually(WAIT, || {
        let _ = a.read();
        metric(&s, r#"causeloop_acks_total{result="taken"}"#) >= 1
    }));
    client_close(&mut a);
    // 400 events of about 600 bytes: 15 times the outbound bound.
    let pad = "x".repeat(560);
    for n in 1..=400u64 {
        publisher
            .publish(WS, "test.seq", &serde_json::json!({ "n": n, "pad": pad }))
            .unwrap();
    }
    let mut b = open(&s, &token);
    let mut after = Vec::new();
    read_some(&mut b, 400, &mut after);
    assert_eq!(after, (1..=400).collect::<Vec<u64>>());
    assert_eq!(metric(&s, r#"causeloop_closes_sent_total{code="1008""#), 0);
    assert!(metric(&s, "causeloop_replayed_frames_total") >= 400);
}

#[test]
fn racing_publishers_reach_every_subscriber_in_one_order_once() {
    // Four publisher threads on one workspace: their events take positions in one order but
    // may reach a shard's inbox in another. Every subscriber, on every shard, must see each
    // event once, and all of them the same order (the positions').
    let s = server(|c| c.shards = 3);
    let mut subs: Vec<Ws> = (0..12)
        .map(|i| open(&s, &token(WS, &format!("u{i}"), 3600)))
        .collect();
    const EACH: u64 = 400;
    let threads: Vec<_> = (0..4u64)
        .map(|p| {
            let publisher = s.server().publisher();
            std::thread::spawn(move || {
                for n in 0..EACH {
                    publisher
                        .publish(WS, "test.seq", &serde_json::json!({ "n": p * EACH + n }))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut orders = Vec::new();
    for ws in subs.iter_mut() {
        let mut got = Vec::new();
        read_some(ws, (4 * EACH) as usize, &mut got);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, (0..4 * EACH).collect::<Vec<_>>(), "each event once");
        // Each publisher's own events in its order.
        for p in 0..4 {
            let mine: Vec<u64> = got.iter().copied().filter(|n| n / EACH == p).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
        orders.push(got);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "subscribers saw different orders"
    );
    eprintln!(
        "racing publishers: {} events taken from the history out of order",
        metric(&s, "causeloop_gap_fills_total")
    );
}
