//! What a test does when something it needs from the machine is missing (Redis, Node.js, a
//! network namespace, `../shared`).
//!
//! Under `CI=true` the test fails: CI installs everything, so a missing piece is a broken CI,
//! never a reason to pass having run nothing. Elsewhere the test says so where cargo shows it
//! and returns: the banner goes straight to the process's stderr (`io::stderr()`), which the
//! test harness does not capture, so it appears next to the test's `ok` even when it passes.

use std::io::Write;

/// Whether this run is CI (`CI=true`, as CI services set it and `.ci/run` does).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `test` cannot run because `what` is missing (`how` says how to get it). Panics under CI;
/// otherwise prints the banner uncaptured and the caller returns.
pub fn missing(test: &str, what: &str, how: &str) {
    assert!(
        !in_ci(),
        "{test}: {what} ({how}); CI=true, so this is a failure, not a skip"
    );
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! SKIPPED {test}: {what} !!!!!!!!\n!!!!!!!! {how}\n"
    );
}
