//! What the delivery guarantee costs, measured:
//!
//! - `replay/live_1000` against `replay/replay_1000`: the time a client takes to receive 1,000
//!   events published while it is subscribed (one batch), against the time a client that comes
//!   back with the same token, 1,000 events behind, takes from its connect to its last replayed
//!   event. Real sockets, a real WebSocket client, a running server (one shard).
//! - `history/append_batch_100`: giving 100 events their positions and keeping them, as the
//!   publish path does once per batch.
//! - Memory, printed before the timings: live heap bytes per history event (with and without
//!   its frame) and per resume record, counted by a global allocator that adds what is allocated
//!   and subtracts what is freed.
//!
//! Run: `cargo bench --bench history`

use causeloop_stream::config::{Config, Secret};
use causeloop_stream::history::records::{record_key, Record, Records};
use causeloop_stream::history::ring::{History, Limits};
use causeloop_stream::history::Position;
use causeloop_stream::server::Server;
use criterion::{criterion_group, criterion_main, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Live heap bytes: allocations minus frees.
struct Live;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - layout.size() as i64, Ordering::Relaxed);
        System.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static GLOBAL: Live = Live;

const SECRET: &[u8] = b"bench-secret-0123456789abcdef0123456789";
const PAYLOAD: &str = r#"{"id":"iss_00000001","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}"#;

fn frame() -> causeloop_stream::ws::SharedFrame {
    causeloop_stream::event::encode_with("issue.created", PAYLOAD.len(), 1_705_312_800_000, |b| {
        b.extend_from_slice(PAYLOAD.as_bytes())
    })
}

/// Live bytes per history event in a steady state: 200 workspaces of 1,000 events each.
fn memory_per_event() {
    let limits = Limits {
        size: 1000,
        ttl: Duration::from_secs(3600),
        max_bytes: 1 << 30,
        keep_idle: Duration::from_secs(3600),
    };
    let now = Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let mut h = History::new(limits, 1);
    let names: Vec<String> = (0..200).map(|w| format!("ws_{w:04}")).collect();
    let mut frame_bytes = 0i64;
    // Twice round, so every ring has grown and been trimmed to its working size.
    for _ in 0..2 {
        for _ in 0..1000 {
            for name in &names {
                let f = frame();
                h.append(name, None, &f, 0, now);
            }
        }
    }
    for _ in 0..1 {
        let f = frame();
        // The heap share of one frame: its bytes plus the shared allocation's counts.
        frame_bytes = (f.len() + 16) as i64;
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    let events = h.events() as i64;
    println!(
        "history: {events} events in {} workspaces: {} bytes per event live, {} of them the frame ({} bytes counted against --history-max-bytes per event)",
        h.spaces(),
        used / events,
        frame_bytes,
        h.bytes() as i64 / events
    );
    drop(h);
}

/// Live bytes per resume record: 100,000 records under distinct keys.
fn memory_per_record() {
    let now = Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let mut r = Records::new(1_000_000, Duration::from_secs(3600));
    const N: i64 = 100_000;
    for i in 0..N {
        let key = record_key(format!("token-{i}").as_bytes(), "ws_1");
        r.put(
            key,
            Record {
                at: Position {
                    epoch: 1,
                    offset: i as u64,
                },
                since_ms: Some(0),
                caught_up: false,
                from_ack: true,
                made: now,
            },
            now,
        );
    }
    let used = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "resume records: {N} held: {} bytes per record live",
        used / N
    );
}

fn server() -> Server {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        // Acknowledgements come with heartbeats: frequent, so that a client can wait for the
        // one covering everything it read before it leaves (its record is then exact).
        heartbeat_interval: Duration::from_millis(20),
        ack_interval: Duration::from_millis(20),
        ping_interval: Duration::ZERO,
        history_size: 10_000,
        ..Config::default()
    };
    c.jwt.hs256_secrets = vec![Secret::from(SECRET.to_vec())];
    Server::start(c).expect("server starts")
}

fn token(user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    causeloop_stream::auth::jwt::sign_hs256(
        SECRET,
        format!(
            r#"{{"sub":"{user}","workspace_id":"ws_bench","iat":{now},"exp":{}}}"#,
            now + 3600
        )
        .as_bytes(),
    )
}

type Ws = tungstenite::WebSocket<TcpStream>;

fn open(s: &Server, token: &str) -> Ws {
    let stream = TcpStream::connect(s.public_addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let url = format!(
        "ws://{}/v1/stream?token={token}&workspace=ws_bench",
        s.public_addr()
    );
    let (mut ws, _) = tungstenite::client(url, stream).unwrap();
    match ws.read().unwrap() {
        Message::Text(t) => assert!(t.starts_with(r#"{"type":"connected""#)),
        other => panic!("{other:?}"),
    }
    ws
}

/// Reads until the event numbered `last` (heartbeats keep the read timeout from firing, so the
/// wait has its own deadline).
fn read_to(ws: &mut Ws, last: u64) {
    let needle = format!(r#""n":{last}}}"#);
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "event {last} never came"
        );
        if let Message::Text(t) = ws.read().unwrap() {
            if t.contains(&needle) {
                return;
            }
        }
    }
}

/// Reads until an acknowledgement ping for offset `offset` (or later) has been answered.
fn acknowledge(ws: &mut Ws, offset: u64) {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no acknowledgement ping"
        );
        if let Message::Ping(p) = ws.read().unwrap() {
            if p.len() == 18 && u64::from_be_bytes(p[10..18].try_into().unwrap()) >= offset {
                ws.flush().unwrap();
                return;
            }
        }
    }
}

/// 1,000 events as one publish batch, numbered from `from`.
fn publish_1000(s: &Server, from: u64) -> u64 {
    let specs: Vec<String> = (from..from + 1000)
        .map(|n| {
            format!(
                r#"{{"workspace_id":"ws_bench","type":"issue.created","payload":{{"p":{PAYLOAD},"n":{n}}}}}"#
            )
        })
        .collect();
    let body = format!("[{}]", specs.join(","));
    let limits = causeloop_stream::bus::body::BodyLimits::default();
    let parsed = causeloop_stream::bus::body::parse(body.as_bytes(), limits).unwrap();
    s.publisher().publish_specs(&parsed).unwrap();
    from + 999
}

fn bench(c: &mut Criterion) {
    memory_per_event();
    memory_per_record();

    let s = server();
    let mut next = 0u64;
    let mut g = c.benchmark_group("replay");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    let live_token = token("u_live");
    let mut live = open(&s, &live_token);
    g.bench_function("live_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let last = publish_1000(&s, next);
                read_to(&mut live, last);
                total += start.elapsed();
                next = last + 1;
            }
            total
        })
    });
    drop(live);
    let replay_token = token("u_replay");
    // The connection, and whether it has read events (to be acknowledged before it leaves).
    let mut ws = Some((open(&s, &replay_token), false));
    g.bench_function("replay_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The client leaves (closing, after acknowledging what it read), the 1,000 are
                // published, and it comes back.
                let (mut old, read) = ws.take().unwrap();
                if read {
                    acknowledge(&mut old, next);
                }
                old.close(None).unwrap();
                let start = Instant::now();
                while !matches!(old.read(), Ok(Message::Close(_)) | Err(_)) {
                    assert!(start.elapsed() < Duration::from_secs(20), "no close echo");
                }
                let last = publish_1000(&s, next);
                let start = Instant::now();
                let mut back = open(&s, &replay_token);
                read_to(&mut back, last);
                total += start.elapsed();
                ws = Some((back, true));
                next = last + 1;
            }
            total
        })
    });
    g.finish();

    let mut g = c.benchmark_group("history");
    let limits = Limits {
        size: 1000,
        ttl: Duration::from_secs(3600),
        max_bytes: 64 << 20,
        keep_idle: Duration::from_secs(3600),
    };
    let mut h = History::new(limits, 1);
    let f = frame();
    let now = Instant::now();
    g.bench_function("append_batch_100", |b| {
        b.iter(|| {
            for i in 0..100u32 {
                let ws = ["ws_a", "ws_b", "ws_c", "ws_d"][(i % 4) as usize];
                std::hint::black_box(h.append(ws, None, &f, 0, now));
            }
        })
    });
    g.finish();
    s.shutdown();
    s.wait();
}

criterion_group!(benches, bench);
criterion_main!(benches);
