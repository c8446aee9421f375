//! Counters, kept per shard and summed only when `/metrics` is scraped.
//!
//! Each shard writes only its own [`ShardStats`] (uncontended relaxed atomics, each shard's on
//! its own cache lines); the internal listener reads them all at scrape time. Labels are bounded
//! enumerations: never a token, user, workspace or address.

use crate::auth::AuthError;
use crate::ws::close::CloseReason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Auth failure labels, in `auth_index` order.
pub const AUTH_LABELS: [&str; 7] = [
    "missing",
    "malformed",
    "signature",
    "expired",
    "not_yet_valid",
    "claims",
    "workspace_mismatch",
];

fn auth_index(e: AuthError) -> usize {
    AUTH_LABELS
        .iter()
        .position(|l| *l == e.label())
        .unwrap_or(1)
}

/// Counters of one shard.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardStats {
    /// Sockets accepted.
    pub accepted: AtomicU64,
    /// Connections that completed authentication and received `connected`.
    pub subscribed: AtomicU64,
    /// Connections currently subscribed.
    pub open: AtomicU64,
    /// WebSocket closes sent, by reason ([`CloseReason::ALL`] order).
    pub closes: [AtomicU64; CloseReason::ALL.len()],
    /// Authentication failures by label ([`AUTH_LABELS`] order).
    pub auth_failures: [AtomicU64; AUTH_LABELS.len()],
    /// Plain HTTP responses on the public listener (probes and rejections).
    pub http_responses: AtomicU64,
    /// Sockets that ended without a close handshake (reset, EOF, timeout).
    pub dropped: AtomicU64,
    /// Frames completely written.
    pub frames_written: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Panics caught in a connection's handler (each closed that connection with 1011).
    pub handler_panics: AtomicU64,
    /// Time of one event-loop iteration (poll excluded).
    pub loop_iteration: Histogram,
    /// How late heartbeats were sent, past their due tick.
    pub heartbeat_lateness: Histogram,
    /// From a publish being accepted to this shard's last write of its frames.
    pub fanout: Histogram,
    /// Connections removed, by the close code they ended with ([`CLOSED_CODES`] order; the last
    /// slot is "none": no close frame either way).
    pub closed: [AtomicU64; CLOSED_CODES.len() + 1],
    /// Bytes queued on this shard's connections that could not be written yet (sampled each
    /// second).
    pub queued_bytes: AtomicU64,
    /// Connections holding an inflater (they sent a compressed message and keep their context),
    /// sampled each second.
    pub inflaters: AtomicU64,
    /// Publish batches that found this shard's inbox full and waited for room (back-pressure).
    pub inbox_waits: AtomicU64,
    /// Times accepting paused for 100 ms for lack of file descriptors.
    pub accept_pauses: AtomicU64,
    /// Changes of interest waiting for room in the cluster bus's channel (sampled each second).
    pub bus_interest_backlog: AtomicU64,
    /// Event frames compressed (`permessage-deflate`): bytes before.
    pub deflate_in: AtomicU64,
    /// Event frames compressed: bytes after (the plain size when compressing did not pay).
    pub deflate_out: AtomicU64,
    /// Compressed event frames queued to connections.
    pub deflate_frames: AtomicU64,
    /// TLS handshakes completed on the public listener.
    pub tls_handshakes: AtomicU64,
    /// TLS connections that failed before their handshake completed (bad ClientHello, no
    /// shared version or cipher suite, a peer that stopped mid-handshake is counted by its
    /// deadline instead).
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshake reads put off to the next loop turn (the per-turn handshake budget).
    pub tls_handshakes_deferred: AtomicU64,
    /// TLS records sealed for connections (several frames to a record in bursts).
    pub tls_records: AtomicU64,
}

/// Close codes counted one by one in `causeloop_connections_closed_total`; any other code counts
/// as `other`, and a connection that ended without a close frame as `none`.
pub const CLOSED_CODES: [u16; 13] = [
    1000, 1001, 1002, 1005, 1006, 1007, 1008, 1009, 1011, 1013, 4003, 4401, 0,
];

impl ShardStats {
    /// Counts a connection removed after sending or receiving close `code` (0: none).
    pub fn closed_with(&self, code: u16) {
        let i = match CLOSED_CODES.iter().position(|&c| c == code) {
            Some(i) if code != 0 => i,
            // 0 is the "other" slot's sentinel; a real unknown code lands there too.
            _ if code != 0 => CLOSED_CODES.len() - 1,
            _ => CLOSED_CODES.len(),
        };
        Self::add(&self.closed[i], 1);
    }
}

/// Upper bounds of the histogram buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 16] = [
    10, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A fixed-bucket latency histogram written by one thread (its shard) and read at scrape time.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn record(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations recorded so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn snapshot(&self) -> ([u64; BUCKETS_US.len() + 1], u64) {
        let mut c = [0u64; BUCKETS_US.len() + 1];
        for (dst, src) in c.iter_mut().zip(&self.counts) {
            *dst = src.load(Ordering::Relaxed);
        }
        (c, self.sum_us.load(Ordering::Relaxed))
    }
}

impl ShardStats {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a close sent for `reason`.
    pub fn close(&self, reason: CloseReason) {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        Self::add(&self.closes[i], 1);
    }

    /// Counts an authentication failure.
    pub fn auth_failure(&self, e: AuthError) {
        Self::add(&self.auth_failures[auth_index(e)], 1);
    }
}

/// Counters kept outside the shards: the publish path and process-wide events.
#[derive(Default)]
pub struct BusStats {
    /// Key reloads (SIGHUP or `reload_keys`) that took effect.
    pub key_reloads_ok: AtomicU64,
    /// Key reloads that failed (the old keys stayed in force).
    pub key_reloads_failed: AtomicU64,
    /// TLS certificate reloads (SIGHUP) that took effect.
    pub tls_reloads_ok: AtomicU64,
    /// TLS certificate reloads refused (the old pair stayed in force).
    pub tls_reloads_failed: AtomicU64,
    /// The TLS certificate in force's notAfter, Unix seconds (0: no TLS, or not readable).
    pub tls_not_after: std::sync::atomic::AtomicI64,
    /// Events accepted for fan-out.
    pub published: AtomicU64,
    /// Publish requests refused: bad body.
    pub rejected_invalid: AtomicU64,
    /// Publish requests refused: bad or missing key.
    pub rejected_unauthorized: AtomicU64,
    /// Publish requests refused: body too large.
    pub rejected_too_large: AtomicU64,
    /// Publish requests refused: draining.
    pub rejected_draining: AtomicU64,
    /// Publish requests refused: the cluster bus (Redis) is unreachable.
    pub rejected_bus_unavailable: AtomicU64,
    /// 1 while the cluster bus's subscriber connection is up (always 1 with `--bus local`).
    pub bus_up: AtomicU64,
    /// Cluster bus connections established after the first.
    pub bus_reconnects: AtomicU64,
    /// Attempts to connect to a Redis server (or read a cluster's layout) that failed.
    pub bus_connect_failures: AtomicU64,
    /// Messages received from the cluster bus and delivered to the shards.
    pub bus_received: AtomicU64,
    /// Messages received from the cluster bus and dropped as invalid (each logged).
    pub bus_invalid: AtomicU64,
    /// `MOVED` redirects from a Redis Cluster (a slot changed hands), on subscribe or publish.
    pub bus_redirects: AtomicU64,
    /// Redis Cluster layouts read (`CLUSTER SLOTS`): at start, after a redirect or a lost master.
    pub bus_layout_reads: AtomicU64,
    /// Workspaces with local subscribers whose Redis subscription is not made yet (the bus is
    /// down, or their master is).
    pub bus_pending: AtomicU64,
    /// Publishes queued for the bus thread or waiting for Redis's answer.
    pub bus_publish_queue: AtomicU64,
    /// Publishes refused because the bus's publish queue or a command connection's output
    /// bound was full.
    pub bus_publish_busy: AtomicU64,
    /// Batches received from Redis waiting for room in a shard's inbox.
    pub bus_shard_backlog: AtomicU64,
    /// Times the bus stopped reading Redis because that backlog reached its bound.
    pub bus_read_pauses: AtomicU64,
    /// Reads of workspace streams (`--bus-wire 2`): where a new subscription starts, and what
    /// the node missed.
    pub bus_stream_reads: AtomicU64,
    /// Times a workspace's events were missing on this node beyond what its history stream
    /// held (its clients here were sent `stream.gap`).
    pub bus_stream_gaps: AtomicU64,
    /// Messages held while a stream read runs (a gauge).
    pub bus_stream_held: AtomicU64,
    /// Stream reads given up because too much was held meanwhile.
    pub bus_stream_overflows: AtomicU64,
    /// Resume records that could not be kept in Redis (no connection to its master, or Redis
    /// refused): that client's next connection elsewhere starts without them.
    pub bus_records_lost: AtomicU64,
}

/// Counters of the internal listener (its thread writes them).
#[derive(Default)]
pub struct InternalStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused at `--max-internal-connections` (answered 503).
    pub refused: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Times a connection's unsent answers passed the bound and reading it paused.
    pub paused_for_output: AtomicU64,
    /// Local publishes that found a shard's inbox full and waited for room.
    pub publishes_parked: AtomicU64,
    /// Open connections (sampled each second).
    pub connections: AtomicU64,
    /// Connections whose publish is on its way (sampled each second).
    pub publishes_waiting: AtomicU64,
}

/// Every counter of a server, as one handle.
#[derive(Clone, Default)]
pub struct Stats {
    /// Each shard's.
    pub shards: Arc<[ShardStats]>,
    /// The publish path's and the cluster bus's.
    pub bus: Arc<BusStats>,
    /// The internal listener's.
    pub internal: Arc<InternalStats>,
    /// The delivery guarantee's (history on only).
    pub delivery: Option<Arc<crate::history::Delivery>>,
}

impl Stats {
    /// Counters for `shards` shards.
    pub fn new(shards: usize) -> Stats {
        Stats {
            shards: (0..shards).map(|_| ShardStats::default()).collect(),
            bus: Arc::default(),
            internal: Arc::default(),
            delivery: None,
        }
    }
}

fn sum(shards: &[ShardStats], f: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
}

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// Reads every counter at scrape time and hands it to prometheus-client's OpenMetrics encoder.
/// The counters stay our own per-shard atomics (nothing is shared on the per-frame path); the
/// crate does the exposition format: names, `_total` suffixes, escaping, histogram layout, `# EOF`.
struct StatsCollector {
    shards: Arc<[ShardStats]>,
    bus: Arc<BusStats>,
    internal: Arc<InternalStats>,
    delivery: Option<Arc<crate::history::Delivery>>,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatsCollector({} shards)", self.shards.len())
    }
}

/// A counter's two rows by `result`: `ok` and `error`.
fn ok_and_error(ok: u64, error: u64) -> Vec<(Labels, u64)> {
    vec![
        (vec![("result", "ok".to_string())], ok),
        (vec![("result", "error".to_string())], error),
    ]
}

fn counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            m.encode_counter::<(), _, u64>(v, None)?;
        } else {
            m.encode_family(labels)?
                .encode_counter::<(), _, u64>(v, None)?;
        }
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            m.encode_gauge(v)?;
        } else {
            m.encode_family(labels)?.encode_gauge(v)?;
        }
    }
    Ok(())
}

fn shard_label(i: usize) -> Labels {
    vec![("shard", i.to_string())]
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let shards = &self.shards[..];
        let bus = &*self.bus;
        let internal = &*self.internal;
        let one = |v: u64| vec![(Labels::new(), v)];
        let per_shard = |f: &dyn Fn(&ShardStats) -> u64| -> Vec<(Labels, i64)> {
            shards
                .iter()
                .enumerate()
                .map(|(i, s)| (shard_label(i), f(s) as i64))
                .collect()
        };
        gauges(
            &mut enc,
            "causeloop_connections_open",
            "Subscribed WebSocket connections.",
            &per_shard(&|s| s.open.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_connections_accepted",
            "Sockets accepted on the public listener.",
            &one(sum(shards, |s| &s.accepted)),
        )?;
        counters(
            &mut enc,
            "causeloop_connections_subscribed",
            "Connections authenticated and sent `connected`.",
            &one(sum(shards, |s| &s.subscribed)),
        )?;
        let closes: Vec<(Labels, u64)> = CloseReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    vec![("code", r.code().to_string()), ("reason", format!("{r:?}"))],
                    sum(shards, |s| &s.closes[i]),
                )
            })
            .collect();
        counters(
            &mut enc,
            "causeloop_closes_sent",
            "WebSocket close frames sent, by code.",
            &closes,
        )?;
        let closed: Vec<(Labels, u64)> = (0..=CLOSED_CODES.len())
            .map(|i| {
                let label = match CLOSED_CODES.get(i) {
                    Some(0) => "other".to_string(),
                    Some(c) => c.to_string(),
                    None => "none".to_string(),
                };
                (vec![("code", label)], sum(shards, |s| &s.closed[i]))
            })
            .collect();
        counters(
            &mut enc,
            "causeloop_connections_closed",
            "Connections removed, by the close code they ended with (sent or received; none: no close frame).",
            &closed,
        )?;
        let auth: Vec<(Labels, u64)> = AUTH_LABELS
            .iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    vec![("reason", l.to_string())],
                    sum(shards, |s| &s.auth_failures[i]),
                )
            })
            .collect();
        counters(
            &mut enc,
            "causeloop_auth_failures",
            "Stream connections refused, by reason.",
            &auth,
        )?;
        counters(
            &mut enc,
            "causeloop_http_responses",
            "Plain HTTP responses on the public listener.",
            &one(sum(shards, |s| &s.http_responses)),
        )?;
        counters(
            &mut enc,
            "causeloop_connections_dropped",
            "Sockets ended without a close handshake.",
            &one(sum(shards, |s| &s.dropped)),
        )?;
        counters(
            &mut enc,
            "causeloop_frames_written",
            "Frames completely written to sockets.",
            &one(sum(shards, |s| &s.frames_written)),
        )?;
        counters(
            &mut enc,
            "causeloop_compression_bytes",
            "Event frames compressed once for permessage-deflate subscribers: bytes before and after (the plain size when compressing did not pay).",
            &[
                (
                    vec![("stage", "before".to_string())],
                    sum(shards, |s| &s.deflate_in),
                ),
                (
                    vec![("stage", "after".to_string())],
                    sum(shards, |s| &s.deflate_out),
                ),
            ],
        )?;
        counters(
            &mut enc,
            "causeloop_compressed_frames",
            "Compressed event frames queued to connections.",
            &one(sum(shards, |s| &s.deflate_frames)),
        )?;
        counters(
            &mut enc,
            "causeloop_tls_handshakes",
            "TLS handshakes on the public listener, by result (a peer that stops mid-handshake ends at --handshake-timeout and is counted as failed).",
            &ok_and_error(
                sum(shards, |s| &s.tls_handshakes),
                sum(shards, |s| &s.tls_handshake_failures),
            ),
        )?;
        counters(
            &mut enc,
            "causeloop_tls_records",
            "TLS application-data records sealed on the public listener: against causeloop_frames_written_total, how many frames share a record.",
            &one(sum(shards, |s| &s.tls_records)),
        )?;
        counters(
            &mut enc,
            "causeloop_tls_handshakes_deferred",
            "TLS handshake reads put off to the next loop turn: more handshakes were ready than one turn does (32), so heartbeats and fan-out were not held up behind them.",
            &one(sum(shards, |s| &s.tls_handshakes_deferred)),
        )?;
        counters(
            &mut enc,
            "causeloop_bytes_written",
            "Bytes written to WebSocket sockets.",
            &one(sum(shards, |s| &s.bytes_written)),
        )?;
        counters(
            &mut enc,
            "causeloop_handler_panics",
            "Connection handler panics (each closed with 1011).",
            &one(sum(shards, |s| &s.handler_panics)),
        )?;
        gauges(
            &mut enc,
            "causeloop_queued_outbound_bytes",
            "Bytes waiting on connections whose socket is full, per shard.",
            &per_shard(&|s| s.queued_bytes.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_client_inflaters",
            "Connections holding an inflater for their compressed messages (up to about 40 KiB each: the client's LZ77 window), per shard, sampled each second.",
            &per_shard(&|s| s.inflaters.load(Ordering::Relaxed)),
        )?;
        let waits: Vec<(Labels, u64)> = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (shard_label(i), s.inbox_waits.load(Ordering::Relaxed)))
            .collect();
        counters(
            &mut enc,
            "causeloop_publish_inbox_waits",
            "Publish batches that found a shard's inbox full and waited for room (back-pressure on the publisher; nothing is dropped).",
            &waits,
        )?;
        counters(
            &mut enc,
            "causeloop_accept_pauses",
            "Times accepting paused for 100 ms for lack of file descriptors.",
            &one(sum(shards, |s| &s.accept_pauses)),
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_interest_backlog",
            "Changes of a shard's workspaces waiting for room in the cluster bus's channel, per shard.",
            &per_shard(&|s| s.bus_interest_backlog.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_internal_connections_accepted",
            "Connections accepted on the internal listener.",
            &one(internal.accepted.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_internal_connections_refused",
            "Internal connections refused at --max-internal-connections (answered 503).",
            &one(internal.refused.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_internal_connections_open",
            "Open connections on the internal listener.",
            &[(
                Labels::new(),
                internal.connections.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counters(
            &mut enc,
            "causeloop_internal_requests",
            "Requests served on the internal listener.",
            &one(internal.requests.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_internal_output_pauses",
            "Times an internal connection's unsent answers passed the bound and reading it paused until they drained.",
            &one(internal.paused_for_output.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_internal_publishes_parked",
            "HTTP publishes that found a shard's inbox full and waited (their connection paused) for room.",
            &one(internal.publishes_parked.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_internal_publishes_waiting",
            "HTTP publishes on their way (waiting for room in a shard's inbox, or for Redis).",
            &[(
                Labels::new(),
                internal.publishes_waiting.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counters(
            &mut enc,
            "causeloop_events_published",
            "Events accepted for fan-out.",
            &one(bus.published.load(Ordering::Relaxed)),
        )?;
        let rejected: Vec<(Labels, u64)> = [
            ("invalid", &bus.rejected_invalid),
            ("unauthorized", &bus.rejected_unauthorized),
            ("too_large", &bus.rejected_too_large),
            ("draining", &bus.rejected_draining),
            ("bus_unavailable", &bus.rejected_bus_unavailable),
        ]
        .iter()
        .map(|(l, c)| (vec![("reason", l.to_string())], c.load(Ordering::Relaxed)))
        .collect();
        counters(
            &mut enc,
            "causeloop_publish_rejected",
            "Publish requests refused, by reason.",
            &rejected,
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_up",
            "1 while the cluster bus is connected (always 1 with --bus local).",
            &[(Labels::new(), bus.bus_up.load(Ordering::Relaxed) as i64)],
        )?;
        counters(
            &mut enc,
            "causeloop_bus_reconnects",
            "Cluster bus connections made after the first.",
            &one(bus.bus_reconnects.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_connect_failures",
            "Attempts to connect to a Redis server, or to read a Redis Cluster's layout, that failed.",
            &one(bus.bus_connect_failures.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_redirects",
            "MOVED redirects from a Redis Cluster: a slot changed hands.",
            &one(bus.bus_redirects.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_pending_subscriptions",
            "Workspaces with local subscribers whose Redis subscription is not made yet.",
            &[(
                Labels::new(),
                bus.bus_pending.load(Ordering::Relaxed) as i64,
            )],
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_publish_queue",
            "Publishes queued for the cluster bus thread or waiting for Redis's answer.",
            &[(
                Labels::new(),
                bus.bus_publish_queue.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counters(
            &mut enc,
            "causeloop_bus_publish_busy",
            "Publishes refused 503 because the cluster bus's publish queue or a Redis command connection was full.",
            &one(bus.bus_publish_busy.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_shard_backlog",
            "Batches received from Redis waiting for room in a shard's inbox.",
            &[(
                Labels::new(),
                bus.bus_shard_backlog.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counters(
            &mut enc,
            "causeloop_bus_read_pauses",
            "Times the cluster bus stopped reading Redis because the shards' backlog reached its bound.",
            &one(bus.bus_read_pauses.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_stream_reads",
            "Reads of workspace history streams in Redis (--bus-wire 2): a new subscription's start, and what this node missed.",
            &one(bus.bus_stream_reads.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_stream_gaps",
            "Times events of a workspace were missing on this node beyond what its Redis history held (its clients here were sent stream.gap).",
            &one(bus.bus_stream_gaps.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "causeloop_bus_stream_held",
            "Messages from Redis held while the missing events before them are read.",
            &[(
                Labels::new(),
                bus.bus_stream_held.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counters(
            &mut enc,
            "causeloop_bus_stream_overflows",
            "Stream reads given up because more than 65,536 messages of one workspace were held meanwhile (its clients here were sent stream.gap).",
            &one(bus.bus_stream_overflows.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_records_lost",
            "Resume records this node could not keep in Redis (its master unreachable, Redis refused, or the bus's channel full).",
            &one(
                bus.bus_records_lost.load(Ordering::Relaxed)
                    + self
                        .delivery
                        .as_ref()
                        .map_or(0, |d| d.stats.records_not_kept.load(Ordering::Relaxed)),
            ),
        )?;
        counters(
            &mut enc,
            "causeloop_bus_layout_reads",
            "Redis Cluster layouts read with CLUSTER SLOTS.",
            &one(bus.bus_layout_reads.load(Ordering::Relaxed)),
        )?;
        let received = [
            ("delivered", &bus.bus_received),
            ("invalid", &bus.bus_invalid),
        ]
        .iter()
        .map(|(l, c)| (vec![("result", l.to_string())], c.load(Ordering::Relaxed)))
        .collect::<Vec<_>>();
        counters(
            &mut enc,
            "causeloop_bus_messages",
            "Messages received from the cluster bus, by result.",
            &received,
        )?;
        counters(
            &mut enc,
            "causeloop_key_reloads",
            "Key reloads, by result.",
            &ok_and_error(
                bus.key_reloads_ok.load(Ordering::Relaxed),
                bus.key_reloads_failed.load(Ordering::Relaxed),
            ),
        )?;
        counters(
            &mut enc,
            "causeloop_tls_reloads",
            "TLS certificate reloads (SIGHUP), by result; on error the old certificate stays in force.",
            &ok_and_error(
                bus.tls_reloads_ok.load(Ordering::Relaxed),
                bus.tls_reloads_failed.load(Ordering::Relaxed),
            ),
        )?;
        let not_after = bus.tls_not_after.load(Ordering::Relaxed);
        if not_after != 0 {
            gauges(
                &mut enc,
                "causeloop_tls_certificate_expiry_timestamp_seconds",
                "When the public listener's TLS certificate in force expires (its notAfter), Unix seconds.",
                &[(Labels::new(), not_after)],
            )?;
        }
        type Pick = fn(&ShardStats) -> &Histogram;
        let histograms: [(&str, &str, Pick); 3] = [
            (
                "causeloop_loop_iteration_seconds",
                "Time of one event-loop iteration, poll excluded, per shard.",
                |s| &s.loop_iteration,
            ),
            (
                "causeloop_heartbeat_lateness_seconds",
                "How late heartbeats were sent past their due time, per shard.",
                |s| &s.heartbeat_lateness,
            ),
            (
                "causeloop_fanout_seconds",
                "From a publish being accepted to a shard's last write of its frames, per shard.",
                |s| &s.fanout,
            ),
        ];
        for (name, help, pick) in histograms {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (i, shard) in shards.iter().enumerate() {
                let (counts, sum_us) = pick(shard).snapshot();
                let buckets: Vec<(f64, u64)> = counts
                    .iter()
                    .enumerate()
                    .map(|(b, c)| {
                        (
                            BUCKETS_US.get(b).map_or(f64::MAX, |us| *us as f64 / 1e6),
                            *c,
                        )
                    })
                    .collect();
                let total: u64 = counts.iter().sum();
                let labels = shard_label(i);
                m.encode_family(&labels)?.encode_histogram::<()>(
                    sum_us as f64 / 1e6,
                    total,
                    &buckets,
                    None,
                )?;
            }
        }
        if let Some(d) = &self.delivery {
            encode_delivery(&mut enc, d)?;
        }
        if let Some((cpu, rss, fds)) = process_figures() {
            let mut m = enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of the process.",
                None,
                MetricType::Counter,
            )?;
            m.encode_counter::<(), _, u64>(&cpu, None)?;
            gauges(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident set size.",
                &[(Labels::new(), rss as i64)],
            )?;
            gauges(
                &mut enc,
                "process_open_fds",
                "Open file descriptors.",
                &[(Labels::new(), fds as i64)],
            )?;
        }
        Ok(())
    }
}

/// The delivery guarantee's figures: what the history and the records hold and what left them,
/// how connections began, replays and acknowledgements.
fn encode_delivery(
    enc: &mut DescriptorEncoder<'_>,
    d: &crate::history::Delivery,
) -> std::fmt::Result {
    use crate::history::{ring::EVICTION_CAUSES, RESUME_OUTCOMES};
    let h = d.history.usage();
    let r = d.records.usage();
    let st = &d.stats;
    let one_gauge = |v: usize| vec![(Labels::new(), v as i64)];
    let one = |c: &AtomicU64| vec![(Labels::new(), c.load(Ordering::Relaxed))];
    gauges(
        enc,
        "causeloop_history_events",
        "Events held in the history.",
        &one_gauge(h.events),
    )?;
    gauges(
        enc,
        "causeloop_history_bytes",
        "Bytes held by the history, as counted against --history-max-bytes.",
        &one_gauge(h.bytes),
    )?;
    gauges(
        enc,
        "causeloop_history_workspaces",
        "Workspaces whose stream the history keeps.",
        &one_gauge(h.workspaces),
    )?;
    let evictions: Vec<(Labels, u64)> = EVICTION_CAUSES
        .iter()
        .zip(h.evictions)
        .map(|(c, v)| (vec![("cause", c.to_string())], v))
        .collect();
    counters(
        enc,
        "causeloop_history_evictions",
        "Events that left the history, by cause (size: --history-size, ttl: --history-ttl, bytes: --history-max-bytes).",
        &evictions,
    )?;
    gauges(
        enc,
        "causeloop_resume_records",
        "Resume records held.",
        &one_gauge(r.held),
    )?;
    counters(
        enc,
        "causeloop_resume_records_made",
        "Resume records made (one per ended authenticated connection).",
        &one(&st.records_made),
    )?;
    counters(
        enc,
        "causeloop_resume_records_evicted",
        "Resume records dropped at --resume-max-records (their clients get stream.gap history_lost).",
        &[(Labels::new(), r.evicted)],
    )?;
    counters(
        enc,
        "causeloop_resume_records_expired",
        "Resume records whose --resume-window passed unused.",
        &[(Labels::new(), r.expired)],
    )?;
    let outcomes: Vec<(Labels, u64)> = RESUME_OUTCOMES
        .iter()
        .zip(&st.outcomes)
        .map(|(o, c)| (vec![("outcome", o.to_string())], c.load(Ordering::Relaxed)))
        .collect();
    counters(
        enc,
        "causeloop_stream_starts",
        "Connections by how their stream began: fresh, replayed from a resume record, or with stream.gap.",
        &outcomes,
    )?;
    counters(
        enc,
        "causeloop_replayed_frames",
        "Event frames sent from the history to resuming connections.",
        &one(&st.replayed_frames),
    )?;
    let acks = vec![
        (
            vec![("result", "sent".to_string())],
            st.acks_sent.load(Ordering::Relaxed),
        ),
        (
            vec![("result", "taken".to_string())],
            st.acks_received.load(Ordering::Relaxed),
        ),
        (
            vec![("result", "refused".to_string())],
            st.acks_refused.load(Ordering::Relaxed),
        ),
    ];
    counters(
        enc,
        "causeloop_acks",
        "Acknowledgement pings sent, and pong payloads taken or refused (stale, foreign, beyond what was sent).",
        &acks,
    )?;
    let waits: Vec<(Labels, u64)> = crate::history::TWIN_WAIT_ENDS
        .iter()
        .zip(&st.twin_waits)
        .map(|(e, c)| (vec![("ended", e.to_string())], c.load(Ordering::Relaxed)))
        .collect();
    counters(
        enc,
        "causeloop_twin_waits",
        "Connections that found another open with their token and waited for its record, by how the wait ended: record, answered (every twin answered its probe), timeout.",
        &waits,
    )?;
    counters(
        enc,
        "causeloop_gap_fills",
        "Events a shard took from the history because they reached it out of order.",
        &one(&st.gap_fills),
    )?;
    counters(
        enc,
        "causeloop_live_gaps",
        "stream.gap frames sent to live connections because the history could not fill a shard's gap.",
        &one(&st.live_gaps),
    )?;
    Ok(())
}

/// Renders every metric in the OpenMetrics text format (which Prometheus scrapes natively).
pub fn render(stats: &Stats) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector {
        shards: stats.shards.clone(),
        bus: stats.bus.clone(),
        internal: stats.internal.clone(),
        delivery: stats.delivery.clone(),
    }));
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// (CPU seconds, RSS bytes, open descriptors) of this process, from /proc (Linux).
fn process_figures() -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    // utime and stime, in USER_HZ (100 on Linux) ticks.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some((ticks as f64 / 100.0, rss_kb * 1024, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_shards_and_labels_are_bounded() {
        let stats = Stats::new(3);
        let shards = stats.shards.clone();
        ShardStats::add(&shards[0].frames_written, 5);
        ShardStats::add(&shards[2].frames_written, 7);
        shards[1].close(CloseReason::SlowConsumer);
        shards[1].auth_failure(AuthError::Expired);
        let text = render(&stats);
        assert!(text.contains("causeloop_frames_written_total 12\n"));
        assert!(
            text.contains("causeloop_closes_sent_total{code=\"1008\",reason=\"SlowConsumer\"} 1\n")
        );
        assert!(text.contains("causeloop_auth_failures_total{reason=\"expired\"} 1\n"));
        assert!(text.contains("causeloop_connections_open{shard=\"2\"} 0\n"));
        assert!(
            text.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends with # EOF"
        );
        shards[1]
            .fanout
            .record(std::time::Duration::from_micros(70));
        shards[1].fanout.record(std::time::Duration::from_secs(9));
        let text = render(&stats);
        assert!(
            text.contains("causeloop_fanout_seconds_bucket{le=\"0.00005\",shard=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("causeloop_fanout_seconds_bucket{le=\"0.0001\",shard=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("causeloop_fanout_seconds_bucket{le=\"+Inf\",shard=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("causeloop_fanout_seconds_count{shard=\"1\"} 2\n"),
            "{text}"
        );
    }
}
