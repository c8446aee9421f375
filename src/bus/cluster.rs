//! The Redis bus: every node of a cluster publishes through one Redis server and delivers what it
//! receives from it, including its own publishes, so that the order Redis gives a workspace's
//! channel is the order every subscriber everywhere sees.
//!
//! One thread per node owns the subscriber connection (a mio loop over the socket and a waker).
//! Shards tell it when a workspace gets its first subscriber on that shard and when it loses its
//! last ([`BusInterest`]); it keeps, per workspace, the set of shards that want it, `SUBSCRIBE`s
//! on the first and `UNSUBSCRIBE`s after the last, so a node receives only the traffic of
//! workspaces it serves. When Redis confirms a subscription, the shards that asked are told the
//! workspace is live ([`ShardMsg::Live`]); until then their new connections wait for their
//! `connected` frame, so that `connected` keeps meaning "every event published from now on
//! reaches you", as it does on one node.
//!
//! Messages are checked like HTTP publishes ([`wire::decode`]), each frame is built once, and
//! the events of one read go to the shards as one batch, exactly like a local publish.
//!
//! When the connection drops, the thread reconnects with exponential backoff and jitter and
//! re-subscribes every live interest; meanwhile open connections keep their heartbeats, and
//! publishes are refused (503) instead of vanishing. Publishing itself ([`ClusterBus::publish`])
//! runs on the publisher's thread over its own connection; no bus call ever blocks a shard.

use super::event::Event;
use super::redis::{RedisConn, MAX_REPLY_BULK};
use super::resp::{self, Reply};
use super::wire::{self, WireLimits};
use crate::bus::interest::ShardSet;
use crate::config::RedisConfig;
use crate::metrics::ShardStats;
use crate::server::Shared;
use crate::shard::inbox::ShardMsg;
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest as Ready, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);
/// Connect and handshake deadline for each attempt of the bus thread.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for a publisher's connect and for each of its reads and writes. Short: the HTTP
/// publisher is the internal listener's thread, which also answers the health probes.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short on purpose: Redis pub/sub keeps no backlog, so the time between Redis coming back and a
/// node re-subscribing is a window in which that node's subscribers miss events that other nodes
/// already publish again. A connect attempt a second per node costs Redis nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After a reconnect, a node holds its publishes back this long (answering 503) so that the
/// other nodes, which lost Redis at the same moment, have re-subscribed before the backlog its
/// publishers resend goes out: Redis would deliver it only to the nodes already back. Twice the
/// longest jittered backoff, plus a margin for the connect itself.
const PUBLISH_SETTLE: Duration = Duration::from_millis(2000);
/// A silent subscriber connection is pinged after this long, and given up after as long again:
/// a Redis that vanished without a FIN is noticed within ten seconds.
const IDLE_PING: Duration = Duration::from_secs(5);

/// A shard's change of interest in a workspace.
#[derive(Debug)]
pub enum BusInterest {
    /// The shard's first subscriber of the workspace arrived.
    Add(Arc<str>, usize),
    /// The shard's last subscriber of the workspace left.
    Remove(Arc<str>, usize),
}

/// Why a publish through the bus failed. Nothing of the request was published.
#[derive(Debug)]
pub struct BusUnavailable(pub String);

/// The handle shards and publishers hold.
pub struct ClusterBus {
    cfg: RedisConfig,
    tx: Sender<BusInterest>,
    waker: Waker,
    up: AtomicBool,
    stop: AtomicBool,
    /// After a reconnect: publishes wait until this instant (see [`PUBLISH_SETTLE`]).
    settle_until: Mutex<Option<Instant>>,
    publish_conn: Mutex<Option<RedisConn>>,
}

/// What the bus thread starts from (built before the shards, started after them).
pub struct BusThread {
    bus: Arc<ClusterBus>,
    rx: Receiver<BusInterest>,
    poll: Poll,
}

impl ClusterBus {
    /// Creates the handle and the thread's state. Nothing connects until [`BusThread::run`].
    pub fn new(cfg: RedisConfig) -> io::Result<(Arc<ClusterBus>, BusThread)> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let bus = Arc::new(ClusterBus {
            cfg,
            tx,
            waker,
            up: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            settle_until: Mutex::new(None),
            publish_conn: Mutex::new(None),
        });
        Ok((bus.clone(), BusThread { bus, rx, poll }))
    }

    /// Reports a shard's change of interest (never blocks).
    pub fn interest(&self, change: BusInterest) {
        if self.tx.send(change).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Ends the bus thread (after the shards are gone); its connection closes, and with it every
    /// subscription of this node.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Whether the subscriber connection is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Publishes `messages` (channel, wire message) in order, in one pipelined write, and waits
    /// for Redis to take them. While the bus is down this fails at once.
    pub fn publish(&self, messages: &[(Vec<u8>, Vec<u8>)]) -> Result<(), BusUnavailable> {
        if !self.is_up() {
            return Err(BusUnavailable(
                "the cluster bus (Redis) is unreachable; publish again once it is back".into(),
            ));
        }
        let settle = *self.settle_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(left) = settle.and_then(|t| t.checked_duration_since(Instant::now())) {
            return Err(BusUnavailable(format!(
                "the cluster bus (Redis) is back; publishes resume in {} ms, once every node has re-subscribed",
                left.as_millis().max(1)
            )));
        }
        let mut encoded = Vec::new();
        for (channel, message) in messages {
            resp::command(&mut encoded, &[b"PUBLISH", channel, message]);
        }
        let mut guard = self.publish_conn.lock().unwrap_or_else(|p| p.into_inner());
        // One retry on a fresh connection: a pooled connection may have died while idle. A
        // retry can only repeat a publish whose reply was lost with the connection, and the
        // first attempt then never reached Redis or was never delivered: Redis executes a
        // pipeline in order and a dead socket stops it.
        for attempt in 0..2 {
            if guard.is_none() {
                match RedisConn::connect(&self.cfg, PUBLISH_TIMEOUT) {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        return Err(BusUnavailable(format!(
                            "the cluster bus (Redis) is unreachable: {e}"
                        )))
                    }
                }
            }
            let conn = guard.as_mut().expect("connected above");
            match conn.pipeline(&encoded, messages.len()) {
                Ok(replies) => {
                    if let Some(Reply::Error(e)) =
                        replies.iter().find(|r| matches!(r, Reply::Error(_)))
                    {
                        return Err(BusUnavailable(format!(
                            "the cluster bus refused the publish: {}",
                            String::from_utf8_lossy(e)
                        )));
                    }
                    return Ok(());
                }
                Err(e) => {
                    *guard = None;
                    if attempt == 1 {
                        return Err(BusUnavailable(format!(
                            "the cluster bus (Redis) connection failed: {e}"
                        )));
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

/// Per-workspace subscription state.
#[derive(Default)]
struct Want {
    /// Shards with subscribers of the workspace.
    shards: ShardSet,
    /// A `SUBSCRIBE` is in force or on its way (and no `UNSUBSCRIBE` after it).
    requested: bool,
    /// Commands for this channel sent and not yet confirmed.
    in_flight: u32,
    /// Confirmed and in force: messages are delivered, new shards are told at once.
    live: bool,
}

struct Link {
    stream: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    writable: bool,
    /// When the last bytes arrived.
    heard: Instant,
    /// When a PING went out with nothing heard since.
    pinged: Option<Instant>,
}

impl BusThread {
    /// Runs the bus until the process ends.
    pub fn run(mut self, shared: Arc<Shared>) {
        let bus = self.bus.clone();
        let limits = WireLimits {
            max_event_bytes: shared.config.max_event_bytes,
            max_depth: shared.config.max_json_depth,
            max_id_bytes: shared.config.max_id_bytes,
        };
        let stats = &shared.bus_stats;
        let mut wants: HashMap<Arc<str>, Want> = HashMap::new();
        let mut link: Option<Link> = None;
        let mut backoff = BACKOFF_MIN;
        let mut retry_at = Instant::now();
        let mut connected_once = false;
        let mut events = Events::with_capacity(64);
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            if bus.stop.load(Ordering::Acquire) {
                bus.up.store(false, Ordering::Release);
                return;
            }
            // Connect when down and due.
            if link.is_none() && Instant::now() >= retry_at {
                match self.connect(&mut wants) {
                    Ok(l) => {
                        if connected_once {
                            ShardStats::add(&stats.bus_reconnects, 1);
                            *bus.settle_until.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(Instant::now() + PUBLISH_SETTLE);
                        }
                        connected_once = true;
                        log::info!(
                            "cluster bus: connected to redis://{}:{}",
                            bus.cfg.host,
                            bus.cfg.port
                        );
                        backoff = BACKOFF_MIN;
                        stats.bus_up.store(1, Ordering::Relaxed);
                        bus.up.store(true, Ordering::Release);
                        link = Some(l);
                    }
                    Err(e) => {
                        retry_at = Instant::now() + jittered(backoff);
                        log::warn!(
                            "cluster bus: redis://{}:{}: {e}; retrying in {:?}",
                            bus.cfg.host,
                            bus.cfg.port,
                            retry_at - Instant::now()
                        );
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let timeout = match &link {
                Some(_) => Some(IDLE_PING),
                None => Some(retry_at.saturating_duration_since(Instant::now())),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("cluster bus: poll failed: {e}");
                    return;
                }
            }
            // Interest changes from the shards.
            while let Ok(change) = self.rx.try_recv() {
                self.on_interest(change, &mut wants, link.as_mut(), &shared);
            }
            let Some(l) = link.as_mut() else {
                continue;
            };
            let mut failed: Option<String> = None;
            for ev in events.iter() {
                if ev.token() == SOCKET && ev.is_writable() {
                    l.writable = true;
                }
            }
            // Read everything there is, then handle each complete reply.
            loop {
                match l.stream.read(&mut scratch) {
                    Ok(0) => {
                        failed = Some("connection closed by Redis".into());
                        break;
                    }
                    Ok(n) => {
                        l.inbuf.extend_from_slice(&scratch[..n]);
                        l.heard = Instant::now();
                        l.pinged = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let mut batch: Vec<Event> = Vec::new();
            let mut targets = ShardSet::default();
            let mut used = 0;
            while failed.is_none() {
                match resp::parse(&l.inbuf[used..], MAX_REPLY_BULK) {
                    Ok(Some((reply, n))) => {
                        used += n;
                        on_reply(
                            &reply,
                            &mut wants,
                            &shared,
                            limits,
                            &mut batch,
                            &mut targets,
                        );
                    }
                    Ok(None) => break,
                    Err(e) => failed = Some(e.to_string()),
                }
            }
            l.inbuf.drain(..used);
            if !batch.is_empty() {
                ShardStats::add(&stats.bus_received, batch.len() as u64);
                let batch: Arc<[Event]> = batch.into();
                for (i, shard) in shared.links.iter().enumerate() {
                    if targets.contains(i) {
                        // Waits while the shard's inbox is full: the back-pressure reaches
                        // Redis, which buffers for its subscribers up to its own limit.
                        let _ = shard.send(ShardMsg::Events(batch.clone()));
                    }
                }
            }
            // A quiet connection is asked for a sign of life; no answer in time means Redis is gone
            // even if no FIN or RST ever arrives. (In subscribed mode PING answers ["pong", ""],
            // which `on_reply` ignores; any bytes count.)
            if failed.is_none() {
                match l.pinged {
                    Some(t) if t.elapsed() >= IDLE_PING => {
                        failed = Some(format!("no answer to PING within {IDLE_PING:?}"));
                    }
                    None if l.heard.elapsed() >= IDLE_PING => {
                        resp::command(&mut l.outbuf, &[b"PING"]);
                        l.pinged = Some(Instant::now());
                    }
                    _ => {}
                }
            }
            if failed.is_none() {
                failed = flush(l).err().map(|e| e.to_string());
            }
            if let Some(why) = failed {
                log::warn!(
                    "cluster bus: lost redis://{}:{}: {why}; publishes answer 503 until it is back",
                    bus.cfg.host,
                    bus.cfg.port
                );
                bus.up.store(false, Ordering::Release);
                stats.bus_up.store(0, Ordering::Relaxed);
                if let Some(mut l) = link.take() {
                    let _ = self.poll.registry().deregister(&mut l.stream);
                }
                // Nothing is subscribed any more; workspaces no shard wants (an UNSUBSCRIBE was in
                // flight) are forgotten, the rest are subscribed again on reconnect.
                wants.retain(|_, w| !w.shards.is_empty());
                for w in wants.values_mut() {
                    w.requested = false;
                    w.in_flight = 0;
                    w.live = false;
                }
                retry_at = Instant::now() + jittered(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Connects, then subscribes to every workspace some shard wants.
    fn connect(&mut self, wants: &mut HashMap<Arc<str>, Want>) -> io::Result<Link> {
        let conn = RedisConn::connect(&self.bus.cfg, CONNECT_TIMEOUT)?;
        let (std_stream, leftover) = conn.into_parts();
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        self.poll
            .registry()
            .register(&mut stream, SOCKET, Ready::READABLE | Ready::WRITABLE)?;
        let mut link = Link {
            stream,
            inbuf: leftover,
            outbuf: Vec::new(),
            writable: true,
            heard: Instant::now(),
            pinged: None,
        };
        for (ws, w) in wants.iter_mut() {
            if !w.shards.is_empty() {
                resp::command(&mut link.outbuf, &[b"SUBSCRIBE", &wire::channel(ws)]);
                w.requested = true;
                w.in_flight += 1;
            }
        }
        flush(&mut link)?;
        Ok(link)
    }

    fn on_interest(
        &mut self,
        change: BusInterest,
        wants: &mut HashMap<Arc<str>, Want>,
        link: Option<&mut Link>,
        shared: &Shared,
    ) {
        let mut command: Option<&[u8]> = None;
        let ws = match change {
            BusInterest::Add(ws, shard) => {
                let w = wants.entry(ws.clone()).or_default();
                w.shards.insert(shard);
                if w.live {
                    let _ = shared.links[shard].send(ShardMsg::Live(ws.clone()));
                } else if !w.requested {
                    command = Some(b"SUBSCRIBE");
                }
                ws
            }
            BusInterest::Remove(ws, shard) => {
                let Some(w) = wants.get_mut(&ws) else {
                    return;
                };
                w.shards.remove(shard);
                if w.shards.is_empty() && w.requested {
                    command = Some(b"UNSUBSCRIBE");
                } else if w.shards.is_empty() && w.in_flight == 0 {
                    wants.remove(&ws);
                }
                ws
            }
        };
        let (Some(cmd), Some(l)) = (command, link) else {
            // Down: the reconnect subscribes whatever is wanted then.
            return;
        };
        let w = wants.get_mut(&ws).expect("present above");
        w.requested = cmd == b"SUBSCRIBE";
        w.live = false;
        w.in_flight += 1;
        resp::command(&mut l.outbuf, &[cmd, &wire::channel(&ws)]);
        // A failed flush shows up as a read or write error on the next turn.
        let _ = flush(l);
    }
}

/// Handles one reply on the subscriber connection.
fn on_reply(
    reply: &Reply,
    wants: &mut HashMap<Arc<str>, Want>,
    shared: &Shared,
    limits: WireLimits,
    batch: &mut Vec<Event>,
    targets: &mut ShardSet,
) {
    if let Some(m) = resp::pubsub_message(reply) {
        let Some(ws) = wire::workspace_of(m.channel) else {
            return;
        };
        if !wants.get(ws).is_some_and(|w| w.live) {
            return; // a message racing an UNSUBSCRIBE
        }
        match wire::decode(m.payload, limits) {
            Ok(got) => {
                targets.union(shared.interest.shards_for(ws));
                batch.push(Event {
                    workspace_id: ws.into(),
                    user_id: got.user_id,
                    frame: got.frame,
                    accepted_at: Instant::now(),
                });
            }
            Err(why) => {
                ShardStats::add(&shared.bus_stats.bus_invalid, 1);
                log::warn!(workspace = ws, reason = why.as_str(); "cluster bus: dropped an invalid message");
            }
        }
        return;
    }
    // A subscription confirmation: ["subscribe" | "unsubscribe", channel, count].
    let Reply::Array(Some(items)) = reply else {
        return;
    };
    let (Some(kind), Some(channel)) = (
        items.first().and_then(Reply::as_bytes),
        items.get(1).and_then(Reply::as_bytes),
    ) else {
        return;
    };
    let Some(ws) = wire::workspace_of(channel) else {
        return;
    };
    let Some(key) = wants.get_key_value(ws).map(|(k, _)| k.clone()) else {
        return;
    };
    let w = wants.get_mut(&key).expect("present above");
    w.in_flight = w.in_flight.saturating_sub(1);
    if w.in_flight > 0 {
        return; // a later command for this channel will settle it
    }
    if kind == b"subscribe" && w.requested {
        w.live = true;
        for (i, link) in shared.links.iter().enumerate() {
            if w.shards.contains(i) {
                let _ = link.send(ShardMsg::Live(key.clone()));
            }
        }
    } else if !w.requested && w.shards.is_empty() {
        wants.remove(&key);
    }
}

/// Writes what is queued; leaves the rest for the next writable event.
fn flush(l: &mut Link) -> io::Result<()> {
    while l.writable && !l.outbuf.is_empty() {
        match l.stream.write(&l.outbuf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                l.outbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => l.writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `d` scaled by a factor in [0.5, 1.5), so that nodes that lost Redis together do not all come
/// back in the same instant.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let r = (nanos.wrapping_mul(2_654_435_761) >> 8) as f64 / (1u32 << 24) as f64;
    d.mul_f64(0.5 + r)
}
