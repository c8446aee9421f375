//! `--config FILE` and `--print-config` through the binary: precedence flag > environment >
//! file > default, unknown keys refused with their line, secrets never printed.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_causeloop-stream");

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("causeloop-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--print-config");
    for k in [
        "CAUSELOOP_HEARTBEAT_INTERVAL",
        "CAUSELOOP_SHARDS",
        "CAUSELOOP_MAX_CONNECTIONS",
        "CAUSELOOP_PUBLISH_KEY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn flag_beats_environment_beats_file_beats_default() {
    let file = write(
        "ok.toml",
        "max-connections = 5000\nheartbeat-interval = \"2s\"\nshards = 3\njwt_rs256_public_key = [\"a.pem\", \"b.pem\"]\n",
    );
    let out = print_config(
        &["--config", file.to_str().unwrap(), "--shards", "4"],
        &[
            ("CAUSELOOP_HEARTBEAT_INTERVAL", "7s"),
            ("CAUSELOOP_PUBLISH_KEY", "very-secret-publish-key"),
        ],
    );
    assert!(out.contains("shards = \"4\"  # flag\n"), "{out}");
    assert!(
        out.contains("heartbeat-interval = \"7s\"  # environment\n"),
        "{out}"
    );
    assert!(
        out.contains("max-connections = \"5000\"  # file\n"),
        "{out}"
    );
    assert!(
        out.contains("jwt-rs256-public-key = [\"a.pem\", \"b.pem\"]  # file\n"),
        "{out}"
    );
    assert!(
        out.contains("drain-timeout = \"30s\"  # default\n"),
        "{out}"
    );
    assert!(
        out.contains("# CAUSELOOP_PUBLISH_KEY: set (redacted)"),
        "{out}"
    );
    assert!(!out.contains("very-secret-publish-key"));
    // The printed configuration reads back as a configuration file.
    let again = write(
        "again.toml",
        &out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split("  #").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let out2 = print_config(&["--config", again.to_str().unwrap()], &[]);
    assert!(out2.contains("shards = \"4\"  # file\n"), "{out2}");
    assert!(
        out2.contains("heartbeat-interval = \"7s\"  # file\n"),
        "{out2}"
    );
}

#[test]
fn unknown_keys_and_bad_values_are_refused_with_their_line() {
    let file = write(
        "bad.toml",
        "listen = \"127.0.0.1:0\"\n# a comment\nmax-conections = 5\n",
    );
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3: unknown key \"max-conections\""),
        "{err}"
    );
    let file = write("bad2.toml", "heartbeat-interval = \"soon\"\n");
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
}
