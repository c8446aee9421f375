//! Command-line flags and their environment twins, turned into a [`Config`].
//!
//! Every flag `--some-flag` also reads `CAUSELOOP_SOME_FLAG`; a flag given on the command line
//! wins over the environment. Secrets are never flags: the inline HS256 secret and the publish
//! key come from `CAUSELOOP_JWT_HS256_SECRET` and `CAUSELOOP_PUBLISH_KEY` (or from files named by
//! flags), so they never show up in `ps`.

use crate::config::{
    defaults, parse_cpu_list, parse_duration, ByteSize, Config, HumanDuration, JwtConfig, Secret,
};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding one HS256 secret inline.
pub const ENV_HS256_SECRET: &str = "CAUSELOOP_JWT_HS256_SECRET";
/// Environment variable holding the publish key inline.
pub const ENV_PUBLISH_KEY: &str = "CAUSELOOP_PUBLISH_KEY";
/// The Redis bus password, inline (the file form is `--bus-password-file`).
pub const ENV_BUS_PASSWORD: &str = "CAUSELOOP_BUS_PASSWORD";

/// causeloop-stream: real-time workspace events over WebSocket.
#[derive(Parser, Debug)]
#[command(name = "causeloop-stream", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A subcommand; without one, the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mint an HS256 token for a workspace and user (for tests and first runs).
    Token(TokenArgs),
    /// Ask a running server's internal listener for `/healthz`: exit 0 if it answers 200, 1
    /// otherwise (a container's HEALTHCHECK, where there is no shell or curl).
    Healthcheck(HealthcheckArgs),
}

/// `causeloop-stream healthcheck` flags.
#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// The server's internal listener (an unspecified address means this host's loopback).
    #[arg(long = "internal-listen", env = "CAUSELOOP_INTERNAL_LISTEN", default_value_t = defaults().internal_listen)]
    pub internal_listen: std::net::SocketAddr,
    /// How long to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `causeloop-stream token` flags.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Workspace id to put in the workspace claim.
    #[arg(long)]
    pub workspace: String,
    /// User id (`sub`).
    #[arg(long)]
    pub user: String,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// File holding the HS256 secret (first non-empty line); defaults to CAUSELOOP_JWT_HS256_SECRET,
    /// then CAUSELOOP_JWT_HS256_SECRET_FILE.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Name of the workspace claim.
    #[arg(
        long,
        env = "CAUSELOOP_JWT_WORKSPACE_CLAIM",
        default_value_t = defaults().jwt.workspace_claim.clone()
    )]
    pub workspace_claim: String,
}

/// Server flags. Each has an environment twin `CAUSELOOP_<FLAG>`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Read flags from this TOML file (flag > environment > file > default); unknown keys are
    /// refused with their line.
    #[arg(long, env = "CAUSELOOP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Development mode: random HS256 secret and publish key, a ready URL, a curl command and a
    /// demo publisher. Never for production.
    #[arg(long, env = "CAUSELOOP_DEV")]
    pub dev: bool,
    /// Public listener: /v1/stream, /healthz, /readyz. Port 0 picks a free port.
    #[arg(long, env = "CAUSELOOP_LISTEN", default_value_t = defaults().listen)]
    pub listen: SocketAddr,
    /// Internal listener: /v1/publish, /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "CAUSELOOP_INTERNAL_LISTEN",
        default_value_t = defaults().internal_listen
    )]
    pub internal_listen: SocketAddr,
    /// Worker threads, each with its own event loop [default: available cores].
    #[arg(long, env = "CAUSELOOP_SHARDS")]
    pub shards: Option<usize>,
    /// Pin shard threads to these CPUs (`0-3` or `0,2,4`); shard i runs on the i-th, cycling.
    #[arg(long, env = "CAUSELOOP_CPU_AFFINITY", value_parser = parse_cpus)]
    pub cpu_affinity: Option<CpuList>,
    /// Open public sockets before new connections are refused with close code 1013.
    #[arg(long, env = "CAUSELOOP_MAX_CONNECTIONS", default_value_t = defaults().max_connections)]
    pub max_connections: usize,
    /// Unsent bytes per connection before it is closed 1008 (slow consumer).
    #[arg(long, env = "CAUSELOOP_MAX_OUTBOUND_BYTES", default_value_t = ByteSize(defaults().max_outbound_bytes))]
    pub max_outbound_bytes: ByteSize,
    /// SO_SNDBUF of stream sockets (0: the kernel's autotuning). Bounds kernel memory per
    /// connection and how long a stalled reader hides behind kernel buffers.
    #[arg(long, env = "CAUSELOOP_SOCKET_SEND_BUFFER", default_value_t = ByteSize(defaults().socket_send_buffer))]
    pub socket_send_buffer: ByteSize,
    /// Time from accept to a completed WebSocket upgrade.
    #[arg(long, env = "CAUSELOOP_HANDSHAKE_TIMEOUT", default_value_t = HumanDuration(defaults().handshake_timeout))]
    pub handshake_timeout: HumanDuration,
    /// How long a drain waits for clients to answer 1001.
    #[arg(long, env = "CAUSELOOP_DRAIN_TIMEOUT", default_value_t = HumanDuration(defaults().drain_timeout))]
    pub drain_timeout: HumanDuration,
    /// Spread a drain's 1001 closes evenly over this window (0: all at once); must be shorter
    /// than --drain-timeout.
    #[arg(long, env = "CAUSELOOP_DRAIN_SPREAD", default_value_t = HumanDuration(defaults().drain_spread))]
    pub drain_spread: HumanDuration,
    /// How long a server-initiated close waits for the client's close frame.
    #[arg(long, env = "CAUSELOOP_CLOSE_TIMEOUT", default_value_t = HumanDuration(defaults().close_timeout))]
    pub close_timeout: HumanDuration,
    /// Interval between heartbeat frames on each connection.
    #[arg(long, env = "CAUSELOOP_HEARTBEAT_INTERVAL", default_value_t = HumanDuration(defaults().heartbeat_interval))]
    pub heartbeat_interval: HumanDuration,
    /// Send each open connection a WebSocket ping this often (0: never); rounded up to whole
    /// heartbeat intervals.
    #[arg(long, env = "CAUSELOOP_PING_INTERVAL", default_value_t = HumanDuration(defaults().ping_interval))]
    pub ping_interval: HumanDuration,
    /// Drop a connection whose pong has not arrived this long after its ping (a dead peer).
    #[arg(long, env = "CAUSELOOP_PING_TIMEOUT", default_value_t = HumanDuration(defaults().ping_timeout))]
    pub ping_timeout: HumanDuration,
    /// TCP_USER_TIMEOUT of stream sockets: drop a connection whose sent data stays unacknowledged
    /// this long (0: the kernel's default, about 15 minutes).
    #[arg(long, env = "CAUSELOOP_TCP_USER_TIMEOUT", default_value_t = HumanDuration(defaults().tcp_user_timeout))]
    pub tcp_user_timeout: HumanDuration,
    /// Resolution of the shards' timer wheels.
    #[arg(long, env = "CAUSELOOP_TIMER_TICK", default_value_t = HumanDuration(defaults().timer_tick))]
    pub timer_tick: HumanDuration,
    /// Largest POST /v1/publish body.
    #[arg(long, env = "CAUSELOOP_MAX_PUBLISH_BYTES", default_value_t = ByteSize(defaults().max_publish_bytes))]
    pub max_publish_bytes: ByteSize,
    /// Most events in one publish batch.
    #[arg(long, env = "CAUSELOOP_MAX_PUBLISH_EVENTS", default_value_t = defaults().max_publish_events)]
    pub max_publish_events: usize,
    /// Open connections on the internal listener.
    #[arg(
        long,
        env = "CAUSELOOP_MAX_INTERNAL_CONNECTIONS",
        default_value_t = defaults().max_internal_connections
    )]
    pub max_internal_connections: usize,
    /// Largest data message a client may send (it is ignored); larger closes 1009.
    #[arg(long, env = "CAUSELOOP_MAX_CLIENT_MESSAGE_BYTES", default_value_t = ByteSize(defaults().max_client_message_bytes))]
    pub max_client_message_bytes: ByteSize,
    /// Largest HTTP request head; larger is answered 431.
    #[arg(long, env = "CAUSELOOP_MAX_REQUEST_HEAD_BYTES", default_value_t = ByteSize(defaults().max_request_head_bytes))]
    pub max_request_head_bytes: ByteSize,
    /// Most header fields in one HTTP request head (1 to 256); more is answered 431.
    #[arg(long, env = "CAUSELOOP_MAX_REQUEST_HEADERS", default_value_t = defaults().max_request_headers)]
    pub max_request_headers: usize,
    /// Largest single event as subscribers receive it (type, payload and ts encoded); larger is
    /// refused (413 on HTTP). At most --max-outbound-bytes.
    #[arg(long, env = "CAUSELOOP_MAX_EVENT_BYTES", default_value_t = ByteSize(defaults().max_event_bytes))]
    pub max_event_bytes: ByteSize,
    /// Deepest JSON nesting of an event's payload (1 to 100); deeper is refused (400).
    #[arg(long, env = "CAUSELOOP_MAX_JSON_DEPTH", default_value_t = defaults().max_json_depth)]
    pub max_json_depth: usize,
    /// Longest workspace or user id, in bytes (1 to 1024), in publishes and in token claims.
    #[arg(long, env = "CAUSELOOP_MAX_ID_BYTES", default_value_t = defaults().max_id_bytes)]
    pub max_id_bytes: usize,
    /// Frames a client may send per second (pings, pongs, messages), counted over each
    /// heartbeat interval; more closes the connection 1008.
    #[arg(
        long,
        env = "CAUSELOOP_MAX_CLIENT_FRAMES_PER_SEC",
        default_value_t = defaults().max_client_frames_per_sec
    )]
    pub max_client_frames_per_sec: u32,
    /// Largest JWKS, PEM or secret file the server reads; larger refuses to start (or to reload).
    #[arg(long, env = "CAUSELOOP_MAX_KEY_FILE_BYTES", default_value_t = ByteSize(defaults().jwt.max_key_file_bytes as usize))]
    pub max_key_file_bytes: ByteSize,
    /// Publish batches queued per shard before publishers wait.
    #[arg(long, env = "CAUSELOOP_SHARD_INBOX", default_value_t = defaults().shard_inbox)]
    pub shard_inbox: usize,
    /// PEM certificate chain (the server's certificate first): with --tls-key, the public
    /// listener speaks only TLS (wss://, https:// probes). Reloaded on SIGHUP.
    #[arg(long, env = "CAUSELOOP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Reloaded on SIGHUP.
    #[arg(long, env = "CAUSELOOP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// permessage-deflate: `auto` takes a client's offer (with server_no_context_takeover: each
    /// event is compressed once for every subscriber), `off` declines every offer.
    #[arg(long, env = "CAUSELOOP_COMPRESSION", default_value = "auto")]
    pub compression: Compression,
    /// Event frames smaller than this are sent uncompressed (so are those compression would not
    /// shrink, and heartbeats).
    #[arg(long, env = "CAUSELOOP_COMPRESSION_MIN_BYTES", default_value_t = ByteSize(defaults().compression_min_bytes))]
    pub compression_min_bytes: ByteSize,
    /// Events kept per workspace for resumes (0: no history, no resume).
    #[arg(long, env = "CAUSELOOP_HISTORY_SIZE", default_value_t = defaults().history_size)]
    pub history_size: usize,
    /// Age past which an event leaves the history.
    #[arg(long, env = "CAUSELOOP_HISTORY_TTL", default_value_t = HumanDuration(defaults().history_ttl))]
    pub history_ttl: HumanDuration,
    /// Bytes the history of every workspace together may hold; the oldest events go first.
    #[arg(long, env = "CAUSELOOP_HISTORY_MAX_BYTES", default_value_t = ByteSize(defaults().history_max_bytes))]
    pub history_max_bytes: ByteSize,
    /// How long an ended connection's resume record is kept.
    #[arg(long, env = "CAUSELOOP_RESUME_WINDOW", default_value_t = HumanDuration(defaults().resume_window))]
    pub resume_window: HumanDuration,
    /// Resume records kept at most; at the bound the oldest goes.
    #[arg(long, env = "CAUSELOOP_RESUME_MAX_RECORDS", default_value_t = defaults().resume_max_records)]
    pub resume_max_records: usize,
    /// How often a connection receiving events is sent an acknowledgement ping (with a
    /// heartbeat: rounded up to whole heartbeat intervals).
    #[arg(long, env = "CAUSELOOP_ACK_INTERVAL", default_value_t = HumanDuration(defaults().ack_interval))]
    pub ack_interval: HumanDuration,
    /// How long a connection whose token comes back on another connection has to answer a ping
    /// before it is taken for gone and its replacement resumes from it.
    #[arg(long, env = "CAUSELOOP_RESUME_PROBE_TIMEOUT", default_value_t = HumanDuration(defaults().resume_probe_timeout))]
    pub resume_probe_timeout: HumanDuration,
    /// File of HS256 secrets, one per line (several for rotation).
    #[arg(long, env = "CAUSELOOP_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// PEM file with RS256 public key(s); repeatable (comma-separated in the environment).
    #[arg(long, env = "CAUSELOOP_JWT_RS256_PUBLIC_KEY", value_delimiter = ',')]
    pub jwt_rs256_public_key: Vec<PathBuf>,
    /// RFC 7517 JWKS file; a token's `kid` picks the key.
    #[arg(long, env = "CAUSELOOP_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// Claim holding the workspace id.
    #[arg(
        long,
        env = "CAUSELOOP_JWT_WORKSPACE_CLAIM",
        default_value_t = defaults().jwt.workspace_claim.clone()
    )]
    pub jwt_workspace_claim: String,
    /// Required `iss`.
    #[arg(long, env = "CAUSELOOP_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud`.
    #[arg(long, env = "CAUSELOOP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed for exp, nbf and iat.
    #[arg(long, env = "CAUSELOOP_JWT_LEEWAY", default_value_t = HumanDuration(defaults().jwt.leeway))]
    pub jwt_leeway: HumanDuration,
    /// File holding the publish key (first line). CAUSELOOP_PUBLISH_KEY holds it inline instead.
    #[arg(long, env = "CAUSELOOP_PUBLISH_KEY_FILE")]
    pub publish_key_file: Option<PathBuf>,
    /// How events travel between nodes: `local` (in process), `redis://HOST:PORT[/DB]` (every
    /// node on one Redis server) or `redis-cluster://HOST:PORT,HOST:PORT,...` (a Redis Cluster,
    /// sharded pub/sub; the nodes listed are seeds). The Redis password comes from
    /// CAUSELOOP_BUS_PASSWORD or --bus-password-file.
    #[arg(long, env = "CAUSELOOP_BUS", default_value_t = defaults().bus.to_string())]
    pub bus: String,
    /// File holding the Redis password (first line).
    #[arg(long, env = "CAUSELOOP_BUS_PASSWORD_FILE")]
    pub bus_password_file: Option<PathBuf>,
    /// The cluster wire format this node publishes: 1, or 2 (positions assigned by Redis,
    /// history and resume records in Redis: nothing lost across nodes). Nodes read both; turn
    /// 2 on once every node runs a release that reads it (docs/cluster.md, "Rollout").
    #[arg(long, env = "CAUSELOOP_BUS_WIRE", default_value_t = 1)]
    pub bus_wire: u8,
    /// Log line format: text or json.
    #[arg(long, env = "CAUSELOOP_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::logging::Format,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, env = "CAUSELOOP_LOG_LEVEL", default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

/// A list of CPU ids from `--cpu-affinity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

/// `--compression`: `auto` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Take a client's `permessage-deflate` offer.
    Auto,
    /// Decline every offer.
    Off,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compression::Auto),
            "off" => Ok(Compression::Off),
            _ => Err(format!("invalid compression {s:?}: use auto or off")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Off => "off",
        })
    }
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("invalid log level {s:?}: use error, warn, info, debug or trace"))
}

/// Reads the first non-empty line of a secret file.
pub fn read_secret_file(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .find(|l| !l.is_empty())
        .ok_or_else(|| format!("{}: empty file", path.display()))?;
    Ok(Secret::from(line.to_vec()))
}

fn env_secret(name: &str) -> Option<Secret> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(|v| Secret::from(v.into_encoded_bytes()))
}

impl RunArgs {
    /// Builds the server configuration. Errors name the flag at fault.
    pub fn to_config(&self) -> Result<Config, String> {
        let mut bus = crate::config::BusConfig::parse(&self.bus)?;
        if let crate::config::BusConfig::Redis(r) = &mut bus {
            r.wire = self.bus_wire;
            r.password = match &self.bus_password_file {
                Some(p) => Some(read_secret_file(p)?),
                None => env_secret(ENV_BUS_PASSWORD),
            };
        }
        let mut jwt = JwtConfig {
            hs256_secrets: env_secret(ENV_HS256_SECRET).into_iter().collect(),
            hs256_secret_file: self.jwt_hs256_secret_file.clone(),
            rs256_public_keys: self.jwt_rs256_public_key.clone(),
            jwks_file: self.jwt_jwks_file.clone(),
            workspace_claim: self.jwt_workspace_claim.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway.0,
            max_key_file_bytes: self.max_key_file_bytes.0 as u64,
        };
        let publish_key = match &self.publish_key_file {
            Some(p) => Some(read_secret_file(p)?),
            None => env_secret(ENV_PUBLISH_KEY),
        };
        jwt.hs256_secrets.retain(|s| !s.expose().is_empty());
        Ok(Config {
            listen: self.listen,
            internal_listen: self.internal_listen,
            shards: self.shards.unwrap_or(defaults().shards),
            cpu_affinity: self.cpu_affinity.clone().map(|c| c.0).unwrap_or_default(),
            max_connections: self.max_connections,
            max_outbound_bytes: self.max_outbound_bytes.0,
            socket_send_buffer: self.socket_send_buffer.0,
            handshake_timeout: self.handshake_timeout.0,
            drain_timeout: self.drain_timeout.0,
            drain_spread: self.drain_spread.0,
            close_timeout: self.close_timeout.0,
            heartbeat_interval: self.heartbeat_interval.0,
            ping_interval: self.ping_interval.0,
            ping_timeout: self.ping_timeout.0,
            tcp_user_timeout: self.tcp_user_timeout.0,
            max_publish_bytes: self.max_publish_bytes.0,
            max_publish_events: self.max_publish_events,
            max_internal_connections: self.max_internal_connections,
            max_client_message_bytes: self.max_client_message_bytes.0,
            max_request_head_bytes: self.max_request_head_bytes.0,
            max_request_headers: self.max_request_headers,
            max_event_bytes: self.max_event_bytes.0,
            max_json_depth: self.max_json_depth,
            max_id_bytes: self.max_id_bytes,
            max_client_frames_per_sec: self.max_client_frames_per_sec,
            shard_inbox: self.shard_inbox,
            history_size: self.history_size,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            compression: self.compression == Compression::Auto,
            compression_min_bytes: self.compression_min_bytes.0,
            history_ttl: self.history_ttl.0,
            history_max_bytes: self.history_max_bytes.0,
            resume_window: self.resume_window.0,
            resume_max_records: self.resume_max_records,
            ack_interval: self.ack_interval.0,
            resume_probe_timeout: self.resume_probe_timeout.0,
            timer_tick: self.timer_tick.0,
            jwt,
            publish_key,
            bus,
            ..Config::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_left_alone_give_the_library_defaults() {
        // Every default is written once (Config::default); the flags show and use it. A flag
        // whose default drifted would make these differ. (Run without CAUSELOOP_* variables.)
        let cli = Cli::try_parse_from(["causeloop-stream"]).unwrap();
        let from_flags = cli.run.to_config().unwrap();
        assert_eq!(
            format!("{from_flags:?}"),
            format!("{:?}", Config::default())
        );
    }
}
