//! docs/protocol.md carries the code's tables and nothing else: every close code and reason
//! phrase the server can send (`CloseReason`), the codes it counts but never sends, every code
//! the close metric counts one by one (`CLOSED_CODES`), and every HTTP status it can answer
//! (`Status`); and every code the docs list is one the code can produce.

use causeloop_stream::http::Status;
use causeloop_stream::metrics::CLOSED_CODES;
use causeloop_stream::ws::close::{CloseReason, DEAD_PEER};
use std::collections::BTreeSet;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap()
}

/// The rows of the table that follows `heading`, as cells.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("docs/protocol.md has no {heading}"));
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// Codes the server counts but never sends: no code in the client's close, and a dead peer.
const NEVER_SENT: [u16; 2] = [1005, DEAD_PEER];

#[test]
fn the_close_code_table_is_the_codes() {
    let doc = doc();
    let rows = table(&doc, "### Close codes");
    assert!(rows.len() >= 10, "{rows:?}");
    for reason in CloseReason::ALL {
        let code = reason.code().to_string();
        let phrase = reason.phrase();
        let found = rows
            .iter()
            .any(|r| r[0] == code && (phrase.is_empty() || r[1].contains(&format!("`{phrase}`"))));
        assert!(
            found,
            "docs/protocol.md's close code table lacks {code} `{phrase}` ({reason:?})"
        );
    }
    for code in NEVER_SENT {
        let row = rows
            .iter()
            .find(|r| r[0] == code.to_string())
            .unwrap_or_else(|| panic!("docs/protocol.md's close code table lacks {code}"));
        assert_eq!(row[1], "(never sent)", "{code}");
    }
    let known: BTreeSet<String> = CloseReason::ALL
        .iter()
        .map(|r| r.code())
        .chain(NEVER_SENT)
        .map(|c| c.to_string())
        .collect();
    for row in &rows {
        assert!(
            known.contains(&row[0]),
            "docs/protocol.md lists close code {}, which the server never uses",
            row[0]
        );
    }
}

#[test]
fn the_close_metric_counts_exactly_the_documented_codes() {
    let counted: BTreeSet<u16> = CLOSED_CODES.iter().copied().filter(|&c| c != 0).collect();
    let used: BTreeSet<u16> = CloseReason::ALL
        .iter()
        .map(|r| r.code())
        .chain(NEVER_SENT)
        .collect();
    assert_eq!(
        counted, used,
        "causeloop_connections_closed_total's codes differ from the close code table"
    );
}

/// Every `NNN` that opens a backticked status in a table row of the docs (`` `202 {…}` ``,
/// `` `426 Upgrade Required` ``), or a bare status cell (`| 404; …`).
fn documented_statuses(doc: &str) -> BTreeSet<u16> {
    let mut found = BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        for cell in line.split('|') {
            let cell = cell.trim();
            for part in cell.split('`').skip(1).step_by(2).chain([cell]) {
                let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
                let rest = &part[digits.len()..];
                if digits.len() == 3 && (rest.starts_with(' ') || rest.starts_with(';')) {
                    let code: u16 = digits.parse().unwrap();
                    if (100..600).contains(&code) {
                        found.insert(code);
                    }
                }
            }
        }
    }
    found
}

#[test]
fn the_http_status_tables_are_the_statuses() {
    let doc = doc();
    let documented = documented_statuses(&doc);
    // 101 is the upgrade, written by the WebSocket handshake rather than the status table.
    let answered: BTreeSet<u16> = Status::ALL.iter().map(|s| s.code()).chain([101]).collect();
    let missing: Vec<&u16> = answered.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/protocol.md's tables lack statuses {missing:?}"
    );
    let extra: Vec<&u16> = documented.difference(&answered).collect();
    assert!(
        extra.is_empty(),
        "docs/protocol.md lists statuses {extra:?}, which the server never answers"
    );
}

#[test]
fn the_function_library_in_cluster_md_is_the_one_the_nodes_load() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cluster.md"))
        .expect("docs/cluster.md");
    let start = doc
        .find("```lua\n")
        .expect("cluster.md shows the library in a lua block")
        + "```lua\n".len();
    let end = start + doc[start..].find("\n```").expect("the block ends");
    assert_eq!(
        &doc[start..end],
        causeloop_stream::bus::cluster::FUNCTIONS.trim_end(),
        "docs/cluster.md's copy of src/bus/cluster/causeloop.lua differs from the file"
    );
}
