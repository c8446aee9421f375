//! The load tester's own accounting, against a causeloop-stream server started in the test:
//! delivered counts, loss and reorder detection, and latency percentiles.

use causeloop_stream::config::{Config, Secret};
use causeloop_stream::server::Server;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "loadtest-accounting-secret-0123456789";
const KEY: &str = "loadtest-accounting-publish-key";

fn server() -> Server {
    server_with(None)
}

fn server_with(tls: Option<causeloop_stream::tls::TlsFiles>) -> Server {
    let mut c = Config {
        tls,
        listen: "127.0.0.1:0".parse().unwrap(),
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        publish_key: Some(Secret::from(KEY.as_bytes().to_vec())),
        ..Config::default()
    };
    c.jwt.hs256_secrets = vec![Secret::from(SECRET.as_bytes().to_vec())];
    Server::start(c).unwrap()
}

fn loadtest(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_causeloop-loadtest"))
        .args(args)
        .env("CAUSELOOP_JWT_HS256_SECRET", SECRET)
        .env("CAUSELOOP_PUBLISH_KEY", KEY)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for the load tester to exit, at most a minute: a run that does not stop fails the
/// test instead of hanging it.
fn finished(mut child: std::process::Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the load tester did not exit within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn subscribed(s: &Server) -> u64 {
    s.stats()
        .shards
        .iter()
        .map(|st| st.open.load(Ordering::Relaxed))
        .sum()
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn counts_every_frame_of_a_clean_run() {
    let s = server();
    let json = std::env::temp_dir().join(format!("lt-clean-{}.json", std::process::id()));
    let args = [
        "fanout",
        "--url",
        &format!("ws://{}", s.public_addr()),
        "--internal",
        &format!("http://{}", s.internal_addr()),
        "--connections",
        "60",
        "--workspaces",
        "3",
        "--rate",
        "10",
        "--duration",
        "2s",
        "--processes",
        "2",
        "--json",
        json.to_str().unwrap(),
    ];
    let status = finished(loadtest(&args));
    assert!(status.success());
    let r = read_json(&json);
    let f = &r["fanout"];
    let published = f["published_events"].as_u64().unwrap();
    assert!(published >= 30, "published {published}");
    // 60 subscribers over 3 workspaces: every event reaches 20 of them.
    assert_eq!(f["delivered_frames"].as_u64().unwrap(), published * 20);
    assert_eq!(f["lost"], 0);
    assert_eq!(f["reordered"], 0);
    assert_eq!(r["connect"]["connected"], 60);
    let lat = &f["latency_us"];
    assert_eq!(lat["count"].as_u64().unwrap(), published * 20);
    assert!(lat["p50"].as_u64().unwrap() <= lat["p99"].as_u64().unwrap());
    assert!(lat["p99"].as_u64().unwrap() <= lat["max"].as_u64().unwrap());
    std::fs::remove_file(&json).ok();
}

#[test]
fn detects_gaps_and_reordering() {
    let s = server();
    let json = std::env::temp_dir().join(format!("lt-gaps-{}.json", std::process::id()));
    let args = [
        "fanout",
        "--url",
        &format!("ws://{}", s.public_addr()),
        "--connections",
        "10",
        "--workspaces",
        "2",
        "--rate",
        "0",
        "--duration",
        "3s",
        "--json",
        json.to_str().unwrap(),
    ];
    let child = loadtest(&args);
    let start = Instant::now();
    while subscribed(&s) < 10 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the load tester never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Per workspace: 0, 1, 3, 2, 5. Each subscriber must see one gap that stays open (4) and one
    // event out of order (2, which first looked lost).
    let p = s.publisher();
    for seq in [0u64, 1, 3, 2, 5] {
        for w in 0..2 {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            p.publish(
                &format!("lt_ws_{w}"),
                "loadtest.event",
                &serde_json::json!({"seq": seq, "t": t}),
            )
            .unwrap();
        }
    }
    assert!(finished(child).success());
    let r = read_json(&json);
    let f = &r["fanout"];
    assert_eq!(f["delivered_frames"], 50);
    assert_eq!(f["lost"], 10, "{f}");
    assert_eq!(f["reordered"], 10, "{f}");
    assert_eq!(f["latency_us"]["count"], 50);
    std::fs::remove_file(&json).ok();
}

#[test]
fn churn_reconnects_and_loses_nothing() {
    let s = server();
    let r = churn_run(&s, "churn", "20", &[]);
    let f = &r["fanout"];
    let churned = f["churned"].as_u64().unwrap();
    // 20 a second for 3 seconds, give or take the edges of the window.
    assert!(churned >= 20, "churned {churned}");
    // Every churned connection saw the server's 1000 and came back with a new `connected`.
    let closed_1000 = r["closes"]["1000"].as_u64().unwrap_or(0);
    assert!(
        closed_1000 + 1 >= churned && closed_1000 <= churned,
        "{closed_1000} closes for {churned} churned"
    );
    let connected = r["connect"]["connected"].as_u64().unwrap();
    assert!(
        connected + 2 >= 40 + churned,
        "{connected} connected for 40 + {churned} churned"
    );
    // Reconnecting subscribers start a new sequence: churn alone is no loss.
    assert_eq!(f["lost"], 0);
    assert_eq!(f["reordered"], 0);
    assert!(f["delivered_frames"].as_u64().unwrap() > 0);
}

/// A 3-second churn run (40 connections over 4 workspaces, 20 closes a second) at `rate` events
/// per second per workspace, with `extra` flags; returns its JSON report.
fn churn_run(s: &Server, name: &str, rate: &str, extra: &[&str]) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("lt-{name}-{}.json", std::process::id()));
    let (url, internal) = (
        format!("ws://{}", s.public_addr()),
        format!("http://{}", s.internal_addr()),
    );
    let mut args = vec![
        "fanout",
        "--url",
        &url,
        "--internal",
        &internal,
        "--connections",
        "40",
        "--workspaces",
        "4",
        "--rate",
        rate,
        "--churn",
        "20",
        "--duration",
        "3s",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    assert!(finished(loadtest(&args)).success());
    let r = read_json(&json);
    std::fs::remove_file(&json).ok();
    r
}

#[test]
fn with_continuity_a_resuming_server_gives_back_what_each_reconnect_missed() {
    // The same token comes back on every reconnect: the server replays each its missed events
    // (and those after its last acknowledgement again), so across reconnects nothing is lost.
    let s = server();
    let r = churn_run(&s, "resume", "100", &["--continuity"]);
    let f = &r["fanout"];
    assert!(f["churned"].as_u64().unwrap() >= 20, "{f}");
    assert_eq!(f["lost"], 0, "{f}");
    assert_eq!(f["gaps"], 0, "{f}");
    // Resumes happened: a churned subscriber that had acknowledged nothing yet is replayed
    // from its start, and the load tester counts what it had already read as repeats (a
    // sequence that started over would have counted them as reordered instead).
    assert!(f["repeated"].as_u64().unwrap() > 0, "{f}");
    assert_eq!(f["reordered"], 0, "{f}");
}

/// A stand-in server whose `connected` frame follows the 101 by `delay`, as a cluster-bus node's
/// does for the first subscriber of a workspace (it waits for Redis to confirm). Returns its
/// address; its threads hold every connection open until the test process ends.
fn server_with_late_connected(delay: Duration) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                std::thread::sleep(delay);
                let text = br#"{"type":"connected","payload":{"workspace_id":"w","user_id":"u"},"ts":"2026-01-01T00:00:00.000Z"}"#;
                let mut frame = vec![0x81, text.len() as u8];
                frame.extend_from_slice(text);
                let _ = s.write_all(&frame);
                // Hold the connection until the client goes.
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[test]
fn slow_readers_count_as_connected_when_connected_follows_the_upgrade_later() {
    // A slow reader stops reading once it is connected; it used to stop at the 101, so a
    // `connected` that came in a later segment was never read: the connection never counted,
    // its worker never reported ready, and churn never started in a cluster soak.
    let addr = server_with_late_connected(Duration::from_millis(300));
    let json = std::env::temp_dir().join(format!("lt-late-{}.json", std::process::id()));
    let args = [
        "slow",
        "--url",
        &format!("ws://{addr}"),
        "--internal",
        "http://127.0.0.1:9",
        "--connections",
        "10",
        "--slow-fraction",
        "0.5",
        "--rate",
        "0",
        "--duration",
        "1s",
        "--connect-timeout",
        "10s",
        "--json",
        json.to_str().unwrap(),
    ];
    let status = finished(loadtest(&args));
    assert!(status.success());
    let r = read_json(&json);
    assert!(
        r["slow_connections"].as_u64().unwrap_or(0) > 0,
        "no slow reader in the run: {r}"
    );
    assert_eq!(r["connect"]["connected"], 10, "{}", r["connect"]);
    std::fs::remove_file(&json).ok();
}

/// A throwaway authority and a server certificate for localhost it signed, in `dir`:
/// (ca.pem, the server's files).
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, causeloop_stream::tls::TlsFiles) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let files = causeloop_stream::tls::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(&files.cert, leaf.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (dir.join("ca.pem"), files)
}

#[test]
fn counts_every_frame_over_wss_and_refuses_an_untrusted_certificate() {
    let dir = std::env::temp_dir().join(format!("lt-wss-{}", std::process::id()));
    let (ca, files) = certificate(&dir);
    let s = server_with(Some(files));
    let json = dir.join("run.json");
    let url = format!("wss://localhost:{}", s.public_addr().port());
    let internal = format!("http://{}", s.internal_addr());
    let run = |ca: &std::path::Path, json: &std::path::Path| {
        let args = [
            "fanout",
            "--url",
            &url,
            "--ca-file",
            ca.to_str().unwrap(),
            "--internal",
            &internal,
            "--connections",
            "40",
            "--workspaces",
            "2",
            "--rate",
            "10",
            "--duration",
            "2s",
            "--compression",
            "--pad",
            "200",
            "--connect-timeout",
            "5s",
            "--json",
            json.to_str().unwrap(),
        ];
        finished(loadtest(&args))
    };
    assert!(run(&ca, &json).success());
    let r = read_json(&json);
    let f = &r["fanout"];
    let published = f["published_events"].as_u64().unwrap();
    assert!(published >= 20, "published {published}");
    assert_eq!(r["connect"]["connected"], 40);
    assert_eq!(f["delivered_frames"].as_u64().unwrap(), published * 20);
    assert_eq!(f["lost"], 0);
    // Padded past --compression-min-bytes, the events came compressed, through TLS.
    assert_eq!(f["compressed_frames"], f["delivered_frames"]);

    // Trusting another authority: every connection fails, and the report says why.
    let (other_ca, _) = certificate(&dir.join("other"));
    let json2 = dir.join("refused.json");
    let _ = run(&other_ca, &json2);
    let r = read_json(&json2);
    assert_eq!(r["connect"]["connected"], 0);
    let failures = r["connect"]["failures"].as_object().unwrap();
    assert!(
        failures
            .keys()
            .any(|k| k.starts_with("tls: invalid peer certificate")),
        "{failures:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
