//! Fan-out of one event to 10,000 subscribers inside one shard, through the shard's own
//! `fan_out` and `Outbox` code (sockets replaced by `io::sink`, so only the server's work is
//! timed).
//!
//! Before timing, it counts what one fan-out costs per subscriber: heap allocations (a counting
//! global allocator) and frame copies (every queued reference must point at the one shared
//! buffer). Both must be zero; the counts are printed with the timings.
//!
//! Run: `cargo bench --bench fanout`

use causeloop_stream::event::encode_with;
use causeloop_stream::shard::fanout::{fan_out, Queues};
use causeloop_stream::shard::registry::Registry;
use causeloop_stream::ws::SharedFrame;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use slab::Slab;

#[path = "../tests/support/counting.rs"]
mod counting;
use counting::{allocations, Counting, Sub};

#[global_allocator]
static GLOBAL: Counting = Counting;

const SUBSCRIBERS: usize = 10_000;

struct Shard {
    registry: Registry,
    conns: Slab<Sub>,
    dirty: Vec<u32>,
    slow: Vec<u32>,
}

impl Shard {
    fn new() -> Shard {
        let mut registry = Registry::new();
        let mut conns = Slab::new();
        for i in 0..SUBSCRIBERS {
            let k = conns.insert(Sub::default());
            registry.add(k, "ws_bench", &format!("usr_{i}"));
        }
        Shard {
            registry,
            conns,
            dirty: Vec::with_capacity(SUBSCRIBERS),
            slow: Vec::new(),
        }
    }

    /// One delivery as the shard does it: look up the recipients, queue the frame.
    fn deliver(&mut self, frame: &SharedFrame) {
        let recipients = self.registry.recipients("ws_bench", None);
        let mut q = Queues {
            dirty: &mut self.dirty,
            slow: &mut self.slow,
            max_outbound: 1 << 20,
        };
        let mut done = 0;
        fan_out(
            frame,
            recipients,
            &mut self.conns,
            &mut q,
            &mut done,
            |_| {},
        );
    }

    /// The flush, with a sink standing in for the sockets.
    fn flush(&mut self) {
        for k in self.dirty.drain(..) {
            let c = &mut self.conns[k as usize];
            c.dirty = false;
            c.out
                .write_to(&mut std::io::sink())
                .expect("sink never fails");
        }
    }
}

fn event_frame(seq: u64) -> SharedFrame {
    let payload = format!(
        r#"{{"id":"iss_{seq:08}","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}}"#
    );
    encode_with("issue.created", payload.len(), 1_705_312_800_000, |b| {
        b.extend_from_slice(payload.as_bytes())
    })
}

fn count_costs() {
    let mut shard = Shard::new();
    // Warm-up: each connection's queue grows to its working size once in its life.
    let warm = event_frame(0);
    shard.deliver(&warm);
    shard.flush();
    drop(warm);

    let frame = event_frame(1);
    let before = allocations();
    shard.deliver(&frame);
    let allocs = allocations() - before;
    let shared = shard
        .conns
        .iter_mut()
        .filter(|(_, c)| c.out.pending_bytes() == frame.len())
        .count();
    let refs = SharedFrame::strong_count(&frame) - 1;
    println!(
        "fan-out of one {}-byte event to {SUBSCRIBERS} subscribers: {allocs} heap allocations, {} frame copies, {refs} shared references ({:.4} allocations and {:.4} copies per subscriber)",
        frame.len(),
        SUBSCRIBERS - refs,
        allocs as f64 / SUBSCRIBERS as f64,
        (SUBSCRIBERS - refs) as f64 / SUBSCRIBERS as f64,
    );
    assert_eq!(shared, SUBSCRIBERS, "every subscriber queued the event");
    assert_eq!(
        refs, SUBSCRIBERS,
        "every subscriber holds a reference to the one shared frame"
    );
    assert_eq!(allocs, 0, "fan-out allocated");
    shard.flush();
}

fn bench(c: &mut Criterion) {
    count_costs();
    let mut shard = Shard::new();
    let frame = event_frame(2);
    shard.deliver(&frame);
    shard.flush();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    g.bench_function("queue_10k_subscribers", |b| {
        b.iter(|| {
            shard.deliver(&frame);
            // Reset without writing, so only the queueing is timed.
            for k in shard.dirty.drain(..) {
                let c = &mut shard.conns[k as usize];
                c.dirty = false;
                c.out.discard_unstarted();
            }
        })
    });
    g.bench_function("queue_and_flush_10k_subscribers", |b| {
        b.iter(|| {
            shard.deliver(&frame);
            shard.flush();
        })
    });
    g.finish();
    c.bench_function("encode_event_frame", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            event_frame(seq)
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
