//! The internal listener answers `/healthz`, `/readyz` and `/metrics` at once, and publishes to
//! healthy destinations go through, whatever other publishers are waiting for: a shard whose
//! inbox is full, a frozen Redis, or one frozen master of a Redis Cluster (SIGSTOP: its sockets
//! stay open and silent). The Kubernetes probes in `deploy/` point at this listener, so a probe
//! that waited behind a publish would get a healthy node restarted.
//!
//! The bound asserted below is liveness, not speed: a listener that waited behind a publish
//! would take the publish deadline (1 s) or longer, while the target for a probe is 50 ms and
//! the slowest one measured is printed. The bound is wider than the target so that a debug
//! build on two busy cores cannot fail it by being slow.

mod common;

use causeloop_stream::fault::Faults;
use common::redis::{Redis, RedisCluster};
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a probe, a scrape or a publish to a healthy destination may take here.
const BOUND: Duration = Duration::from_millis(250);

/// `GET path` on the internal listener: its status and how long the whole answer took.
fn timed_get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let start = Instant::now();
    let resp = raw_http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    (status_of(&resp), start.elapsed())
}

/// Every probe and a scrape, `rounds` times; each must answer within [`BOUND`]. Returns the
/// slowest.
fn probe(addr: SocketAddr, rounds: usize, what: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (status, took) = timed_get(addr, path);
            assert!(
                status == 200 || status == 503,
                "{path} answered {status} while {what}"
            );
            assert!(took < BOUND, "{path} took {took:?} while {what}");
            slowest = slowest.max(took);
        }
    }
    eprintln!("slowest probe while {what}: {slowest:?}");
    slowest
}

fn publish_body(ws: &str, n: usize) -> String {
    format!(r#"{{"workspace_id":"{ws}","type":"tick","payload":{{"n":{n}}}}}"#)
}

/// Publishes to `ws` from another thread, one after another, until `stop`; returns the
/// statuses.
fn keep_publishing(
    internal: SocketAddr,
    ws: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u16>> {
    let ws = ws.to_string();
    std::thread::spawn(move || {
        let mut statuses = Vec::new();
        let start = Instant::now();
        while !stop.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(60) {
            let (status, _) = publish_with_key(
                internal,
                Some(PUBLISH_KEY),
                &publish_body(&ws, statuses.len()),
            );
            statuses.push(status);
        }
        statuses
    })
}

/// Waits until the node's cluster bus holds a publish it has not answered.
fn wait_for_a_publish_held_by_the_bus(n: &TestServer) {
    let queued = || {
        n.server()
            .stats()
            .bus
            .bus_publish_queue
            .load(Ordering::Relaxed)
    };
    assert!(
        eventually(WAIT, || queued() > 0),
        "no publish ever waited for Redis"
    );
}

#[test]
fn probes_answer_at_once_while_publishes_wait_for_a_full_shard_inbox() {
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    let s = TestServer::with(move |c| {
        c.shards = 1;
        c.shard_inbox = 1;
        c.faults = Some(f);
    });
    let mut sub = s.subscribe("ws_p", "u");
    faults.stall(true);
    // The first publish fills the one-batch inbox of the stalled shard; the rest park.
    const PUBLISHES: usize = 6;
    let internal = s.internal;
    let publishers: Vec<_> = (0..PUBLISHES)
        .map(|i| {
            std::thread::spawn(move || {
                publish_with_key(internal, Some(PUBLISH_KEY), &publish_body("ws_p", i))
            })
        })
        .collect();
    let parked = || {
        s.server()
            .stats()
            .internal
            .publishes_parked
            .load(Ordering::Relaxed)
    };
    assert!(
        eventually(WAIT, || parked() >= PUBLISHES as u64 - 1),
        "only {} publishes parked",
        parked()
    );
    probe(s.internal, 10, "publishes wait for a full inbox");
    faults.stall(false);
    for p in publishers {
        let (status, body) = p.join().unwrap();
        assert_eq!(status, 202, "{body}");
    }
    let mut seen: Vec<u64> = (0..PUBLISHES)
        .map(|_| {
            json(&read_event(&mut sub))["payload"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..PUBLISHES as u64).collect::<Vec<_>>());
}

#[test]
fn probes_answer_at_once_while_publishes_wait_for_a_frozen_redis() {
    let Some(redis) = Redis::start("probes_answer_at_once_while_publishes_wait_for_a_frozen_redis")
    else {
        return;
    };
    let bus = redis.bus();
    let n = TestServer::with(move |c| c.bus = bus);
    let mut sub = n.subscribe("ws_r", "u");
    redis.signal("STOP");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = keep_publishing(n.internal, "ws_r", stop.clone());
    wait_for_a_publish_held_by_the_bus(&n);
    probe(n.internal, 10, "publishes wait for a frozen Redis");
    stop.store(true, Ordering::Release);
    let statuses = publisher.join().unwrap();
    assert!(
        statuses.contains(&503),
        "a frozen Redis answers no publish: {statuses:?}"
    );
    redis.signal("CONT");
    assert!(
        eventually(WAIT, || n.publish(&publish_body("ws_r", 999_999)).0 == 202),
        "publishes never resumed after Redis thawed"
    );
    // Publishes that timed out may still have reached Redis before it froze; the last one is
    // delivered in any case.
    let deadline = Instant::now() + WAIT;
    while !read_event(&mut sub).contains("999999") {
        assert!(
            Instant::now() < deadline,
            "the publish after the thaw never arrived"
        );
    }
}

#[test]
fn a_frozen_master_holds_up_neither_the_probes_nor_publishes_to_other_masters() {
    let Some(cluster) = RedisCluster::start(
        "a_frozen_master_holds_up_neither_the_probes_nor_publishes_to_other_masters",
        3,
    ) else {
        return;
    };
    let bus = cluster.bus();
    let n = TestServer::with(move |c| c.bus = bus);
    let spaces = cluster.one_workspace_per_master();
    let mut live = n.subscribe(&spaces[1], "u");
    cluster.nodes[0].signal("STOP");
    let stop = Arc::new(AtomicBool::new(false));
    let frozen_publisher = keep_publishing(n.internal, &spaces[0], stop.clone());
    wait_for_a_publish_held_by_the_bus(&n);
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let start = Instant::now();
        let (status, body) = n.publish(&publish_body(&spaces[1], i));
        let took = start.elapsed();
        assert_eq!(status, 202, "{body}");
        assert!(
            took < BOUND,
            "a publish to a healthy master took {took:?} while another master is frozen"
        );
        slowest = slowest.max(took);
        assert_eq!(json(&read_event(&mut live))["payload"]["n"], i);
    }
    eprintln!("slowest publish to a healthy master while another is frozen: {slowest:?}");
    probe(n.internal, 5, "publishes wait for a frozen master");
    stop.store(true, Ordering::Release);
    let statuses = frozen_publisher.join().unwrap();
    assert!(
        statuses.iter().all(|&s| s == 503),
        "the frozen master's publishes: {statuses:?}"
    );
    cluster.nodes[0].signal("CONT");
}

#[test]
fn the_healthcheck_subcommand_asks_the_internal_listener() {
    // The container image's HEALTHCHECK: exit 0 when /healthz answers 200, 1 otherwise.
    let s = TestServer::start();
    let run = |addr: String| {
        std::process::Command::new(common::process::BIN)
            .args(["healthcheck", "--internal-listen", &addr, "--timeout", "2s"])
            .env_remove("CAUSELOOP_INTERNAL_LISTEN")
            .output()
            .unwrap()
    };
    let up = run(s.internal.to_string());
    assert_eq!(up.status.code(), Some(0), "{up:?}");
    // An unspecified address means this host's loopback, as inside a container.
    let any = run(format!("0.0.0.0:{}", s.internal.port()));
    assert_eq!(any.status.code(), Some(0), "{any:?}");
    // The public listener answers /healthz too, but is not what is asked; a closed port fails.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let down = run(closed.to_string());
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(String::from_utf8_lossy(&down.stderr).contains("healthcheck"));
}
