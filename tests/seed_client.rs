//! The seed document's own JavaScript client, run unchanged under Node against this server.
//!
//! The client code is cut out of the API document (a copy is kept in `tests/seed/`, checked
//! against `../shared/seed/`, which must be present under `CI=true`); only the URL is swapped, and the usage
//! example's placeholder token is filled in. The test sees it connect, receive a published
//! `issue.created`, and reconnect by itself after a 1001 drain.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SEED: &str = include_str!("seed/realtime-event-stream.txt");

fn client_source(url: &str, token: &str) -> String {
    let start = SEED
        .find("function connectCauseloopStream")
        .expect("client function in the seed");
    let end = SEED
        .find("Event bus integration")
        .expect("end of the example");
    let code = &SEED[start..end];
    assert_eq!(
        code.matches("'wss://api.causeloop.ai/v1/stream'").count(),
        1
    );
    assert_eq!(code.matches("'<your_access_token>'").count(), 1);
    code.replace("'wss://api.causeloop.ai/v1/stream'", &format!("'{url}'"))
        .replace("'<your_access_token>'", &format!("'{token}'"))
}

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

#[test]
fn seed_client_connects_receives_and_reconnects_after_drain() {
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    let version = Command::new(&node).arg("--version").output().unwrap_or_else(|e| {
        panic!("this test needs Node.js 20+ (`{node}`): {e}. Install nodejs or set NODE=/path/to/node")
    });
    assert!(version.status.success());

    let workspace = "ws_01abc123"; // the usage example's workspace
    let first = TestServer::with(|c| c.shards = 1);
    let port = first.public.port();
    let url = format!("ws://127.0.0.1:{port}/v1/stream");
    let dir = std::env::temp_dir().join(format!("causeloop-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("client.js");
    std::fs::write(
        &script,
        client_source(&url, &token(workspace, "usr_01abc456", 600)),
    )
    .unwrap();

    let mut child = Command::new(&node)
        .arg("--experimental-websocket")
        .arg(&script)
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
    // stdout (console.log) and stderr (console.warn/error) arrive on two pipes, so lines written
    // in one order may be received in another: keep every line not yet matched and search them
    // all, rather than assuming order across the two streams.
    let mut unmatched: Vec<String> = Vec::new();
    let mut wait_for = |needle: &str| -> String {
        loop {
            if let Some(i) = unmatched.iter().position(|l| l.contains(needle)) {
                return unmatched.remove(i);
            }
            match rx.recv_timeout(Duration::from_secs(15)) {
                Ok(line) => unmatched.push(line),
                Err(_) => {
                    panic!("the seed client never printed {needle:?}; it printed {unmatched:?}")
                }
            }
        }
    };
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
