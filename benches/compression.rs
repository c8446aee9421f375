//! `permessage-deflate` against plain frames, per delivered frame: one event fanned out to 100
//! subscribers of its workspace and flushed (sockets replaced by `io::sink`, so only the
//! server's own work is timed), for the API document's sample events and a 4 KiB payload. With
//! compression the event is compressed once (a fresh `Event` each iteration, as each publish is)
//! and the same compressed frame is queued on every subscriber, through the shard's own
//! `fan_out_with` and `Outbox` code. Prints each payload's bytes on the wire plain and
//! compressed first.
//!
//! Run: `cargo bench --bench compression` (ratios in docs/performance.md)

use causeloop_stream::event::encode_with;
use causeloop_stream::shard::fanout::{fan_out_with, Queues, Subscriber};
use causeloop_stream::shard::outbox::Outbox;
use causeloop_stream::ws::deflate::Deflater;
use causeloop_stream::ws::SharedFrame;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use slab::Slab;
use std::sync::OnceLock;

const SUBSCRIBERS: usize = 100;
const MIN_BYTES: usize = 128;

#[derive(Default)]
struct Sub {
    out: Outbox,
    dirty: bool,
    deflate: bool,
}

impl Subscriber for Sub {
    fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }
    fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }
    fn deflate(&self) -> bool {
        self.deflate
    }
}

struct Shard {
    conns: Slab<Sub>,
    recipients: Vec<u32>,
    dirty: Vec<u32>,
    slow: Vec<u32>,
    deflater: Deflater,
}

impl Shard {
    fn new(deflate: bool) -> Shard {
        let mut conns = Slab::new();
        let recipients = (0..SUBSCRIBERS)
            .map(|_| {
                conns.insert(Sub {
                    deflate,
                    ..Sub::default()
                }) as u32
            })
            .collect();
        Shard {
            conns,
            recipients,
            dirty: Vec::with_capacity(SUBSCRIBERS),
            slow: Vec::new(),
            deflater: Deflater::default(),
        }
    }

    /// One event delivered and flushed: compressed at most once (its cell is new, as a new
    /// event's is), queued on every subscriber, written out.
    fn deliver(&mut self, frame: &SharedFrame) -> usize {
        let cell: OnceLock<Option<SharedFrame>> = OnceLock::new();
        let deflater = &mut self.deflater;
        let deflater = std::cell::RefCell::new(deflater);
        let deflated = || {
            cell.get_or_init(|| deflater.borrow_mut().compress_frame(frame, MIN_BYTES))
                .as_ref()
        };
        let mut q = Queues {
            dirty: &mut self.dirty,
            slow: &mut self.slow,
            max_outbound: 1 << 20,
        };
        let mut done = 0;
        fan_out_with(
            frame,
            &deflated,
            &self.recipients,
            &mut self.conns,
            &mut q,
            &mut done,
            |_| {},
        );
        let mut bytes = 0;
        for k in self.dirty.drain(..) {
            let c = &mut self.conns[k as usize];
            c.dirty = false;
            bytes += c.out.pending_bytes();
            c.out
                .write_to(&mut std::io::sink())
                .expect("sink never fails");
        }
        bytes
    }
}

/// The frames benchmarked: three of the document's sample events and a 4 KiB payload.
fn frames() -> Vec<(&'static str, SharedFrame)> {
    let samples = [
        (
            "issue.created",
            r#"{"id":"iss_0042","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2026-12-05T12:00:00.000Z"}"#.to_string(),
        ),
        (
            "pattern.detected",
            r#"{"id":"pat_0042","name":"Payment gateway timeout under load","risk_score":82,"status":"emerging","issue_count":7,"detected_at":"2026-12-05T12:00:00.000Z"}"#.to_string(),
        ),
        (
            "job.updated",
            r#"{"job_id":"rpt_job_0042","status":"running","progress":0.65,"result_url":null,"error":null,"created_at":"2026-12-05T12:00:00.000Z","finished_at":null}"#.to_string(),
        ),
        ("report.ready (4 KiB)", {
            let rows: Vec<String> = (0..90)
                .map(|i| format!(r#"{{"service":"svc-{i:02}","p99_ms":{},"errors":{}}}"#, 120 + i * 7, i % 5))
                .collect();
            let body = format!(r#"{{"id":"rpt_0042","rows":[{}]}}"#, rows.join(","));
            format!("{}{}", &body[..body.len() - 1], r#","note":"padding"}"#)
        }),
    ];
    samples
        .into_iter()
        .map(|(kind, payload)| {
            let t = kind.split(' ').next().unwrap();
            let frame = encode_with(t, payload.len(), 1_796_486_400_000, |b| {
                b.extend_from_slice(payload.as_bytes())
            });
            (kind, frame)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for (kind, frame) in frames() {
        let compressed = Deflater::default().compress_frame(&frame, MIN_BYTES);
        println!(
            "{kind}: {} bytes plain, {} compressed ({:.0}% saved)",
            frame.len(),
            compressed.as_ref().map_or(frame.len(), |c| c.len()),
            100.0
                * (1.0
                    - compressed.as_ref().map_or(frame.len(), |c| c.len()) as f64
                        / frame.len() as f64)
        );
    }
    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for (kind, frame) in frames() {
        for deflate in [false, true] {
            let mut shard = Shard::new(deflate);
            shard.deliver(&frame); // queues grown to their working size
            let name = format!("{kind}/{}", if deflate { "deflate" } else { "plain" });
            g.bench_function(name, |b| b.iter(|| shard.deliver(&frame)));
        }
    }
    g.finish();

    // Where a streaming compressor's time goes, for the first sample event: its reset between
    // messages (each must stand alone), and the compression itself at zlib's default level (6)
    // and at the fastest (1), with what each saves; against the one-shot encoder the server
    // uses.
    let (_, frame) = &frames()[0];
    let payload = &frame[causeloop_stream::ws::frame::header_len_of(frame)..];
    let mut g = c.benchmark_group("compression/breakdown");
    let mut reset_only = flate2::Compress::new(flate2::Compression::default(), false);
    g.bench_function("reset", |b| b.iter(|| reset_only.reset()));
    for level in [1, 6] {
        let mut z = flate2::Compress::new(flate2::Compression::new(level), false);
        let mut out = Vec::with_capacity(payload.len() + 256);
        let once = |z: &mut flate2::Compress, out: &mut Vec<u8>| {
            out.clear();
            z.reset();
            z.compress_vec(payload, out, flate2::FlushCompress::Sync)
                .expect("in memory");
        };
        once(&mut z, &mut out);
        println!(
            "level {level}: {} bytes of {} ({:.0}% saved)",
            out.len() - 4,
            payload.len(),
            100.0 * (1.0 - (out.len() - 4) as f64 / payload.len() as f64)
        );
        g.bench_function(format!("reset and compress, level {level}"), |b| {
            b.iter(|| once(&mut z, &mut out))
        });
    }
    // What the server uses: the one-shot encoder, nothing to clear between messages.
    let mut one = causeloop_stream::ws::oneshot::OneShot::default();
    let mut out = Vec::with_capacity(payload.len() + 64);
    one.compress(payload, &mut out);
    println!(
        "one-shot: {} bytes of {} ({:.0}% saved)",
        out.len(),
        payload.len(),
        100.0 * (1.0 - out.len() as f64 / payload.len() as f64)
    );
    g.bench_function("one-shot encoder", |b| {
        b.iter(|| {
            out.clear();
            one.compress(payload, &mut out)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
