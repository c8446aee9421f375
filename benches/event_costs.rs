//! What one published event costs on each path before it reaches a shard: heap allocations,
//! and bytes asked of the allocator (an upper bound on what was copied into fresh buffers),
//! counted on the calling thread with a counting global allocator, then timed.
//!
//! - `http_local`: an HTTP publish body validated (`body::parse`) and prepared for the shards
//!   by the real `Publisher` of a running server on the local bus (`Publisher::prepare`: the
//!   frame built once);
//! - `http_cluster`: the same on a cluster-bus server, giving the Redis command instead;
//! - `received`: what every node does with the message as Redis sends it: the pub/sub message
//!   found in place in the read buffer (`resp::message_at`), checked and made a frame
//!   (`wire::decode`).
//!
//! The payload is the seed's sample `issue.created` (~200 bytes): bytes per event divided by
//! the payload's length says how many times the payload was copied at most.
//!
//! Run: `cargo bench --bench event_costs`

use causeloop_stream::bus::body::{self, BodyLimits};
use causeloop_stream::bus::publisher::Prepared;
use causeloop_stream::bus::{resp, wire};
use causeloop_stream::config::{BusConfig, Config, Secret};
use causeloop_stream::server::Server;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

#[path = "../tests/support/counting.rs"]
mod counting;
use counting::{set_large, thread_allocations, thread_bytes, thread_large, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAYLOAD: &str = r#"{"id":"iss_00000001","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}"#;

fn server(bus: BusConfig) -> Server {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        bus,
        ..Config::default()
    };
    c.jwt.hs256_secrets = vec![Secret::from(b"bench-secret-0123456789abcdef0123".to_vec())];
    Server::start(c).expect("server starts")
}

fn body() -> String {
    format!(r#"{{"workspace_id":"ws_01abc123","type":"issue.created","payload":{PAYLOAD}}}"#)
}

/// The RESP push Redis sends a subscriber for one message.
fn pushed() -> Vec<u8> {
    let message = wire::encode("issue.created", None, 1_705_312_800_000, PAYLOAD.as_bytes());
    let channel = wire::channel("ws_01abc123");
    let mut out = Vec::new();
    for part in [&b"message"[..], &channel, &message] {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    [b"*3\r\n".to_vec(), out].concat()
}

fn limits() -> wire::WireLimits {
    wire::WireLimits {
        max_event_bytes: 64 << 10,
        max_depth: 32,
        max_id_bytes: 256,
    }
}

/// What one run of `f` cost, after a warm-up run.
struct Cost {
    allocations: u64,
    bytes: u64,
    /// Allocations that could hold the payload: an upper bound on its copies.
    payload_sized: u64,
}

fn cost<T>(mut f: impl FnMut() -> T) -> Cost {
    set_large(PAYLOAD.len());
    drop(f());
    let (a, b, l) = (thread_allocations(), thread_bytes(), thread_large());
    let out = f();
    let counted = Cost {
        allocations: thread_allocations() - a,
        bytes: thread_bytes() - b,
        payload_sized: thread_large() - l,
    };
    drop(out);
    counted
}

fn report(path: &str, c: Cost) {
    println!(
        "{path}: {} heap allocations, {} of them big enough for the {}-byte payload (its copies, at most); {} bytes asked of the allocator per event",
        c.allocations,
        c.payload_sized,
        PAYLOAD.len(),
        c.bytes,
    );
}

fn bench(c: &mut Criterion) {
    let body = body();
    let local = server(BusConfig::Local);
    let local_publisher = local.publisher();
    // A Redis nobody listens on: preparing a publish needs no connection.
    let cluster = server(BusConfig::parse("redis://127.0.0.1:1").unwrap());
    let cluster_publisher = cluster.publisher();
    let pushed = pushed();
    let body_limits = BodyLimits::default();

    let http_local = || {
        let specs = body::parse(body.as_bytes(), body_limits).unwrap();
        let prepared = local_publisher.prepare(&specs).unwrap();
        assert!(matches!(prepared, Prepared::Local(..)));
        prepared
    };
    let http_cluster = || {
        let specs = body::parse(body.as_bytes(), body_limits).unwrap();
        let prepared = cluster_publisher.prepare(&specs).unwrap();
        assert!(matches!(prepared, Prepared::Bus(..)));
        prepared
    };
    let received = || {
        let (at, used) = resp::message_at(&pushed, 64 << 20).expect("a pub/sub message");
        assert_eq!(used, pushed.len());
        assert!(wire::workspace_of(&pushed[at.channel]).is_some());
        wire::decode(&pushed[at.payload], limits()).unwrap()
    };
    report("http_local", cost(http_local));
    report("http_cluster", cost(http_cluster));
    report("received", cost(received));

    let mut g = c.benchmark_group("event_costs");
    g.throughput(Throughput::Elements(1));
    g.bench_function("http_local", |b| b.iter(|| black_box(http_local())));
    g.bench_function("http_cluster", |b| b.iter(|| black_box(http_cluster())));
    g.bench_function("received", |b| b.iter(|| black_box(received())));
    g.finish();
    local.shutdown();
    cluster.shutdown();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = bench
}
criterion_main!(benches);
