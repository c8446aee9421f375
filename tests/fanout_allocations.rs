//! Fan-out allocates nothing and copies nothing per subscriber: counted with a counting global
//! allocator around the shard's own `fan_out`, for 10,000 subscribers of one workspace and for
//! user-scoped delivery.

use causeloop_stream::bus::interest::Interest;
use causeloop_stream::shard::fanout::fan_out;
use causeloop_stream::shard::registry::Registry;
use causeloop_stream::ws::SharedFrame;
use slab::Slab;
use std::sync::Arc;

#[path = "support/counting.rs"]
mod counting;
use counting::{allocations, Counting, Sub};

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn zero_allocations_and_copies_per_subscriber() {
    const N: usize = 10_000;
    let mut registry = Registry::new(0, Arc::new(Interest::default()));
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
    // Warm-up: the first frame of a turn is held inline; a connection's first burst of two or
    // more grows its overflow queue, once in its life. The rounds below queue two frames on the
    // user's connections, so the warm-up does too.
    let warm = SharedFrame::from(vec![1u8; 200]);
    fan_out(
        &warm,
        registry.recipients("ws", None),
        &mut conns,
        &mut dirty,
        &mut slow,
        1 << 20,
    );
    fan_out(
        &warm,
        registry.recipients("ws", Some("usr_3")),
        &mut conns,
        &mut dirty,
        &mut slow,
        1 << 20,
    );
    flush(&mut conns, &mut dirty);

    for round in 0..3 {
        let frame = SharedFrame::from(vec![round as u8; 300]);
        let before = allocations();
        fan_out(
            &frame,
            registry.recipients("ws", None),
            &mut conns,
            &mut dirty,
            &mut slow,
            1 << 20,
        );
        fan_out(
            &frame,
            registry.recipients("ws", Some("usr_3")),
            &mut conns,
            &mut dirty,
            &mut slow,
            1 << 20,
        );
        let allocs = allocations() - before;
        assert_eq!(allocs, 0, "round {round}: fan-out allocated {allocs} times");
        // Zero copies: every queued frame is a reference to the one buffer.
        assert_eq!(Arc::strong_count(&frame), 1 + N + N / 10);
        assert_eq!(dirty.len(), N);
        flush(&mut conns, &mut dirty);
        assert_eq!(Arc::strong_count(&frame), 1);
    }
}
