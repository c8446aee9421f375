//! `wss://` end to end: the seed's contract over TLS (connected, heartbeats, one event with
//! the same text on every subscriber, 4401, 4003, the drain's 1001), probes over `https://`,
//! certificate reloads under open connections (the library call and a real SIGHUP to the
//! binary), pairs refused at start, and hostile peers (garbage instead of a ClientHello, a
//! client that stops mid-handshake, a TLS slowloris). Every client is a real TLS client (rustls)
//! under a real WebSocket client (tungstenite), trusting only a test authority made per test.

mod common;

use common::process::{metric, spawn};
use common::tls::*;
use common::*;
use rustls::pki_types::pem::PemObject;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use tungstenite::Message;

fn tls_server(
    cert: &TestCert,
    f: impl FnOnce(&mut causeloop_stream::config::Config),
) -> TestServer {
    let files = cert.files();
    TestServer::with(|c| {
        c.tls = Some(files);
        f(c)
    })
}

fn path(token: &str, workspace: &str) -> String {
    format!("/v1/stream?token={token}&workspace={workspace}")
}

/// Waits until the server ends `sock` (end of stream or reset), within `limit`; how long that
/// took. Anything the server sends first (an alert) is read and discarded.
fn closed_within(sock: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1024];
    while start.elapsed() < limit {
        match sock.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// The first flight of a real TLS client: its ClientHello, as bytes.
fn client_hello(cert: &TestCert) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(cert.client(), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

#[test]
fn the_seed_contract_holds_over_wss() {
    let cert = TestCert::new("contract", 2030, 1, 1);
    let s = tls_server(&cert, |c| {
        c.heartbeat_interval = Duration::from_millis(300);
        c.timer_tick = Duration::from_millis(10);
    });
    let connect = |t: &str, w: &str| connect_wss(s.public, cert.client(), &path(t, w));

    // Two subscribers: `connected`, then heartbeats, then one event with the same text on both.
    let mut a = connect(&token("ws_tls", "usr_a", 600), "ws_tls");
    let mut b = connect(&token("ws_tls", "usr_b", 600), "ws_tls");
    for ws in [&mut a, &mut b] {
        let first = json(&read_text(ws));
        assert_eq!(first["type"], "connected");
        assert_eq!(first["payload"]["workspace_id"], "ws_tls");
        let beat = json(&read_text(ws));
        assert_eq!(beat["type"], "heartbeat", "{beat}");
    }
    let body = r#"{"workspace_id":"ws_tls","type":"issue.created","payload":{"id":"iss_1","title":"over TLS"}}"#;
    assert_eq!(s.publish(body).0, 202);
    let (ea, eb) = (read_event(&mut a), read_event(&mut b));
    assert_eq!(ea, eb, "one frame, the same bytes, for every subscriber");
    let e = json(&ea);
    assert_eq!(e["type"], "issue.created");
    assert_eq!(e["payload"]["title"], "over TLS");

    // Refusals keep their codes over TLS.
    let mut bad = connect("not-a-token", "ws_tls");
    assert_eq!(expect_close(&mut bad, true).0, 4401);
    let mut other = connect(&token("ws_other", "usr_a", 600), "ws_tls");
    assert_eq!(expect_close(&mut other, true).0, 4003);

    // The probes answer over https on the public listener.
    let health = https(
        s.public,
        cert.client(),
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&health), 200, "{health}");
    let ready = https(
        s.public,
        cert.client(),
        b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&ready), 200, "{ready}");
    // Plain HTTP on the TLS listener gets no HTTP answer: the connection ends.
    let plain = raw_http(s.public, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!plain.starts_with("HTTP/1.1"), "{plain:?}");

    // The drain closes both with 1001, through TLS.
    s.server().shutdown();
    for ws in [&mut a, &mut b] {
        assert_eq!(expect_close(ws, false).0, 1001);
        finish_close(ws);
    }
    let handshakes = metric(s.internal, "causeloop_tls_handshakes_total{result=\"ok\"}");
    assert!(handshakes >= Some(6), "{handshakes:?}");
    assert_eq!(
        metric(
            s.internal,
            "causeloop_tls_certificate_expiry_timestamp_seconds "
        ),
        Some(cert.not_after as u64)
    );
}

#[test]
fn tls_1_2_clients_are_served_too() {
    let cert = TestCert::new("tls12", 2030, 1, 1);
    let s = tls_server(&cert, |_| {});
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.ca_der.clone()).unwrap();
    let client = client_with_roots(roots, &[&rustls::version::TLS12]);
    let mut ws = connect_wss(s.public, client, &path(&token("ws_12", "u", 600), "ws_12"));
    assert!(read_text(&mut ws).contains("\"connected\""));
}

#[test]
fn a_reload_swaps_the_certificate_for_new_handshakes_and_a_bad_pair_keeps_the_old() {
    let cert = TestCert::new("reload", 2030, 1, 1);
    let s = tls_server(&cert, |_| {});
    let old_client = cert.client();
    let mut kept = connect_wss(
        s.public,
        old_client.clone(),
        &path(&token("ws_r", "kept", 600), "ws_r"),
    );
    assert!(read_text(&mut kept).contains("\"connected\""));

    let new_ca = cert.replace(2031, 6, 1);
    let control = s.server().control();
    assert!(control.reload_tls().expect("reload"));
    let new_client = client_trusting(&new_ca);
    let mut fresh = connect_wss(
        s.public,
        new_client.clone(),
        &path(&token("ws_r", "fresh", 600), "ws_r"),
    );
    assert!(read_text(&mut fresh).contains("\"connected\""));
    // A client that trusts only the old authority now refuses the server. (A fresh client: one
    // that kept a session from before could resume it, which presents no certificate.)
    drop(old_client);
    let refused = try_connect_wss(
        s.public,
        cert.client(),
        &path(&token("ws_r", "old", 600), "ws_r"),
    );
    assert!(refused.is_err(), "the old certificate is still presented");
    // The connection made before the reload is untouched: it gets the next event.
    let body = r#"{"workspace_id":"ws_r","type":"job.updated","payload":{"id":"job_1"}}"#;
    assert_eq!(s.publish(body).0, 202);
    assert_eq!(json(&read_event(&mut kept))["payload"]["id"], "job_1");
    assert_eq!(json(&read_event(&mut fresh))["payload"]["id"], "job_1");

    // A broken key file: refused, counted, and the pair in force stays.
    std::fs::write(&cert.key, "-----BEGIN PRIVATE KEY-----\nnot a key\n").unwrap();
    let err = control.reload_tls().expect_err("a broken key is refused");
    assert!(err.to_string().contains("key.pem"), "{err}");
    // A key that is not the certificate's: refused too.
    let other = TestCert::new("reload-other", 2030, 1, 1);
    std::fs::copy(&other.key, &cert.key).unwrap();
    let err = control.reload_tls().expect_err("a foreign key is refused");
    assert!(err.to_string().contains("does not match"), "{err}");
    let mut still = connect_wss(
        s.public,
        new_client,
        &path(&token("ws_r", "still", 600), "ws_r"),
    );
    assert!(read_text(&mut still).contains("\"connected\""));
    assert_eq!(
        metric(s.internal, "causeloop_tls_reloads_total{result=\"ok\"}"),
        Some(1)
    );
    assert_eq!(
        metric(s.internal, "causeloop_tls_reloads_total{result=\"error\"}"),
        Some(2)
    );
    let expiry = causeloop_stream::tls::not_after(
        &rustls::pki_types::CertificateDer::from_pem_file(&cert.cert).unwrap(),
    )
    .unwrap();
    assert_eq!(
        metric(
            s.internal,
            "causeloop_tls_certificate_expiry_timestamp_seconds "
        ),
        Some(expiry as u64),
        "the reloaded certificate's expiry"
    );
}

#[test]
fn sighup_reloads_the_certificate_of_the_running_binary() {
    let cert = TestCert::new("sighup", 2030, 1, 1);
    let (c, k) = (cert.cert.to_str().unwrap(), cert.key.to_str().unwrap());
    let mut p = spawn(
        &["--tls-cert", c, "--tls-key", k],
        &common::process::secret_env(),
    );
    let mut kept = connect_wss(
        p.public,
        cert.client(),
        &path(&token("ws_h", "kept", 600), "ws_h"),
    );
    assert!(read_text(&mut kept).contains("\"connected\""));
    let new_ca = cert.replace(2032, 3, 1);
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(eventually(Duration::from_secs(10), || metric(
        p.internal,
        "causeloop_tls_reloads_total{result=\"ok\"}"
    ) == Some(1)));
    let mut fresh = connect_wss(
        p.public,
        client_trusting(&new_ca),
        &path(&token("ws_h", "fresh", 600), "ws_h"),
    );
    assert!(read_text(&mut fresh).contains("\"connected\""));
    kept.send(Message::Ping(b"still here".to_vec())).unwrap();
    expect_pong(&mut kept, b"still here");
    let (found, log) = p.log().wait_for("TLS certificate reloaded");
    assert!(found, "{log}");
    let _ = p.child.kill();
    let _ = p.child.wait();
}

#[test]
fn pairs_that_cannot_serve_are_refused_at_start() {
    let cert = TestCert::new("start", 2030, 1, 1);
    let other = TestCert::new("start-other", 2030, 1, 1);
    let start = |cert_path: &std::path::Path, key_path: &std::path::Path| {
        let mut c = config();
        c.tls = Some(causeloop_stream::tls::TlsFiles {
            cert: cert_path.into(),
            key: key_path.into(),
        });
        match causeloop_stream::server::Server::start(c) {
            Ok(s) => {
                s.shutdown();
                s.wait();
                panic!("started with {cert_path:?} and {key_path:?}");
            }
            Err(e) => e.to_string(),
        }
    };
    let mismatch = start(&cert.cert, &other.key);
    assert!(mismatch.contains("does not match"), "{mismatch}");
    let missing = start(&cert.dir.join("nope.pem"), &cert.key);
    assert!(missing.contains("nope.pem"), "{missing}");
    let swapped = start(&cert.key, &cert.cert);
    assert!(swapped.contains("no PEM certificate"), "{swapped}");

    // One of the two flags alone is a usage error.
    use clap::Parser;
    let half = causeloop_stream::cli::Cli::try_parse_from([
        "causeloop-stream",
        "--tls-cert",
        cert.cert.to_str().unwrap(),
    ]);
    let err = half
        .map(|_| ())
        .expect_err("--tls-cert alone is refused")
        .to_string();
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn garbage_instead_of_a_client_hello_is_dropped_and_counted() {
    let cert = TestCert::new("garbage", 2030, 1, 1);
    let s = tls_server(&cert, |_| {});
    for junk in [
        &b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00][..],
        &[0u8; 600][..],
    ] {
        let mut sock = TcpStream::connect(s.public).unwrap();
        sock.write_all(junk).unwrap();
        let took = closed_within(&mut sock, WAIT);
        assert!(took.is_some(), "kept open after {junk:?}");
    }
    assert!(eventually(WAIT, || metric(
        s.internal,
        "causeloop_tls_handshakes_total{result=\"error\"}"
    ) == Some(3)));
    // The listener still serves.
    let mut ws = connect_wss(
        s.public,
        cert.client(),
        &path(&token("ws_g", "u", 600), "ws_g"),
    );
    assert!(read_text(&mut ws).contains("\"connected\""));
}

#[test]
fn a_client_that_stops_mid_handshake_is_closed_at_the_handshake_timeout() {
    let cert = TestCert::new("stall", 2030, 1, 1);
    let s = tls_server(&cert, |c| c.handshake_timeout = Duration::from_secs(1));
    let hello = client_hello(&cert);
    // Half a ClientHello, then nothing; and a whole one never followed by the client's Finished.
    let mut half = TcpStream::connect(s.public).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    let mut whole = TcpStream::connect(s.public).unwrap();
    whole.write_all(&hello).unwrap();
    // Meanwhile an honest client gets through.
    let mut ws = connect_wss(
        s.public,
        cert.client(),
        &path(&token("ws_s", "u", 600), "ws_s"),
    );
    assert!(read_text(&mut ws).contains("\"connected\""));
    for sock in [&mut half, &mut whole] {
        let took = closed_within(sock, WAIT).expect("closed");
        assert!(took < Duration::from_secs(10), "closed after {took:?}");
    }
    assert!(eventually(WAIT, || metric(
        s.internal,
        "causeloop_tls_handshakes_total{result=\"error\"}"
    ) == Some(2)));
}

#[test]
fn a_tls_slowloris_is_closed_at_the_handshake_timeout() {
    // The TLS handshake completes; the request head then comes one byte at a time. The deadline
    // runs from accept, so dribbling does not push it back.
    let cert = TestCert::new("slowloris", 2030, 1, 1);
    let s = tls_server(&cert, |c| c.handshake_timeout = Duration::from_secs(1));
    let head = b"GET /v1/stream?token=x&workspace=w HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut dribblers: Vec<_> = (0..20)
        .map(|_| {
            let mut d = tls_stream(s.public, cert.client(), WAIT);
            d.conn.complete_io(&mut d.sock).expect("TLS handshake");
            d.sock
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            d
        })
        .collect();
    let started = Instant::now();
    let mut closed = vec![None; dribblers.len()];
    let mut i = 0;
    while closed.iter().any(Option::is_none) && started.elapsed() < WAIT {
        for (k, d) in dribblers.iter_mut().enumerate() {
            if closed[k].is_some() {
                continue;
            }
            let wrote = d
                .write_all(&head[i % head.len()..][..1])
                .and_then(|_| d.flush());
            let mut buf = [0u8; 64];
            let gone = match d.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
                Err(_) => true,
            };
            if gone || wrote.is_err() {
                closed[k] = Some(started.elapsed());
            }
        }
        i += 1;
    }
    for (k, c) in closed.iter().enumerate() {
        let took = c.unwrap_or_else(|| panic!("dribbler {k} still open after {WAIT:?}"));
        assert!(
            took < Duration::from_secs(10),
            "dribbler {k} closed after {took:?}"
        );
    }
}
