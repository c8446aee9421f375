//! The server's configuration, as the library sees it. [`crate::cli`] fills it from flags and
//! environment; embedders fill it in code. Defaults are the contract's.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A secret value (key, publish key). Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// The secret's bytes. Call only where the bytes are used as a key.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Secret(v)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

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

impl JwtConfig {
    /// The claim rules for [`crate::auth::jwt::verify`]; `max_id_bytes` is `--max-id-bytes`.
    pub fn validation(&self, max_id_bytes: usize) -> crate::auth::jwt::Validation {
        crate::auth::jwt::Validation {
            workspace_claim: self.workspace_claim.clone(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway_secs: self.leeway.as_secs(),
            max_id_bytes,
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
    pub cluster: bool,
    /// Logical database (`SELECT`); pub/sub ignores it, but `AUTH`-scoped setups may care.
    /// Always 0 on a Redis Cluster, which has only database 0.
    pub db: u32,
    /// `AUTH` password (`CAUSELOOP_BUS_PASSWORD` or `--bus-password-file`); never in argv.
    pub password: Option<Secret>,
}

impl RedisConfig {
    /// One Redis server at `host:port`, database 0, no password.
    pub fn single(host: &str, port: u16) -> RedisConfig {
        RedisConfig {
            nodes: vec![RedisNode {
                host: host.to_string(),
                port,
            }],
            cluster: false,
            db: 0,
            password: None,
        }
    }

    /// The `--bus` URL this configuration stands for (for logs; it never holds the password).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| n.to_string()).collect();
        match (self.cluster, self.db) {
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
            cluster,
            db,
            password: None,
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
    /// `--timer-tick`: resolution of the shards' timer wheels.
    pub timer_tick: Duration,
    /// Token verification.
    pub jwt: JwtConfig,
    /// `--publish-key-file` / `CAUSELOOP_PUBLISH_KEY`. `None` refuses every HTTP publish (401).
    pub publish_key: Option<Secret>,
    /// `--bus`.
    pub bus: BusConfig,
    /// Fault injection for tests of failure isolation: a client ping carrying exactly these bytes
    /// makes that connection's handler panic. Not reachable from flags; `None` outside tests.
    #[doc(hidden)]
    pub fault_injection_ping: Option<Vec<u8>>,
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
            timer_tick: Duration::from_millis(10),
            jwt: JwtConfig::default(),
            publish_key: None,
            bus: BusConfig::Local,
            fault_injection_ping: None,
        }
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
        assert!(!r.cluster);
        assert_eq!(r.db, 2);
        assert_eq!(r.url(), "redis://10.0.0.5:6380/2");
        let c = BusConfig::parse("redis-cluster://a:7000, b:7001,[::1]:7002").unwrap();
        let BusConfig::Redis(r) = &c else {
            panic!("{c:?}")
        };
        assert!(r.cluster);
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
