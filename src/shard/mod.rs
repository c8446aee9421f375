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

pub mod conn;
pub mod fanout;
pub mod inbox;
pub mod outbox;
pub mod registry;

use crate::auth::jwt;
use crate::auth::keys::KeySet;
use crate::auth::AuthError;
use crate::bus::event::{connected_frame, heartbeat_frame, Event};
use crate::clock;
use crate::http::request::{parse_head, route_public, PublicRoute};
use crate::http::{response, Status};
use crate::metrics::ShardStats;
use crate::server::Shared;
use crate::timer::wheel::Wheel;
use crate::ws::close::{close_frame, CloseReason};
use crate::ws::decoder::Control;
use crate::ws::frame::{encode, OpCode};
use crate::ws::{upgrade, SharedFrame};
use conn::{Conn, Phase};
use inbox::{Inbox, ShardMsg};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use registry::Registry;
use slab::Slab;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token of the shard's listener.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the shard's waker.
pub const WAKER: Token = Token(usize::MAX - 2);
/// Connections accepted per wake-up before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Inbox messages handled per iteration.
const INBOX_BUDGET: usize = 256;
/// Bytes read from one connection per iteration.
const READ_BUDGET: usize = 64 * 1024;
/// Size of the shard's shared read buffer.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Slots in the timer wheel.
const WHEEL_SLOTS: usize = 1024;
/// Pause before accepting again after running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKind {
    /// Handshake, close or linger deadline: the connection is dropped.
    Deadline,
    /// Time to send a heartbeat.
    Heartbeat,
    /// The token's `exp` (plus leeway) passed.
    Expiry,
}

#[derive(Clone, Copy, Debug)]
struct Timer {
    key: u32,
    gen: u32,
    kind: TimerKind,
    due: u64,
}

/// The numbers a shard reads from the configuration on every iteration.
struct Limits {
    max_outbound: usize,
    send_buffer: usize,
    max_client_message: u64,
    max_head: usize,
    max_connections: usize,
    handshake_ticks: u64,
    close_ticks: u64,
    heartbeat_ticks: u64,
    drain_timeout: Duration,
    tick: Duration,
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
    inbox_pending: bool,
    drain_deadline: Option<Instant>,
}

fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).max(1)
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
    ) -> io::Result<Shard> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let cfg = &shared.config;
        let tick = cfg.timer_tick;
        let limits = Limits {
            max_outbound: cfg.max_outbound_bytes,
            send_buffer: cfg.socket_send_buffer,
            max_client_message: cfg.max_client_message_bytes as u64,
            max_head: cfg.max_request_head_bytes,
            max_connections: cfg.max_connections,
            handshake_ticks: ticks(cfg.handshake_timeout, tick),
            close_ticks: ticks(cfg.close_timeout, tick),
            heartbeat_ticks: ticks(cfg.heartbeat_interval, tick),
            drain_timeout: cfg.drain_timeout,
            tick,
        };
        Ok(Shard {
            index,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            registry: Registry::new(index, shared.interest.clone()),
            inbox,
            rules: cfg.jwt.validation(),
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
            inbox_pending: true,
            drain_deadline: None,
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
                if e.kind() == io::ErrorKind::Interrupted {
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
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        self.guarded(key, |s| {
                            if readable {
                                s.on_readable(key, now);
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
                self.guarded(key as usize, |s| s.on_readable(key as usize, now));
            }
            if self.inbox_pending {
                self.drain_inbox(now);
            }
            self.fire_timers(now);
            self.flush();
            self.reap();
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

    /// Drops every connection at once. With `reason`, open connections whose queue is empty get
    /// one best-effort, non-blocking write of that close frame first (a connection with queued
    /// bytes cannot take a frame in the middle of another).
    fn abort_all(&mut self, reason: Option<CloseReason>) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            let conn = &mut self.conns[k];
            if let Some(r) = reason {
                if matches!(conn.phase, Phase::Open) && !conn.close_sent && conn.out.is_empty() {
                    let _ = io::Write::write(&mut conn.stream, &r.frame());
                    self.stats().close(r);
                }
            }
            self.kill(k);
        }
        self.reap();
    }

    // ---- accepting ----

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BUDGET {
            let res = match &self.listener {
                Some(l) => l.accept(),
                None => {
                    self.accept_pending = false;
                    return;
                }
            };
            match res {
                Ok((stream, peer)) => self.add_conn(stream, peer, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    log::warn!(
                        "shard {}: accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}",
                        self.index
                    );
                    self.accept_pending = false;
                    self.accept_retry = Some(now + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => log::debug!("shard {}: accept: {e}", self.index),
            }
        }
        self.accept_pending = true;
    }

    fn add_conn(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Instant) {
        let _ = stream.set_nodelay(true);
        if self.limits.send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(self.limits.send_buffer);
        }
        let over_limit =
            self.shared.open_sockets.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE,
        ) {
            log::warn!("shard {}: register: {e}", self.index);
            self.shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        entry.insert(Conn::new(stream, peer, gen, over_limit, now));
        ShardStats::add(&self.stats().accepted, 1);
        let due = self.tick_of(now) + self.limits.handshake_ticks;
        self.set_deadline(key, due);
    }

    // ---- timers ----

    fn set_deadline(&mut self, key: usize, due: u64) {
        if let Some(old) = self.conns[key].deadline.take() {
            self.wheel.cancel(old);
        }
        let gen = self.conns[key].gen;
        let id = self.wheel.insert(
            due,
            Timer {
                key: key as u32,
                gen,
                kind: TimerKind::Deadline,
                due,
            },
        );
        self.conns[key].deadline = Some(id);
    }

    fn fire_timers(&mut self, now: Instant) {
        let tick = self.tick_of(now);
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(tick, &mut fired);
        let mut heartbeat: Option<SharedFrame> = None;
        for t in fired.drain(..) {
            let key = t.key as usize;
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.gen == t.gen) else {
                debug_assert!(false, "timer for a connection that is gone");
                continue;
            };
            // The timer is out of the wheel: forget its id before anything can cancel it.
            match t.kind {
                TimerKind::Deadline => conn.deadline = None,
                TimerKind::Heartbeat => conn.heartbeat = None,
                TimerKind::Expiry => conn.expiry = None,
            }
            if conn.dead {
                continue;
            }
            match t.kind {
                TimerKind::Deadline => self.kill(key),
                TimerKind::Expiry => {
                    self.guarded(key, |s| s.close_ws(key, CloseReason::TokenExpired))
                }
                TimerKind::Heartbeat if matches!(conn.phase, Phase::Open) => {
                    let frame = heartbeat
                        .get_or_insert_with(|| heartbeat_frame(clock::now_ms()))
                        .clone();
                    self.enqueue(key, frame);
                    let next = (t.due + self.limits.heartbeat_ticks).max(tick + 1);
                    let id = self.wheel.insert(next, Timer { due: next, ..t });
                    self.conns[key].heartbeat = Some(id);
                }
                TimerKind::Heartbeat => {}
            }
        }
        self.fired = fired;
        self.close_slow();
    }

    // ---- reading ----

    fn on_readable(&mut self, key: usize, now: Instant) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) {
            match conn.stream.read(&mut scratch) {
                Ok(0) => {
                    // Peer closed its side. Nothing more will arrive; whatever we still owe it
                    // cannot be answered by a close handshake.
                    self.kill(key);
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.on_bytes(key, &scratch[..n], now);
                    if total >= READ_BUDGET {
                        self.read_again.push(key as u32);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_bytes(&mut self, key: usize, data: &[u8], now: Instant) {
        match self.conns[key].phase {
            Phase::Head(_) => self.on_head_bytes(key, data, now),
            Phase::Open | Phase::Closing => self.on_frame_bytes(key, data),
            Phase::Http | Phase::Lingering => {}
        }
    }

    fn on_head_bytes(&mut self, key: usize, data: &[u8], now: Instant) {
        let max = self.limits.max_head;
        let conn = &mut self.conns[key];
        let Phase::Head(buf) = &mut conn.phase else {
            return;
        };
        let room = (max + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
        let (route, rest) = match parse_head(buf, max) {
            Ok(None) => return,
            Err(e) => (PublicRoute::Reject(e.status()), Vec::new()),
            Ok(Some(head)) => {
                let rest = buf[head.len..].to_vec();
                (route_public(&head), rest)
            }
        };
        match route {
            PublicRoute::Reject(status) => self.respond_http(key, response::plain(status, true)),
            PublicRoute::Health => self.respond_http(
                key,
                response::build(Status::Ok, "text/plain", b"ok\n", true, ""),
            ),
            PublicRoute::Ready => {
                let resp = if self.shared.is_ready() {
                    response::build(Status::Ok, "text/plain", b"ready\n", true, "")
                } else {
                    response::build(Status::Unavailable, "text/plain", b"draining\n", true, "")
                };
                self.respond_http(key, resp)
            }
            PublicRoute::Stream { key: ws_key, query } => {
                self.upgrade(
                    key,
                    &ws_key,
                    query.token.as_deref(),
                    query.workspace.as_deref(),
                    now,
                );
                if !rest.is_empty() {
                    self.on_frame_bytes(key, &rest);
                }
            }
        }
    }

    fn respond_http(&mut self, key: usize, bytes: Vec<u8>) {
        ShardStats::add(&self.stats().http_responses, 1);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Http;
        conn.close_when_flushed = true;
        self.enqueue(key, bytes.into());
    }

    fn upgrade(
        &mut self,
        key: usize,
        ws_key: &[u8],
        token: Option<&[u8]>,
        workspace: Option<&str>,
        now: Instant,
    ) {
        self.enqueue(key, upgrade::response(ws_key).into());
        if let Some(old) = self.conns[key].deadline.take() {
            self.wheel.cancel(old);
        }
        self.conns[key].phase = Phase::Closing; // until subscribed below
        if self.drain_deadline.is_some() {
            return self.close_ws(key, CloseReason::GoingAway);
        }
        if self.conns[key].over_limit {
            return self.close_ws(key, CloseReason::TryAgainLater);
        }
        let now_ms = clock::now_ms();
        let verified = match token {
            None => Err(AuthError::Missing),
            Some(t) => jwt::verify(t, &self.keys, &self.rules, now_ms / 1000),
        };
        let identity = match verified {
            Ok(id) if workspace == Some(&*id.workspace_id) => Ok(id),
            Ok(_) => Err(AuthError::WorkspaceMismatch),
            Err(e) => Err(e),
        };
        match identity {
            Ok(id) => self.subscribe(key, id, now_ms, now),
            Err(e) => {
                log::debug!(
                    "shard {}: connection {key} from {} refused: {}",
                    self.index,
                    self.conns[key].peer,
                    e.label()
                );
                self.stats().auth_failure(e);
                self.close_ws(key, e.close_reason());
            }
        }
    }

    fn subscribe(&mut self, key: usize, id: crate::auth::Identity, now_ms: u64, now: Instant) {
        self.registry.add(key, &id.workspace_id, &id.user_id);
        let frame = connected_frame(&id.workspace_id, &id.user_id, now_ms);
        let tick = self.tick_of(now);
        let gen = self.conns[key].gen;
        let hb_due = tick + self.limits.heartbeat_ticks;
        let hb = self.wheel.insert(
            hb_due,
            Timer {
                key: key as u32,
                gen,
                kind: TimerKind::Heartbeat,
                due: hb_due,
            },
        );
        let expires_ms = id
            .exp
            .saturating_add(self.rules.leeway_secs)
            .saturating_mul(1000);
        let exp_due = tick
            + ticks(
                Duration::from_millis(expires_ms.saturating_sub(now_ms)),
                self.limits.tick,
            );
        let ex = self.wheel.insert(
            exp_due,
            Timer {
                key: key as u32,
                gen,
                kind: TimerKind::Expiry,
                due: exp_due,
            },
        );
        let conn = &mut self.conns[key];
        conn.heartbeat = Some(hb);
        conn.expiry = Some(ex);
        conn.identity = Some(id);
        conn.phase = Phase::Open;
        ShardStats::add(&self.stats().subscribed, 1);
        ShardStats::add(&self.stats().open, 1);
        self.enqueue(key, frame);
    }

    // ---- frames from the client ----

    fn on_frame_bytes(&mut self, key: usize, data: &[u8]) {
        let max = self.limits.max_client_message;
        let conn = &mut self.conns[key];
        let may_reply = matches!(conn.phase, Phase::Open);
        let mut peer_close: Option<Option<u16>> = None;
        let mut replied = false;
        let Conn { decoder, out, .. } = conn;
        let result = decoder.feed(data, max, &mut |c| match c {
            Control::Ping(p) if may_reply && peer_close.is_none() => {
                out.push(encode(OpCode::Pong, p));
                replied = true;
            }
            Control::Close(code) if peer_close.is_none() => peer_close = Some(code),
            _ => {}
        });
        if let (Some(magic), true) = (&self.shared.config.fault_injection_ping, replied) {
            let conn = &self.conns[key];
            if conn.out.pending_bytes() >= 2 + magic.len() && injected_fault(&conn.out, magic) {
                panic!("fault injection: a ping asked this connection's handler to fail");
            }
        }
        if replied {
            self.mark_dirty(key);
            // A peer that pings without reading its pongs is bounded like any slow consumer.
            if self.conns[key].out.pending_bytes() > self.limits.max_outbound {
                self.slow.push(key as u32);
                self.close_slow();
            }
        }
        if let Err(e) = result {
            log::debug!("shard {}: connection {key}: {e:?}", self.index);
            return self.fail(key, e.close_reason());
        }
        if let Some(code) = peer_close {
            self.on_peer_close(key, code);
        }
    }

    fn on_peer_close(&mut self, key: usize, code: Option<u16>) {
        if matches!(self.conns[key].phase, Phase::Open) {
            self.unsubscribe(key);
            let echo = match code {
                Some(c) => close_frame(c, ""),
                None => encode(OpCode::Close, &[]),
            };
            self.conns[key].phase = Phase::Closing;
            self.conns[key].close_sent = true;
            self.enqueue(key, echo);
        }
        let conn = &mut self.conns[key];
        conn.close_when_flushed = true;
        self.mark_dirty(key);
    }

    // ---- closing ----

    /// Sends a close frame for `reason` and waits (up to `--close-timeout`) for the peer's.
    fn close_ws(&mut self, key: usize, reason: CloseReason) {
        let conn = &mut self.conns[key];
        if conn.dead || matches!(conn.phase, Phase::Lingering | Phase::Http | Phase::Head(_)) {
            return;
        }
        if conn.close_sent {
            return;
        }
        self.unsubscribe(key);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Closing;
        conn.close_sent = true;
        self.stats().close(reason);
        self.enqueue(key, reason.frame());
        // A drain waits for close frames up to its own deadline; other closes use --close-timeout.
        let now = Instant::now();
        let due = match self.drain_deadline {
            Some(d) if reason == CloseReason::GoingAway => {
                self.tick_of(d).max(self.tick_of(now) + 1)
            }
            _ => self.tick_of(now) + self.limits.close_ticks,
        };
        self.set_deadline(key, due);
    }

    /// Closes after a protocol failure or server error: close frame, then shut down once flushed
    /// without waiting for the peer's close frame.
    fn fail(&mut self, key: usize, reason: CloseReason) {
        if !self.conns.get(key).is_some_and(|c| !c.dead) {
            return;
        }
        if self.conns[key].upgraded() {
            self.close_ws(key, reason);
            self.conns[key].close_when_flushed = true;
            self.mark_dirty(key);
        } else {
            self.kill(key);
        }
    }

    fn unsubscribe(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Some(id) = conn.identity.take() else {
            return;
        };
        for t in [conn.heartbeat.take(), conn.expiry.take()]
            .into_iter()
            .flatten()
        {
            self.wheel.cancel(t);
        }
        self.registry.remove(key, &id.workspace_id, &id.user_id);
        self.stats().open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Marks a connection for removal at the end of the iteration.
    fn kill(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dead {
                conn.dead = true;
                self.dead.push(key as u32);
            }
        }
    }

    fn reap(&mut self) {
        for key in std::mem::take(&mut self.dead) {
            let key = key as usize;
            self.unsubscribe(key);
            let conn = self.conns.remove(key);
            for t in [conn.deadline, conn.heartbeat, conn.expiry]
                .into_iter()
                .flatten()
            {
                self.wheel.cancel(t);
            }
            if !matches!(conn.phase, Phase::Lingering) {
                ShardStats::add(&self.stats().dropped, 1);
            }
            self.shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
            log::debug!(
                "shard {}: connection {key} from {} closed after {:?}",
                self.index,
                conn.peer,
                conn.opened_at.elapsed()
            );
            // Dropping the stream closes the socket and removes it from the poll.
        }
    }

    // ---- writing ----

    fn enqueue(&mut self, key: usize, frame: SharedFrame) {
        let conn = &mut self.conns[key];
        conn.out.push(frame);
        if conn.out.pending_bytes() > self.limits.max_outbound && matches!(conn.phase, Phase::Open)
        {
            self.slow.push(key as u32);
        }
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key as u32);
        }
    }

    fn close_slow(&mut self) {
        for key in std::mem::take(&mut self.slow) {
            let key = key as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.dead || !matches!(conn.phase, Phase::Open) {
                continue;
            }
            conn.out.discard_unstarted();
            self.close_ws(key, CloseReason::SlowConsumer);
            self.conns[key].close_when_flushed = true;
        }
    }

    fn flush(&mut self) {
        let shared = self.shared.clone();
        let stats = &shared.shard_stats[self.index];
        for key in std::mem::take(&mut self.dirty) {
            let key = key as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.dead {
                continue;
            }
            match conn.out.write_to(&mut conn.stream) {
                Ok(done) => {
                    ShardStats::add(&stats.frames_written, done.frames as u64);
                    ShardStats::add(&stats.bytes_written, done.bytes as u64);
                    // Write readiness is watched only while bytes wait: registering it for good
                    // would deliver an EPOLLOUT wake-up for nearly every ACK.
                    let blocked = !conn.out.is_empty();
                    if blocked != conn.want_write {
                        let interest = if blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
                        if self.poll.registry().reregister(&mut conn.stream, Token(key), interest).is_err() {
                            self.kill(key);
                            continue;
                        }
                        conn.want_write = blocked;
                    }
                    if !blocked && conn.close_when_flushed {
                        self.linger(key);
                    }
                }
                Err(_) => self.kill(key),
            }
        }
    }

    fn linger(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.close_when_flushed = false;
        if conn.stream.shutdown(Shutdown::Write).is_err() {
            return self.kill(key);
        }
        self.unsubscribe(key);
        self.conns[key].phase = Phase::Lingering;
        let due = self.tick_of(Instant::now()) + self.limits.close_ticks;
        self.set_deadline(key, due);
    }

    // ---- the inbox ----

    fn drain_inbox(&mut self, now: Instant) {
        self.shared.links[self.index].clear_notified();
        for _ in 0..INBOX_BUDGET {
            match self.inbox.try_recv() {
                Ok(ShardMsg::Events(batch)) => self.deliver(&batch),
                Ok(ShardMsg::Keys(keys)) => self.keys = keys,
                Ok(ShardMsg::Drain) => self.start_drain(now),
                Err(_) => {
                    self.inbox_pending = false;
                    return;
                }
            }
        }
        self.inbox_pending = true;
    }

    fn deliver(&mut self, batch: &[Event]) {
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
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns[key].phase {
                Phase::Head(_) => self.kill(key),
                Phase::Open => self.close_ws(key, CloseReason::GoingAway),
                _ => {}
            }
        }
    }
}

/// Whether the last queued frame is the pong answering the fault-injection ping.
fn injected_fault(out: &outbox::Outbox, magic: &[u8]) -> bool {
    out.last().is_some_and(|f| f.len() >= 2 && &f[2..] == magic)
}
