//! The server's configuration, as the library sees it. [`crate::cli`] fills it from flags and
//! environment; embedders fill it in code.
//!
//! Every default is written once, in `Config::default` (the contract's values); the flags take
//! theirs from it ([`defaults`]), and [`Config::validate`] is the one place a configuration is
//! checked before a server starts.

pub use crate::secret::Secret;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where tokens are verified against, and which claims they must carry.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// Inline HS256 secrets (`CAUSELOOP_JWT_HS256_SECRET`, `--dev`).
    pub hs256_secrets: Vec<Secret>,
    /// `--jwt-hs256-secret-file`: one secret per non-empty line.
    pub hs256_secret_file: Option<PathBuf>,
    /// `--jwt-rs256-public-key`: PEM files.
    pub rs256_public_keys: Vec<PathBuf>,
    /// `--jwt-jwks-file`: an RFC 7517 key set.
    pub jwks_file: Option<PathBuf>,
    /// `--jwt-workspace-claim`.
    pub workspace_claim: String,
    /// `--jwt-issuer`.
    pub issuer: Option<String>,
    /// `--jwt-audience`.
    pub audience: Option<String>,
    /// `--jwt-leeway`.
    pub leeway: Duration,
    /// `--max-key-file-bytes`: largest JWKS, PEM or secret file read.
    pub max_key_file_bytes: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secrets: Vec::new(),
            hs256_secret_file: None,
            rs256_public_keys: Vec::new(),
            jwks_file: None,
            workspace_claim: "workspace_id".into(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            max_key_file_bytes: 1 << 20,
        }
    }
}

/// How events travel between nodes (`--bus`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BusConfig {
    /// In process only: one node.
    #[default]
    Local,
    /// Through Redis: one server (`redis://HOST:PORT[/DB]`) or a Redis Cluster
    /// (`redis-cluster://HOST:PORT,HOST:PORT,...`).
    Redis(RedisConfig),
}

/// One Redis server's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RedisNode {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where the Redis bus connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// The server (one Redis), or the seed nodes the cluster's layout is first asked of (Redis
    /// Cluster; any one that answers is enough).
    pub nodes: Vec<RedisNode>,
    /// A Redis Cluster: sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), each channel on the master
    /// that owns its hash slot.
    pub redis_cluster: bool,
    /// Logical database (`SELECT`); pub/sub ignores it, but `AUTH`-scoped setups may care.
    /// Always 0 on a Redis Cluster, which has only database 0.
    pub db: u32,
    /// `AUTH` password (`CAUSELOOP_BUS_PASSWORD` or `--bus-password-file`); never in argv.
    pub password: Option<Secret>,
    /// The wire format this node publishes (`--bus-wire`): 1, or 2 (positions, history and
    /// resume records in Redis). A node reads both whatever it publishes.
    pub wire: u8,
}

impl RedisConfig {
    /// One Redis server at `host:port`, database 0, no password.
    pub fn single(host: &str, port: u16) -> RedisConfig {
        RedisConfig {
            nodes: vec![RedisNode {
                host: host.to_string(),
                port,
            }],
            redis_cluster: false,
            db: 0,
            password: None,
            wire: 1,
        }
    }

    /// The `--bus` URL this configuration stands for (for logs; it never holds the password).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.to_string()).collect();
        match (self.redis_cluster, self.db) {
            (true, _) => format!("redis-cluster://{}", nodes.join(",")),
            (false, 0) => format!("redis://{}", nodes.join(",")),
            (false, db) => format!("redis://{}/{db}", nodes.join(",")),
        }
    }
}

/// Parses one `HOST:PORT` (`[v6]:PORT` for IPv6) of a `--bus` URL.
fn parse_redis_node(url: &str, hostport: &str) -> Result<RedisNode, String> {
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("--bus {url:?}: expected HOST:PORT, got {hostport:?}"))?;
    let port = port
        .parse()
        .map_err(|_| format!("--bus {url:?}: port {port:?} is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("--bus {url:?}: no host in {hostport:?}"));
    }
    Ok(RedisNode {
        host: host.to_string(),
        port,
    })
}

impl fmt::Display for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusConfig::Local => f.write_str("local"),
            BusConfig::Redis(r) => f.write_str(&r.url()),
        }
    }
}

impl BusConfig {
    /// Parses `--bus`: `local`, `redis://HOST:PORT[/DB]`, or
    /// `redis-cluster://HOST:PORT[,HOST:PORT...]`. A password in the URL is refused (argv is
    /// visible to every local user); it comes from the environment or a file.
    pub fn parse(s: &str) -> Result<BusConfig, String> {
        if s == "local" {
            return Ok(BusConfig::Local);
        }
        let (rest, cluster) = if let Some(rest) = s.strip_prefix("redis://") {
            (rest, false)
        } else if let Some(rest) = s.strip_prefix("redis-cluster://") {
            (rest, true)
        } else {
            return Err(format!(
                "--bus {s:?}: expected `local`, `redis://HOST:PORT[/DB]` or `redis-cluster://HOST:PORT,HOST:PORT,...`"
            ));
        };
        if rest.contains('@') {
            return Err("--bus: put the Redis password in CAUSELOOP_BUS_PASSWORD or --bus-password-file, not in the URL".into());
        }
        let (hostports, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some(_) if cluster => {
                return Err(format!(
                    "--bus {s:?}: a Redis Cluster has only database 0; drop the /DB"
                ))
            }
            Some((hp, db)) => (
                hp,
                db.parse()
                    .map_err(|_| format!("--bus: database {db:?} is not a number"))?,
            ),
            None => (rest, 0),
        };
        let nodes = hostports
            .split(',')
            .map(|hp| parse_redis_node(s, hp.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.len() > 1 && !cluster {
            return Err(format!(
                "--bus {s:?}: redis:// takes one server; for a Redis Cluster use redis-cluster://HOST:PORT,HOST:PORT,..."
            ));
        }
        Ok(BusConfig::Redis(RedisConfig {
            nodes,
            redis_cluster: cluster,
            db,
            password: None,
            wire: 1,
        }))
    }
}

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--listen`: the public listener (`/v1/stream`, `/healthz`, `/readyz`).
    pub listen: SocketAddr,
    /// `--internal-listen`: publish, metrics and probes.
    pub internal_listen: SocketAddr,
    /// `--shards`: worker threads, each with its own poll loop.
    pub shards: usize,
    /// `--cpu-affinity`: CPU ids to pin shard threads to (shard `i` on `cpus[i % len]`); empty
    /// leaves placement to the scheduler.
    pub cpu_affinity: Vec<usize>,
    /// `--max-connections`: open sockets on the public listener before new ones get 1013.
    pub max_connections: usize,
    /// `--max-outbound-bytes`: unsent bytes per connection before it is closed 1008.
    pub max_outbound_bytes: usize,
    /// `--socket-send-buffer`: `SO_SNDBUF` for stream sockets (0 keeps the kernel's autotuning).
    /// Bounds kernel memory per connection and makes a stalled reader visible to
    /// `--max-outbound-bytes` after this much, not after the kernel's maximum (often 4 MiB).
    pub socket_send_buffer: usize,
    /// `--handshake-timeout`: from accept to a completed upgrade.
    pub handshake_timeout: Duration,
    /// `--drain-timeout`: how long a drain waits for clients' close frames.
    pub drain_timeout: Duration,
    /// `--drain-spread`: the window over which a drain sends its 1001s, in even batches, so a
    /// fleet restart does not send every client back at once. Zero closes everyone at once.
    pub drain_spread: Duration,
    /// `--close-timeout`: how long a server-initiated close waits for the client's close frame.
    pub close_timeout: Duration,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: Duration,
    /// `--ping-interval`: how often an open connection is sent a WebSocket ping (zero: never).
    /// Rounded up to whole heartbeat intervals; the ping goes out with a heartbeat.
    pub ping_interval: Duration,
    /// `--ping-timeout`: a connection whose pong has not arrived this long after its ping is a
    /// dead peer and is dropped (rounded up to whole heartbeat intervals).
    pub ping_timeout: Duration,
    /// `--tcp-user-timeout`: `TCP_USER_TIMEOUT` on stream sockets: the kernel drops a connection
    /// whose sent data stays unacknowledged this long (zero: the kernel's retransmission limit,
    /// about 15 minutes). Heartbeats keep data in flight, so this bounds how long a peer that
    /// vanished without a FIN is kept.
    pub tcp_user_timeout: Duration,
    /// `--max-publish-bytes`: largest `POST /v1/publish` body.
    pub max_publish_bytes: usize,
    /// `--max-publish-events`: most events in one publish batch.
    pub max_publish_events: usize,
    /// `--max-internal-connections`: open connections on the internal listener.
    pub max_internal_connections: usize,
    /// `--max-client-message-bytes`: largest data message a client may send (it is ignored).
    pub max_client_message_bytes: usize,
    /// `--max-request-head-bytes`: largest HTTP request head on either listener.
    pub max_request_head_bytes: usize,
    /// `--max-request-headers`: most header fields in one request head.
    pub max_request_headers: usize,
    /// `--max-event-bytes`: largest single event as a subscriber receives it (the encoded
    /// `{type,payload,ts}` text); must not exceed `--max-outbound-bytes`.
    pub max_event_bytes: usize,
    /// `--max-json-depth`: deepest nesting of an event's payload.
    pub max_json_depth: usize,
    /// `--max-id-bytes`: longest workspace or user id (publishes and token claims).
    pub max_id_bytes: usize,
    /// `--max-client-frames-per-sec`: frames a client may send per second, counted over each
    /// heartbeat interval; more closes the connection 1008.
    pub max_client_frames_per_sec: u32,
    /// `--shard-inbox`: publish batches queued per shard before publishers wait.
    pub shard_inbox: usize,
    /// `--history-size`: events kept per workspace for resumes; 0 turns history and resume off.
    pub history_size: usize,
    /// `--tls-cert` and `--tls-key`: the public listener speaks TLS.
    pub tls: Option<crate::tls::TlsFiles>,
    /// `--dev`: the page on `GET /` and its publish route (see `dev_site`); never otherwise.
    pub dev_site: Option<std::sync::Arc<crate::dev_site::DevSite>>,
    /// `--compression auto|off`: take a client's `permessage-deflate` offer (`auto`).
    pub compression: bool,
    /// `--compression-min-bytes`: event frames smaller than this are sent uncompressed.
    pub compression_min_bytes: usize,
    /// `--history-ttl`: age past which an event leaves the history.
    pub history_ttl: Duration,
    /// `--history-max-bytes`: the history of every workspace together, oldest events first out.
    pub history_max_bytes: usize,
    /// `--resume-window`: how long an ended connection's resume record is kept.
    pub resume_window: Duration,
    /// `--resume-max-records`: resume records kept at most (the oldest goes at the bound).
    pub resume_max_records: usize,
    /// `--ack-interval`: how often a connection receiving events gets an acknowledgement ping.
    pub ack_interval: Duration,
    /// `--resume-probe-timeout`: how long an open connection whose token reconnected elsewhere
    /// has to answer a ping before it is taken for gone (its replacement waits half as long
    /// again for its record).
    pub resume_probe_timeout: Duration,
    /// `--timer-tick`: resolution of the shards' timer wheels.
    pub timer_tick: Duration,
    /// Token verification.
    pub jwt: JwtConfig,
    /// `--publish-key-file` / `CAUSELOOP_PUBLISH_KEY`. `None` refuses every HTTP publish (401).
    pub publish_key: Option<Secret>,
    /// `--bus`.
    pub bus: BusConfig,
    /// Faults to inject, for the tests of failure isolation (builds with the `fault-injection`
    /// feature only, which the tests turn on; never reachable from flags).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub faults: Option<std::sync::Arc<crate::fault::Faults>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:4000".parse().expect("literal address"),
            internal_listen: "127.0.0.1:4001".parse().expect("literal address"),
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_affinity: Vec::new(),
            max_connections: 1_000_000,
            max_outbound_bytes: 1 << 20,
            socket_send_buffer: 256 << 10,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            drain_spread: Duration::ZERO,
            close_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(30),
            tcp_user_timeout: Duration::from_secs(30),
            max_publish_bytes: 1 << 20,
            max_publish_events: 10_000,
            max_internal_connections: 1024,
            max_client_message_bytes: 4096,
            max_request_head_bytes: 16 << 10,
            max_request_headers: 64,
            max_event_bytes: 64 << 10,
            max_json_depth: 32,
            max_id_bytes: 256,
            max_client_frames_per_sec: 100,
            shard_inbox: 256,
            history_size: 1000,
            tls: None,
            dev_site: None,
            compression: true,
            compression_min_bytes: 128,
            history_ttl: Duration::from_secs(120),
            history_max_bytes: 64 << 20,
            resume_window: Duration::from_secs(120),
            resume_max_records: 1_000_000,
            ack_interval: Duration::from_secs(5),
            resume_probe_timeout: Duration::from_secs(1),
            timer_tick: Duration::from_millis(10),
            jwt: JwtConfig::default(),
            publish_key: None,
            bus: BusConfig::Local,
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }
}

/// The most shards a server can run (the interest table keeps four 64-bit words per bucket).
pub const MAX_SHARDS: usize = 256;
/// The highest `--max-request-headers` (header slots are uninitialised stack, so the cap costs
/// nothing per request).
pub const MAX_REQUEST_HEADERS: usize = 256;
/// The highest `--max-id-bytes`.
pub const MAX_ID_BYTES: usize = 1024;
/// The highest `--max-json-depth`: serde_json refuses nesting past 128 on its own, and a
/// publish body adds two levels (the batch array and the event object) around each payload.
pub const MAX_JSON_DEPTH: usize = 100;

/// Why a configuration cannot run; the message names the flag at fault and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The defaults, built once: the flags show and use these (`Config::default` is where each is
/// written).
pub fn defaults() -> &'static Config {
    static DEFAULTS: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    DEFAULTS.get_or_init(Config::default)
}

impl Config {
    /// Checks every setting's range and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        let bad = |m: String| Err(ConfigError(m));
        if c.shards == 0 || c.shards > MAX_SHARDS {
            return bad(format!("--shards must be 1 to {MAX_SHARDS}"));
        }
        if c.heartbeat_interval.is_zero() || c.timer_tick.is_zero() {
            return bad("--heartbeat-interval and --timer-tick must be above zero".into());
        }
        if !c.drain_spread.is_zero() && c.drain_spread >= c.drain_timeout {
            return bad("--drain-spread must be shorter than --drain-timeout".into());
        }
        if c.timer_tick > c.heartbeat_interval {
            return bad("--timer-tick must not exceed --heartbeat-interval".into());
        }
        if c.max_request_head_bytes < 256 {
            return bad("--max-request-head-bytes must be at least 256".into());
        }
        if c.shard_inbox == 0 || c.max_publish_events == 0 {
            return bad("--shard-inbox and --max-publish-events must be above zero".into());
        }
        if c.max_internal_connections == 0 {
            return bad("--max-internal-connections must be above zero".into());
        }
        if c.max_outbound_bytes < 1024 || c.max_outbound_bytes > 1 << 30 {
            return bad("--max-outbound-bytes must be 1 KiB to 1 GiB".into());
        }
        if c.max_request_headers == 0 || c.max_request_headers > MAX_REQUEST_HEADERS {
            return bad(format!(
                "--max-request-headers must be 1 to {MAX_REQUEST_HEADERS}"
            ));
        }
        if c.max_event_bytes < 64 || c.max_event_bytes > c.max_outbound_bytes {
            // A larger event could never be queued without tripping the slow-consumer close.
            return bad(
                "--max-event-bytes must be at least 64 and at most --max-outbound-bytes".into(),
            );
        }
        if let BusConfig::Redis(r) = &c.bus {
            if r.wire != 1 && r.wire != 2 {
                return bad("--bus-wire must be 1 or 2".into());
            }
            if r.wire == 2 && c.history_size == 0 {
                return bad(
                    "--bus-wire 2 keeps each workspace's history in Redis, and --history-size 0 turns history off: use --bus-wire 1, or a history size of at least 1"
                        .into(),
                );
            }
        }
        if c.max_json_depth == 0 || c.max_json_depth > MAX_JSON_DEPTH {
            return bad(format!("--max-json-depth must be 1 to {MAX_JSON_DEPTH}"));
        }
        if c.max_id_bytes == 0 || c.max_id_bytes > MAX_ID_BYTES {
            return bad(format!("--max-id-bytes must be 1 to {MAX_ID_BYTES}"));
        }
        let beats = |d: Duration| {
            d.as_nanos()
                .div_ceil(c.heartbeat_interval.as_nanos().max(1))
        };
        if beats(c.ping_interval) > u16::MAX as u128 || beats(c.ping_timeout) > u16::MAX as u128 {
            return bad(
                "--ping-interval and --ping-timeout must be at most 65535 heartbeat intervals"
                    .into(),
            );
        }
        if !c.ping_interval.is_zero() && c.ping_timeout.is_zero() {
            return bad("--ping-timeout must be above zero while pings are on".into());
        }
        if c.tcp_user_timeout.as_millis() > u32::MAX as u128 {
            return bad("--tcp-user-timeout is too large".into());
        }
        if c.max_client_frames_per_sec == 0 {
            return bad("--max-client-frames-per-sec must be above zero".into());
        }
        if c.jwt.workspace_claim.is_empty() {
            return bad("--jwt-workspace-claim must not be empty".into());
        }
        if c.history_size > 0 {
            if c.history_ttl.is_zero() || c.resume_window.is_zero() || c.ack_interval.is_zero() {
                return bad("--history-ttl, --resume-window and --ack-interval must be above zero while --history-size is".into());
            }
            if c.history_max_bytes < c.max_event_bytes {
                return bad(
                    "--history-max-bytes must hold at least one event of --max-event-bytes".into(),
                );
            }
            if c.resume_probe_timeout.is_zero() {
                return bad("--resume-probe-timeout must be above zero".into());
            }
            if c.resume_max_records == 0 {
                return bad("--resume-max-records must be above zero while --history-size is (0 history turns resume off)".into());
            }
        }
        Ok(())
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ))
        }
    };
    Ok(d)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// A duration as flags write it (`500ms`, `5s`, `2m`, `1h`): what clap parses and shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(HumanDuration)
    }
}

/// A byte size as flags write it (`4096`, `64KiB`, `1MiB`): what clap parses and shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n != 0 && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_bytes(s).map(ByteSize)
    }
}

/// Parses a CPU list: `0,2,4` or `0-3` or a mix (`0-1,4`).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid CPU list {s:?}: expected e.g. 0-3 or 0,2,4");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if b < a || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// Parses a byte size: `4096`, `64KiB`, `1MiB`, `1GiB`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 4096, 64KiB, 1MiB"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unit must be B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        for d in ["500ms", "5s", "2m", "1h", "0s", "90s"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2, 4"), Ok(vec![0, 2, 4]));
        assert_eq!(parse_cpu_list("0-1,4"), Ok(vec![0, 1, 4]));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn sizes_and_durations_print_as_they_parse() {
        for s in ["0", "100", "4KiB", "1MiB", "256KiB", "3GiB", "1025"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
        for s in ["0s", "10ms", "5s", "2m", "1h", "1500ms"] {
            assert_eq!(s.parse::<HumanDuration>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn the_defaults_are_valid_and_bad_values_name_their_flag() {
        assert_eq!(Config::default().validate(), Ok(()));
        let with = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert!(with(|c| c.shards = 0).contains("--shards"));
        assert!(
            with(|c| c.max_event_bytes = c.max_outbound_bytes + 1).contains("--max-event-bytes")
        );
        assert!(with(|c| c.drain_spread = c.drain_timeout).contains("--drain-spread"));
        assert!(with(|c| c.max_internal_connections = 0).contains("--max-internal-connections"));
        assert!(with(|c| c.jwt.workspace_claim.clear()).contains("--jwt-workspace-claim"));
        assert!(with(|c| c.history_max_bytes = 1000).contains("--history-max-bytes"));
        assert!(with(|c| c.history_ttl = Duration::ZERO).contains("--history-ttl"));
        assert!(with(|c| c.resume_max_records = 0).contains("--resume-max-records"));
        assert!(
            with(|c| c.resume_probe_timeout = Duration::ZERO).contains("--resume-probe-timeout")
        );
        // With history off, its settings are not checked.
        let mut off = Config {
            history_size: 0,
            history_ttl: Duration::ZERO,
            ..Config::default()
        };
        off.resume_max_records = 0;
        assert_eq!(off.validate(), Ok(()));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert!(parse_bytes("1TB").is_err());
    }

    #[test]
    fn bus_urls() {
        let one = BusConfig::parse("redis://10.0.0.5:6380/2").unwrap();
        let BusConfig::Redis(r) = &one else {
            panic!("{one:?}")
        };
        assert!(!r.redis_cluster);
        assert_eq!(r.db, 2);
        assert_eq!(r.url(), "redis://10.0.0.5:6380/2");
        let c = BusConfig::parse("redis-cluster://a:7000, b:7001,[::1]:7002").unwrap();
        let BusConfig::Redis(r) = &c else {
            panic!("{c:?}")
        };
        assert!(r.redis_cluster);
        assert_eq!(r.nodes.len(), 3);
        assert_eq!(r.nodes[2].host, "::1");
        assert_eq!(r.url(), "redis-cluster://a:7000,b:7001,[::1]:7002");
        assert_eq!(BusConfig::parse("local"), Ok(BusConfig::Local));
        for bad in [
            "redis://a:1,b:2",
            "redis-cluster://a:7000/1",
            "redis-cluster://a:7000,",
            "redis://:pw@a:1",
            "redis-cluster://u:pw@a:1",
            "redis://a",
            "redis://a:x",
            "rediss://a:1",
        ] {
            assert!(BusConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::from(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "<redacted>");
        let c = Config {
            publish_key: Some(s),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
