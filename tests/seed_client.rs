//! The seed document's own JavaScript client, run unchanged under Node against this server.
//!
//! The client code is cut out of the API document (a copy is kept in `tests/seed/`, checked
//! against `../shared/seed/`, which must be present under `CI=true`); only the URL is swapped, and the usage
//! example's placeholder token is filled in. The test sees it connect, receive a published
//! `issue.created`, and reconnect by itself after a 1001 drain; and, unchanged, receive every
//! event of a steady stream exactly once across a server-side close and its own reconnect
//! (the delivery guarantee needs nothing from the client); and, with the document's `wss://`
//! URL, connect through the server's own TLS and inflate a compressed event (Node's WebSocket
//! offers permessage-deflate).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn the_seed_copy_matches_the_shared_document() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/seed/realtime-event-stream.txt");
    match std::fs::read_to_string(&shared) {
        Ok(original) => assert_eq!(original, SEED, "tests/seed/ drifted from ../shared/seed/"),
        Err(e) => deps::missing(
            "the_seed_copy_matches_the_shared_document",
            &format!("{} cannot be read ({e})", shared.display()),
            "check out the repository next to ../shared to compare the committed copy with the document",
        ),
    }
}

/// The seed client running under Node against `url` with `token`, its output lines on a
/// channel; the script lives in `dir`.
fn run_client(url: &str, token: &str, dir: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    run_client_with(url, token, dir, &[])
}

/// [`run_client`] with extra environment for Node (say, `NODE_EXTRA_CA_CERTS`).
fn run_client_with(
    url: &str,
    token: &str,
    dir: &std::path::Path,
    env: &[(&str, &std::path::Path)],
) -> (Child, mpsc::Receiver<String>) {
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let version = Command::new(&node).arg("--version").output().unwrap_or_else(|e| {
        panic!("this test needs Node.js 20+ (`{node}`): {e}. Install nodejs or set NODE=/path/to/node")
    });
    assert!(version.status.success());
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("client.js");
    std::fs::write(&script, seed_client_source(url, token)).unwrap();
    let mut child = Command::new(&node)
        .arg("--experimental-websocket")
        .arg(&script)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// The client's output lines as they come. stdout (console.log) and stderr (console.warn/error)
/// arrive on two pipes, so lines written in one order may be received in another: every line
/// not matched yet is kept and searched, rather than assuming order across the two streams.
struct Printed {
    rx: mpsc::Receiver<String>,
    unmatched: Vec<String>,
}

impl Printed {
    /// The first line holding `needle`, waiting up to 15 s for it (then the test fails with what
    /// the client printed).
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            if let Some(i) = self.unmatched.iter().position(|l| l.contains(needle)) {
                return self.unmatched.remove(i);
            }
            match self.rx.recv_timeout(Duration::from_secs(15)) {
                Ok(line) => self.unmatched.push(line),
                Err(_) => panic!(
                    "the seed client never printed {needle:?}; it printed {:?}",
                    self.unmatched
                ),
            }
        }
    }
}

#[test]
fn seed_client_connects_receives_and_reconnects_after_drain() {
    let workspace = "ws_01abc123"; // the usage example's workspace
    let first = TestServer::with(|c| c.shards = 1);
    let port = first.public.port();
    let url = format!("ws://127.0.0.1:{port}/v1/stream");
    let dir = std::env::temp_dir().join(format!("causeloop-seed-{}", std::process::id()));
    let (mut child, rx) = run_client(&url, &token(workspace, "usr_01abc456", 600), &dir);
    let mut printed = Printed {
        rx,
        unmatched: Vec::new(),
    };
    let mut wait_for = |needle: &str| printed.wait_for(needle);
    wait_for("[WS] connected");
    wait_for(&format!("[WS] authenticated as workspace {workspace}"));
    let (st, _) = first.publish(&format!(
        r#"{{"workspace_id":"{workspace}","type":"issue.created","payload":{{"id":"iss_01abc123","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}}}}"#
    ));
    assert_eq!(st, 202);
    wait_for("New issue: Payment gateway timeout on checkout");

    // Drain: the client sees 1001 and schedules a reconnect with backoff.
    drop(first);
    let closed = wait_for("[WS] closed:");
    assert!(closed.contains("1001"), "{closed}");
    wait_for("[WS] reconnecting in");
    // A new server on the same port (a deploy): the client comes back by itself.
    let second = TestServer::with(|c| {
        c.shards = 1;
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
    });
    wait_for("[WS] connected");
    assert_eq!(second.publish(&format!(r#"{{"workspace_id":"{workspace}","type":"issue.created","payload":{{"title":"after the deploy"}}}}"#)).0, 202);
    wait_for("New issue: after the deploy");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn seed_client_receives_every_event_across_a_server_close_and_its_reconnect() {
    let workspace = "ws_01abc123";
    let faults = std::sync::Arc::new(causeloop_stream::fault::Faults::default());
    let f2 = faults.clone();
    let s = TestServer::with(move |c| {
        c.shards = 2;
        c.heartbeat_interval = Duration::from_millis(300);
        c.ack_interval = Duration::from_millis(100);
        c.faults = Some(f2);
    });
    let url = format!("ws://127.0.0.1:{}/v1/stream", s.public.port());
    let dir = std::env::temp_dir().join(format!("causeloop-seed-resume-{}", std::process::id()));
    let (mut child, rx) = run_client(&url, &token(workspace, "usr_01abc456", 600), &dir);
    let mut seen: Vec<u64> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    // Reads lines until `until` holds; every "New issue: n<i>" is collected on the way.
    let mut pump = |until: &mut dyn FnMut(&[u64], &str) -> bool| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| {
                let tail = &lines[lines.len().saturating_sub(20)..];
                panic!(
                    "the seed client went quiet after {} events; it last printed {tail:?}",
                    seen.len()
                )
            });
        if let Some(n) = line.strip_prefix("New issue: n") {
            seen.push(n.trim().parse().unwrap());
        }
        let done = until(&seen, &line);
        lines.push(line);
        if done {
            return;
        }
    };
    pump(&mut |_, l| l.contains("[WS] authenticated as workspace"));
    // A steady stream of issue.created events numbered in their titles.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = s.server().publisher();
    let stop2 = stop.clone();
    let flow = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let title = format!("n{n}");
            publisher
                .publish(
                    workspace,
                    "issue.created",
                    &serde_json::json!({ "title": title }),
                )
                .unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    });
    pump(&mut |seen, _| seen.len() >= 100);
    // The server closes the client's connection 1001 (one connection's drain); the client
    // reconnects by itself after its backoff, with the same token.
    faults.plant(causeloop_stream::fault::Point::Drain, Some("usr_01abc456"));
    pump(&mut |_, l| l.contains("[WS] closed: 1001"));
    let mut resumed_at = 0;
    pump(&mut |seen, l| {
        resumed_at = seen.len();
        l.contains("[WS] authenticated as workspace")
    });
    pump(&mut |seen, _| seen.len() >= resumed_at + 100);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = flow.join().unwrap();
    let mut all = Vec::new();
    pump(&mut |seen, _| {
        all = seen.to_vec();
        seen.last() == Some(&(total - 1))
    });
    let want: Vec<u64> = (0..total).collect();
    assert_eq!(
        all, want,
        "every event once, in order, across the reconnect"
    );
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn seed_client_works_unchanged_over_wss() {
    // The document's production URL is wss://: the same client, unchanged but for the URL,
    // against the server's own TLS, trusting the test authority the way an operator's Node
    // service would (NODE_EXTRA_CA_CERTS). Node's WebSocket offers permessage-deflate.
    let workspace = "ws_01abc123";
    let cert = common::tls::TestCert::new("seed", 2030, 1, 1);
    let files = cert.files();
    let s = TestServer::with(|c| {
        c.shards = 1;
        c.tls = Some(files);
    });
    let url = format!("wss://localhost:{}/v1/stream", s.public.port());
    let dir = std::env::temp_dir().join(format!("causeloop-seed-wss-{}", std::process::id()));
    let (mut child, rx) = run_client_with(
        &url,
        &token(workspace, "usr_01abc456", 600),
        &dir,
        &[("NODE_EXTRA_CA_CERTS", cert.ca.as_path())],
    );
    let mut printed = Printed {
        rx,
        unmatched: Vec::new(),
    };
    let mut wait_for = |needle: &str| {
        printed.wait_for(needle);
    };
    wait_for("[WS] connected");
    wait_for(&format!("[WS] authenticated as workspace {workspace}"));
    let title = "Payment gateway timeout on checkout, over TLS, with enough text to be compressed";
    assert_eq!(
        s.publish(&format!(
            r#"{{"workspace_id":"{workspace}","type":"issue.created","payload":{{"id":"iss_01abc123","title":"{title}","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}}}}"#
        ))
        .0,
        202
    );
    wait_for(&format!("New issue: {title}"));
    let handshakes =
        common::process::metric(s.internal, "causeloop_tls_handshakes_total{result=\"ok\"}");
    assert!(handshakes >= Some(1), "{handshakes:?}");
    // Node's WebSocket offers permessage-deflate, so the event came compressed and the client
    // inflated it: a real client library that offers the extension, over TLS.
    let compressed = common::process::metric(s.internal, "causeloop_compressed_frames_total");
    assert!(compressed >= Some(1), "{compressed:?}");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
}
