//! What the orchestrator tells a worker process, and what a worker reports back, as JSON lines
//! over the worker's stdin and stdout. The secret travels this way too: never in argv.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The scenario a worker runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Ramp and hold connections.
    Connect,
    /// Subscribers receive published events.
    Fanout,
    /// Drop everything, reconnect with the seed client's backoff.
    Storm,
    /// Some subscribers stop reading.
    Slow,
}

/// A worker's assignment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Scenario.
    pub scenario: Scenario,
    /// Public listener addresses (`host:port`); connection `i` uses `targets[i % len]`.
    pub targets: Vec<String>,
    /// First global connection index of this worker.
    pub first: u64,
    /// How many connections this worker opens.
    pub count: u64,
    /// Total connections across workers (for the workspace assignment).
    pub total: u64,
    /// Number of workspaces.
    pub workspaces: u32,
    /// Zipf exponent of the workspace assignment (0: uniform).
    pub skew: f64,
    /// Workspace id prefix.
    pub workspace_prefix: String,
    /// Connections per second this worker opens (0: as fast as `max_inflight` allows).
    pub connect_rate: f64,
    /// Most handshakes in flight at once.
    pub max_inflight: u64,
    /// HS256 secret for minting tokens.
    pub secret: String,
    /// Workspace claim name.
    pub claim: String,
    /// Source addresses to bind, round-robin (empty: the kernel's choice).
    pub source_ips: Vec<String>,
    /// Fraction of connections that stop reading (slow scenario).
    pub slow_fraction: f64,
    /// The server's heartbeat interval, for lateness.
    pub heartbeat_interval_ms: u64,
    /// Connections this worker closes (with a close handshake) and reopens per second, once all
    /// are open (0: none).
    #[serde(default)]
    pub churn_per_s: f64,
    /// A reconnected subscriber's sequence goes on across the reconnect (`--continuity`).
    #[serde(default)]
    pub continuity: bool,
    /// Offer `permessage-deflate` and inflate compressed frames (`--compression`).
    #[serde(default)]
    pub compression: bool,
    /// `wss://`: how to speak TLS (none: plain `ws://`).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSpec>,
    /// When the run started, Unix milliseconds: workers report right after each whole second
    /// of the run, so that the orchestrator can add up each second's figures.
    #[serde(default)]
    pub started_unix_ms: u64,
}

/// A worker's report: counters and histograms (serialized HdrHistogram V2, base64).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// `progress`, `ready` or `final`.
    pub kind: String,
    /// Connections attempted (including reconnects).
    pub attempts: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections that received `connected`.
    pub connected: u64,
    /// Failures to connect, by reason (`http 503`, `refused`, `close 4401`, …).
    pub failures: BTreeMap<String, u64>,
    /// Close frames received on established connections, by code.
    pub closes: BTreeMap<u16, u64>,
    /// Connections told to stop reading (slow scenario).
    pub slow: u64,
    /// Close codes received by connections that were told to stop reading.
    pub slow_closes: BTreeMap<u16, u64>,
    /// Event frames received (not counting `connected` and heartbeats).
    pub events: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Events missing from a subscriber's per-workspace sequence.
    pub lost: u64,
    /// Events received out of order.
    pub reordered: u64,
    /// Events received again after a reconnect (a resume replays from the last acknowledgement).
    #[serde(default)]
    pub repeated: u64,
    /// `stream.gap` frames received: the server told a reconnecting client it missed events.
    #[serde(default)]
    pub gaps: u64,
    /// Connections closed by churn (each then reconnects).
    pub churned: u64,
    /// Storm: milliseconds from the drop until every connection was back, when they all came back.
    pub storm_recovered_ms: Option<u64>,
    /// Connect latency histogram (µs, TCP connect start to `connected`).
    pub connect_hist: String,
    /// Event latency histogram (µs, publish to receipt); readers only in the slow scenario.
    pub latency_hist: String,
    /// Heartbeat lateness histogram (µs past the interval).
    pub heartbeat_hist: String,
    /// This worker's own CPU, nanoseconds.
    pub cpu_ns: u64,
    /// Compressed frames received and inflated (`--compression`).
    #[serde(default)]
    pub compressed_frames: u64,
    /// When the figures were taken, Unix milliseconds (progress reports: just after a whole
    /// second of the run).
    #[serde(default)]
    pub t_ms: u64,
}
