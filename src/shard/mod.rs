//! A shard: one worker thread owning one mio `Poll`, one listener socket (SO_REUSEPORT), one slab
//! of connections, one timer wheel and one subscription registry. A connection lives on the shard
//! that accepted it for its whole life; nothing about it is ever touched by another thread.
//!
//! One loop iteration, in a fixed order (nginx's): compute the poll timeout from the wheel's next
//! deadline; poll; accept (budgeted); read from ready connections (budgeted per connection);
//! drain the inbox (budgeted); fire expired timers; flush every connection with queued frames
//! once, several frames per `writev`; remove connections that ended. Budgets that run out leave
//! a flag set so the next poll does not sleep: edge-triggered readiness is never lost.
//!
//! Only channels and the `Waker` cross threads. Messages name no connection, so no stale id can
//! reach a reused slab slot; timers carry a generation that is checked before use.
//!
//! The `impl Shard` is split by job: `handshake` (accepting, the request head, the upgrade and
//! authentication), `io` (reading client frames, queueing and flushing), `closing` (close
//! handshakes, removal), `timers` (deadlines, heartbeats, expiry). This file holds the loop.

mod closing;
pub mod conn;
pub mod fanout;
mod handshake;
pub mod inbox;
mod io;
pub mod outbox;
pub mod registry;
mod timers;

use crate::auth::jwt;
use crate::auth::keys::KeySet;
use crate::bus::event::Event;
use crate::metrics::ShardStats;
use crate::server::Shared;
use crate::timer::wheel::Wheel;
use crate::ws::close::CloseReason;
use conn::{Conn, Phase};
use inbox::{Inbox, ShardMsg};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use registry::Registry;
use slab::Slab;
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
}

/// A drain in progress: the open connections still to be sent 1001, and when.
struct Drain {
    started: Instant,
    /// Connections (key, generation) open when the drain began, in the order they get 1001.
    pending: Vec<(u32, u32)>,
    /// How many of `pending` have been closed.
    closed: usize,
}

/// A shard and everything it owns. Built on the starting thread, then moved to its own.
pub struct Shard {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    wheel: Wheel<Timer>,
    registry: Registry,
    inbox: Inbox,
    shared: Arc<Shared>,
    keys: Arc<KeySet>,
    rules: jwt::Validation,
    limits: Limits,
    started: Instant,
    next_gen: u32,
    scratch: Vec<u8>,
    dirty: Vec<u32>,
    dead: Vec<u32>,
    read_again: Vec<u32>,
    slow: Vec<u32>,
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
    /// When to next sample the queued-bytes gauge.
    next_sample: Instant,
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
    /// given to this shard's [`inbox::ShardLink`].
    pub fn new(
        index: usize,
        poll: Poll,
        mut listener: TcpListener,
        inbox: Inbox,
        shared: Arc<Shared>,
        keys: Arc<KeySet>,
    ) -> std::io::Result<Shard> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let cfg = &shared.config;
        let tick = cfg.timer_tick;
        let limits = Limits {
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
        };
        Ok(Shard {
            index,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            registry: Registry::with_bus(index, shared.interest.clone(), shared.bus.clone()),
            inbox,
            rules: cfg.jwt.validation(cfg.max_id_bytes),
            keys,
            limits,
            started: Instant::now(),
            next_gen: 0,
            scratch: vec![0; SCRATCH_BYTES],
            dirty: Vec::new(),
            dead: Vec::new(),
            read_again: Vec::new(),
            slow: Vec::new(),
            fired: Vec::new(),
            accept_pending: false,
            accept_retry: None,
            accept_starved: false,
            inbox_pending: true,
            drain_deadline: None,
            drain: None,
            fanout_started: Vec::new(),
            next_sample: Instant::now(),
            shared,
        })
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.shard_stats[self.index]
    }

    fn tick_of(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.started).as_nanos()
            / self.limits.tick.as_nanos().max(1)) as u64
    }

    fn instant_of(&self, tick: u64) -> Instant {
        self.started + self.limits.tick * (tick.min(u32::MAX as u64) as u32)
    }

    /// Runs the loop until the drain completes. Returns when every connection is gone.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = self.poll_timeout(now);
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
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => self.inbox_pending = true,
                    Token(key) => {
                        let closed = event.is_read_closed() || event.is_error();
                        let readable = event.is_readable() || closed;
                        self.guarded(key, |s| {
                            if readable {
                                s.on_readable(key, now, closed);
                            }
                            if event.is_writable() {
                                s.mark_dirty(key);
                            }
                        });
                    }
                }
            }
            if self.accept_retry.is_some_and(|t| t <= now) {
                self.accept_retry = None;
                self.accept_pending = true;
            }
            if self.accept_pending {
                self.accept(now);
            }
            for key in std::mem::take(&mut self.read_again) {
                self.guarded(key as usize, |s| s.on_readable(key as usize, now, false));
            }
            if self.inbox_pending {
                self.drain_inbox(now);
            }
            self.fire_timers(now);
            self.spread_drain(now);
            self.flush();
            self.reap();
            let stats = &self.shared.shard_stats[self.index];
            for accepted in self.fanout_started.drain(..) {
                stats.fanout.record(accepted.elapsed());
            }
            stats.loop_iteration.record(now.elapsed());
            if now >= self.next_sample {
                // Once a second, not per write: a walk over the slab is cheap at that rate.
                self.next_sample = now + Duration::from_secs(1);
                let queued: usize = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.want_write)
                    .map(|(_, c)| c.out.pending_bytes())
                    .sum();
                self.shared.shard_stats[self.index]
                    .queued_bytes
                    .store(queued as u64, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(deadline) = self.drain_deadline {
                if self.conns.is_empty() {
                    return;
                }
                if now >= deadline {
                    log::info!(
                        "shard {}: drain timeout with {} connection(s) left; dropping them",
                        self.index,
                        self.conns.len()
                    );
                    // Each already has its 1001; it just did not answer in time.
                    self.abort_all(None);
                    return;
                }
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.inbox_pending || self.accept_pending || !self.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        if self
            .drain
            .as_ref()
            .is_some_and(|d| d.closed < d.pending.len())
        {
            // Spreading 1001s: wake every tick to send the next batch.
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

    /// Runs `f` for connection `key`; a panic in it closes that connection (1011), not the shard.
    fn guarded(&mut self, key: usize, f: impl FnOnce(&mut Self)) {
        if !self.conns.get(key).is_some_and(|c| !c.dead) {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| f(self))).is_err() {
            ShardStats::add(&self.stats().handler_panics, 1);
            // Restore what a handler may have taken out of the shard when it unwound.
            if self.scratch.len() != SCRATCH_BYTES {
                self.scratch = vec![0; SCRATCH_BYTES];
            }
            log::error!(
                "shard {}: connection handler panicked; closing the connection with 1011",
                self.index
            );
            let closed = catch_unwind(AssertUnwindSafe(|| {
                self.fail(key, CloseReason::ServerError)
            }));
            if closed.is_err() {
                self.kill(key);
            }
        }
    }

    fn drain_inbox(&mut self, now: Instant) {
        self.shared.links[self.index].clear_notified();
        for _ in 0..INBOX_BUDGET {
            match self.inbox.try_recv() {
                Ok(ShardMsg::Events(batch)) => self.deliver(&batch),
                Ok(ShardMsg::Keys(keys)) => self.keys = keys,
                Ok(ShardMsg::Drain) => self.start_drain(now),
                Ok(ShardMsg::Live(ws)) => self.on_live(&ws, now),
                Err(_) => {
                    self.inbox_pending = false;
                    return;
                }
            }
        }
        self.inbox_pending = true;
    }

    fn deliver(&mut self, batch: &[Event]) {
        if let Some(first) = batch.first() {
            self.fanout_started.push(first.accepted_at);
        }
        for event in batch {
            let recipients = self
                .registry
                .recipients(&event.workspace_id, event.user_id.as_deref());
            fanout::fan_out(
                &event.frame,
                recipients,
                &mut self.conns,
                &mut self.dirty,
                &mut self.slow,
                self.limits.max_outbound,
            );
        }
        self.close_slow();
    }

    fn start_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(now + self.limits.drain_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_pending = false;
        // Open connections get 1001, all now or spread over --drain-spread. One still sending its
        // request head is left to finish it: its upgrade is answered with 101 and 1001 (see
        // `upgrade`), so a client caught by a restart sees a clean close and reconnects, never a
        // reset.
        let pending: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Open)
            .map(|(k, c)| (k as u32, c.gen))
            .collect();
        self.drain = Some(Drain {
            started: now,
            pending,
            closed: 0,
        });
        self.spread_drain(now);
    }

    /// Sends the drain's 1001s that are due: `pending × elapsed ÷ spread` of them by now, all at
    /// once without a spread. Connections that already closed, or whose slot was reused, are
    /// skipped (the generation is checked).
    fn spread_drain(&mut self, now: Instant) {
        let Some(d) = self.drain.as_mut() else { return };
        let total = d.pending.len();
        let spread = self.limits.drain_spread;
        let due = if spread.is_zero() || now >= d.started + spread {
            total
        } else {
            ((total as f64) * now.duration_since(d.started).as_secs_f64() / spread.as_secs_f64())
                .ceil() as usize
        };
        let batch: Vec<(u32, u32)> = d.pending[d.closed..due.max(d.closed)].to_vec();
        d.closed = due.max(d.closed);
        for (key, gen) in batch {
            let key = key as usize;
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.gen == gen && c.phase == Phase::Open)
            {
                self.close_ws(key, CloseReason::GoingAway);
            }
        }
    }
}
