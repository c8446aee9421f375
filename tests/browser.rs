//! Also `--dev`'s page in the same Chromium: connected, frames as they arrive, and an event
//! published from its own form (a screenshot of it is what docs/ shows).
//!
//! The seed's browser client in a real headless Chromium (Debian's `chromium`), over `wss://`
//! with `permessage-deflate`: Chromium offers the extension on every WebSocket, so the event it
//! shows arrived compressed, through the server's own TLS.
//!
//! The page is a local file holding the client code cut from the API document, unchanged but for
//! the URL and token; `console.log` lines are kept in `window.logs`. The test drives Chromium
//! through its DevTools protocol (a WebSocket, spoken here with tungstenite) and polls those
//! lines with a deadline. Chromium trusts the test certificate by its key
//! (`--ignore-certificate-errors-spki-list`), not by turning checks off.

mod common;

use base64::Engine;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Chromium, or `None` (with the skip banner outside CI) when it is not installed.
fn chromium() -> Option<String> {
    let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => Some(bin),
        _ => {
            deps::missing(
                "tests/browser.rs",
                &format!("`{bin}` is not installed"),
                "apt-get install chromium (or set CHROMIUM=/path/to/chromium)",
            );
            None
        }
    }
}

/// Kills Chromium when the test ends, whatever the outcome.
struct Browser(Child, std::path::PathBuf);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The DevTools port Chromium announces on stderr (`DevTools listening on ws://...`).
fn devtools_port(child: &mut Child) -> u16 {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                let port = rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
                let _ = tx.send(port);
            }
        }
    });
    rx.recv_timeout(WAIT)
        .ok()
        .flatten()
        .expect("Chromium did not announce its DevTools port")
}

/// The page's DevTools WebSocket URL (`/json/list`; Chromium keeps the connection open, so the
/// answer is read until its body parses).
fn page_target(port: u16) -> String {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let request = format!("GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        sock.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < WAIT {
            match sock.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
            let text = String::from_utf8_lossy(&got);
            let Some(body) = text.split("\r\n\r\n").nth(1) else {
                continue;
            };
            let Ok(targets) = serde_json::from_str::<serde_json::Value>(body) else {
                continue;
            };
            let page = targets.as_array().and_then(|t| {
                t.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            });
            if let Some(url) = page {
                return url.to_string();
            }
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no page target in {:?}",
            String::from_utf8_lossy(&got)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Evaluates `expr` in the page; its value as JSON.
fn evaluate<S: std::io::Read + std::io::Write>(
    cdp: &mut tungstenite::WebSocket<S>,
    id: u64,
    expr: &str,
) -> serde_json::Value {
    let call = serde_json::json!({
        "id": id,
        "method": "Runtime.evaluate",
        "params": { "expression": expr, "returnByValue": true },
    });
    cdp.send(Message::Text(call.to_string())).unwrap();
    loop {
        let Message::Text(t) = cdp.read().expect("DevTools answer") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["id"] == id {
            return v["result"]["result"]["value"].clone();
        }
    }
}

#[test]
fn the_seed_client_in_chromium_over_wss_with_compression() {
    let Some(bin) = chromium() else { return };
    let workspace = "ws_01abc123";
    let cert = tls::TestCert::new("chromium", 2030, 1, 1);
    let files = cert.files();
    let s = TestServer::with(|c| {
        c.shards = 1;
        c.tls = Some(files);
    });
    let dir = std::env::temp_dir().join(format!("causeloop-chromium-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("wss://localhost:{}/v1/stream", s.public.port());
    let page = dir.join("page.html");
    std::fs::write(
        &page,
        format!(
            "<!doctype html><meta charset=utf-8><title>causeloop-stream</title><script>\n\
             window.logs = [];\n\
             for (const k of ['log', 'warn', 'error']) {{\n\
               const orig = console[k];\n\
               console[k] = (...a) => {{ window.logs.push(a.map(String).join(' ')); orig(...a); }};\n\
             }}\n\
             {}\n</script>",
            seed_client_source(&url, &token(workspace, "usr_01abc456", 600))
        ),
    )
    .unwrap();
    // Chromium trusts the test certificate by the SHA-256 of its public key.
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let spki = spki_of(&leaf);
    let pin = base64::engine::general_purpose::STANDARD
        .encode(ring::digest::digest(&ring::digest::SHA256, &spki));
    let (_browser, mut cdp) = launch(
        &bin,
        &dir,
        &[format!("--ignore-certificate-errors-spki-list={pin}")],
        &format!("file://{}", page.display()),
    );
    let mut id = 0;
    let mut logs = |needle: &str| {
        let expr = format!(
            "(window.logs || []).some(l => l.includes({}))",
            serde_json::to_string(needle).unwrap()
        );
        wait_for(
            &mut cdp,
            &mut id,
            &expr,
            &format!("the log line {needle:?}"),
        );
    };
    logs(&format!("[WS] authenticated as workspace {workspace}"));
    let title = "Payment gateway timeout on checkout, seen in Chromium over TLS, compressed";
    assert_eq!(
        s.publish(&format!(
            r#"{{"workspace_id":"{workspace}","type":"issue.created","payload":{{"id":"iss_01abc123","title":"{title}","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2024-01-15T10:00:00.000Z"}}}}"#
        ))
        .0,
        202
    );
    logs(&format!("New issue: {title}"));
    // Chromium offered permessage-deflate; the event went compressed, through TLS.
    let compressed = common::process::metric(s.internal, "causeloop_compressed_frames_total");
    assert!(compressed >= Some(1), "{compressed:?}");
    let handshakes =
        common::process::metric(s.internal, "causeloop_tls_handshakes_total{result=\"ok\"}");
    assert!(handshakes >= Some(1), "{handshakes:?}");
}

/// Chromium headless on `url` (its profile in `dir`, removed with it), and a DevTools connection
/// to the page; the flags that keep it off the network but for the page.
fn launch(
    bin: &str,
    dir: &std::path::Path,
    extra: &[String],
    url: &str,
) -> (
    Browser,
    tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
) {
    let profile = dir.join("profile");
    let child = Command::new(bin)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,800",
            "--remote-debugging-port=0",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(extra)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let mut browser = Browser(child, dir.to_path_buf());
    let port = devtools_port(&mut browser.0);
    let (mut cdp, _) = tungstenite::connect(page_target(port)).expect("DevTools");
    if let tungstenite::stream::MaybeTlsStream::Plain(sock) = cdp.get_mut() {
        sock.set_read_timeout(Some(WAIT)).unwrap();
    }
    (browser, cdp)
}

/// Sends a DevTools command; its result.
fn call<S: std::io::Read + std::io::Write>(
    cdp: &mut tungstenite::WebSocket<S>,
    id: u64,
    method: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    let msg = serde_json::json!({ "id": id, "method": method, "params": params });
    cdp.send(Message::Text(msg.to_string())).unwrap();
    loop {
        let Message::Text(t) = cdp.read().expect("DevTools answer") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["id"] == id {
            assert!(v.get("error").is_none(), "{method}: {v}");
            return v["result"].clone();
        }
    }
}

/// Polls `expr` in the page until it is true, within [`WAIT`]; `what` names it in the failure.
fn wait_for<S: std::io::Read + std::io::Write>(
    cdp: &mut tungstenite::WebSocket<S>,
    id: &mut u64,
    expr: &str,
    what: &str,
) {
    let start = Instant::now();
    loop {
        *id += 1;
        if evaluate(cdp, *id, expr) == serde_json::Value::Bool(true) {
            return;
        }
        if start.elapsed() > WAIT {
            *id += 1;
            let page = evaluate(
                cdp,
                *id,
                "document.body.innerText + ' | log: ' + (window.logs || []).join(' / ')",
            );
            panic!("the page never showed {what}; it shows: {page}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_dev_page_shows_the_stream_and_publishes_from_its_form() {
    let Some(bin) = chromium() else { return };
    let workspace = "ws_dev";
    let limits = causeloop_stream::bus::body::BodyLimits::of(&config());
    let (site, queue) = causeloop_stream::dev_site::DevSite::new(
        workspace,
        "usr_dev",
        &token(workspace, "usr_dev", 600),
        limits,
    );
    let site = std::sync::Arc::new(site);
    let faults = std::sync::Arc::new(causeloop_stream::fault::Faults::default());
    let f2 = faults.clone();
    let s = TestServer::with(|c| {
        c.shards = 1;
        c.heartbeat_interval = Duration::from_millis(500);
        c.dev_site = Some(site);
        c.faults = Some(f2);
    });
    let publisher = s.server().publisher();
    std::thread::spawn(move || {
        causeloop_stream::dev_site::DevSite::publish_queued(queue, publisher, limits)
    });
    let dir = std::env::temp_dir().join(format!("causeloop-devpage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_browser, mut cdp) = launch(&bin, &dir, &[], &format!("http://{}/", s.public));
    let mut id = 0;
    wait_for(
        &mut cdp,
        &mut id,
        "document.getElementById('state').textContent === 'open' && document.getElementById('log').innerText.includes('authenticated as workspace ws_dev')",
        "the connection open and authenticated",
    );
    // An event from a backend, then one from the page's own form (published through the page's
    // server, which holds the key).
    s.server()
        .publisher()
        .publish(
            workspace,
            "pattern.detected",
            &serde_json::json!({"id": "pat_1", "name": "Checkout timeouts under load", "risk_score": 82}),
        )
        .unwrap();
    wait_for(
        &mut cdp,
        &mut id,
        "[...document.querySelectorAll('#frames li')].some(li => li.dataset.type === 'pattern.detected' && li.innerText.includes('Checkout timeouts under load'))",
        "the published pattern.detected event",
    );
    id += 1;
    evaluate(
        &mut cdp,
        id,
        "document.getElementById('payload').value = JSON.stringify({id: 'iss_form', title: 'Sent from the form'}); document.getElementById('send').click(); true",
    );
    wait_for(
        &mut cdp,
        &mut id,
        "[...document.querySelectorAll('#frames li')].some(li => li.dataset.type === 'issue.created' && li.innerText.includes('Sent from the form')) && document.getElementById('published').textContent === 'published'",
        "the event its form published",
    );
    wait_for(
        &mut cdp,
        &mut id,
        "/^[0-9]+ heartbeats?, last /.test(document.getElementById('beats').textContent)",
        "heartbeats folded into a count",
    );
    // The server closes the page's connection (1001, as in a drain): the page shows the code,
    // the client's reconnect, and the connection open again.
    faults.plant(causeloop_stream::fault::Point::Drain, Some("usr_dev"));
    wait_for(
        &mut cdp,
        &mut id,
        "document.getElementById('log').innerText.includes('[WS] closed: 1001') && document.getElementById('log').innerText.includes('[WS] reconnecting in')",
        "the close code and the reconnect",
    );
    wait_for(
        &mut cdp,
        &mut id,
        "document.getElementById('state').textContent === 'open' && [...document.querySelectorAll('#frames li')].filter(li => li.dataset.type === 'connected').length === 2",
        "the connection open again",
    );
    // The page never holds the publish key.
    id += 1;
    let html = evaluate(&mut cdp, id, "document.documentElement.outerHTML");
    assert!(!html.as_str().unwrap_or("").contains(PUBLISH_KEY));
    // A screenshot for docs/ (docs/images/dev-page.png is one of these).
    id += 1;
    let shot = call(
        &mut cdp,
        id,
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dev-page.png");
    std::fs::write(&out, png).unwrap();
    eprintln!("dev page screenshot: {}", out.display());
}

#[test]
fn outside_dev_the_page_and_its_publish_route_are_404() {
    let s = TestServer::start();
    let page = raw_http(s.public, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status_of(&page), 404, "{page}");
    let publish = raw_http(
        s.public,
        b"POST /dev/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(status_of(&publish), 404, "{publish}");
}

/// The SubjectPublicKeyInfo of a certificate (DER): the seventh element of `tbsCertificate`
/// after an optional version.
fn spki_of(cert: &[u8]) -> Vec<u8> {
    fn der(input: &[u8]) -> (u8, usize, usize) {
        // (tag, header length, content length)
        let tag = input[0];
        let first = input[1] as usize;
        if first < 0x80 {
            return (tag, 2, first);
        }
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | b as usize);
        (tag, 2 + n, len)
    }
    let (_, h, _) = der(cert);
    let tbs = &cert[h..];
    let (_, h, len) = der(tbs);
    let mut rest = &tbs[h..h + len];
    let (tag, hh, l) = der(rest);
    if tag == 0xa0 {
        rest = &rest[hh + l..];
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        let (_, hh, l) = der(rest);
        rest = &rest[hh + l..];
    }
    let (_, hh, l) = der(rest);
    rest[..hh + l].to_vec()
}
