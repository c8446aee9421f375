//! The deployment kit in `deploy/` uses only real names: every metric the Grafana dashboard and
//! the alert rules query exists on a running server's `/metrics`, and the sample configuration
//! file is accepted by the binary.

mod common;

use common::*;
use std::collections::BTreeSet;

/// Metric names mentioned in `text` (`causeloop_…` and `process_…`).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["causeloop_", "process_"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            let before_ok = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = start
                + text[start..]
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(text.len() - start);
            if before_ok {
                out.insert(text[start..end].to_string());
            }
            from = end;
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_use_existing_metrics() {
    // With TLS on, so that the certificate's expiry is exported too.
    let cert = common::tls::TestCert::new("deploy-kit", 2030, 1, 1);
    let files = cert.files();
    let s = TestServer::with(|c| c.tls = Some(files));
    let metrics = raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let exposed: BTreeSet<String> = metrics
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    for file in ["grafana/dashboard.json", "prometheus/alerts.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = referenced(&text);
        assert!(!used.is_empty(), "{file} queries no metric");
        for name in &used {
            assert!(
                exposed.contains(name),
                "{file} uses {name}, which /metrics does not expose"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(root.join("grafana/dashboard.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
}

#[test]
fn the_sample_configuration_file_is_accepted() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/causeloop.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_causeloop-stream"))
        .args(["--config", path.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("drain-spread = \"20s\"  # file"), "{text}");
}
