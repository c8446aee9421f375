//! Starting, draining and stopping a server.
//!
//! [`Server::start`] binds one public listener socket per shard on the same address with
//! SO_REUSEPORT (the kernel spreads new connections over them, no acceptor thread and no hand-off),
//! binds the internal listener, and starts one thread per shard, the internal thread and (with a
//! cluster bus) the bus thread. Each thread is handed the narrow handles it uses and nothing
//! else: the shards their inboxes, the interest table, the lifecycle and their counters; the
//! publishers the links into the shards or the bus; the internal listener a publisher and the
//! counters. [`Server::shutdown`] begins the drain; [`Server::wait`] returns once it has finished.

use crate::auth::keys::{KeyError, KeySet};
use crate::bus::cluster::ClusterBus;
use crate::bus::wire::WireLimits;
use crate::bus::Publisher;
use crate::config::{BusConfig, Config, ConfigError, JwtConfig};
use crate::dispatch::inbox::{Room, ShardLink, ShardMsg};
use crate::dispatch::interest::Interest;
use crate::dispatch::Links;
use crate::history::{Delivery, DeliveryConfig};
use crate::internal::Internal;
use crate::lifecycle::Lifecycle;
use crate::metrics::{ShardStats, Stats};
use crate::shard::{Shard, ShardContext, WAKER};
use crate::tls::Tls;
use mio::net::TcpListener;
use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Listen backlog of every listener (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// A setting is out of range; the message says which and why.
    Config(ConfigError),
    /// A key file could not be loaded.
    Keys(KeyError),
    /// The TLS certificate pair could not be loaded.
    Tls(crate::tls::TlsError),
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
            StartError::Tls(e) => write!(f, "cannot load the TLS certificate: {e}"),
            StartError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartError::Io(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running server.
pub struct Server {
    config: Config,
    control: Control,
    stats: Stats,
    publisher: Publisher,
    bus: Option<Arc<ClusterBus>>,
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
    lifecycle: Arc<Lifecycle>,
    links: Arc<Links>,
    jwt: Arc<JwtConfig>,
    tls: Option<Arc<Tls>>,
    stats: Stats,
}

impl Control {
    /// Begins the graceful drain: stop accepting, `/readyz` answers 503, every connection gets
    /// 1001 and is waited for up to `--drain-timeout`. Idempotent.
    pub fn shutdown(&self) {
        if self.lifecycle.begin_drain() {
            return;
        }
        self.links.broadcast(|| ShardMsg::Drain);
    }

    /// Re-reads every key file and hands the new key set to the shards. On error the old keys
    /// stay in force.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        let loaded = KeySet::load(&self.jwt).and_then(|k| {
            if k.is_empty() {
                Err(KeyError::NoKeyLeft)
            } else {
                Ok(k)
            }
        });
        let stats = &self.stats.bus;
        let keys = match loaded {
            Ok(k) => Arc::new(k),
            Err(e) => {
                ShardStats::add(&stats.key_reloads_failed, 1);
                return Err(e);
            }
        };
        self.links.broadcast(|| ShardMsg::Keys(keys.clone()));
        ShardStats::add(&stats.key_reloads_ok, 1);
        Ok(())
    }
}

impl Control {
    /// Re-reads `--tls-cert` and `--tls-key`: new handshakes use the new pair, open connections
    /// keep theirs. On error the old pair stays in force. Without TLS, nothing to do.
    pub fn reload_tls(&self) -> Result<bool, crate::tls::TlsError> {
        let Some(tls) = &self.tls else {
            return Ok(false);
        };
        let stats = &self.stats.bus;
        match tls.reload() {
            Ok(()) => {
                ShardStats::add(&stats.tls_reloads_ok, 1);
                stats
                    .tls_not_after
                    .store(tls.not_after(), Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                ShardStats::add(&stats.tls_reloads_failed, 1);
                Err(e)
            }
        }
    }
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

/// Spawns a named thread.
fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(StartError::Io)
}

impl Server {
    /// Binds the listeners and starts every thread. Keys are loaded first: a server that cannot
    /// verify tokens refuses to start.
    pub fn start(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let keys = KeySet::load(&config.jwt).map_err(StartError::Keys)?;
        if keys.is_empty() {
            return Err(StartError::Config(ConfigError(
                "no JWT key configured: set CAUSELOOP_JWT_HS256_SECRET, --jwt-hs256-secret-file, --jwt-rs256-public-key or --jwt-jwks-file (or try --dev)".into(),
            )));
        }
        let keys = Arc::new(keys);
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(Tls::new(files.clone()).map_err(StartError::Tls)?)),
            None => None,
        };

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
        // With shards pinned to CPUs, each listener asks for the connections whose packets the
        // kernel handled on its shard's CPU (SO_INCOMING_CPU): the reuseport group then prefers
        // that socket, so a connection is accepted, read and written on the core that took its
        // interrupt instead of waking another. Without pinning the hash decides, as before.
        if !config.cpu_affinity.is_empty() {
            let cpus = &config.cpu_affinity;
            for (i, l) in listeners.iter().enumerate() {
                let cpu = cpus[i % cpus.len()];
                if let Err(e) = socket2::SockRef::from(l).set_cpu_affinity(cpu) {
                    log::warn!("shard {i}: SO_INCOMING_CPU {cpu} refused ({e}); connections are spread by hash");
                }
            }
        }
        // SO_REUSEPORT on both listeners lets a new process bind the same ports while this one
        // drains (zero-downtime restart); the kernel only allows it for the same user.
        let internal_listener = bind(config.internal_listen, true, 0, Duration::ZERO)?;
        let internal_addr = internal_listener.local_addr().map_err(StartError::Io)?;

        let lifecycle = Arc::new(Lifecycle::default());
        let mut stats = Stats::new(config.shards);
        if let Some(t) = &tls {
            stats
                .bus
                .tls_not_after
                .store(t.not_after(), Ordering::Relaxed);
        }
        let delivery = DeliveryConfig::of(&config).map(|d| Arc::new(Delivery::local(d)));
        stats.delivery = delivery.clone();
        let room = Arc::new(Room::default());
        let mut polls = Vec::with_capacity(config.shards);
        let mut shard_links = Vec::with_capacity(config.shards);
        let mut inboxes = Vec::with_capacity(config.shards);
        for _ in 0..config.shards {
            let poll = Poll::new().map_err(StartError::Io)?;
            let waker = Waker::new(poll.registry(), WAKER).map_err(StartError::Io)?;
            let (tx, rx) = crossbeam_channel::bounded(config.shard_inbox);
            shard_links.push(ShardLink::new(tx, waker, room.clone()));
            inboxes.push(rx);
            polls.push(poll);
        }
        let links = Arc::new(Links::new(shard_links, Arc::new(Interest::default()), room));
        let (bus, bus_thread, to_bus) = match &config.bus {
            BusConfig::Local => {
                stats.bus.bus_up.store(1, Ordering::Relaxed);
                (None, None, None)
            }
            BusConfig::Redis(r) => {
                let history = delivery.as_ref().map(|d| {
                    let dc = DeliveryConfig::of(&config).expect("delivery on");
                    crate::bus::cluster::BusHistory {
                        limits: dc.limits,
                        window: dc.window,
                        mirror: d.history.clone(),
                    }
                });
                let new = ClusterBus::create(r.clone(), stats.bus.clone(), history)
                    .map_err(StartError::Io)?;
                (Some(new.bus), Some(new.thread), Some(new.to_bus))
            }
        };

        let mut shards = Vec::new();
        for (i, ((poll, inbox), listener)) in
            polls.into_iter().zip(inboxes).zip(listeners).enumerate()
        {
            let ctx = ShardContext {
                index: i,
                links: links.clone(),
                lifecycle: lifecycle.clone(),
                stats: stats.shards.clone(),
                keys: keys.clone(),
                to_bus: to_bus.clone(),
                delivery: delivery.clone(),
                tls: tls.as_ref().map(|t| t.config()),
            };
            let shard = Shard::new(ctx, &config, poll, TcpListener::from_std(listener), inbox)
                .map_err(StartError::Io)?;
            let cpus = &config.cpu_affinity;
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            shards.push(spawn(format!("shard-{i}"), move || {
                if let Some(id) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        log::warn!("shard {i}: could not pin to CPU {id}; running unpinned");
                    }
                }
                shard.run()
            })?);
        }

        let bus_thread = match bus_thread {
            // Starts after the shards, whose inboxes it feeds; connects in the background (a
            // Redis that is down at start is retried, and publishes answer 503 meanwhile).
            Some(thread) => {
                let links = links.clone();
                let limits = WireLimits {
                    max_event_bytes: config.max_event_bytes,
                    max_depth: config.max_json_depth,
                    max_id_bytes: config.max_id_bytes,
                };
                Some(spawn("cluster-bus".into(), move || {
                    thread.run(links, limits)
                })?)
            }
            None => None,
        };

        let publisher = Publisher::new(
            &config,
            lifecycle.clone(),
            links.clone(),
            stats.bus.clone(),
            stats.shards.clone(),
            bus.clone(),
            // On the cluster bus Redis assigns positions; the bus thread keeps the history.
            delivery
                .as_ref()
                .filter(|d| !d.from_bus)
                .map(|d| d.history.clone()),
        );
        let internal_stop = Arc::new(AtomicBool::new(false));
        let internal = Internal::new(
            TcpListener::from_std(internal_listener),
            &config,
            publisher.clone(),
            stats.clone(),
            internal_stop.clone(),
        )
        .map_err(StartError::Io)?;
        let internal_waker = internal.waker();
        let internal = spawn("internal".into(), move || internal.run())?;

        let control = Control {
            lifecycle,
            links,
            jwt: Arc::new(config.jwt.clone()),
            tls,
            stats: stats.clone(),
        };
        Ok(Server {
            config,
            control,
            stats,
            publisher,
            bus,
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

    /// The configuration the server started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A publish handle.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Every counter (what `/metrics` shows).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A handle for draining and key reloads from other threads.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Begins the graceful drain (see [`Control::shutdown`]).
    pub fn shutdown(&self) {
        self.control.shutdown()
    }

    /// Reloads every key file (see [`Control::reload_keys`]).
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        self.control.reload_keys()
    }

    /// Waits for the drain to finish (every shard thread has exited), then stops the internal
    /// listener and the bus.
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
        if let Some(bus) = &self.bus {
            bus.stop();
        }
        if let Some(h) = self.bus_thread.take() {
            let _ = h.join();
        }
    }
}
