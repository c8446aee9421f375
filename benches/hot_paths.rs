//! The per-connection and per-event hot paths, each on its own: token verification (HS256,
//! RS256), upgrade-request parsing and routing, publish-body validation, client frame decoding,
//! a heartbeat interval over 100,000 connections on the timer wheel, and the cluster bus's
//! per-event work (the wire message built by a publisher, checked and made a frame by each
//! node, and the hash slot of its channel).
//!
//! Run: `cargo bench --bench hot_paths`

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use causeloop_stream::auth::jwt::{self, Validation};
use causeloop_stream::auth::keys::{parse_pem_keys, KeySet};
use causeloop_stream::bus::{body, topology, wire};
use causeloop_stream::http::request::{parse_head, route_public, PublicRoute};
use causeloop_stream::timer::wheel::Wheel;
use causeloop_stream::ws::decoder::Decoder;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

const NOW: u64 = 1_800_000_000;

fn claims() -> String {
    format!(
        r#"{{"sub":"usr_01abc456","workspace_id":"ws_01abc123","iat":{},"exp":{}}}"#,
        NOW - 10,
        NOW + 3600
    )
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn auth(c: &mut Criterion) {
    let mut keys = KeySet::default();
    keys.add_hs256(None, b"bench-secret-0123456789abcdef0123456789");
    let hs = jwt::sign_hs256(
        b"bench-secret-0123456789abcdef0123456789",
        claims().as_bytes(),
    );
    let rules = Validation::default();
    let mut buf = Vec::new();
    assert!(jwt::verify(hs.as_bytes(), &keys, &rules, NOW, &mut buf).is_ok());
    c.bench_function("verify_hs256", |b| {
        b.iter(|| jwt::verify(black_box(hs.as_bytes()), &keys, &rules, NOW, &mut buf).is_ok())
    });

    let rsa_keys = KeySet {
        rs256: parse_pem_keys(&fixture("rsa_public.pem")).unwrap(),
        ..KeySet::default()
    };
    let kp = ring::signature::RsaKeyPair::from_pkcs8(&fixture("rsa_private.pk8")).unwrap();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims())
    );
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    let rs = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert!(jwt::verify(rs.as_bytes(), &rsa_keys, &rules, NOW, &mut buf).is_ok());
    c.bench_function("verify_rs256_2048", |b| {
        b.iter(|| jwt::verify(black_box(rs.as_bytes()), &rsa_keys, &rules, NOW, &mut buf).is_ok())
    });
}

fn handshake(c: &mut Criterion) {
    let token = jwt::sign_hs256(b"k", claims().as_bytes());
    let req = format!(
        "GET /v1/stream?token={token}&workspace=ws_01abc123 HTTP/1.1\r\nHost: api.causeloop.ai\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\nUpgrade: websocket\r\nOrigin: https://app.causeloop.ai\r\nSec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    );
    c.bench_function("parse_and_route_browser_upgrade", |b| {
        b.iter(|| {
            let head = parse_head(black_box(req.as_bytes()), 8192, 64)
                .unwrap()
                .unwrap();
            matches!(route_public(&head), PublicRoute::Stream { .. })
        })
    });
}

fn publish_body(c: &mut Criterion) {
    let items: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"workspace_id":"ws_{i}","type":"issue.created","payload":{{"id":"iss_{i:08}","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}}}}"#
            )
        })
        .collect();
    let batch = format!("[{}]", items.join(","));
    let mut g = c.benchmark_group("publish_body");
    g.throughput(Throughput::Elements(20));
    g.bench_function("validate_batch_of_20", |b| {
        b.iter(|| {
            body::parse(black_box(batch.as_bytes()), body::BodyLimits::default())
                .unwrap()
                .len()
        })
    });
    g.finish();
}

fn cluster_bus(c: &mut Criterion) {
    let payload = r#"{"id":"iss_00000001","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}"#;
    let message = wire::encode("issue.created", None, 1_705_312_800_000, payload.as_bytes());
    let limits = wire::WireLimits {
        max_event_bytes: 64 << 10,
        max_depth: 32,
        max_id_bytes: 256,
    };
    assert!(wire::decode(&message, limits).is_ok());
    let mut g = c.benchmark_group("cluster_bus");
    g.bench_function("encode_wire_message", |b| {
        b.iter(|| {
            wire::encode(
                "issue.created",
                None,
                black_box(1_705_312_800_000),
                payload.as_bytes(),
            )
        })
    });
    g.bench_function("wire_message_to_frame", |b| {
        b.iter(|| wire::decode(black_box(&message), limits).unwrap())
    });
    g.bench_function("channel_slot", |b| {
        b.iter(|| topology::slot(black_box(b"causeloop:v1:ws:ws_01abc123")))
    });
    g.finish();
}

fn client_frames(c: &mut Criterion) {
    // 100 masked pings of 16 bytes, as one read.
    let mut bytes = Vec::new();
    for _ in 0..100 {
        bytes.extend_from_slice(&[0x89, 0x90, 1, 2, 3, 4]);
        bytes.extend_from_slice(&[0u8; 16]);
    }
    let mut g = c.benchmark_group("client_frames");
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode_100_pings", |b| {
        b.iter(|| {
            let mut d = Decoder::default();
            let mut pending = Vec::new();
            let mut n = 0;
            d.feed(&mut pending, black_box(&bytes), 4096, &mut |_| n += 1)
                .unwrap();
            n
        })
    });
    g.finish();
}

/// A wheel of (connection, due tick) entries.
type HeartbeatWheel = Wheel<(u64, u64)>;

fn heartbeat_wheel(c: &mut Criterion) {
    // 100,000 connections with 5 s heartbeats on a 10 ms wheel: advance one whole interval, so
    // every timer fires once and is rescheduled, as the shard does.
    const CONNS: u64 = 100_000;
    const INTERVAL: u64 = 500;
    let mut g = c.benchmark_group("heartbeat_wheel");
    g.throughput(Throughput::Elements(CONNS));
    g.sample_size(20);
    g.bench_function("one_interval_100k_connections", |b| {
        b.iter_batched(
            || {
                let mut w = Wheel::new(1024, 0);
                for i in 0..CONNS {
                    w.insert(1 + i % INTERVAL, (i, 1 + i % INTERVAL));
                }
                (w, Vec::with_capacity(4096))
            },
            |(mut w, mut fired): (HeartbeatWheel, Vec<(u64, u64)>)| {
                for tick in 1..=INTERVAL {
                    w.advance(tick, &mut fired);
                    for (conn, due) in fired.drain(..) {
                        w.insert(due + INTERVAL, (conn, due + INTERVAL));
                    }
                }
                w.len()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
    targets = auth, handshake, publish_body, client_frames, heartbeat_wheel, cluster_bus
}
criterion_main!(benches);
