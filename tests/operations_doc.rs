//! docs/operations.md documents every flag of the binary, with its environment twin.

mod common;

use std::process::Command;

#[test]
fn every_flag_and_env_twin_is_documented() {
    let help = Command::new(env!("CARGO_BIN_EXE_causeloop-stream"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let mut flags = 0;
    for line in help.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("--") else {
            continue;
        };
        let flag = rest.split([' ', ',']).next().unwrap();
        if flag == "help" || flag == "version" {
            continue;
        }
        flags += 1;
        assert!(
            doc.contains(&format!("| `--{flag}` |")),
            "docs/operations.md lacks a row for --{flag}"
        );
    }
    assert!(flags >= 25, "parsed only {flags} flags from --help");
    for env in help
        .split("[env: ")
        .skip(1)
        .map(|s| s.split('=').next().unwrap())
    {
        assert!(
            doc.contains(&format!("`{env}`")),
            "docs/operations.md lacks {env}"
        );
    }
    // And the other way: every flag row names a flag the binary has.
    for row in doc.lines().filter(|l| l.starts_with("| `--")) {
        let flag = row.split('`').nth(1).unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "docs/operations.md documents {flag}, which the binary lacks"
        );
    }
}

/// The metric family of one sample line: its name without the labels and without the
/// histogram's `_bucket`, `_sum` and `_count` (the docs name a histogram once).
fn family(sample: &str) -> Option<&str> {
    if sample.starts_with('#') || sample.trim().is_empty() {
        return None;
    }
    let name = sample.split(['{', ' ']).next()?;
    Some(
        ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name),
    )
}

#[test]
fn every_exported_metric_is_documented_and_every_documented_one_exported() {
    // A server that has done a little of everything, so that every family has samples.
    let s = common::TestServer::start();
    let mut ws = s.subscribe("ws_m", "u");
    let (status, _) = s.publish(r#"{"workspace_id":"ws_m","type":"t","payload":{}}"#);
    assert_eq!(status, 202);
    common::read_event(&mut ws);
    let scrape = common::raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    // And one with TLS, whose certificate's expiry is exported only then.
    let cert = common::tls::TestCert::new("ops-doc", 2030, 1, 1);
    let files = cert.files();
    let t = common::TestServer::with(|c| c.tls = Some(files));
    let tls_scrape = common::raw_http(
        t.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let body = format!(
        "{}\n{}",
        scrape.split("\r\n\r\n").nth(1).unwrap_or(""),
        tls_scrape.split("\r\n\r\n").nth(1).unwrap_or("")
    );
    let body = body.as_str();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let mut exported: Vec<&str> = body.lines().filter_map(family).collect();
    exported.dedup();
    assert!(
        exported.len() >= 20,
        "only {} families in {body}",
        exported.len()
    );
    let undocumented: Vec<&str> = exported
        .iter()
        .copied()
        .filter(|name| {
            !doc.contains(&format!("| `{name}`")) && !doc.contains(&format!("| `{name}{{"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/operations.md's metric table lacks {undocumented:?}"
    );
    let unexported: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `causeloop_"))
        .map(|row| row.split('`').nth(1).unwrap().split('{').next().unwrap())
        .filter(|name| !exported.contains(name))
        .collect();
    assert!(
        unexported.is_empty(),
        "docs/operations.md documents {unexported:?}, which /metrics does not export"
    );
}
