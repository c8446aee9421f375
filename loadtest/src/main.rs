//! `causeloop-loadtest`: the load tester for servers that implement the causeloop-stream contract.
//!
//! The scenarios (`connect`, `fanout`, `storm`, `slow`) are not built yet; until they are, the binary
//! says so and exits non-zero rather than pretending to measure anything.

fn main() {
    eprintln!("causeloop-loadtest: no scenario is implemented yet; see docs/loadtest.md");
    std::process::exit(2);
}
