//! The binary as an operator runs it: the `listening` lines, env twins, SIGTERM drain with 1001,
//! `/readyz` turning 503, exit status, `--dev`, `token`, and the token never reaching the output.

mod common;

use common::process::*;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends SIGTERM (through `kill(1)`, which keeps the test crate free of `unsafe`).
fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM, answer the 1001 like a browser, and expect a clean exit.
fn stop_cleanly(p: &mut Proc, mut ws: Ws) {
    sigterm(&p.child);
    assert_eq!(expect_close(&mut ws, false).0, 1001);
    finish_close(&mut ws);
    drop(ws);
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(5)), Some(0));
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_drains_with_1001_and_exits_zero() {
    let mut p = spawn(
        &["--drain-timeout", "20s", "--log-level", "debug"],
        &secret_env(),
    );
    let tok = token("ws_drain", "usr_1", 600);
    let mut ws = connect(&format!(
        "ws://{}/v1/stream?token={tok}&workspace=ws_drain",
        p.public
    ));
    assert!(read_text(&mut ws).contains("connected"));
    let silent = silent_subscriber(p.public, "ws_drain");
    let get = |addr: SocketAddr, path: &str| {
        raw_http(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(status_of(&get(p.internal, "/readyz")), 200);

    sigterm(&p.child);
    let (code, reason) = expect_close(&mut ws, false);
    assert_eq!((code, reason.as_str()), (1001, "server going away"));
    finish_close(&mut ws);
    drop(ws);
    // The silent client holds the drain open: the process is draining, not ready, and refuses
    // publishes with a clear answer.
    assert_eq!(status_of(&get(p.internal, "/readyz")), 503);
    let (st, body) = publish_with_key(
        p.internal,
        Some(PUBLISH_KEY),
        r#"{"workspace_id":"w","type":"a","payload":{}}"#,
    );
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    // New connections are refused: the public listener is closed.
    assert!(std::net::TcpStream::connect(p.public).is_err());
    assert!(
        wait_exit(&mut p.child, Duration::from_millis(300)).is_none(),
        "exited while a client was still connected"
    );
    // The last client goes away; the drain ends and the process exits 0 well before the timeout.
    drop(silent);
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(8)), Some(0));

    let mut err = String::new();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).unwrap();
    assert!(
        !err.contains(&tok) && !out.contains(&tok),
        "the token reached the output"
    );
    assert!(
        !err.contains(&tok[tok.len() - 20..]),
        "part of the token's signature reached the output"
    );
    assert!(
        err.contains("connection closed"),
        "debug log of the connection is missing: {err}"
    );
}

#[test]
fn drain_timeout_bounds_an_unresponsive_client() {
    let mut p = spawn(&["--drain-timeout", "500ms"], &secret_env());
    let tok = token("ws_d", "u", 600);
    let mut ws = connect(&format!(
        "ws://{}/v1/stream?token={tok}&workspace=ws_d",
        p.public
    ));
    assert!(read_text(&mut ws).contains("connected"));
    sigterm(&p.child);
    // The client never answers the 1001.
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(5)), Some(0));
    assert_eq!(expect_close(&mut ws, false).0, 1001);
}

#[test]
fn refuses_to_start_without_keys_and_says_why() {
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .env_remove("CAUSELOOP_JWT_HS256_SECRET")
        .env("CAUSELOOP_PUBLISH_KEY", "k")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no JWT key configured"), "{err}");
    let bad = Command::new(BIN)
        .args(["--heartbeat-interval", "5 parsecs"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid duration"));
}

#[test]
fn env_twins_configure_the_server() {
    let mut env = secret_env();
    env.push(("CAUSELOOP_HEARTBEAT_INTERVAL", "150ms"));
    env.push(("CAUSELOOP_SHARDS", "1"));
    let mut p = spawn(&[], &env);
    let mut ws = connect(&format!(
        "ws://{}/v1/stream?token={}&workspace=w",
        p.public,
        token("w", "u", 60)
    ));
    assert!(read_text(&mut ws).contains("connected"));
    let start = Instant::now();
    assert!(read_text(&mut ws).contains("heartbeat"));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "CAUSELOOP_HEARTBEAT_INTERVAL was not applied"
    );
    stop_cleanly(&mut p, ws);
}

#[test]
fn dev_mode_prints_a_working_url_and_curl_command() {
    let mut p = spawn(&["--dev"], &[]);
    let mut banner = String::new();
    let mut line = String::new();
    while !banner.contains("every event type") {
        line.clear();
        if p.stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        banner.push_str(&line);
    }
    assert!(banner.contains("DEVELOPMENT MODE"), "{banner}");
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .unwrap()
        .to_string();
    let key = banner
        .split("Authorization: Bearer ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    let mut ws = connect(&url);
    assert!(read_text(&mut ws).contains(r#""workspace_id":"ws_dev","user_id":"usr_dev""#));
    let (st, _) = publish_with_key(
        p.internal,
        Some(&key),
        r#"{"workspace_id":"ws_dev","type":"issue.created","payload":{"id":"from-test"}}"#,
    );
    assert_eq!(st, 202);
    // The demo publisher's events and ours both arrive; ours is among the next few.
    let mut found = false;
    for _ in 0..4 {
        if read_event(&mut ws).contains("from-test") {
            found = true;
            break;
        }
    }
    assert!(found);
    stop_cleanly(&mut p, ws);
}

#[test]
fn token_subcommand_mints_a_token_the_server_accepts() {
    let out = Command::new(BIN)
        .args([
            "token",
            "--workspace",
            "ws_t",
            "--user",
            "usr_t",
            "--ttl",
            "2m",
        ])
        .env(
            "CAUSELOOP_JWT_HS256_SECRET",
            std::str::from_utf8(SECRET).unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let s = TestServer::start();
    let mut ws = connect(&s.url(&tok, "ws_t"));
    assert!(read_text(&mut ws).contains(r#""user_id":"usr_t""#));
    let missing = Command::new(BIN)
        .args(["token", "--workspace", "w", "--user", "u"])
        .env_remove("CAUSELOOP_JWT_HS256_SECRET")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn json_logs_have_one_open_and_one_close_line_per_connection_and_no_token() {
    let mut p = spawn(
        &["--log-format", "json", "--log-level", "debug"],
        &secret_env(),
    );
    let tok = token("ws_log", "usr_log", 600);
    let mut ws = connect(&format!(
        "ws://{}/v1/stream?token={tok}&workspace=ws_log",
        p.public
    ));
    assert!(read_text(&mut ws).contains("connected"));
    ws.close(None).unwrap();
    let _ = expect_close(&mut ws, false);
    finish_close(&mut ws);
    drop(ws);
    let bad = token("ws_log", "usr_bad", -600);
    let mut refused = connect(&format!(
        "ws://{}/v1/stream?token={bad}&workspace=ws_log",
        p.public
    ));
    assert_eq!(expect_close(&mut refused, true).0, 4401);
    finish_close(&mut refused);
    drop(refused);
    // Requests the server refuses over plain HTTP, each carrying the token: none is reflected.
    for req in [
        format!("GET /v1/streams?token={tok}&workspace=ws_log HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /v1/stream?token={tok}&workspace=ws_log HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /v1/stream?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        format!("POST /v1/stream?token={tok} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
    ] {
        let resp = raw_http(p.public, req.as_bytes());
        assert!(status_of(&resp) >= 400, "{resp}");
        assert!(!resp.contains(&tok), "a response reflected the token: {resp}");
    }
    let metrics = raw_http(
        p.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(metrics.contains("causeloop_auth_failures_total"));
    assert!(!metrics.contains(&tok) && !metrics.contains(&bad));
    // Both WebSocket connections are removed (their close lines written) before the drain.
    assert!(eventually(WAIT, || {
        metric(
            p.internal,
            "causeloop_connections_closed_total{code=\"1005\"}",
        ) == Some(1)
            && metric(
                p.internal,
                "causeloop_connections_closed_total{code=\"4401\"}",
            ) == Some(1)
    }));
    sigterm(&p.child);
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(8)), Some(0));
    let mut err = String::new();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !err.contains(&tok) && !err.contains(&bad),
        "a token reached the log"
    );
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let open: Vec<_> = lines
        .iter()
        .filter(|l| l["msg"] == "connection open")
        .collect();
    assert_eq!(open.len(), 1, "{err}");
    assert_eq!(open[0]["workspace"], "ws_log");
    assert_eq!(open[0]["user"], "usr_log");
    assert!(open[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // WebSocket connections only: the plain HTTP exchanges above end with code 0.
    let closed: Vec<_> = lines
        .iter()
        .filter(|l| l["msg"] == "connection closed" && l["code"] != 0)
        .collect();
    assert_eq!(closed.len(), 2, "{err}");
    assert!(
        closed
            .iter()
            .any(|l| l["code"] == 1005 && l["user"] == "usr_log"),
        "{err}"
    );
    assert!(closed.iter().any(|l| l["code"] == 4401), "{err}");
    assert!(
        lines.iter().any(|l| l["msg"] == "connection refused"
            && l["reason"] == "expired"
            && l["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:"))),
        "{err}"
    );
}

fn sighup(child: &Child) {
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sighup_reloads_the_secret_file_and_a_broken_file_keeps_the_old_keys() {
    let dir = std::env::temp_dir().join(format!("causeloop-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secrets");
    std::fs::write(&path, "old-secret-0123456789abcdef\n").unwrap();
    let mut p = spawn(
        &["--jwt-hs256-secret-file", path.to_str().unwrap()],
        &[("CAUSELOOP_PUBLISH_KEY", PUBLISH_KEY)],
    );
    let signed = |secret: &str| {
        causeloop_stream::auth::jwt::sign_hs256(
            secret.as_bytes(),
            format!(
                r#"{{"sub":"u","workspace_id":"ws_k","exp":{}}}"#,
                now() + 600
            )
            .as_bytes(),
        )
    };
    let url = |t: &str| format!("ws://{}/v1/stream?token={t}&workspace=ws_k", p.public);
    let mut kept = connect(&url(&signed("old-secret-0123456789abcdef")));
    assert!(read_text(&mut kept).contains("connected"));

    std::fs::write(&path, "new-secret-0123456789abcdef\n").unwrap();
    sighup(&p.child);
    assert!(eventually(Duration::from_secs(5), || metric(
        p.internal,
        "causeloop_key_reloads_total{result=\"ok\"}"
    ) == Some(1)));
    let mut fresh = connect(&url(&signed("new-secret-0123456789abcdef")));
    assert!(read_text(&mut fresh).contains("connected"));
    let mut old = connect(&url(&signed("old-secret-0123456789abcdef")));
    assert_eq!(expect_close(&mut old, true).0, 4401);

    // A broken file: the reload fails, is counted, and the keys in force stay.
    std::fs::write(&path, "").unwrap();
    sighup(&p.child);
    assert!(eventually(Duration::from_secs(5), || metric(
        p.internal,
        "causeloop_key_reloads_total{result=\"error\"}"
    ) == Some(1)));
    let mut still = connect(&url(&signed("new-secret-0123456789abcdef")));
    assert!(read_text(&mut still).contains("connected"));
    // The connection opened under the first key was never touched.
    kept.send(tungstenite::Message::Ping(b"alive".to_vec()))
        .unwrap();
    expect_pong(&mut kept, b"alive");
    sigterm(&p.child);
    drop((kept, fresh, old, still));
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(10)), Some(0));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_new_process_takes_over_the_ports_while_the_old_one_drains_and_no_connection_is_refused() {
    let mut old = spawn(&["--drain-timeout", "10s"], &secret_env());
    let (public, internal) = (old.public.to_string(), old.internal.to_string());
    let url = format!(
        "ws://{public}/v1/stream?token={}&workspace=ws_zd",
        token("ws_zd", "u", 600)
    );
    // A long-lived client of the old process (connected before the new one exists): it gets
    // 1001 and would reconnect.
    let mut resident = connect(&url);
    assert!(read_text(&mut resident).contains("connected"));
    let mut new = spawn_at(&public, &internal, &[], &secret_env());
    assert_eq!(new.public, old.public);
    assert_eq!(new.internal, old.internal);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let made = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let client = {
        let (url, stop, made) = (url.clone(), stop.clone(), made.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                match try_connect(&url) {
                    Ok(mut ws) => match ws.read() {
                        Ok(tungstenite::Message::Text(t)) if t.contains("connected") => {}
                        // Caught mid-drain by the old process: a clean 1001, then reconnect.
                        Ok(tungstenite::Message::Close(Some(f))) if u16::from(f.code) == 1001 => {}
                        other => failures.push(format!("{other:?}")),
                    },
                    Err(e) => failures.push(e.to_string()),
                }
                made.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
            failures
        })
    };
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    let _guard = StopOnDrop(stop.clone());
    let made_now = || made.load(std::sync::atomic::Ordering::Acquire);
    // Both processes serve the port for a while before the old one drains...
    assert!(eventually(WAIT, || made_now() >= 30));
    sigterm(&old.child);
    assert_eq!(expect_close(&mut resident, false).0, 1001);
    finish_close(&mut resident);
    drop(resident);
    assert_eq!(
        wait_exit(&mut old.child, Duration::from_secs(10)),
        Some(0),
        "the old process did not finish its drain"
    );
    // ...and the new one serves it alone for a while after.
    let at_exit = made_now();
    assert!(eventually(WAIT, || made_now() >= at_exit + 30));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let failures = client.join().unwrap();
    let ok = made_now() as usize - failures.len();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed during the restart: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 50, "only {ok} connections made");
    // The new process serves the port alone now, publishes included.
    let mut after = connect(&url);
    assert!(read_text(&mut after).contains("connected"));
    let (st, _) = publish_with_key(
        new.internal,
        Some(PUBLISH_KEY),
        r#"{"workspace_id":"ws_zd","type":"after.restart","payload":{}}"#,
    );
    assert_eq!(st, 202);
    assert!(read_event(&mut after).contains("after.restart"));
    sigterm(&new.child);
    let _ = expect_close(&mut after, false);
    finish_close(&mut after);
    drop(after);
    assert_eq!(wait_exit(&mut new.child, Duration::from_secs(10)), Some(0));
}

#[test]
fn drain_spread_sends_1001s_in_batches_over_the_window() {
    let mut p = spawn(
        &[
            "--drain-spread",
            "1s",
            "--drain-timeout",
            "10s",
            "--shards",
            "1",
        ],
        &secret_env(),
    );
    let url = format!(
        "ws://{}/v1/stream?token={}&workspace=ws_sp",
        p.public,
        token("ws_sp", "u", 600)
    );
    let mut clients: Vec<Ws> = (0..20)
        .map(|_| {
            let mut ws = connect(&url);
            assert!(read_text(&mut ws).contains("connected"));
            ws
        })
        .collect();
    let start = Instant::now();
    sigterm(&p.child);
    // Each client records when its 1001 arrived, from its own thread.
    let handles: Vec<_> = clients
        .drain(..)
        .map(|mut ws| {
            std::thread::spawn(move || {
                let (code, _) = expect_close(&mut ws, false);
                let at = start.elapsed();
                finish_close(&mut ws);
                (code, at)
            })
        })
        .collect();
    let mut times: Vec<Duration> = handles
        .into_iter()
        .map(|h| {
            let (code, at) = h.join().unwrap();
            assert_eq!(code, 1001);
            at
        })
        .collect();
    times.sort();
    // Spread over about a second: the first closes come at once, the last ones near the end.
    assert!(
        times[0] < Duration::from_millis(400),
        "first 1001 after {:?}",
        times[0]
    );
    assert!(
        times[19] >= Duration::from_millis(700),
        "last 1001 after {:?}: not spread",
        times[19]
    );
    assert!(
        times[19] < Duration::from_secs(5),
        "last 1001 after {:?}",
        times[19]
    );
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(10)), Some(0));
}

#[test]
fn cpu_affinity_pins_each_shard_thread() {
    let mut p = spawn(&["--shards", "2", "--cpu-affinity", "1,0"], &secret_env());
    // /proc/PID/task/TID/status names each thread and its allowed CPUs.
    let mut pinned = std::collections::BTreeMap::new();
    let start = Instant::now();
    let want = |m: &std::collections::BTreeMap<String, String>| {
        m.get("shard-0").map(String::as_str) == Some("1")
            && m.get("shard-1").map(String::as_str) == Some("0")
    };
    // Each shard pins itself as its thread starts: poll until both have.
    while !want(&pinned) && start.elapsed() < Duration::from_secs(5) {
        for task in std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
            .unwrap()
            .flatten()
        {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap_or("")
                .trim()
                .to_string();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_string();
            if name.starts_with("shard-") {
                pinned.insert(name, cpus);
            }
        }
    }
    assert_eq!(
        pinned.get("shard-0").map(String::as_str),
        Some("1"),
        "{pinned:?}"
    );
    assert_eq!(
        pinned.get("shard-1").map(String::as_str),
        Some("0"),
        "{pinned:?}"
    );
    sigterm(&p.child);
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(5)), Some(0));
}

#[test]
fn running_out_of_descriptors_pauses_accepting_without_spinning_and_recovers() {
    // The server gets 64 descriptors; the test opens far more connections than that.
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--nofile=64:64",
        BIN,
        "--listen",
        "127.0.0.1:0",
        "--internal-listen",
        "127.0.0.1:0",
        "--shards",
        "1",
    ]);
    for (k, v) in secret_env() {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs the server");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let public: SocketAddr = line
        .trim()
        .strip_prefix("listening public=")
        .unwrap()
        .parse()
        .unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let mut p = Proc {
        child,
        public,
        internal: line
            .trim()
            .strip_prefix("listening internal=")
            .unwrap()
            .parse()
            .unwrap(),
        stdout,
    };

    let url = format!(
        "ws://{public}/v1/stream?token={}&workspace=ws_fd",
        token("ws_fd", "u", 600)
    );
    let mut held: Vec<Ws> = Vec::new();
    // Fill the descriptor table with live WebSocket connections.
    while held.len() < 200 {
        // An accepted connection answers; one stuck in the kernel's backlog does not, and this
        // client gives up after a short read timeout.
        match try_connect_within(&url, Duration::from_millis(300)) {
            Ok(mut ws) => match ws.read() {
                Ok(tungstenite::Message::Text(t)) if t.contains("connected") => held.push(ws),
                _ => break,
            },
            Err(_) => break,
        }
    }
    assert!(
        held.len() > 20 && held.len() < 64,
        "held {} connections under a 64-descriptor limit",
        held.len()
    );
    // Now starved: more clients wait in the backlog. The loop must not spin meanwhile.
    let waiting: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(public).unwrap())
        .collect();
    let pid = p.child.id().to_string();
    let cpu = |pid: &str| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    // Each back-off is one sleep in epoll_wait, a voluntary context switch of the shard's
    // thread: wait for ten of them (a spinning loop never gets there) and check the CPU spent
    // meanwhile (a spinning one would burn about 10 ticks per 100 ms back-off).
    let shard = shard_thread(&pid);
    let sleeps = || voluntary_switches(&pid, &shard);
    let (before, slept) = (cpu(&pid), sleeps());
    let waited = Instant::now();
    assert!(
        eventually(WAIT, || sleeps() >= slept + 10),
        "the starved shard never slept: spinning"
    );
    let ticks = cpu(&pid) - before;
    let window = waited.elapsed();
    // 30% of a core over the window, in 10 ms ticks, and one tick of rounding.
    let allowed = window.as_millis() as u64 * 3 / 100 + 1;
    assert!(
        ticks <= allowed,
        "the server used {ticks} CPU ticks in {window:?} while starved (allowed {allowed}): spinning"
    );
    // Descriptors come back: accepting resumes and a new client is served.
    for ws in held.iter_mut().take(15) {
        let _ = ws.close(None);
    }
    held.truncate(held.len() - 15);
    drop(waiting);
    assert!(eventually(Duration::from_secs(10), || {
        try_connect_within(&url, Duration::from_millis(500))
            .is_ok_and(|mut ws| matches!(ws.read(), Ok(tungstenite::Message::Text(t)) if t.contains("connected")))
    }));
    sigterm(&p.child);
    drop(held);
    assert_eq!(wait_exit(&mut p.child, Duration::from_secs(10)), Some(0));
    let mut err = String::new();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // One warning per starvation episode (the backlog's closed clients can start a second one),
    // never one per 100 ms back-off.
    let warnings = err.matches("pausing accepts").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} starvation warnings: {err}"
    );
    assert!(err.contains("accepting again"), "{err}");
}

/// The thread id of the first shard of process `pid`.
fn shard_thread(pid: &str) -> String {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "shard-0")
        })
        .expect("a thread named shard-0")
}

/// How many times thread `tid` of `pid` has gone to sleep of its own accord.
fn voluntary_switches(pid: &str, tid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}
