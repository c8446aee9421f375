//! Starting, draining and stopping a server.
//!
//! [`Server::start`] binds one public listener socket per shard on the same address with
//! SO_REUSEPORT (the kernel spreads new connections over them, no acceptor thread and no hand-off),
//! binds the internal listener, and starts one thread per shard plus the internal thread.
//! [`Server::shutdown`] begins the drain; [`Server::wait`] returns once it has finished.

use crate::auth::keys::{KeyError, KeySet};
use crate::bus::cluster::ClusterBus;
use crate::bus::event::MAX_ID_BYTES;
use crate::bus::interest::{Interest, MAX_SHARDS};
use crate::bus::Publisher;
use crate::config::{BusConfig, Config};
use crate::http::request::MAX_REQUEST_HEADERS;
use crate::internal::Internal;
use crate::metrics::{BusStats, ShardStats};
use crate::shard::inbox::{ShardLink, ShardMsg};
use crate::shard::{Shard, WAKER};
use mio::net::TcpListener;
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Listen backlog of every listener (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// State every thread can see. Written rarely (start, drain), read on probes and per publish.
pub struct Shared {
    /// The configuration the server started with.
    pub config: Config,
    /// Set once a drain begins; never cleared.
    pub draining: AtomicBool,
    /// Sockets open on the public listener, across shards (for `--max-connections`).
    pub open_sockets: AtomicUsize,
    /// Which shards hold subscribers of which workspaces.
    pub interest: Arc<Interest>,
    /// Each shard's counters.
    pub shard_stats: Arc<[ShardStats]>,
    /// Publish counters.
    pub bus_stats: Arc<BusStats>,
    /// Each shard's inbox.
    pub links: Box<[ShardLink]>,
    /// The cluster bus, with `--bus redis://`.
    pub bus: Option<Arc<ClusterBus>>,
}

impl Shared {
    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// What `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// A setting is out of range; the message says which and why.
    Config(String),
    /// A key file could not be loaded.
    Keys(KeyError),
    /// A listener could not be bound.
    Bind(SocketAddr, std::io::Error),
    /// Creating a poll, waker or thread failed.
    Io(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(m) => write!(f, "invalid configuration: {m}"),
            StartError::Keys(e) => write!(f, "cannot load JWT keys: {e}"),
            StartError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartError::Io(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    shards: Vec<JoinHandle<()>>,
    internal: Option<JoinHandle<()>>,
    internal_waker: Arc<Waker>,
    internal_stop: Arc<AtomicBool>,
    bus_thread: Option<JoinHandle<()>>,
    public_addr: SocketAddr,
    internal_addr: SocketAddr,
}

/// A cloneable handle to begin the drain or reload keys from another thread (signal handling).
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// Begins the graceful drain: stop accepting, `/readyz` answers 503, every connection gets
    /// 1001 and is waited for up to `--drain-timeout`. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        for link in self.shared.links.iter() {
            let _ = link.send(ShardMsg::Drain);
        }
    }

    /// Re-reads every key file and hands the new key set to the shards. On error the old keys
    /// stay in force.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        let loaded = KeySet::load(&self.shared.config.jwt).and_then(|k| {
            if k.is_empty() {
                Err(KeyError("no key left after reload".into()))
            } else {
                Ok(k)
            }
        });
        let stats = &self.shared.bus_stats;
        let keys = match loaded {
            Ok(k) => Arc::new(k),
            Err(e) => {
                crate::metrics::ShardStats::add(&stats.key_reloads_failed, 1);
                return Err(e);
            }
        };
        for link in self.shared.links.iter() {
            let _ = link.send(ShardMsg::Keys(keys.clone()));
        }
        crate::metrics::ShardStats::add(&stats.key_reloads_ok, 1);
        Ok(())
    }
}

/// The highest `--max-json-depth`: serde_json refuses nesting past 128 on its own, and a
/// publish body adds two levels (the batch array and the event object) around each payload.
pub const MAX_JSON_DEPTH: usize = 100;

fn validate(c: &Config) -> Result<(), StartError> {
    let bad = |m: &str| Err(StartError::Config(m.to_string()));
    if c.shards == 0 || c.shards > MAX_SHARDS {
        return bad(&format!("--shards must be 1 to {MAX_SHARDS}"));
    }
    if c.heartbeat_interval.is_zero() || c.timer_tick.is_zero() {
        return bad("--heartbeat-interval and --timer-tick must be above zero");
    }
    if !c.drain_spread.is_zero() && c.drain_spread >= c.drain_timeout {
        return bad("--drain-spread must be shorter than --drain-timeout");
    }
    if c.timer_tick > c.heartbeat_interval {
        return bad("--timer-tick must not exceed --heartbeat-interval");
    }
    if c.max_request_head_bytes < 256 {
        return bad("--max-request-head-bytes must be at least 256");
    }
    if c.shard_inbox == 0 || c.max_publish_events == 0 {
        return bad("--shard-inbox and --max-publish-events must be above zero");
    }
    if c.max_outbound_bytes < 1024 || c.max_outbound_bytes > 1 << 30 {
        return bad("--max-outbound-bytes must be 1 KiB to 1 GiB");
    }
    if c.max_request_headers == 0 || c.max_request_headers > MAX_REQUEST_HEADERS {
        return bad(&format!(
            "--max-request-headers must be 1 to {MAX_REQUEST_HEADERS}"
        ));
    }
    if c.max_event_bytes < 64 || c.max_event_bytes > c.max_outbound_bytes {
        // A larger event could never be queued without tripping the slow-consumer close.
        return bad("--max-event-bytes must be at least 64 and at most --max-outbound-bytes");
    }
    if c.max_json_depth == 0 || c.max_json_depth > MAX_JSON_DEPTH {
        return bad(&format!("--max-json-depth must be 1 to {MAX_JSON_DEPTH}"));
    }
    if c.max_id_bytes == 0 || c.max_id_bytes > MAX_ID_BYTES {
        return bad(&format!("--max-id-bytes must be 1 to {MAX_ID_BYTES}"));
    }
    let beats = |d: Duration| {
        d.as_nanos()
            .div_ceil(c.heartbeat_interval.as_nanos().max(1))
    };
    if beats(c.ping_interval) > u16::MAX as u128 || beats(c.ping_timeout) > u16::MAX as u128 {
        return bad("--ping-interval and --ping-timeout must be at most 65535 heartbeat intervals");
    }
    if !c.ping_interval.is_zero() && c.ping_timeout.is_zero() {
        return bad("--ping-timeout must be above zero while pings are on");
    }
    if c.tcp_user_timeout.as_millis() > u32::MAX as u128 {
        return bad("--tcp-user-timeout is too large");
    }
    if c.max_client_frames_per_sec == 0 {
        return bad("--max-client-frames-per-sec must be above zero");
    }

    Ok(())
}

/// Binds a listener. Options set on a listening socket are inherited by every socket it accepts
/// (Linux copies them when it clones the socket), which saves a `setsockopt` per connection:
/// `TCP_NODELAY` always, `SO_SNDBUF` when `send_buffer` is not zero, and `TCP_USER_TIMEOUT` when
/// `user_timeout` is not zero.
fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    send_buffer: usize,
    user_timeout: Duration,
) -> Result<std::net::TcpListener, StartError> {
    let err = |e| StartError::Bind(addr, e);
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_nodelay(true).map_err(err)?;
    if send_buffer > 0 {
        socket.set_send_buffer_size(send_buffer).map_err(err)?;
    }
    if !user_timeout.is_zero() {
        socket
            .set_tcp_user_timeout(Some(user_timeout))
            .map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    Ok(socket.into())
}

impl Server {
    /// Binds the listeners and starts every thread. Keys are loaded first: a server that cannot
    /// verify tokens refuses to start.
    pub fn start(config: Config) -> Result<Server, StartError> {
        validate(&config)?;
        let keys = KeySet::load(&config.jwt).map_err(StartError::Keys)?;
        if keys.is_empty() {
            return Err(StartError::Config(
                "no JWT key configured: set CAUSELOOP_JWT_HS256_SECRET, --jwt-hs256-secret-file, --jwt-rs256-public-key or --jwt-jwks-file (or try --dev)".into(),
            ));
        }
        let keys = Arc::new(keys);

        // One listening socket per shard, all on the same port.
        let user_timeout = config.tcp_user_timeout;
        let first = bind(config.listen, true, config.socket_send_buffer, user_timeout)?;
        let public_addr = first.local_addr().map_err(StartError::Io)?;
        let mut listeners = vec![first];
        for _ in 1..config.shards {
            listeners.push(bind(
                public_addr,
                true,
                config.socket_send_buffer,
                user_timeout,
            )?);
        }
        // SO_REUSEPORT on both listeners lets a new process bind the same ports while this one
        // drains (zero-downtime restart); the kernel only allows it for the same user.
        let internal_listener = bind(config.internal_listen, true, 0, Duration::ZERO)?;
        let internal_addr = internal_listener.local_addr().map_err(StartError::Io)?;

        let mut polls = Vec::with_capacity(config.shards);
        let mut links = Vec::with_capacity(config.shards);
        let mut inboxes = Vec::with_capacity(config.shards);
        for _ in 0..config.shards {
            let poll = Poll::new().map_err(StartError::Io)?;
            let waker = Waker::new(poll.registry(), WAKER).map_err(StartError::Io)?;
            let (tx, rx) = crossbeam_channel::bounded(config.shard_inbox);
            links.push(ShardLink::new(tx, waker));
            inboxes.push(rx);
            polls.push(poll);
        }
        let bus_stats = Arc::new(BusStats::default());
        let (bus, bus_thread) = match &config.bus {
            BusConfig::Local => (None, None),
            BusConfig::Redis(r) => {
                let (bus, thread) =
                    ClusterBus::new(r.clone(), bus_stats.clone()).map_err(StartError::Io)?;
                (Some(bus), Some(thread))
            }
        };
        if bus.is_none() {
            bus_stats.bus_up.store(1, Ordering::Relaxed);
        }
        let shared = Arc::new(Shared {
            bus,
            draining: AtomicBool::new(false),
            open_sockets: AtomicUsize::new(0),
            interest: Arc::new(Interest::default()),
            shard_stats: (0..config.shards).map(|_| ShardStats::default()).collect(),
            bus_stats,
            links: links.into_boxed_slice(),
            config,
        });

        let mut shards = Vec::new();
        for (i, ((poll, inbox), listener)) in
            polls.into_iter().zip(inboxes).zip(listeners).enumerate()
        {
            let shard = Shard::new(
                i,
                poll,
                TcpListener::from_std(listener),
                inbox,
                shared.clone(),
                keys.clone(),
            )
            .map_err(StartError::Io)?;
            let cpus = &shared.config.cpu_affinity;
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(id) = cpu {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                            log::warn!("shard {i}: could not pin to CPU {id}; running unpinned");
                        }
                    }
                    shard.run()
                })
                .map_err(StartError::Io)?;
            shards.push(handle);
        }

        let bus_thread = match bus_thread {
            // Starts after the shards, whose inboxes it feeds; connects in the background (a
            // Redis that is down at start is retried, and publishes answer 503 meanwhile).
            Some(thread) => {
                let shared = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("cluster-bus".into())
                        .spawn(move || thread.run(shared))
                        .map_err(StartError::Io)?,
                )
            }
            None => None,
        };

        let internal_stop = Arc::new(AtomicBool::new(false));
        let internal = Internal::new(
            TcpListener::from_std(internal_listener),
            shared.clone(),
            Publisher::new(shared.clone()),
            internal_stop.clone(),
        )
        .map_err(StartError::Io)?;
        let internal_waker = internal.waker();
        let internal = std::thread::Builder::new()
            .name("internal".into())
            .spawn(move || internal.run())
            .map_err(StartError::Io)?;

        Ok(Server {
            shared,
            shards,
            internal: Some(internal),
            internal_waker,
            internal_stop,
            bus_thread,
            public_addr,
            internal_addr,
        })
    }

    /// The bound public address (useful with port 0).
    pub fn public_addr(&self) -> SocketAddr {
        self.public_addr
    }

    /// The bound internal address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// A publish handle.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.shared.clone())
    }

    /// Shared state, for metrics and probes.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A handle for draining and key reloads from other threads.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
        }
    }

    /// Begins the graceful drain (see [`Control::shutdown`]).
    pub fn shutdown(&self) {
        self.control().shutdown()
    }

    /// Reloads every key file (see [`Control::reload_keys`]).
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        self.control().reload_keys()
    }

    /// Waits for the drain to finish (every shard thread has exited), then stops the internal
    /// listener.
    pub fn wait(mut self) {
        for h in self.shards.drain(..) {
            if h.join().is_err() {
                log::error!("a shard thread panicked");
            }
        }
        self.internal_stop.store(true, Ordering::Release);
        let _ = self.internal_waker.wake();
        if let Some(h) = self.internal.take() {
            let _ = h.join();
        }
        if let Some(bus) = &self.shared.bus {
            bus.stop();
        }
        if let Some(h) = self.bus_thread.take() {
            let _ = h.join();
        }
    }
}
