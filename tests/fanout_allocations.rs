//! Delivery allocates nothing and copies nothing per subscriber, through the shard's real code:
//! a server in this process, real sockets, a counting global allocator that counts what the
//! shard threads allocate. Once every connection's queue has grown to its working size, a
//! round of events to 500 subscribers (the inbox, the fan-out, the flush list, the vectored
//! writes, the loop's own work lists) must allocate nothing on the shard.
//!
//! Over TLS the same round allocates only what rustls allocates per record it seals (one
//! buffer each), and the round's frames share records.
//!
//! The fan-out step alone is also counted for 10,000 subscribers without sockets, and every
//! queued frame must be a reference to the one buffer.

mod common;

use causeloop_stream::shard::fanout::{fan_out, Queues};
use causeloop_stream::shard::registry::Registry;
use causeloop_stream::ws::SharedFrame;
use common::*;
use slab::Slab;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[path = "support/counting.rs"]
mod counting;
use counting::{shard_allocations, thread_allocations, Counting, Sub};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn tls_records(s: &TestServer) -> u64 {
    s.server()
        .stats()
        .shards
        .iter()
        .map(|st| st.tls_records.load(Ordering::Relaxed))
        .sum()
}

fn frames_written(s: &TestServer) -> u64 {
    s.server()
        .stats()
        .shards
        .iter()
        .map(|st| st.frames_written.load(Ordering::Relaxed))
        .sum()
}

#[test]
fn a_shard_allocates_nothing_per_event_once_warm() {
    shard_allocates_nothing_per_event(false);
}

#[test]
fn over_tls_one_allocation_per_record_and_none_per_frame() {
    // Frames are sealed into records through the shard's buffers and written straight from
    // them; the only allocation is rustls' own buffer for each record it seals.
    shard_allocates_nothing_per_event(true);
}

/// A subscriber, left unread once it has its `connected` frame (kept open, never read).
#[allow(dead_code)]
enum Sub2 {
    Plain(std::net::TcpStream),
    Tls(Box<common::tls::Wss>),
}

/// The counter counts every shard thread in the process: one server at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn shard_allocates_nothing_per_event(tls: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SUBSCRIBERS: usize = 500;
    let cert = common::tls::TestCert::new("alloc", 2030, 1, 1);
    let files = cert.files();
    let s = TestServer::with(|c| {
        if tls {
            c.tls = Some(files);
        }
        c.shards = 1;
        // Nothing but the events below in the window: no heartbeats, no pings.
        c.heartbeat_interval = Duration::from_secs(3600);
        c.ping_interval = Duration::ZERO;
        // History stays on (its seam is on this path); acknowledgement pings are frames of
        // their own, kept out of the window.
        c.ack_interval = Duration::from_secs(3600);
    });
    let socks: Vec<Sub2> = (0..SUBSCRIBERS)
        .map(|_| {
            if !tls {
                return Sub2::Plain(raw_subscribe(&s, "ws_alloc"));
            }
            let path = format!(
                "/v1/stream?token={}&workspace=ws_alloc",
                token("ws_alloc", "u", 600)
            );
            let mut ws = common::tls::connect_wss(s.public, cert.client(), &path);
            assert!(read_text(&mut ws).contains("\"connected\""));
            Sub2::Tls(Box::new(ws))
        })
        .collect();
    let publisher = s.server().publisher();
    let payload =
        serde_json::json!({"id": "iss_1", "title": "Payment gateway timeout on checkout"});
    // One round: two workspace events and one for user "u" (every subscriber here is "u"),
    // sent as three batches: bursts of several frames per connection per turn.
    let round = |n: u64| {
        for i in 0..2 {
            publisher
                .publish(
                    "ws_alloc",
                    "issue.created",
                    &serde_json::json!({"n": n, "i": i, "p": payload}),
                )
                .unwrap();
        }
        publisher
            .publish_user("ws_alloc", "u", "notification.created", &payload)
            .unwrap();
    };
    // Each subscriber has been written one frame (its 101 and `connected`, one buffer). The
    // client can read it before the shard has counted it, so the count is waited for, not read.
    let subscribed = SUBSCRIBERS as u64;
    assert!(
        eventually(WAIT, || frames_written(&s) == subscribed),
        "{} frames written to {subscribed} subscribers",
        frames_written(&s)
    );
    let mut expected = subscribed;
    let mut run = |rounds: u64, from: u64| {
        for n in from..from + rounds {
            round(n);
        }
        expected += rounds * 3 * SUBSCRIBERS as u64;
        let want = expected;
        assert!(
            eventually(WAIT, || frames_written(&s) == want),
            "written {} of {want} frames",
            frames_written(&s)
        );
    };
    // Warm-up: the queues, the work lists and their spares grow to their working sizes.
    run(10, 0);
    let before = shard_allocations();
    let records_before = tls_records(&s);
    run(10, 10);
    let allocs = shard_allocations() - before;
    if tls {
        // rustls seals each record into a buffer of its own before copying it out (its
        // unbuffered API has no in-place encryption yet): one allocation per record, none per
        // frame or per subscriber otherwise. The frames of a round share records.
        let records = tls_records(&s) - records_before;
        let frames = 30 * SUBSCRIBERS as u64;
        assert!(
            allocs <= records,
            "{allocs} allocations for {records} records ({frames} frames)"
        );
        assert!(records < frames, "{records} records for {frames} frames");
    } else {
        assert_eq!(
            allocs, 0,
            "the shard allocated {allocs} times delivering 30 events to {SUBSCRIBERS} subscribers"
        );
    }
    drop(socks);
}

#[test]
fn zero_allocations_and_copies_per_subscriber_in_fan_out() {
    const N: usize = 10_000;
    let mut registry = Registry::new();
    let mut conns: Slab<Sub> = Slab::new();
    for i in 0..N {
        let k = conns.insert(Sub::default());
        registry.add(k, "ws", &format!("usr_{}", i % 10));
    }
    let mut dirty = Vec::with_capacity(N);
    let mut slow = Vec::new();
    let flush = |conns: &mut Slab<Sub>, dirty: &mut Vec<u32>| {
        for k in dirty.drain(..) {
            conns[k as usize].dirty = false;
            conns[k as usize]
                .out
                .write_to(&mut std::io::sink())
                .unwrap();
        }
    };
    let deliver = |frame: &SharedFrame,
                   user: Option<&str>,
                   conns: &mut Slab<Sub>,
                   dirty: &mut Vec<u32>,
                   slow: &mut Vec<u32>| {
        let mut q = Queues {
            dirty,
            slow,
            max_outbound: 1 << 20,
        };
        let mut done = 0;
        fan_out(
            frame,
            registry.recipients("ws", user),
            conns,
            &mut q,
            &mut done,
            |_| {},
        );
    };
    // Warm-up: the first frame of a turn is held inline; a connection's first burst of two or
    // more grows its overflow queue, once in its life. The rounds below queue two frames on the
    // user's connections, so the warm-up does too.
    let warm = SharedFrame::from(vec![1u8; 200]);
    deliver(&warm, None, &mut conns, &mut dirty, &mut slow);
    deliver(&warm, Some("usr_3"), &mut conns, &mut dirty, &mut slow);
    flush(&mut conns, &mut dirty);

    for round in 0..3 {
        let frame = SharedFrame::from(vec![round as u8; 300]);
        let before = thread_allocations();
        deliver(&frame, None, &mut conns, &mut dirty, &mut slow);
        deliver(&frame, Some("usr_3"), &mut conns, &mut dirty, &mut slow);
        let allocs = thread_allocations() - before;
        assert_eq!(allocs, 0, "round {round}: fan-out allocated {allocs} times");
        // Zero copies: every queued frame is a reference to the one buffer.
        assert_eq!(SharedFrame::strong_count(&frame), 1 + N + N / 10);
        assert_eq!(dirty.len(), N);
        flush(&mut conns, &mut dirty);
        assert_eq!(SharedFrame::strong_count(&frame), 1);
    }
}
