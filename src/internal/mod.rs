//! The internal listener: `POST /v1/publish`, `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! One thread, one mio loop, HTTP/1.1 with keep-alive (publishers reuse their connection). The
//! loop never blocks: it is also where the Kubernetes probes land, so nothing may hold it up.
//! A publish that cannot be handed over at once (a shard's inbox is full, or the cluster bus
//! is talking to Redis) parks its connection, which is not read until the publish is done;
//! every other connection carries on. Parked local publishes are retried in the order they
//! were made when a shard drains its inbox (the [`crate::dispatch::inbox::Room`] wakes this
//! loop), so each shard takes this listener's batches in order.
//!
//! Every input is bounded before it is buffered, and every drain has a budget:
//! - the head by `--max-request-head-bytes`, the body by `--max-publish-bytes` (checked
//!   against `Content-Length` before a byte of it is read), the number of connections by
//!   `--max-internal-connections`, idle or stalled connections by a deadline;
//! - a connection whose unsent answers pass [`OUT_HIGH`] is not read (nor its buffered
//!   requests served) until they drain, so a client that pipelines requests without reading
//!   the answers holds at most that much here, and the kernel's buffers push back on it;
//! - at most [`REQUESTS_PER_TURN`] requests per connection, [`READ_BUDGET`] bytes per connection
//!   and [`ACCEPT_BUDGET`] accepts per loop turn, so one busy client cannot starve the others.
//!
//! It keeps serving during a drain, so probes see 503 and publishers get a clear answer until
//! the shards are gone.

mod publish_key;
pub mod routes;

use crate::bus::body::BodyLimits;
use crate::bus::cluster::BusUnavailable;
use crate::bus::publisher::{Prepared, PublishError, Publisher};
use crate::config::Config;
use crate::dispatch::inbox::Waiter;
use crate::dispatch::interest::ShardSet;
use crate::dispatch::{PendingBatch, Progress};
use crate::http::request::parse_head;
use crate::http::response;
use crate::metrics::{ShardStats, Stats};
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use publish_key::PublishKey;
use routes::Route;
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// A connection with no request in progress is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Unsent answer bytes above which a connection is not read until they drain.
pub const OUT_HIGH: usize = 256 * 1024;
/// Requests served per connection per loop turn.
pub const REQUESTS_PER_TURN: usize = 8;
/// Bytes read per connection per loop turn.
pub const READ_BUDGET: usize = 64 * 1024;
/// How long a connection whose last answer is written waits for the peer to close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Connections accepted per loop turn.
pub const ACCEPT_BUDGET: usize = 64;

/// A publish on its way.
enum Waiting {
    /// Handed to some shards, waiting for room in the others' inboxes.
    Shards(PendingBatch, usize),
    /// With the cluster bus, waiting for Redis's answer.
    Bus(usize),
}

struct HttpConn {
    stream: TcpStream,
    /// Distinguishes this connection from earlier ones in its slab slot (bus answers name it).
    gen: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    /// A response that closes the connection is queued: nothing more is read or served.
    closing: bool,
    /// A publish of this connection is on its way; the request is still in `inbuf`.
    waiting: Option<(Waiting, usize)>,
    /// `100 Continue` was sent for the request at the front of `inbuf`.
    continued: bool,
    /// The request at the front of `inbuf` asked to close the connection after its answer
    /// (HTTP/1.0, `Connection: close`).
    close_requested: bool,
    /// Reading stopped with bytes possibly left in the socket (budget, a full `out`, a
    /// publish on its way): read again once that clears, since no new edge will say so.
    unread: bool,
    /// The answer that closes the connection is written and our side shut down.
    shut: bool,
    /// Reading is paused because the unsent answers passed [`OUT_HIGH`] (counted once per
    /// pause).
    paused: bool,
    deadline: Instant,
}

impl HttpConn {
    fn unsent(&self) -> usize {
        self.out.len() - self.written
    }

    /// Whether requests may be served (and so bytes read) now.
    fn may_serve(&self) -> bool {
        !self.closing && self.waiting.is_none() && self.unsent() <= OUT_HIGH
    }
}

/// A bus answer for connection (key, generation).
type BusAnswer = (usize, u64, Result<(), BusUnavailable>);

/// The internal listener's loop and state.
pub struct Internal {
    poll: Poll,
    listener: TcpListener,
    waker: Arc<Waker>,
    conns: Slab<HttpConn>,
    publisher: Publisher,
    stats: Stats,
    key: Option<PublishKey>,
    max_connections: usize,
    max_head: usize,
    max_headers: usize,
    max_publish_bytes: usize,
    handshake_timeout: Duration,
    body_limits: BodyLimits,
    stop: Arc<AtomicBool>,
    scratch: Vec<u8>,
    next_gen: u64,
    /// Connections with local publishes waiting for room, oldest first.
    parked: VecDeque<(usize, u64)>,
    /// Connections to serve again next turn (a budget ran out).
    again: Vec<usize>,
    accept_pending: bool,
    answers_tx: Sender<BusAnswer>,
    answers_rx: Receiver<BusAnswer>,
}

impl Internal {
    /// Builds the loop over `listener`. It runs until `stop` is set and the waker fires.
    pub fn new(
        mut listener: TcpListener,
        cfg: &Config,
        publisher: Publisher,
        stats: Stats,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        publisher
            .links()
            .room()
            .register(Waiter::Internal, waker.clone());
        let key = cfg
            .publish_key
            .as_ref()
            .map(|k| PublishKey::new(k.expose()));
        // One answer at most per connection is ever outstanding.
        let (answers_tx, answers_rx) = crossbeam_channel::bounded(cfg.max_internal_connections);
        Ok(Internal {
            poll,
            listener,
            waker,
            conns: Slab::new(),
            publisher,
            stats,
            key,
            max_connections: cfg.max_internal_connections,
            max_head: cfg.max_request_head_bytes,
            max_headers: cfg.max_request_headers,
            max_publish_bytes: cfg.max_publish_bytes,
            handshake_timeout: cfg.handshake_timeout,
            body_limits: BodyLimits::of(cfg),
            stop,
            scratch: vec![0; READ_BUDGET],
            next_gen: 0,
            parked: VecDeque::new(),
            again: Vec::new(),
            accept_pending: false,
            answers_tx,
            answers_rx,
        })
    }

    /// The waker that interrupts the loop (used to stop it).
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Runs until stopped.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_sweep = Instant::now() + Duration::from_secs(1);
        while !self.stop.load(Ordering::Acquire) {
            let timeout = if self.accept_pending || !self.again.is_empty() {
                Duration::ZERO
            } else {
                next_sweep.saturating_duration_since(Instant::now())
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("internal listener: poll failed: {e}");
                    return;
                }
            }
            let mut ready: Vec<usize> = std::mem::take(&mut self.again);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    // Room in a shard's inbox, or a bus answer: both are looked at below.
                    WAKER => {}
                    Token(k) => {
                        if event.is_writable() {
                            self.write(k);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if let Some(c) = self.conns.get_mut(k) {
                                c.unread = true;
                            }
                            ready.push(k);
                        }
                    }
                }
            }
            if self.accept_pending {
                self.accept();
            }
            self.take_answers();
            self.retry_parked();
            ready.sort_unstable();
            ready.dedup();
            for k in ready {
                self.serve(k);
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_secs(1);
                self.sweep(now);
                self.sample();
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= self.max_connections {
                        ShardStats::add(&self.stats.internal.refused, 1);
                        let _ = stream.write(&response::json_error(
                            crate::http::Status::Unavailable,
                            "too many connections",
                            true,
                        ));
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(entry.key()),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_ok()
                    {
                        self.next_gen += 1;
                        ShardStats::add(&self.stats.internal.accepted, 1);
                        entry.insert(HttpConn {
                            stream,
                            gen: self.next_gen,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            written: 0,
                            closing: false,
                            waiting: None,
                            continued: false,
                            close_requested: false,
                            unread: true,
                            paused: false,
                            shut: false,
                            deadline: Instant::now() + IDLE_TIMEOUT,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("internal listener: accept: {e}");
                    self.accept_pending = false;
                    return;
                }
            }
        }
        // Budget spent: the rest next turn.
        self.accept_pending = true;
    }

    /// Serves what connection `k` has buffered, reading more as the budgets allow.
    fn serve(&mut self, k: usize) {
        let mut served = 0;
        let mut read = 0;
        loop {
            let Some(conn) = self.conns.get_mut(k) else {
                return;
            };
            if conn.closing {
                return self.linger(k);
            }
            if !conn.may_serve() {
                if conn.unsent() > OUT_HIGH && !std::mem::replace(&mut conn.paused, true) {
                    ShardStats::add(&self.stats.internal.paused_for_output, 1);
                }
                return;
            }
            // Requests already buffered first.
            match self.serve_one(k) {
                Served::One => {
                    served += 1;
                    if served >= REQUESTS_PER_TURN {
                        self.again.push(k);
                        return;
                    }
                    continue;
                }
                Served::Stop => return,
                Served::NeedMore => {}
            }
            let Some(conn) = self.conns.get_mut(k) else {
                return;
            };
            if !conn.unread {
                return;
            }
            if read >= READ_BUDGET {
                self.again.push(k);
                return;
            }
            // Room for one more head and body at most: what a request can use.
            let room = (self.max_head + self.max_publish_bytes + 1)
                .saturating_sub(conn.inbuf.len())
                .min(self.scratch.len());
            if room == 0 {
                // A request cannot be this long; parse_head or the body bound refuses it.
                return;
            }
            match conn.stream.read(&mut self.scratch[..room]) {
                Ok(0) => {
                    self.conns.remove(k);
                    return;
                }
                Ok(n) => {
                    read += n;
                    if conn.inbuf.is_empty() {
                        // First bytes of a request: it must complete within the handshake
                        // timeout.
                        conn.deadline = Instant::now() + self.handshake_timeout;
                    }
                    conn.inbuf.extend_from_slice(&self.scratch[..n]);
                    if n < room {
                        // A short read emptied the socket; later data raises a new edge.
                        conn.unread = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.unread = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conns.remove(k);
                    return;
                }
            }
        }
    }

    /// Serves the request at the front of connection `k`'s buffer, if it is complete.
    fn serve_one(&mut self, k: usize) -> Served {
        let conn = &mut self.conns[k];
        if conn.inbuf.is_empty() {
            return Served::NeedMore;
        }
        let cx = routes::Context {
            publisher: &self.publisher,
            key: self.key.as_ref(),
            stats: &self.stats,
            max_publish_bytes: self.max_publish_bytes,
            body_limits: self.body_limits,
            ready: !self.publisher.is_draining(),
        };
        let route = match parse_head(&conn.inbuf, self.max_head, self.max_headers) {
            Ok(None) => return Served::NeedMore,
            Err(e) => Route::Respond {
                bytes: response::plain(e.status(), true),
                consumed: conn.inbuf.len(),
                close: true,
            },
            Ok(Some(head)) => {
                let close = head.connection_close || head.minor_version == 0;
                match routes::route(&head, &conn.inbuf, &cx) {
                    Route::Respond {
                        bytes,
                        consumed,
                        close: forced,
                    } => Route::Respond {
                        bytes,
                        consumed,
                        close: close || forced,
                    },
                    other => {
                        conn.close_requested = close;
                        other
                    }
                }
            }
        };
        ShardStats::add(&self.stats.internal.requests, 1);
        match route {
            Route::NeedBody { send_continue } => {
                if send_continue && !std::mem::replace(&mut conn.continued, true) {
                    conn.out.extend_from_slice(routes::CONTINUE);
                    self.write(k);
                }
                Served::NeedMore
            }
            Route::Respond {
                bytes,
                consumed,
                close,
            } => {
                self.answer(k, &bytes, consumed, close);
                Served::One
            }
            Route::Publish {
                prepared,
                events,
                consumed,
            } => self.start_publish(k, prepared, events, consumed),
        }
    }

    /// A connection whose last answer is queued: reads and discards what the peer still sends
    /// (within the read budget) and removes the connection once the peer has closed its side,
    /// so closed connections leave at once instead of at their linger deadline.
    fn linger(&mut self, k: usize) {
        let Some(conn) = self.conns.get_mut(k) else {
            return;
        };
        if !conn.shut {
            return; // the answer is still being written
        }
        let mut read = 0;
        while read < READ_BUDGET {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if read >= READ_BUDGET {
            // A peer that keeps sending after its answer: the deadline ends it.
            return;
        }
        self.conns.remove(k);
    }

    /// Queues an answer to the request at the front of the buffer, which took `consumed` bytes.
    fn answer(&mut self, k: usize, bytes: &[u8], consumed: usize, close: bool) {
        let Some(conn) = self.conns.get_mut(k) else {
            return;
        };
        conn.inbuf.drain(..consumed.min(conn.inbuf.len()));
        conn.continued = false;
        conn.out.extend_from_slice(bytes);
        conn.closing |= close || std::mem::take(&mut conn.close_requested);
        if conn.closing {
            // Nothing after this answer is served; what was buffered is dropped.
            conn.inbuf = Vec::new();
        }
        conn.deadline = Instant::now() + IDLE_TIMEOUT;
        self.write(k);
    }

    fn start_publish(
        &mut self,
        k: usize,
        prepared: Prepared,
        events: usize,
        consumed: usize,
    ) -> Served {
        match prepared {
            Prepared::Empty => {
                self.answer(k, &routes::accepted(0), consumed, false);
                Served::One
            }
            Prepared::Local(batch, n) => {
                let gen = self.conns[k].gen;
                self.conns[k].waiting = Some((Waiting::Shards(batch, n), consumed));
                self.parked.push_back((k, gen));
                ShardStats::add(&self.stats.internal.publishes_parked, 1);
                self.retry_parked();
                Served::Stop
            }
            Prepared::Bus(job) => {
                let (tx, waker) = (self.answers_tx.clone(), self.waker.clone());
                let gen = self.conns[k].gen;
                let sent = self.publisher.submit(
                    job,
                    Box::new(move |r| {
                        // Bounded by the connections, each with one answer at most: never full.
                        let _ = tx.try_send((k, gen, r));
                        let _ = waker.wake();
                    }),
                );
                match sent {
                    Ok(()) => {
                        self.conns[k].waiting = Some((Waiting::Bus(events), consumed));
                        Served::Stop
                    }
                    Err(e) => {
                        self.answer(k, &routes::send_failed(&e), consumed, false);
                        Served::One
                    }
                }
            }
        }
    }

    /// Hands parked local publishes to the shards that have room, oldest first; a shard that
    /// an older batch still waits for takes nothing newer.
    fn retry_parked(&mut self) {
        let mut blocked = ShardSet::default();
        let links = self.publisher.links().clone();
        let mut i = 0;
        while i < self.parked.len() {
            let (k, gen) = self.parked[i];
            let progress = match self.conns.get_mut(k).filter(|c| c.gen == gen) {
                Some(HttpConn {
                    waiting: Some((Waiting::Shards(batch, _), _)),
                    ..
                }) => batch.advance(&links, Waiter::Internal, &mut blocked),
                _ => {
                    self.parked.remove(i);
                    continue;
                }
            };
            match progress {
                Progress::Waiting => i += 1,
                done => {
                    self.parked.remove(i);
                    let Some((Waiting::Shards(_, n), consumed)) = self.conns[k].waiting.take()
                    else {
                        continue;
                    };
                    let reply = if done == Progress::Done {
                        self.publisher.accepted(n);
                        routes::accepted(n)
                    } else {
                        routes::send_failed(&PublishError::Draining)
                    };
                    self.finish(k, &reply, consumed);
                }
            }
        }
    }

    /// Answers from the cluster bus.
    fn take_answers(&mut self) {
        while let Ok((k, gen, result)) = self.answers_rx.try_recv() {
            let Some(conn) = self.conns.get_mut(k).filter(|c| c.gen == gen) else {
                continue;
            };
            let Some((Waiting::Bus(n), consumed)) = conn.waiting.take() else {
                continue;
            };
            let reply = match result {
                Ok(()) => routes::accepted(n),
                Err(e) => routes::send_failed(&PublishError::BusUnavailable(e)),
            };
            self.finish(k, &reply, consumed);
        }
    }

    /// A parked publish is done: answer it and go on with what the connection has buffered.
    fn finish(&mut self, k: usize, reply: &[u8], consumed: usize) {
        self.answer(k, reply, consumed, false);
        self.again.push(k);
    }

    fn write(&mut self, k: usize) {
        let Some(conn) = self.conns.get_mut(k) else {
            return;
        };
        let was_over = conn.unsent() > OUT_HIGH;
        while conn.written < conn.out.len() {
            match conn.stream.write(&conn.out[conn.written..]) {
                Ok(0) => break,
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conns.remove(k);
                    return;
                }
            }
        }
        if conn.written == conn.out.len() {
            conn.out.clear();
            conn.written = 0;
            if conn.closing && !conn.shut {
                // Once: later writable edges (the peer's FIN, its RST) must not push the
                // deadline back, or a busy listener never reaps its closed connections.
                conn.shut = true;
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                // Give the peer a moment to read the response before the socket goes away.
                conn.deadline = Instant::now() + CLOSE_LINGER;
                // The peer may have closed already, with no edge left to say so.
                self.again.push(k);
                return;
            }
        } else if conn.written > OUT_HIGH {
            // Keep the buffer from creeping: drop what was sent.
            conn.out.drain(..conn.written);
            conn.written = 0;
        }
        if conn.unsent() <= OUT_HIGH {
            conn.paused = false;
        }
        if was_over && conn.unsent() <= OUT_HIGH && conn.waiting.is_none() {
            // Reading stopped for this; nothing will say the socket still holds requests.
            self.again.push(k);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.waiting.is_none() && c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            self.conns.remove(k);
        }
    }

    fn sample(&self) {
        let s = &self.stats.internal;
        s.connections
            .store(self.conns.len() as u64, Ordering::Relaxed);
        s.publishes_waiting.store(
            self.conns
                .iter()
                .filter(|(_, c)| c.waiting.is_some())
                .count() as u64,
            Ordering::Relaxed,
        );
    }
}

/// What serving the front of a buffer achieved.
enum Served {
    /// One request answered.
    One,
    /// The front request is not complete.
    NeedMore,
    /// The connection waits (a publish on its way) or is gone.
    Stop,
}
