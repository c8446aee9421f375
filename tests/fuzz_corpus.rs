//! Replays every fuzz input the repository keeps (the corpus in `fuzz/corpus/<target>/` and every
//! crash case in `fuzz/regressions/<target>/`) through the same entry points the fuzz targets use
//! (`causeloop_stream::fuzzing`), so that stable `cargo test` guards what the nightly-only fuzzers
//! found. See docs/security.md for how to run the fuzzers themselves.

use causeloop_stream::fuzzing;
use std::path::Path;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

/// `tls_edge` with the fixture certificate, as the fuzz target runs it.
fn tls_edge(data: &[u8]) {
    static FIXTURE: std::sync::OnceLock<fuzzing::TlsFixture> = std::sync::OnceLock::new();
    let fixture = FIXTURE.get_or_init(|| {
        fuzzing::TlsFixture::new(
            include_bytes!("fixtures/tls/cert.pem"),
            include_bytes!("fixtures/tls/key.pem"),
            include_bytes!("fixtures/tls/ca.pem"),
        )
    });
    fuzzing::tls_edge(fixture, data)
}

const TARGETS: [(&str, Target); 13] = [
    ("http_head", fuzzing::http_head),
    ("client_frames", fuzzing::client_frames),
    ("jwt_verify", fuzzing::jwt_verify),
    ("jwks", fuzzing::jwks),
    ("publish_body", fuzzing::publish_body),
    ("resp_reply", fuzzing::resp_reply),
    ("wire_message", fuzzing::wire_message),
    ("cluster_layout", fuzzing::cluster_layout),
    ("bus_subscriptions", fuzzing::bus_subscriptions),
    ("ack_pong", fuzzing::ack_pong),
    ("ws_extensions", fuzzing::ws_extensions),
    ("ws_deflate", fuzzing::ws_deflate),
    ("tls_edge", tls_edge),
];

fn replay(dir: &Path, run: Target) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} fails its invariant", path.display());
        n += 1;
    }
    n
}

#[test]
fn every_committed_fuzz_input_still_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, run) in TARGETS {
        let corpus = replay(&root.join("corpus").join(target), run);
        let regressions = replay(&root.join("regressions").join(target), run);
        eprintln!("{target}: {corpus} corpus inputs, {regressions} regression cases");
        assert!(
            corpus > 0,
            "no corpus for {target}: fuzz/corpus/{target} is missing"
        );
    }
}
