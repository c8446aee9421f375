//! `causeloop-loadtest compare A.json B.json [...] [--report cmp.html]`: runs side by side.
//!
//! The runs must be of one scenario (a fan-out next to a connect run compares nothing). Every
//! figure is shown for each run with its ratio to the first; what differs in the setup (the
//! connection and workspace counts, the machine) is said above the table, not hidden. The HTML
//! report overlays the runs' latency percentile curves and delivered-frames series.

use crate::report::{bottleneck_banner, esc, nines_curve, svg_lines, Results};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A figure: its name, how to read it from a run, and whether less is better.
struct Figure {
    name: &'static str,
    get: fn(&Results) -> Option<f64>,
    lower_is_better: bool,
}

fn figures() -> Vec<Figure> {
    let f = |name, get, lower_is_better| Figure {
        name,
        get,
        lower_is_better,
    };
    vec![
        f(
            "connections connected",
            |r| Some(r.connect.connected as f64),
            false,
        ),
        f("connect rate /s", |r| Some(r.connect.rate_per_s), false),
        f(
            "connect p99 µs",
            |r| Some(r.connect.latency_us.p99 as f64),
            true,
        ),
        f(
            "delivered frames /s",
            |r| r.fanout.as_ref().map(|f| f.delivered_per_s),
            false,
        ),
        f(
            "event latency p50 µs",
            |r| r.fanout.as_ref().map(|f| f.latency_us.p50 as f64),
            true,
        ),
        f(
            "event latency p90 µs",
            |r| r.fanout.as_ref().map(|f| f.latency_us.p90 as f64),
            true,
        ),
        f(
            "event latency p99 µs",
            |r| r.fanout.as_ref().map(|f| f.latency_us.p99 as f64),
            true,
        ),
        f(
            "event latency p99.9 µs",
            |r| r.fanout.as_ref().map(|f| f.latency_us.p999 as f64),
            true,
        ),
        f(
            "event latency max µs",
            |r| r.fanout.as_ref().map(|f| f.latency_us.max as f64),
            true,
        ),
        f(
            "frames lost",
            |r| r.fanout.as_ref().map(|f| f.lost as f64),
            true,
        ),
        f(
            "frames reordered",
            |r| r.fanout.as_ref().map(|f| f.reordered as f64),
            true,
        ),
        f(
            "stream.gap frames",
            |r| r.fanout.as_ref().map(|f| f.gaps as f64),
            true,
        ),
        f(
            "bytes received per frame",
            |r| {
                r.fanout
                    .as_ref()
                    .filter(|f| f.delivered_frames > 0)
                    .map(|f| f.bytes_received as f64 / f.delivered_frames as f64)
            },
            true,
        ),
        f(
            "heartbeat lateness p99 µs",
            |r| Some(r.heartbeat_lateness_us.p99 as f64),
            true,
        ),
        f(
            "server CPU ns per frame",
            |r| r.server.as_ref().and_then(|s| s.cpu_ns_per_frame),
            true,
        ),
        f(
            "server CPU ns per connection",
            |r| r.server.as_ref().and_then(|s| s.cpu_ns_per_connection),
            true,
        ),
        f(
            "server RSS bytes per connection",
            |r| r.server.as_ref().and_then(|s| s.rss_bytes_per_connection),
            true,
        ),
        f(
            "server RSS max bytes",
            |r| r.server.as_ref().map(|s| s.rss_bytes_max as f64),
            true,
        ),
        f(
            "load tester busiest worker % core",
            |r| Some(r.loadtest.worker_max_core_share * 100.0),
            true,
        ),
    ]
}

/// The runs, read and checked: one scenario. The error says which file and why.
pub fn load(paths: &[PathBuf]) -> Result<Vec<(String, Results)>, String> {
    if paths.len() < 2 {
        return Err("compare needs at least two runs (JSON files written with --json)".into());
    }
    let mut runs = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let r: Results = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a run's JSON: {e}", p.display()))?;
        runs.push((name_of(p), r));
    }
    let first = runs[0].1.scenario.clone();
    if let Some((name, r)) = runs.iter().find(|(_, r)| r.scenario != first) {
        return Err(format!(
            "{name} is a {} run and {} a {first} run: compare runs of one scenario",
            r.scenario, runs[0].0
        ));
    }
    Ok(runs)
}

fn name_of(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// What differs between the runs' setups (said above the table).
pub fn differences(runs: &[(String, Results)]) -> Vec<String> {
    let mut out = Vec::new();
    let first = &runs[0].1;
    for (name, r) in &runs[1..] {
        if r.connect.requested != first.connect.requested {
            out.push(format!(
                "{name} asked for {} connections, {} for {}",
                r.connect.requested, runs[0].0, first.connect.requested
            ));
        }
        if r.workspaces != first.workspaces {
            out.push(format!(
                "{name} spread over {} workspaces, {} over {}",
                r.workspaces, runs[0].0, first.workspaces
            ));
        }
        if r.machine != first.machine {
            out.push(format!("{name} ran on another machine: {}", r.machine));
        }
    }
    out
}

/// The table: a row per figure that some run has, each value with its ratio to the first run's.
pub fn table(runs: &[(String, Results)]) -> Vec<Vec<String>> {
    let mut rows = vec![std::iter::once("figure".to_string())
        .chain(runs.iter().map(|(n, _)| n.clone()))
        .collect::<Vec<_>>()];
    for f in figures() {
        let values: Vec<Option<f64>> = runs.iter().map(|(_, r)| (f.get)(r)).collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        let base = values[0];
        let mut row = vec![format!(
            "{}{}",
            f.name,
            if f.lower_is_better {
                " (lower is better)"
            } else {
                ""
            }
        )];
        for (i, v) in values.iter().enumerate() {
            row.push(match (v, base) {
                (None, _) => "—".into(),
                (Some(v), _) if i == 0 => num(*v),
                (Some(v), Some(b)) if b != 0.0 => format!("{} ({:.2}×)", num(*v), v / b),
                (Some(v), _) => num(*v),
            });
        }
        rows.push(row);
    }
    rows
}

/// The table as aligned text.
pub fn text(runs: &[(String, Results)]) -> String {
    let rows = table(runs);
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== causeloop-loadtest compare: {} ==",
        runs[0].1.scenario
    );
    for (name, r) in runs {
        let _ = writeln!(o, "  {name}: {} ({})", r.command, r.date);
    }
    for d in differences(runs) {
        let _ = writeln!(o, "  NOTE: {d}");
    }
    for (name, r) in runs {
        if let Some(w) = &r.loadtest.bottleneck_warning {
            let _ = writeln!(
                o,
                "  WARNING: {name}: the load tester was the bottleneck: {w}"
            );
        }
    }
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| format!("{v:<w$}", w = widths[c]))
            .collect();
        let _ = writeln!(o, "  {}", cells.join("  ").trim_end());
    }
    o
}

/// The self-contained HTML comparison.
pub fn html(runs: &[(String, Results)]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>causeloop-loadtest compare</title><style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}</style></head><body>"
    );
    for (name, r) in runs {
        if let Some(w) = &r.loadtest.bottleneck_warning {
            o.push_str(&bottleneck_banner(&format!(
                "{name}: the load tester was the bottleneck: {w}"
            )));
        }
    }
    let _ = write!(
        o,
        "<h1>causeloop-loadtest compare: {}</h1>",
        esc(&runs[0].1.scenario)
    );
    for d in differences(runs) {
        let _ = write!(o, "<p><b>Note:</b> {}</p>", esc(&d));
    }
    let _ = write!(o, "<table>");
    for (i, row) in table(runs).iter().enumerate() {
        let cell = if i == 0 { "th" } else { "td" };
        let _ = write!(o, "<tr>");
        for v in row {
            let _ = write!(o, "<{cell}>{}</{cell}>", esc(v));
        }
        let _ = write!(o, "</tr>");
    }
    let _ = write!(o, "</table>");
    let curves: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .filter(|(_, r)| !r.latency_curve.is_empty())
        .map(|(n, r)| (n.clone(), nines_curve(&r.latency_curve)))
        .collect();
    if !curves.is_empty() {
        let series: Vec<(&str, &[(f64, f64)])> =
            curves.iter().map(|(n, p)| (n.as_str(), &p[..])).collect();
        let _ = write!(
            o,
            "<h2>Event latency by percentile</h2>{}",
            svg_lines(
                &series,
                "percentile (nines: 1 = 90%, 2 = 99%, 3 = 99.9%)",
                "latency (ms)"
            )
        );
    }
    let rates: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .filter(|(_, r)| !r.series.is_empty())
        .map(|(n, r)| {
            let pts = r
                .series
                .iter()
                .map(|p| (p.t_s as f64, p.delivered_per_s as f64))
                .collect();
            (n.clone(), pts)
        })
        .collect();
    if !rates.is_empty() {
        let series: Vec<(&str, &[(f64, f64)])> =
            rates.iter().map(|(n, p)| (n.as_str(), &p[..])).collect();
        let _ = write!(
            o,
            "<h2>Delivered frames per second</h2>{}",
            svg_lines(&series, "seconds", "frames/s")
        );
    }
    let _ = write!(o, "<h2>Commands</h2>");
    for (name, r) in runs {
        let _ = write!(
            o,
            "<p><b>{}</b> ({}, {})</p><pre>{}</pre>",
            esc(name),
            esc(&r.date),
            esc(&r.machine),
            esc(&r.command)
        );
    }
    let _ = write!(o, "</body></html>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FanoutFigures, Percentiles};

    fn run(scenario: &str, delivered: f64, p99: u64) -> Results {
        Results {
            scenario: scenario.into(),
            fanout: Some(FanoutFigures {
                delivered_per_s: delivered,
                latency_us: Percentiles {
                    p99,
                    ..Percentiles::default()
                },
                ..FanoutFigures::default()
            }),
            latency_curve: vec![(50.0, 100), (99.0, p99)],
            ..Results::default()
        }
    }

    #[test]
    fn figures_come_with_their_ratio_to_the_first_run() {
        let runs = vec![
            ("a".to_string(), run("fanout", 40_000.0, 1000)),
            ("b".to_string(), run("fanout", 20_000.0, 3000)),
        ];
        let t = table(&runs);
        let row = |name: &str| t.iter().find(|r| r[0].starts_with(name)).unwrap().clone();
        assert_eq!(row("delivered frames /s")[1], "40000");
        assert_eq!(row("delivered frames /s")[2], "20000 (0.50×)");
        assert_eq!(row("event latency p99 µs")[2], "3000 (3.00×)");
        let h = html(&runs);
        assert_eq!(h.matches("<svg").count(), 1, "the latency curves, overlaid");
        assert_eq!(h.matches("<polyline").count(), 2);
        assert!(text(&runs).contains("20000 (0.50×)"));
    }

    #[test]
    fn runs_of_different_scenarios_are_refused() {
        let dir = std::env::temp_dir().join(format!("lt-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.json");
        let b = dir.join("b.json");
        std::fs::write(&a, serde_json::to_string(&run("fanout", 1.0, 1)).unwrap()).unwrap();
        std::fs::write(&b, serde_json::to_string(&run("connect", 1.0, 1)).unwrap()).unwrap();
        let err = load(&[a.clone(), b.clone()]).unwrap_err();
        assert!(err.contains("compare runs of one scenario"), "{err}");
        assert!(load(std::slice::from_ref(&a)).is_err());
        std::fs::write(&b, "{").unwrap();
        assert!(load(&[a, b]).unwrap_err().contains("not a run's JSON"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
