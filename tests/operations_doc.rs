//! docs/operations.md documents every flag of the binary, with its environment twin.

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
