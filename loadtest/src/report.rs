//! The results of a run: the final table, the JSON document (`--json`) and the self-contained
//! HTML page with SVG charts (`--report`). Field names in the JSON are a stable interface,
//! documented in `docs/loadtest.md`.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Percentiles of a latency histogram, microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Summarizes `h` (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Point {
    /// Seconds since the start.
    pub t_s: u64,
    /// Connections open.
    pub open: u64,
    /// Frames delivered in that second.
    pub delivered_per_s: u64,
    /// p99 event latency in that second, microseconds.
    pub p99_us: u64,
    /// The server's RSS at that second, bytes (with `--server-pid`).
    pub server_rss_bytes: Option<u64>,
    /// The server's open file descriptors at that second (with `--server-pid`).
    pub server_open_files: Option<u64>,
}

/// The busiest worker's share of a core past which the load tester, not the server, may have
/// set the pace.
pub const BOTTLENECK_SHARE: f64 = 0.8;

/// The warning for a run whose busiest worker used `max_share` of a core, if it is past
/// [`BOTTLENECK_SHARE`].
pub fn bottleneck_warning(max_share: f64) -> Option<String> {
    (max_share > BOTTLENECK_SHARE).then(|| {
        format!(
            "its busiest worker used {:.0}% of a core (over {:.0}%): it, not the server, may have set the pace; add --processes or another machine",
            max_share * 100.0,
            BOTTLENECK_SHARE * 100.0
        )
    })
}

/// Connection figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectFigures {
    /// Connections requested.
    pub requested: u64,
    /// Attempts, reconnects included.
    pub attempts: u64,
    /// Connections that received `connected`.
    pub connected: u64,
    /// Achieved connections per second during the ramp.
    pub rate_per_s: f64,
    /// TCP connect start to `connected`, microseconds.
    pub latency_us: Percentiles,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
}

/// Event delivery figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FanoutFigures {
    /// Events the server accepted (202).
    pub published_events: u64,
    /// Event frames subscribers received.
    pub delivered_frames: u64,
    /// Delivered frames per second over the publishing window.
    pub delivered_per_s: f64,
    /// Frames missing from a subscriber's sequence.
    pub lost: u64,
    /// Frames received out of order.
    pub reordered: u64,
    /// Frames received again after a reconnect (resumed from the last acknowledgement).
    pub repeated: u64,
    /// Frames that came compressed (`--compression`).
    #[serde(default)]
    pub compressed_frames: u64,
    /// Bytes the subscribers received, in all (frames as on the wire).
    #[serde(default)]
    pub bytes_received: u64,
    /// `stream.gap` frames: reconnecting clients told they missed events.
    pub gaps: u64,
    /// Publish to receipt, microseconds.
    pub latency_us: Percentiles,
    /// Publish errors by status or error.
    pub publish_errors: BTreeMap<String, u64>,
    /// Connections closed by `--churn` (each reconnected).
    pub churned: u64,
}

/// Server resource figures (`--server-pid`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerFigures {
    /// The sampled process.
    pub pid: u32,
    /// Server CPU during the connect phase divided by connections established.
    pub cpu_ns_per_connection: Option<f64>,
    /// Server CPU during the publishing window divided by frames delivered.
    pub cpu_ns_per_frame: Option<f64>,
    /// RSS growth from before the first connection to the end of the run, per connection open then.
    pub rss_bytes_per_connection: Option<f64>,
    /// RSS before connecting.
    pub rss_bytes_start: u64,
    /// RSS at the end.
    pub rss_bytes_end: u64,
    /// Open files at the end.
    pub open_files_end: u64,
    /// Highest RSS sampled (once a second) over the run.
    pub rss_bytes_max: u64,
    /// Most open files sampled (once a second) over the run.
    pub open_files_max: u64,
}

/// The load tester's own cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SelfFigures {
    /// CPU of all workers and the orchestrator, nanoseconds.
    pub cpu_ns: u64,
    /// Highest share of one core any worker used over the run (1.0 = a full core).
    pub worker_max_core_share: f64,
    /// Set when the load tester, not the server, was likely the bottleneck.
    pub bottleneck_warning: Option<String>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Results {
    /// `connect`, `fanout`, `storm` or `slow`.
    pub scenario: String,
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: String,
    /// UTC date and time of the run.
    pub date: String,
    /// Worker processes.
    pub processes: u32,
    /// Workspaces.
    pub workspaces: u32,
    /// Connection figures.
    pub connect: ConnectFigures,
    /// Delivery figures (fanout and slow).
    pub fanout: Option<FanoutFigures>,
    /// Heartbeat lateness past the interval, microseconds.
    pub heartbeat_lateness_us: Percentiles,
    /// Close codes received on established connections.
    pub closes: BTreeMap<u16, u64>,
    /// Slow scenario: connections that stopped reading, and the close codes they got.
    pub slow_connections: Option<u64>,
    /// Close codes received by the connections that stopped reading.
    pub slow_closes: BTreeMap<u16, u64>,
    /// Storm: milliseconds until every connection was back (absent if they never all were).
    pub storm_recovered_ms: Option<u64>,
    /// Server figures.
    pub server: Option<ServerFigures>,
    /// The load tester's own figures.
    pub loadtest: SelfFigures,
    /// One point per second.
    pub series: Vec<Point>,
    /// The event-latency percentile curve: (percentile, microseconds).
    pub latency_curve: Vec<(f64, u64)>,
}

/// The latency percentile curve at a fixed set of percentiles (for charts).
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [
        0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0,
    ]
    .iter()
    .map(|&p| {
        (
            p,
            if p >= 100.0 {
                h.max()
            } else {
                h.value_at_quantile(p / 100.0)
            },
        )
    })
    .collect()
}

fn pct_row(out: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        out,
        "  {name:<26} p50 {:>8}  p90 {:>8}  p99 {:>8}  p99.9 {:>8}  max {:>8}  (n={})",
        us(p.p50),
        us(p.p90),
        us(p.p99),
        us(p.p999),
        us(p.max),
        p.count
    );
}

/// Formats microseconds for people.
pub fn us(v: u64) -> String {
    if v >= 10_000_000 {
        format!("{:.1}s", v as f64 / 1e6)
    } else if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1e3)
    } else {
        format!("{v}µs")
    }
}

impl Results {
    /// The final table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "\n== causeloop-loadtest {} ==", self.scenario);
        let _ = writeln!(o, "  machine: {}", self.machine);
        let c = &self.connect;
        let _ = writeln!(
            o,
            "  connections: {} requested, {} connected, {} attempts, {:.0}/s",
            c.requested, c.connected, c.attempts, c.rate_per_s
        );
        if !c.failures.is_empty() {
            let _ = writeln!(o, "  connect failures: {:?}", c.failures);
        }
        pct_row(&mut o, "connect latency", &c.latency_us);
        if let Some(f) = &self.fanout {
            let _ = writeln!(
                o,
                "  events: {} published, {} frames delivered ({:.0}/s), {} lost, {} reordered, {} repeated after a reconnect, {} stream.gap",
                f.published_events, f.delivered_frames, f.delivered_per_s, f.lost, f.reordered, f.repeated, f.gaps
            );
            pct_row(&mut o, "event latency", &f.latency_us);
            if !f.publish_errors.is_empty() {
                let _ = writeln!(o, "  publish errors: {:?}", f.publish_errors);
            }
        }
        if self.heartbeat_lateness_us.count > 0 {
            pct_row(&mut o, "heartbeat lateness", &self.heartbeat_lateness_us);
        }
        if !self.closes.is_empty() {
            let _ = writeln!(o, "  closes received: {:?}", self.closes);
        }
        if let Some(n) = self.slow_connections {
            let _ = writeln!(
                o,
                "  slow connections: {n}, their closes: {:?}",
                self.slow_closes
            );
        }
        if self.scenario == "storm" {
            match self.storm_recovered_ms {
                Some(ms) => {
                    let _ = writeln!(o, "  storm: every connection back after {ms} ms");
                }
                None => {
                    let _ = writeln!(o, "  storm: NOT every connection came back");
                }
            }
        }
        if let Some(s) = &self.server {
            let f = |v: Option<f64>, unit: &str| {
                v.map_or("n/a".to_string(), |v| format!("{v:.0} {unit}"))
            };
            let _ = writeln!(
                o,
                "  server (pid {}): {} CPU per delivered frame, {} CPU per connection, {} RSS per connection, RSS {} MiB, {} open files",
                s.pid,
                f(s.cpu_ns_per_frame, "ns"),
                f(s.cpu_ns_per_connection, "ns"),
                f(s.rss_bytes_per_connection, "B"),
                s.rss_bytes_end / (1 << 20),
                s.open_files_end
            );
        }
        let _ = writeln!(
            o,
            "  load tester: {:.2} s CPU, busiest worker at {:.0}% of a core",
            self.loadtest.cpu_ns as f64 / 1e9,
            self.loadtest.worker_max_core_share * 100.0
        );
        if let Some(w) = &self.loadtest.bottleneck_warning {
            let _ = writeln!(o, "  WARNING: the load tester was the bottleneck: {w}");
        }
        o
    }

    /// The self-contained HTML report. A load tester that may have set the pace is said first,
    /// in red, above everything else.
    pub fn html(&self) -> String {
        let mut o = String::new();
        let _ = write!(
            o,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>causeloop-loadtest {}</title><style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}}pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}h2{{margin-top:2em}}</style></head><body>",
            esc(&self.scenario)
        );
        if let Some(w) = &self.loadtest.bottleneck_warning {
            o.push_str(&bottleneck_banner(&format!(
                "The load tester was the bottleneck: {w}"
            )));
        }
        let _ = write!(o, "<h1>causeloop-loadtest: {}</h1>", esc(&self.scenario));
        let _ = write!(
            o,
            "<p><b>Date:</b> {}<br><b>Machine:</b> {}</p>",
            esc(&self.date),
            esc(&self.machine)
        );
        let _ = write!(o, "<p><b>Command:</b></p><pre>{}</pre>", esc(&self.command));
        let _ = write!(o, "<h2>Summary</h2><pre>{}</pre>", esc(&self.table()));
        if !self.latency_curve.is_empty() {
            let pts = nines_curve(&self.latency_curve);
            let _ = write!(
                o,
                "<h2>Event latency by percentile</h2>{}",
                svg_line(
                    &pts,
                    "percentile (nines: 1 = 90%, 2 = 99%, 3 = 99.9%)",
                    "latency (ms)"
                )
            );
        }
        if !self.series.is_empty() {
            let d: Vec<(f64, f64)> = self
                .series
                .iter()
                .map(|p| (p.t_s as f64, p.delivered_per_s as f64))
                .collect();
            let _ = write!(
                o,
                "<h2>Delivered frames per second</h2>{}",
                svg_line(&d, "time (s)", "frames/s")
            );
            let c: Vec<(f64, f64)> = self
                .series
                .iter()
                .map(|p| (p.t_s as f64, p.open as f64))
                .collect();
            let _ = write!(
                o,
                "<h2>Connections open</h2>{}",
                svg_line(&c, "time (s)", "connections")
            );
        }
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        let _ = write!(
            o,
            "<h2>All figures (JSON)</h2><pre>{}</pre></body></html>",
            esc(&json)
        );
        o
    }
}

/// The red banner that opens a report whose load tester may have set the pace.
pub fn bottleneck_banner(text: &str) -> String {
    format!(
        "<p class=\"bottleneck\" style=\"color:#b00020;font-weight:bold;border:2px solid #b00020;padding:.6em\">{}</p>",
        esc(text)
    )
}

/// `s` made safe as HTML text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A latency percentile curve as chart points: (nines, milliseconds), where 1 nine is 90%, 2 are
/// 99%, 3 are 99.9% (100% drawn at 5).
pub fn nines_curve(curve: &[(f64, u64)]) -> Vec<(f64, f64)> {
    curve
        .iter()
        .map(|&(p, v)| {
            let nines = if p >= 100.0 {
                5.0
            } else {
                (1.0 / (1.0 - p / 100.0)).log10().min(5.0)
            };
            (nines, v as f64 / 1000.0)
        })
        .collect()
}

/// A line chart as inline SVG, axes labelled, with min/max ticks.
pub fn svg_line(points: &[(f64, f64)], x_label: &str, y_label: &str) -> String {
    svg_lines(&[("", points)], x_label, y_label)
}

/// Line colours, in the order of the series.
const COLOURS: [&str; 6] = [
    "#2a6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#495057",
];

/// Several lines on one chart (one per labelled series, a legend when there are labels), as
/// inline SVG.
pub fn svg_lines(series: &[(&str, &[(f64, f64)])], x_label: &str, y_label: &str) -> String {
    let (w, h, l, b, t, r) = (860.0, 320.0, 70.0, 40.0, 10.0, 20.0);
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let xmax = all().map(|p| p.0).fold(f64::MIN, f64::max).max(1e-9);
    let xmin = all().map(|p| p.0).fold(f64::MAX, f64::min).min(xmax);
    let ymax = all().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.05;
    let sx = |x: f64| l + (x - xmin) / (xmax - xmin).max(1e-9) * (w - l - r);
    let sy = |y: f64| h - b - y / ymax * (h - b - t);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">");
    let _ = write!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        w - l - r,
        h - b - t
    );
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{l}\" x2=\"{}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
            w - r,
            l - 6.0,
            sy(y) + 4.0,
            fmt_num(y),
            y0 = sy(y)
        );
    }
    for i in 0..=4 {
        let x = xmin + (xmax - xmin) * i as f64 / 4.0;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            sx(x),
            h - b + 16.0,
            fmt_num(x)
        );
    }
    for (i, (label, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        if !label.is_empty() {
            let y = t + 16.0 + 16.0 * i as f64;
            let _ = write!(
                s,
                "<line x1=\"{}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
                l + 10.0,
                l + 30.0,
                l + 36.0,
                y + 4.0,
                esc(label)
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{x_label}</text>",
        (w + l) / 2.0,
        h - 6.0
    );
    let _ = write!(s, "<text x=\"14\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">{y_label}</text></svg>", h / 2.0, h / 2.0);
    s
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert_eq!(p.p90, 900);
        assert_eq!(p.p99, 990);
        assert_eq!(p.p999, 999);
        assert_eq!(p.max, 1000);
        assert_eq!(
            Percentiles::of(&Histogram::new(3).unwrap()),
            Percentiles::default()
        );
    }

    #[test]
    fn html_is_self_contained_and_escaped() {
        let r = Results {
            scenario: "fanout".into(),
            command: "causeloop-loadtest fanout --url <x>".into(),
            series: vec![
                Point {
                    t_s: 0,
                    open: 1,
                    delivered_per_s: 2,
                    p99_us: 3,
                    ..Point::default()
                },
                Point {
                    t_s: 1,
                    open: 1,
                    delivered_per_s: 5,
                    p99_us: 3,
                    ..Point::default()
                },
            ],
            latency_curve: vec![(50.0, 100), (99.0, 900)],
            ..Results::default()
        };
        let html = r.html();
        assert!(html.contains("&lt;x&gt;"));
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") || html.contains("http://www.w3.org/2000/svg"));
        assert!(!html.contains("class=\"bottleneck\""));
    }

    #[test]
    fn a_saturated_load_tester_is_said_first_in_red() {
        assert_eq!(bottleneck_warning(0.79), None);
        let mut r = Results {
            scenario: "fanout".into(),
            ..Results::default()
        };
        r.loadtest.bottleneck_warning = bottleneck_warning(0.85);
        let html = r.html();
        let warning = html.find("class=\"bottleneck\"").expect("the warning");
        assert!(warning < html.find("<h1>").unwrap(), "above the title");
        assert!(html.contains("color:#b00020") && html.contains("85% of a core"));
    }
}
