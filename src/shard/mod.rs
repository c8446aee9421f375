//! A shard: one worker thread owning one mio `Poll`, one listener socket (SO_REUSEPORT), one slab
//! of connections, one timer wheel and one subscription registry. A connection lives on the shard
//! that accepted it for its whole life; nothing about it is ever touched by another thread.
//!
//! One loop iteration, in a fixed order (nginx's): compute the poll timeout from the wheel's next
//! deadline; poll; read the clock once (every handler of the turn is given that `Turn`); read
//! from ready connections (budgeted per connection); accept (budgeted); drain the inbox
//! (budgeted); fire expired timers; flush every connection with queued frames once, several
//! frames per `writev`; remove connections that ended. Budgets that run out leave a flag set so
//! the next poll does not sleep: edge-triggered readiness is never lost.
//!
//! Handlers return a `Next` (carry on, close with a code, fail, drop), applied in one place
//! (`Shard::apply`). Every piece of per-connection work runs under `Shard::guarded`: a panic
//! in it closes that connection with 1011 and the shard carries on.
//!
//! Only channels and the `Waker` cross threads. Messages name no connection, so no stale id can
//! reach a reused slab slot; timers carry a generation that is checked before use.
//!
//! The `impl Shard` is split by job: `handshake` (accepting, the request head, the upgrade and
//! authentication), `io` (reading client frames, queueing and flushing), `closing` (close
//! handshakes, removal), `timers` (deadlines, heartbeats, expiry), `delivery` (the inbox, fan-out
//! and the cluster bus's notices). This file holds the loop.

mod closing;
pub mod conn;
mod delivery;
pub mod fanout;
mod handshake;
pub(crate) mod io;
pub mod outbox;
pub mod registry;
mod resume;
mod timers;
pub mod tls;

use crate::auth::jwt;
use crate::auth::keys::KeySet;
use crate::config::Config;
use crate::dispatch::inbox::Inbox;
use crate::dispatch::interest::ShardInterest;
use crate::dispatch::{BusInterest, Links, ToBus};
use crate::fault::Faults;
use crate::history::{Delivery, Position};
use crate::lifecycle::Lifecycle;
use crate::metrics::ShardStats;
use crate::timer::wheel::Wheel;
use crate::ws::close::CloseReason;
use crate::ws::SharedFrame;
use conn::Conn;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use registry::Registry;
use slab::Slab;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the shard's listener.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the shard's waker.
pub const WAKER: Token = Token(usize::MAX - 2);
/// Inbox messages handled per iteration.
const INBOX_BUDGET: usize = 256;
/// TLS handshake steps (reads that a handshaking session processes) per loop turn. A full
/// handshake costs about a millisecond of CPU (its signature and key exchange); past this, the
/// rest wait for the next turn, so that a connection storm delays heartbeats and fan-out by tens
/// of milliseconds, not by seconds.
const TLS_HANDSHAKES_PER_TURN: u32 = 32;
/// Size of the shard's shared read buffer.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Slots in the timer wheel.
const WHEEL_SLOTS: usize = 1024;

/// What a wheel entry carries: the connection it is for, generation-checked.
#[derive(Clone, Copy, Debug)]
struct Timer {
    key: u32,
    gen: u32,
}

/// The clock, read once per loop turn and handed to every handler of the turn.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Turn {
    /// Monotonic time.
    now: Instant,
    /// `now` in wheel ticks since the shard started.
    tick: u64,
    /// Wall-clock Unix milliseconds (for `ts` and token expiry).
    now_ms: u64,
}

/// What a handler decided about its connection; [`Shard::apply`] carries it out.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing more to do.
    Continue,
    /// Start the closing handshake: this close frame, then wait for the peer's.
    Close(CloseReason),
    /// This close frame, then shut down once it is flushed, without waiting for the peer's
    /// (a protocol error, a server error, a slow consumer: queued frames not yet started are
    /// dropped first for the last).
    Fail(CloseReason),
    /// Drop the socket now, no frame (end of stream, an I/O error, a deadline, a dead peer).
    Drop,
}

/// The numbers a shard reads from the configuration on every iteration.
struct Limits {
    max_outbound: usize,
    max_client_message: u64,
    max_head: usize,
    max_headers: usize,
    /// Client frames allowed per heartbeat interval.
    max_client_frames: u32,
    max_connections: usize,
    handshake_ticks: u64,
    close_ticks: u64,
    heartbeat_ticks: u64,
    /// Heartbeats between pings (0: no pings).
    ping_every: u16,
    /// Heartbeats a ping may stay unanswered before the peer counts as dead.
    ping_timeout_beats: u16,
    drain_timeout: Duration,
    drain_spread: Duration,
    tick: Duration,
    /// `--ack-interval` in ticks.
    ack_ticks: u64,
    /// `--resume-probe-timeout`.
    probe_timeout: Duration,
    /// `--handshake-timeout`: also how long a connection waits for its resume record from
    /// Redis (cluster bus).
    handshake_timeout: Duration,
    /// `--compression auto`.
    compression: bool,
    /// `--compression-min-bytes`.
    compression_min: usize,
}

impl Limits {
    fn of(cfg: &Config) -> Limits {
        let tick = cfg.timer_tick;
        Limits {
            max_outbound: cfg.max_outbound_bytes,
            max_client_message: cfg.max_client_message_bytes as u64,
            max_head: cfg.max_request_head_bytes,
            max_headers: cfg.max_request_headers,
            max_client_frames: frame_allowance(
                cfg.max_client_frames_per_sec,
                cfg.heartbeat_interval,
            ),
            max_connections: cfg.max_connections,
            handshake_ticks: ticks(cfg.handshake_timeout, tick),
            close_ticks: ticks(cfg.close_timeout, tick),
            heartbeat_ticks: ticks(cfg.heartbeat_interval, tick),
            ping_every: beats(cfg.ping_interval, cfg.heartbeat_interval),
            ping_timeout_beats: beats(cfg.ping_timeout, cfg.heartbeat_interval).max(1),
            drain_timeout: cfg.drain_timeout,
            drain_spread: cfg.drain_spread,
            tick,
            ack_ticks: ticks(cfg.ack_interval, tick),
            probe_timeout: cfg.resume_probe_timeout,
            handshake_timeout: cfg.handshake_timeout,
            compression: cfg.compression,
            compression_min: cfg.compression_min_bytes,
        }
    }
}

/// A drain in progress: the open connections still to be sent 1001, and when.
struct Drain {
    started: Instant,
    /// Connections (key, generation) open when the drain began, in the order they get 1001.
    pending: Vec<(u32, u32)>,
    /// How many of `pending` have been closed.
    closed: usize,
}

/// Everything a shard is handed when it is built: narrow handles, nothing it does not use.
pub struct ShardContext {
    /// The shard's index.
    pub index: usize,
    /// Every shard's inbox (this shard reads its own; the index says which).
    pub links: Arc<Links>,
    /// The server's lifecycle (drain flag, open sockets).
    pub lifecycle: Arc<Lifecycle>,
    /// Every shard's counters (this shard writes its own).
    pub stats: Arc<[ShardStats]>,
    /// The key set in force at start.
    pub keys: Arc<KeySet>,
    /// The cluster bus's channel, with `--bus redis://` or `redis-cluster://`.
    pub to_bus: Option<ToBus>,
    /// The history and resume records, with history on.
    pub delivery: Option<Arc<Delivery>>,
    /// With `--tls-cert`: every accepted connection starts a TLS handshake with this.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A shard and everything it owns. Built on the starting thread, then moved to its own.
pub struct Shard {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    wheel: Wheel<Timer>,
    registry: Registry,
    interest: ShardInterest,
    links: Arc<Links>,
    inbox: Inbox,
    lifecycle: Arc<Lifecycle>,
    stats_all: Arc<[ShardStats]>,
    to_bus: Option<ToBus>,
    /// Changes of interest the bus's channel had no room for, coalesced: at most one per
    /// workspace (true: add), sent before anything newer.
    bus_backlog: HashMap<Arc<str>, bool>,
    keys: Arc<KeySet>,
    rules: jwt::Validation,
    /// Working space for decoding tokens, kept between upgrades.
    token_buf: Vec<u8>,
    limits: Limits,
    faults: Option<Arc<Faults>>,
    started: Instant,
    next_gen: u32,
    scratch: Vec<u8>,
    // Work lists of one turn: no turn allocates for them once they have grown to the shard's
    // working size.
    dirty: WorkList,
    dead: WorkList,
    read_again: WorkList,
    /// `--dev`: the page and its publish route.
    dev: Option<Arc<crate::dev_site::DevSite>>,
    /// TLS: the buffers every connection's records are encrypted through (empty without TLS),
    /// and the plaintext of one read.
    tls_scratch: tls::TlsScratch,
    tls_plain: Vec<u8>,
    /// The inflaters of connections that sent a compressed message (keyed by slab key; most
    /// connections never do, so they are kept beside the slab rather than in every `Conn`).
    inflaters: HashMap<usize, Box<crate::ws::deflate::Inflater>>,
    /// TLS handshake steps left in this turn (see [`TLS_HANDSHAKES_PER_TURN`]).
    handshakes_left: u32,
    slow: WorkList,
    fired: Vec<Timer>,
    accept_pending: bool,
    accept_retry: Option<Instant>,
    /// Accepting is paused for lack of descriptors (for logging the episode once).
    accept_starved: bool,
    inbox_pending: bool,
    drain_deadline: Option<Instant>,
    drain: Option<Drain>,
    /// When the publishes delivered this turn were accepted (for the fan-out histogram).
    fanout_started: Vec<Instant>,
    /// When to next sample the gauges.
    next_sample: Instant,
    /// The history and resume records (history on only).
    delivery: Option<Arc<Delivery>>,
    /// `--tls-cert`: the configuration of every handshake.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Per connection (by slab key), what the delivery guarantee keeps; empty with history off.
    tracked: Vec<Option<resume::Tracked>>,
    /// Connections being replayed what they missed (or waiting for a twin's record), by key.
    replays: HashMap<u32, resume::Replay>,
    /// Resume keys other shards (or this one) asked about this turn.
    probe_keys: Vec<crate::history::records::RecordKey>,
    /// Connections pinged by a probe: (key, generation, answer deadline).
    probes: Vec<(u32, u32, Instant)>,
    /// Connections (key, generation) whose stream starts once the cluster bus confirms their
    /// workspace (history on): their resume key and token `iat`.
    stream_waits: Vec<(u32, u32, crate::history::records::RecordKey, Option<u64>)>,
    /// Connections (key, generation) waiting for their resume record from Redis, with their
    /// token `iat` and the deadline of the wait.
    record_waits: Vec<resume::RecordWait>,
    /// The last acknowledgement ping built, shared by the connections acknowledged at the same
    /// position.
    ack_frame: Option<(Position, SharedFrame)>,
}

fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).max(1)
}

/// `d` in whole heartbeat intervals, rounded up (the configuration is validated to fit a `u16`).
fn beats(d: Duration, heartbeat: Duration) -> u16 {
    d.as_nanos()
        .div_ceil(heartbeat.as_nanos().max(1))
        .min(u16::MAX as u128) as u16
}

/// Client frames allowed per heartbeat interval for a per-second limit. The count is kept in a
/// `u16` on each connection and reset by its heartbeat, so no clock is read per frame.
fn frame_allowance(per_sec: u32, interval: Duration) -> u32 {
    let n = (per_sec as f64 * interval.as_secs_f64()).ceil() as u64;
    n.clamp(1, u16::MAX as u64 - 1) as u32
}

impl Shard {
    /// A shard over `listener`, receiving on `inbox`. `poll` must be the `Poll` whose waker was
    /// given to this shard's link in `ctx.links`.
    pub fn new(
        ctx: ShardContext,
        cfg: &Config,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Inbox,
    ) -> std::io::Result<Shard> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let registry = if ctx.to_bus.is_some() {
            Registry::gated()
        } else {
            Registry::new()
        };
        #[cfg(feature = "fault-injection")]
        let faults = cfg.faults.clone();
        #[cfg(not(feature = "fault-injection"))]
        let faults = None;
        let started = Instant::now();
        Ok(Shard {
            index: ctx.index,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            registry,
            interest: ShardInterest::new(ctx.links.interest().clone(), ctx.index),
            links: ctx.links,
            inbox,
            lifecycle: ctx.lifecycle,
            stats_all: ctx.stats,
            to_bus: ctx.to_bus,
            bus_backlog: HashMap::new(),
            rules: jwt::Validation::of(&cfg.jwt, cfg.max_id_bytes),
            token_buf: Vec::new(),
            keys: ctx.keys,
            limits: Limits::of(cfg),
            faults,
            started,
            next_gen: 0,
            scratch: vec![0; SCRATCH_BYTES],
            dirty: WorkList::default(),
            dead: WorkList::default(),
            read_again: WorkList::default(),
            handshakes_left: TLS_HANDSHAKES_PER_TURN,
            inflaters: HashMap::new(),
            tls_scratch: if ctx.tls.is_some() {
                tls::TlsScratch::default()
            } else {
                tls::TlsScratch::none()
            },
            tls_plain: Vec::new(),
            dev: cfg.dev_site.clone(),
            slow: WorkList::default(),
            fired: Vec::new(),
            accept_pending: false,
            accept_retry: None,
            accept_starved: false,
            inbox_pending: true,
            drain_deadline: None,
            drain: None,
            fanout_started: Vec::new(),
            next_sample: started,
            delivery: ctx.delivery,
            tls: ctx.tls,
            tracked: Vec::new(),
            replays: HashMap::new(),
            probe_keys: Vec::new(),
            probes: Vec::new(),
            stream_waits: Vec::new(),
            record_waits: Vec::new(),
            ack_frame: None,
        })
    }

    fn stats(&self) -> &ShardStats {
        &self.stats_all[self.index]
    }

    fn tick_of(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.started).as_nanos()
            / self.limits.tick.as_nanos().max(1)) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.started + self.limits.tick * (tick.min(u32::MAX as u64) as u32)
    }

    fn turn(&self) -> Turn {
        let now = Instant::now();
        Turn {
            now,
            tick: self.tick_of(now),
            now_ms: crate::clock::now_ms(),
        }
    }

    /// Runs the loop until the drain completes. Returns when every connection is gone.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                log::error!(
                    "shard {}: poll failed: {e}; closing every connection with 1011",
                    self.index
                );
                self.abort_all(Some(CloseReason::ServerError));
                return;
            }
            let turn = self.turn();
            // Every per-connection step is guarded on its own; this catches what falls between
            // them, so that no panic ever ends the shard.
            let finished = catch_unwind(AssertUnwindSafe(|| self.iterate(&events, &turn)));
            match finished {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => {
                    ShardStats::add(&self.stats().handler_panics, 1);
                    log::error!(
                        "shard {}: a loop step panicked outside any connection; carrying on",
                        self.index
                    );
                    self.repair_after_panic();
                }
            }
        }
    }

    /// One loop turn after the poll; returns true when the shard is done (drained).
    fn iterate(&mut self, events: &Events, turn: &Turn) -> bool {
        crate::fault::stall_point(&self.faults);
        self.handshakes_left = TLS_HANDSHAKES_PER_TURN;
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept_pending = true,
                WAKER => self.inbox_pending = true,
                Token(key) => {
                    let closed = event.is_read_closed() || event.is_error();
                    if event.is_readable() || closed {
                        self.guarded(key, turn, |s| s.on_readable(key, turn, closed));
                    }
                    if event.is_writable() && self.conns.get(key).is_some_and(|c| !c.dead) {
                        self.mark_dirty(key);
                    }
                }
            }
        }
        if self.accept_retry.is_some_and(|t| t <= turn.now) {
            self.accept_retry = None;
            self.accept_pending = true;
        }
        if self.accept_pending {
            self.accept(turn);
        }
        let again = self.read_again.take();
        for &key in &again {
            let key = key as usize;
            self.guarded(key, turn, |s| s.on_readable(key, turn, false));
        }
        self.read_again.give_back(again);
        if self.inbox_pending {
            self.drain_inbox(turn);
        }
        self.fire_timers(turn);
        self.spread_drain(turn);
        self.close_slow(turn);
        self.check_probes(turn);
        self.check_record_waits(turn);
        self.pump_replays(turn);
        self.flush(turn);
        self.reap(turn);
        self.flush_bus_backlog();
        let stats = &self.stats_all[self.index];
        for accepted in self.fanout_started.drain(..) {
            stats.fanout.record(accepted.elapsed());
        }
        stats.loop_iteration.record(turn.now.elapsed());
        if turn.now >= self.next_sample {
            self.sample(turn.now);
        }
        if let Some(deadline) = self.drain_deadline {
            if self.conns.is_empty() {
                return true;
            }
            if turn.now >= deadline {
                log::info!(
                    "shard {}: drain timeout with {} connection(s) left; dropping them",
                    self.index,
                    self.conns.len()
                );
                // Each already has its 1001; it just did not answer in time.
                self.abort_all(None);
                return true;
            }
        }
        false
    }

    /// Once a second, not per write: a walk over the slab is cheap at that rate.
    fn sample(&mut self, now: Instant) {
        self.next_sample = now + Duration::from_secs(1);
        let queued: usize = self
            .conns
            .iter()
            .filter(|(_, c)| c.want_write)
            .map(|(_, c)| c.out.pending_bytes())
            .sum();
        let stats = &self.stats_all[self.index];
        stats
            .queued_bytes
            .store(queued as u64, std::sync::atomic::Ordering::Relaxed);
        stats.bus_interest_backlog.store(
            self.bus_backlog.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        stats.inflaters.store(
            self.inflaters.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.inbox_pending
            || self.accept_pending
            || !self.read_again.is_empty()
            || !self.dirty.is_empty()
            || !self.dead.is_empty()
            || self.replay_ready()
        {
            return Some(Duration::ZERO);
        }
        if !self.bus_backlog.is_empty()
            || !self.probes.is_empty()
            || self.has_waiting()
            || !self.record_waits.is_empty()
            || self
                .drain
                .as_ref()
                .is_some_and(|d| d.closed < d.pending.len())
        {
            // Retrying the bus's channel, or spreading 1001s: wake every tick.
            return Some(self.limits.tick);
        }
        let mut wake: Option<Instant> = self.wheel.next_tick().map(|t| self.instant_of(t));
        for t in [self.accept_retry, self.drain_deadline]
            .into_iter()
            .flatten()
        {
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        // Round up so the poll does not return a hair before the tick and spin.
        wake.map(|w| w.saturating_duration_since(now) + Duration::from_micros(500))
    }

    /// Runs `f` for connection `key`, then applies what it decided; a panic in either closes
    /// that connection (1011), never the shard.
    fn guarded(&mut self, key: usize, turn: &Turn, f: impl FnOnce(&mut Self) -> Next) {
        if !self.conns.get(key).is_some_and(|c| !c.dead) {
            return;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let next = f(self);
            self.apply(key, next, turn);
        }));
        if result.is_err() {
            self.after_panic(key, turn);
        }
    }

    /// A handler of connection `key` panicked: count it, and close that connection with 1011
    /// (or drop it, if even that fails).
    fn after_panic(&mut self, key: usize, turn: &Turn) {
        ShardStats::add(&self.stats().handler_panics, 1);
        // Whatever it was doing (queueing an event, say) may not have finished: its resume
        // record falls back to what the client acknowledged.
        self.distrust_queue(key);
        self.repair_after_panic();
        log::error!(
            "shard {}: connection handler panicked; closing the connection with 1011",
            self.index
        );
        let closed = catch_unwind(AssertUnwindSafe(|| {
            self.apply(key, Next::Fail(CloseReason::ServerError), turn)
        }));
        if closed.is_err() {
            self.kill(key);
        }
    }

    /// Restores what a handler may have taken out of the shard when it unwound.
    fn repair_after_panic(&mut self) {
        if self.scratch.len() != SCRATCH_BYTES {
            self.scratch = vec![0; SCRATCH_BYTES];
        }
    }

    /// Carries out a handler's decision about connection `key`.
    fn apply(&mut self, key: usize, next: Next, turn: &Turn) {
        match next {
            Next::Continue => {}
            Next::Close(reason) => self.close_ws(key, reason, turn),
            Next::Fail(reason) => self.fail(key, reason, turn),
            Next::Drop => self.kill(key),
        }
    }

    /// Tells the cluster bus that this shard gained or lost a workspace; never blocks. When the
    /// channel is full the change waits in the backlog (at most one entry per workspace: an add
    /// and a remove of the same workspace cancel out) and goes before anything newer.
    /// Hands a resume-record request to the cluster bus; false when it cannot take it now
    /// (its channel is full) or there is no cluster bus.
    fn ask_bus(&mut self, op: crate::dispatch::RecordOp) -> bool {
        self.to_bus
            .as_ref()
            .is_some_and(|b| b.try_send(BusInterest::Record(op)).is_ok())
    }

    fn tell_bus(&mut self, change: BusInterest) {
        let Some(to_bus) = &self.to_bus else { return };
        if self.bus_backlog.is_empty() {
            let Err(change) = to_bus.try_send(change) else {
                return;
            };
            self.backlog(change);
        } else {
            self.backlog(change);
            self.flush_bus_backlog();
        }
    }

    fn backlog(&mut self, change: BusInterest) {
        let (ws, add) = match change {
            BusInterest::Add(ws, _) => (ws, true),
            BusInterest::Remove(ws, _) => (ws, false),
            BusInterest::Record(_) => return, // never queued here (see `ask_bus`)
        };
        match self.bus_backlog.get(&ws) {
            // The opposite change has not been sent: together they are no change.
            Some(&queued) if queued != add => {
                self.bus_backlog.remove(&ws);
            }
            Some(_) => debug_assert!(false, "the same change twice"),
            None => {
                self.bus_backlog.insert(ws, add);
            }
        }
    }

    fn flush_bus_backlog(&mut self) {
        let Some(to_bus) = &self.to_bus else { return };
        if self.bus_backlog.is_empty() {
            return;
        }
        let shard = self.index;
        let mut sent = Vec::new();
        for (ws, &add) in &self.bus_backlog {
            let change = if add {
                BusInterest::Add(ws.clone(), shard)
            } else {
                BusInterest::Remove(ws.clone(), shard)
            };
            if to_bus.try_send(change).is_err() {
                break;
            }
            sent.push(ws.clone());
        }
        for ws in sent {
            self.bus_backlog.remove(&ws);
        }
    }
}

/// A work list after its turn: emptied, capacity kept.
fn recycle<T>(mut v: Vec<T>) -> Vec<T> {
    v.clear();
    v
}

use recycle as recycle_timers;

/// A list of connections built during a turn and worked through later in it, while handlers
/// may add to it again: the list being worked through is taken out and the spare stands in.
/// Whichever of the two has grown larger is kept as the one that fills next, so both reach the
/// working size after one busy turn, whatever order the turns come in.
#[derive(Default)]
struct WorkList {
    now: Vec<u32>,
    spare: Vec<u32>,
}

impl WorkList {
    fn push(&mut self, key: u32) {
        self.now.push(key);
    }

    fn is_empty(&self) -> bool {
        self.now.is_empty()
    }

    /// The list to work through; additions from here on go to the spare.
    fn take(&mut self) -> Vec<u32> {
        std::mem::replace(&mut self.now, std::mem::take(&mut self.spare))
    }

    /// Returns a list taken with [`WorkList::take`], emptied.
    fn give_back(&mut self, mut used: Vec<u32>) {
        used.clear();
        if self.now.is_empty() && used.capacity() > self.now.capacity() {
            std::mem::swap(&mut self.now, &mut used);
        }
        self.spare = used;
    }
}
