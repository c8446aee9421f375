//! The Redis bus: every node of a cluster publishes through Redis and delivers what it receives
//! from it, including its own publishes, so that the order Redis gives a workspace's channel is
//! the order every subscriber everywhere sees.
//!
//! Two dialects of the same design: on one Redis server (`redis://`) every channel lives on that
//! server (`SUBSCRIBE`/`PUBLISH`); on a Redis Cluster (`redis-cluster://`) each channel lives on
//! the master that owns its hash slot and uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), so a
//! message travels only within its shard instead of being broadcast to every Redis node.
//! [`Topology`] says which server a channel goes to.
//!
//! One thread per node owns the subscriber connections, one per Redis server (a mio loop over
//! the sockets and a waker). Shards tell it when a workspace gets its first subscriber on that
//! shard and when it loses its last ([`BusInterest`]); it keeps, per workspace, the set of
//! shards that want it, subscribes on the first and unsubscribes after the last, so a node
//! receives only the traffic of workspaces it serves. When Redis confirms a subscription, the
//! shards that asked are told the workspace is live ([`ShardMsg::Live`]); until then their new
//! connections wait for their `connected` frame, so that `connected` keeps meaning "every event
//! published from now on reaches you", as it does on one node.
//!
//! Messages are checked like HTTP publishes ([`wire::decode`]), each frame is built once, and
//! the events of one read go to the shards as one batch, exactly like a local publish.
//!
//! When a connection drops, the thread reconnects with exponential backoff and jitter (on a
//! cluster, after reading the layout again: a master may have failed over) and re-subscribes
//! every live interest; meanwhile open connections keep their heartbeats, and publishes are
//! refused (503) instead of vanishing. When a cluster moves a slot, Redis ends the node's
//! subscriptions in it (`sunsubscribe`) or answers `MOVED`; the thread reads the layout again
//! and subscribes at the slot's new master. Publishing itself ([`ClusterBus::publish`]) runs on
//! the publisher's thread over its own connections; no bus call ever blocks a shard.

use super::redis::{RedisConn, MAX_REPLY_BULK};
use super::resp::{self, Reply};
use super::topology::{self, Topology};
use super::wire::{self, WireLimits};
use crate::config::{RedisConfig, RedisNode};
use crate::dispatch::inbox::ShardMsg;
use crate::dispatch::interest::ShardSet;
use crate::dispatch::{BusInterest, Links, ToBus};
use crate::event::Event;
use crate::metrics::{BusStats, ShardStats};
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest as Ready, Poll, Token, Waker};
use slab::Slab;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const WAKE: Token = Token(0);
/// Subscriber connection `k` of the slab is token `LINK_BASE + k`.
const LINK_BASE: usize = 1;
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
/// Publish attempts when a cluster answers `MOVED` (the slot moved between reading the layout
/// and publishing); each retry goes to the master the redirect names.
const PUBLISH_REDIRECTS: usize = 3;
/// How long a publish to a hash slot that has just changed masters is held back. When a slot
/// moves, every node learns it at the same moment (Redis ends their subscriptions in it) and
/// needs a few milliseconds to subscribe at the new master; an event published there before
/// that would miss them. The hold covers a layout read that waits for [`LAYOUT_MIN_INTERVAL`],
/// with room to spare. Only publishes to that slot wait, and only once.
const MOVED_SLOT_HOLD: Duration = Duration::from_millis(250);
/// The layout is read at most this often, so that masters whose views of it disagree for a
/// moment (while a change spreads through the cluster) cannot spin the bus thread.
const LAYOUT_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Why a publish through the bus failed. Unless Redis failed, or a cluster moved one of the
/// request's slots to a master this node cannot reach, during the publish itself, nothing of
/// the request was published.
#[derive(Debug)]
pub struct BusUnavailable(pub String);

impl BusUnavailable {
    /// The bus did not answer within the publisher's deadline.
    pub fn timed_out() -> BusUnavailable {
        BusUnavailable("the cluster bus did not answer in time; publish again".into())
    }
}

impl std::fmt::Display for BusUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BusUnavailable {}

/// One publish for the bus: its events' Redis commands in one buffer, each with its hash slot.
#[derive(Default, Debug)]
pub struct BusJob {
    commands: Vec<u8>,
    /// Per message: its hash slot and its command's place in `commands`.
    messages: Vec<(u16, std::ops::Range<usize>)>,
}

impl BusJob {
    /// Appends one event, `command` being the dialect's publish command. The payload is written
    /// once, by `write_payload`, straight into the command (`payload_len` is its length).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        command: &[u8],
        workspace_id: &str,
        user_id: Option<&str>,
        kind: &str,
        ts_ms: u64,
        payload_len: usize,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.commands.len();
        wire::write_publish(
            &mut self.commands,
            command,
            workspace_id,
            kind,
            user_id,
            ts_ms,
            payload_len,
            write_payload,
        );
        let slot = topology::slot(&wire::channel(workspace_id));
        self.messages.push((slot, start..self.commands.len()));
    }

    /// The number of events.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// The commands of one dialect.
struct Dialect {
    subscribe: &'static [u8],
    unsubscribe: &'static [u8],
    publish: &'static [u8],
    /// The kind of a subscription confirmation.
    subscribed: &'static [u8],
    /// The kind of an unsubscription confirmation (or, on a cluster, of a subscription Redis
    /// ended because the slot moved).
    unsubscribed: &'static [u8],
}

const CLASSIC: Dialect = Dialect {
    subscribe: b"SUBSCRIBE",
    unsubscribe: b"UNSUBSCRIBE",
    publish: b"PUBLISH",
    subscribed: b"subscribe",
    unsubscribed: b"unsubscribe",
};

const SHARDED: Dialect = Dialect {
    subscribe: b"SSUBSCRIBE",
    unsubscribe: b"SUNSUBSCRIBE",
    publish: b"SPUBLISH",
    subscribed: b"ssubscribe",
    unsubscribed: b"sunsubscribe",
};

/// The handle shards and publishers hold.
pub struct ClusterBus {
    cfg: RedisConfig,
    dialect: &'static Dialect,
    stats: Arc<BusStats>,
    waker: Arc<Waker>,
    up: AtomicBool,
    stop: AtomicBool,
    /// Set by a publisher that was redirected: the bus thread reads the layout again.
    layout_stale: AtomicBool,
    /// Where each channel goes. The bus thread replaces it after reading the layout; a
    /// publisher patches it when redirected.
    topology: Mutex<Arc<Topology>>,
    /// The servers this node's bus thread has a subscriber connection to, each with the
    /// instant publishes to it may start: at once after the first connection, after
    /// [`PUBLISH_SETTLE`] after a reconnect. A publish goes only to these: what goes elsewhere
    /// would miss this node's own subscribers.
    connected: Mutex<HashMap<RedisNode, Instant>>,
    /// Hash slots that changed masters recently, and when: publishes to them wait until
    /// [`MOVED_SLOT_HOLD`] has passed.
    recent_moves: Mutex<HashMap<u16, Instant>>,
    /// One command connection per Redis server, shared by this node's publishers.
    publish_conns: Mutex<HashMap<RedisNode, RedisConn>>,
}

/// What the bus thread starts from (built before the shards, started after them).
pub struct BusThread {
    bus: Arc<ClusterBus>,
    rx: Receiver<BusInterest>,
    poll: Poll,
}

/// What [`ClusterBus::create`] makes.
pub struct NewBus {
    /// The handle for publishers.
    pub bus: Arc<ClusterBus>,
    /// The thread's state, to run once the shards are built.
    pub thread: BusThread,
    /// The shards' channel into the thread.
    pub to_bus: ToBus,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClusterBus {
    /// Creates the handle and the thread's state. Nothing connects until [`BusThread::run`].
    pub fn create(cfg: RedisConfig, stats: Arc<BusStats>) -> io::Result<NewBus> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (to_bus, rx) = ToBus::channel(waker.clone());
        let (dialect, topology) = if cfg.cluster {
            (&SHARDED, Topology::unknown())
        } else {
            (&CLASSIC, Topology::single(cfg.nodes[0].clone()))
        };
        let bus = Arc::new(ClusterBus {
            cfg,
            dialect,
            stats,
            waker,
            up: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            layout_stale: AtomicBool::new(false),
            topology: Mutex::new(Arc::new(topology)),
            connected: Mutex::new(HashMap::new()),
            recent_moves: Mutex::new(HashMap::new()),
            publish_conns: Mutex::new(HashMap::new()),
        });
        Ok(NewBus {
            bus: bus.clone(),
            thread: BusThread { bus, rx, poll },
            to_bus,
        })
    }

    /// The dialect's publish command (`PUBLISH`, or `SPUBLISH` on a Redis Cluster).
    pub fn publish_command(&self) -> &'static [u8] {
        self.dialect.publish
    }

    /// Publishes `job` and calls `done` with Redis's answer.
    pub fn submit(
        &self,
        job: BusJob,
        done: Box<dyn FnOnce(Result<(), BusUnavailable>) + Send>,
    ) -> Result<(), BusUnavailable> {
        done(self.publish(&job));
        Ok(())
    }

    /// Ends the bus thread (after the shards are gone); its connections close, and with them
    /// every subscription of this node.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Whether the bus is up: every Redis server that owns channels has a live subscriber
    /// connection from this node.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Publishes `messages` (channel, wire message) and waits for Redis to take them. Messages
    /// for one server go in one pipelined write, in order, so the order of one workspace's
    /// messages holds. When a server they go to is down (on a cluster: the master of one of
    /// their slots), this fails at once and nothing is sent to any server.
    fn publish(&self, job: &BusJob) -> Result<(), BusUnavailable> {
        let messages = &job.messages;
        let mut conns = lock(&self.publish_conns);
        let mut todo: Vec<usize> = (0..messages.len()).collect();
        for _ in 0..PUBLISH_REDIRECTS {
            self.hold_if_moved(todo.iter().map(|&i| messages[i].0));
            let topo = lock(&self.topology).clone();
            // Per server, its messages in order.
            let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
            for &i in &todo {
                let slot = messages[i].0;
                let Some(node) = topo.node_for_slot(slot) else {
                    return Err(BusUnavailable(format!(
                        "no Redis Cluster master serves hash slot {slot} right now; publish again shortly"
                    )));
                };
                match groups.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, g)) => g.push(i),
                    None => groups.push((node, vec![i])),
                }
            }
            // Check every server first, so that one that is down fails the publish before
            // anything is sent.
            for (node, group) in &groups {
                let node = &topo.nodes[*node];
                let from = lock(&self.connected).get(node).copied();
                if let Some(left) = from.and_then(|t| t.checked_duration_since(Instant::now())) {
                    return Err(BusUnavailable(format!(
                        "the cluster bus (Redis {node}) is back; publishes resume in {} ms, once every node has re-subscribed",
                        left.as_millis().max(1)
                    )));
                }
                let slot = messages[group[0]].0;
                if from.is_none() {
                    return Err(self.unreachable(node, slot, "this node is not connected to it"));
                }
                if !conns.contains_key(node) {
                    let c = RedisConn::connect(node, &self.cfg, PUBLISH_TIMEOUT)
                        .map_err(|e| self.unreachable(node, slot, &e.to_string()))?;
                    conns.insert(node.clone(), c);
                }
            }
            let mut redirected = Vec::new();
            for (node, group) in &groups {
                let node = &topo.nodes[*node];
                let mut encoded = Vec::new();
                for &i in group {
                    encoded.extend_from_slice(&job.commands[messages[i].1.clone()]);
                }
                let slot = messages[group[0]].0;
                let replies = self.pipeline(&mut conns, node, slot, &encoded, group.len())?;
                for (&i, reply) in group.iter().zip(&replies) {
                    let Reply::Error(e) = reply else {
                        continue;
                    };
                    let Some((slot, owner)) = topology::redirect(e) else {
                        return Err(BusUnavailable(format!(
                            "the cluster bus refused the publish: {}",
                            String::from_utf8_lossy(e)
                        )));
                    };
                    ShardStats::add(&self.stats.bus_redirects, 1);
                    Arc::make_mut(&mut lock(&self.topology)).moved(slot, owner);
                    self.slots_moved(&[slot]);
                    redirected.push(i);
                }
            }
            if redirected.is_empty() {
                return Ok(());
            }
            // The bus thread's subscriptions in those slots moved too; it reads the layout.
            self.layout_stale.store(true, Ordering::Release);
            let _ = self.waker.wake();
            redirected.sort_unstable();
            todo = redirected;
        }
        Err(BusUnavailable(
            "the Redis Cluster kept redirecting the publish (its slots are moving); publish again"
                .into(),
        ))
    }

    /// Records that `slots` changed masters just now.
    fn slots_moved(&self, slots: &[u16]) {
        if slots.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut recent = lock(&self.recent_moves);
        recent.retain(|_, t| now < *t + MOVED_SLOT_HOLD);
        recent.extend(slots.iter().map(|&s| (s, now)));
    }

    /// Waits, if one of `channels` is in a slot that changed masters less than
    /// [`MOVED_SLOT_HOLD`] ago, until that long has passed: by then every node has
    /// subscribed at the new master.
    fn hold_if_moved(&self, slots: impl Iterator<Item = u16>) {
        let until = {
            let mut recent = lock(&self.recent_moves);
            if recent.is_empty() {
                return;
            }
            let now = Instant::now();
            recent.retain(|_, t| now < *t + MOVED_SLOT_HOLD);
            slots
                .filter_map(|s| recent.get(&s))
                .map(|t| *t + MOVED_SLOT_HOLD)
                .max()
        };
        if let Some(wait) = until.and_then(|t| t.checked_duration_since(Instant::now())) {
            std::thread::sleep(wait);
        }
    }

    /// Sends `encoded` (`count` commands) to `node` and reads the replies, with one retry on a
    /// fresh connection: a pooled connection may have died while idle. A retry can only repeat
    /// commands whose replies were lost with the connection, and those never reached Redis or
    /// were never run: Redis executes a pipeline in order and a dead socket stops it.
    fn pipeline(
        &self,
        conns: &mut HashMap<RedisNode, RedisConn>,
        node: &RedisNode,
        slot: u16,
        encoded: &[u8],
        count: usize,
    ) -> Result<Vec<Reply>, BusUnavailable> {
        for attempt in 0..2 {
            let conn = match conns.entry(node.clone()) {
                std::collections::hash_map::Entry::Occupied(c) => c.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    RedisConn::connect(node, &self.cfg, PUBLISH_TIMEOUT)
                        .map_err(|e| self.unreachable(node, slot, &e.to_string()))?,
                ),
            };
            match conn.pipeline(encoded, count) {
                Ok(replies) => return Ok(replies),
                Err(e) => {
                    conns.remove(node);
                    if attempt == 1 {
                        return Err(self.unreachable(
                            node,
                            slot,
                            &format!("connection failed: {e}"),
                        ));
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The 503 for a server a publish cannot reach, in one wording whichever step found it: on
    /// a cluster it names the master and a hash slot of the request that lives there.
    fn unreachable(&self, node: &RedisNode, slot: u16, why: &str) -> BusUnavailable {
        BusUnavailable(if self.cfg.cluster {
            format!(
                "the cluster bus (Redis {node}, master of hash slot {slot}) is unreachable ({why}); publish again once it is back"
            )
        } else {
            format!("the cluster bus (Redis) is unreachable ({why}); publish again once it is back")
        })
    }
}

/// The outcome of work done off the bus thread.
enum Attempt {
    /// A read of the cluster's layout.
    Layout(Result<Topology, String>),
    /// A subscriber connection (connected, authenticated, database selected).
    Connected(RedisNode, io::Result<RedisConn>),
    /// The work could not start.
    Failed(String),
}

/// Per-workspace subscription state.
#[derive(Default)]
struct Want {
    /// Shards with subscribers of the workspace.
    shards: ShardSet,
    /// A subscribe is in force or on its way (and no unsubscribe after it).
    requested: bool,
    /// Commands for this channel sent and not yet confirmed.
    in_flight: u32,
    /// Confirmed and in force: messages are delivered, new shards are told at once.
    live: bool,
    /// The subscriber connection the commands went to.
    link: Option<usize>,
}

impl Want {
    /// Forgets the subscription (its connection is gone, or Redis ended or refused it).
    fn reset(&mut self) {
        self.requested = false;
        self.in_flight = 0;
        self.live = false;
        self.link = None;
    }
}

/// One subscriber connection to one Redis server.
struct Link {
    node: RedisNode,
    stream: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    writable: bool,
    /// When the last bytes arrived.
    heard: Instant,
    /// When a PING went out with nothing heard since.
    pinged: Option<Instant>,
}

/// The bus thread's state.
struct Runner {
    bus: Arc<ClusterBus>,
    shards: Arc<Links>,
    limits: WireLimits,
    poll: Poll,
    wants: HashMap<Arc<str>, Want>,
    links: Slab<Link>,
    link_of: HashMap<RedisNode, usize>,
    /// Workspaces some shard wants that are not subscribed yet (no layout or no connection).
    /// A set: a workspace retried many times while Redis is away is in it once.
    pending: HashSet<Arc<str>>,
    topo: Arc<Topology>,
    /// The layout must be read (again): at start, after a redirect, after a lost connection (a
    /// master may have failed over).
    stale: bool,
    attempts_tx: Sender<Attempt>,
    attempts_rx: Receiver<Attempt>,
    /// Servers a connect is under way to.
    connecting: Vec<RedisNode>,
    /// A read of the layout is under way.
    reading_layout: bool,
    /// The server to ask for the layout first: the one that said a slot moved.
    layout_hint: Option<RedisNode>,
    last_layout: Option<Instant>,
    /// A connection was lost since the last one was made: the next one is a reconnect.
    lost: bool,
    backoff: Duration,
    retry_at: Instant,
}

impl BusThread {
    /// Runs the bus until the process ends.
    pub fn run(self, shards: Arc<Links>, limits: WireLimits) {
        let topo = lock(&self.bus.topology).clone();
        let (attempts_tx, attempts_rx) = crossbeam_channel::unbounded();
        let mut r = Runner {
            attempts_tx,
            attempts_rx,
            connecting: Vec::new(),
            reading_layout: false,
            bus: self.bus,
            shards,
            limits,
            poll: self.poll,
            wants: HashMap::new(),
            links: Slab::new(),
            link_of: HashMap::new(),
            pending: HashSet::new(),
            topo,
            stale: true,
            layout_hint: None,
            last_layout: None,
            lost: false,
            backoff: BACKOFF_MIN,
            retry_at: Instant::now(),
        };
        r.run(self.rx);
    }
}

impl Runner {
    fn run(&mut self, rx: Receiver<BusInterest>) {
        let mut events = Events::with_capacity(64);
        let mut scratch = vec![0u8; 64 * 1024];
        let mut ready: Vec<usize> = Vec::new();
        loop {
            if self.bus.stop.load(Ordering::Acquire) {
                self.bus.up.store(false, Ordering::Release);
                lock(&self.bus.connected).clear();
                return;
            }
            if self.bus.layout_stale.swap(false, Ordering::AcqRel) {
                self.stale = true;
            }
            self.start_attempts();
            self.subscribe_pending();
            self.update_up();
            self.bus
                .stats
                .bus_pending
                .store(self.pending.len() as u64, Ordering::Relaxed);
            let timeout = self.next_attempt().map_or(IDLE_PING, |t| {
                t.saturating_duration_since(Instant::now()).min(IDLE_PING)
            });
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("cluster bus: poll failed: {e}");
                    return;
                }
            }
            while let Ok(attempt) = self.attempts_rx.try_recv() {
                self.on_attempt(attempt, &mut ready);
            }
            // Interest changes from the shards.
            while let Ok(change) = rx.try_recv() {
                self.on_interest(change);
            }
            for ev in events.iter() {
                let Some(key) = ev.token().0.checked_sub(LINK_BASE) else {
                    continue;
                };
                if let Some(l) = self.links.get_mut(key) {
                    if ev.is_writable() {
                        l.writable = true;
                    }
                    if !ready.contains(&key) {
                        ready.push(key);
                    }
                }
            }
            let mut failed: Vec<(usize, String)> = Vec::new();
            let mut batch: Vec<Event> = Vec::new();
            let mut targets = ShardSet::default();
            for key in ready.drain(..) {
                if let Err(why) = self.read(key, &mut scratch, &mut batch, &mut targets) {
                    failed.push((key, why));
                }
            }
            if !batch.is_empty() {
                ShardStats::add(&self.bus.stats.bus_received, batch.len() as u64);
                let batch: Arc<[Event]> = batch.into();
                for i in targets.iter().take_while(|&i| i < self.shards.len()) {
                    // Waits while the shard's inbox is full: the back-pressure reaches
                    // Redis, which buffers for its subscribers up to its own limit.
                    let _ = self.shards.shard(i).send(ShardMsg::Events(batch.clone()));
                }
            }
            for (key, l) in self.links.iter_mut() {
                if failed.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                // A quiet connection is asked for a sign of life; no answer in time means
                // Redis is gone even if no FIN or RST ever arrives. (In subscribed mode PING
                // answers ["pong", ""], which `on_reply` ignores; any bytes count.)
                match l.pinged {
                    Some(t) if t.elapsed() >= IDLE_PING => {
                        failed.push((key, format!("no answer to PING within {IDLE_PING:?}")));
                        continue;
                    }
                    None if l.heard.elapsed() >= IDLE_PING => {
                        resp::command(&mut l.outbuf, &[b"PING"]);
                        l.pinged = Some(Instant::now());
                    }
                    _ => {}
                }
                if let Err(e) = flush(l) {
                    failed.push((key, e.to_string()));
                }
            }
            for (key, why) in failed {
                if let Some(node) = self.links.get(key).map(|l| l.node.clone()) {
                    log::warn!(
                        "cluster bus: lost redis {node} ({}): {why}; publishes through it answer 503 until it is back",
                        self.bus.cfg.url()
                    );
                    self.drop_link(key, true);
                }
            }
        }
    }

    /// Whether some server of the layout has no subscriber connection.
    fn missing_links(&self) -> bool {
        self.topo
            .nodes
            .iter()
            .any(|n| !self.link_of.contains_key(n))
    }

    /// Up when the layout is complete and every server in it is connected. (A layout being
    /// read again after a slot moved does not count as down: publishes follow redirects.)
    fn update_up(&self) {
        let up = !self.topo.nodes.is_empty() && self.topo.uncovered() == 0 && !self.missing_links();
        if up != self.bus.up.load(Ordering::Relaxed) {
            self.bus
                .stats
                .bus_up
                .store(u64::from(up), Ordering::Relaxed);
            self.bus.up.store(up, Ordering::Release);
        }
    }

    /// Starts, when due, what the bus lacks: a read of the layout when it is stale, and a
    /// connection to each server of the layout that has none. Both run on threads of their own
    /// and report through [`Attempt`]s, so that a server that does not answer never holds up the
    /// messages of the others.
    fn start_attempts(&mut self) {
        let now = Instant::now();
        if now < self.retry_at {
            return;
        }
        if self.stale && !self.bus.cfg.cluster {
            self.stale = false; // one server: its address is its layout
        }
        if self.stale
            && !self.reading_layout
            && self
                .last_layout
                .map_or(true, |t| now >= t + LAYOUT_MIN_INTERVAL)
        {
            self.reading_layout = true;
            self.last_layout = Some(now);
            // The server that said a slot moved first, then the known masters, then the seeds.
            let mut candidates: Vec<RedisNode> = self.layout_hint.iter().cloned().collect();
            for known in self.topo.nodes.iter().chain(&self.bus.cfg.nodes) {
                if !candidates.contains(known) {
                    candidates.push(known.clone());
                }
            }
            let cfg = self.bus.cfg.clone();
            self.attempt(move || Attempt::Layout(read_layout(&cfg, &candidates)));
        }
        for node in self.topo.nodes.clone() {
            if self.link_of.contains_key(&node) || self.connecting.contains(&node) {
                continue;
            }
            self.connecting.push(node.clone());
            let cfg = self.bus.cfg.clone();
            self.attempt(move || {
                let conn = RedisConn::connect(&node, &cfg, CONNECT_TIMEOUT);
                Attempt::Connected(node, conn)
            });
        }
    }

    /// Runs `work` on a thread of its own and hands its outcome back to the loop.
    fn attempt(&self, work: impl FnOnce() -> Attempt + Send + 'static) {
        let tx = self.attempts_tx.clone();
        let bus = self.bus.clone();
        let spawned = std::thread::Builder::new()
            .name("causeloop-bus-connect".into())
            .spawn(move || {
                let _ = tx.send(work());
                let _ = bus.waker.wake();
            });
        if let Err(e) = spawned {
            // Reported like a failed attempt: the loop retries after the backoff.
            let _ = self.attempts_tx.send(Attempt::Failed(format!(
                "cannot start a connect thread: {e}"
            )));
        }
    }

    /// When [`Runner::start_attempts`] next has something to do, if ever.
    fn next_attempt(&self) -> Option<Instant> {
        let layout = (self.stale && !self.reading_layout).then(|| {
            self.last_layout.map_or(self.retry_at, |t| {
                self.retry_at.max(t + LAYOUT_MIN_INTERVAL)
            })
        });
        let connect = self
            .topo
            .nodes
            .iter()
            .any(|n| !self.link_of.contains_key(n) && !self.connecting.contains(n))
            .then_some(self.retry_at);
        layout.into_iter().chain(connect).min()
    }

    /// Takes the outcome of a layout read or a connect.
    fn on_attempt(&mut self, attempt: Attempt, ready: &mut Vec<usize>) {
        match attempt {
            Attempt::Layout(Ok(topo)) => {
                self.reading_layout = false;
                self.layout_hint = None;
                self.stale = false;
                ShardStats::add(&self.bus.stats.bus_layout_reads, 1);
                let topo = Arc::new(topo);
                self.bus.slots_moved(&self.topo.changed_slots(&topo));
                // Connections to servers that no longer own slots (a failed master that came
                // back as a replica) go; their subscriptions are made again where they belong.
                let gone: Vec<usize> = self
                    .links
                    .iter()
                    .filter(|(_, l)| !topo.nodes.contains(&l.node))
                    .map(|(k, _)| k)
                    .collect();
                for key in gone {
                    self.drop_link(key, false);
                }
                *lock(&self.bus.topology) = topo.clone();
                self.topo = topo;
                // Every workspace whose subscription is not in force is tried again now.
                for (ws, w) in &self.wants {
                    if !w.requested && !w.shards.is_empty() {
                        self.pending.insert(ws.clone());
                    }
                }
                let uncovered = self.topo.uncovered();
                if uncovered > 0 {
                    // A cluster that is partly down: serve the slots that have a master, and
                    // read the layout again until every slot has one.
                    self.stale = true;
                    self.retry_later(format!("{uncovered} hash slots have no master"));
                }
            }
            Attempt::Layout(Err(why)) => {
                self.reading_layout = false;
                self.retry_later(why);
            }
            Attempt::Connected(node, result) => {
                self.connecting.retain(|n| *n != node);
                let conn = match result {
                    Ok(conn) => conn,
                    Err(e) => {
                        if self.bus.cfg.cluster {
                            // An unreachable master may have been replaced by a replica.
                            self.stale = true;
                        }
                        return self.retry_later(format!("redis {node}: {e}"));
                    }
                };
                if !self.topo.nodes.contains(&node) || self.link_of.contains_key(&node) {
                    return; // the layout changed meanwhile: not needed
                }
                let publish_from = if self.lost {
                    Instant::now() + PUBLISH_SETTLE
                } else {
                    Instant::now()
                };
                match self.register(&node, conn, publish_from) {
                    Ok(key) => ready.push(key),
                    Err(e) => return self.retry_later(format!("redis {node}: {e}")),
                }
                if self.lost {
                    ShardStats::add(&self.bus.stats.bus_reconnects, 1);
                }
                log::info!(
                    "cluster bus: connected to redis {node} ({})",
                    self.bus.cfg.url()
                );
                if !self.missing_links() {
                    self.lost = false;
                    self.backoff = BACKOFF_MIN;
                }
            }
            Attempt::Failed(why) => self.retry_later(why),
        }
    }

    /// Logs why the bus is not whole and schedules the next attempts after the backoff.
    fn retry_later(&mut self, why: String) {
        ShardStats::add(&self.bus.stats.bus_connect_failures, 1);
        let wait = jittered(self.backoff);
        self.retry_at = Instant::now() + wait;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        log::warn!(
            "cluster bus: {}: {why}; retrying in {wait:?}",
            self.bus.cfg.url()
        );
    }

    /// Makes `conn` the subscriber connection to `node`; publishes to it start at
    /// `publish_from`.
    fn register(
        &mut self,
        node: &RedisNode,
        conn: RedisConn,
        publish_from: Instant,
    ) -> io::Result<usize> {
        let (std_stream, leftover) = conn.into_parts();
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        let entry = self.links.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(LINK_BASE + key),
            Ready::READABLE | Ready::WRITABLE,
        )?;
        entry.insert(Link {
            node: node.clone(),
            stream,
            inbuf: leftover,
            outbuf: Vec::new(),
            writable: true,
            heard: Instant::now(),
            pinged: None,
        });
        self.link_of.insert(node.clone(), key);
        lock(&self.bus.connected).insert(node.clone(), publish_from);
        Ok(key)
    }

    /// Closes connection `key`. Its subscriptions are forgotten; the workspaces still wanted
    /// are subscribed again once a connection to their server is up. `lost`: it failed (as
    /// opposed to being closed because its server left the layout).
    fn drop_link(&mut self, key: usize, lost: bool) {
        let mut l = self.links.remove(key);
        let _ = self.poll.registry().deregister(&mut l.stream);
        self.link_of.remove(&l.node);
        lock(&self.bus.connected).remove(&l.node);
        self.forget_subscriptions(key, |_| true);
        if lost {
            self.lost = true;
            if self.bus.cfg.cluster {
                self.stale = true;
            }
            self.retry_at = Instant::now() + jittered(self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.update_up();
    }

    /// Forgets the subscriptions made on connection `key` to the workspaces `which` picks:
    /// the workspaces still wanted become pending, the rest are dropped.
    fn forget_subscriptions(&mut self, key: usize, which: impl Fn(&str) -> bool) {
        let pending = &mut self.pending;
        self.wants.retain(|ws, w| {
            if w.link != Some(key) || !which(ws) {
                return true;
            }
            w.reset();
            if w.shards.is_empty() {
                return false;
            }
            pending.insert(ws.clone());
            true
        });
    }

    /// Subscribes every pending workspace whose server is connected; the rest stay pending. A
    /// layout being read again does not hold this up: where the current one is wrong, Redis
    /// answers `MOVED` with the right master, which is tried at once.
    fn subscribe_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut wait = HashSet::new();
        for ws in std::mem::take(&mut self.pending) {
            let Some(w) = self.wants.get_mut(&ws) else {
                continue;
            };
            if w.shards.is_empty() || w.requested {
                continue;
            }
            let channel = wire::channel(&ws);
            let key = self
                .topo
                .node_for(&channel)
                .and_then(|n| self.link_of.get(&self.topo.nodes[n]).copied());
            let Some(key) = key else {
                wait.insert(ws);
                continue;
            };
            if w.link != Some(key) {
                // Confirmations still owed by another connection are ignored when they come
                // (they are not about this subscription), so they no longer count.
                w.in_flight = 0;
            }
            w.requested = true;
            w.live = false;
            w.in_flight += 1;
            w.link = Some(key);
            let l = &mut self.links[key];
            resp::command(&mut l.outbuf, &[self.bus.dialect.subscribe, &channel]);
            // A failed flush shows up as a read or write error on the next turn.
            let _ = flush(l);
        }
        self.pending = wait;
    }

    fn on_interest(&mut self, change: BusInterest) {
        match change {
            BusInterest::Add(ws, shard) => {
                let w = self.wants.entry(ws.clone()).or_default();
                w.shards.insert(shard);
                if w.live {
                    let _ = self.shards.shard(shard).send(ShardMsg::Live(ws));
                } else if !w.requested {
                    self.pending.insert(ws);
                }
            }
            BusInterest::Remove(ws, shard) => {
                let Some(w) = self.wants.get_mut(&ws) else {
                    return;
                };
                w.shards.remove(shard);
                if !w.shards.is_empty() {
                    return;
                }
                match w.link.filter(|_| w.requested) {
                    Some(key) => {
                        w.requested = false;
                        w.live = false;
                        w.in_flight += 1;
                        let l = &mut self.links[key];
                        resp::command(
                            &mut l.outbuf,
                            &[self.bus.dialect.unsubscribe, &wire::channel(&ws)],
                        );
                        let _ = flush(l);
                    }
                    None if w.in_flight == 0 => {
                        self.wants.remove(&ws);
                    }
                    None => {}
                }
            }
        }
    }

    /// Reads everything connection `key` has, then handles each complete reply.
    fn read(
        &mut self,
        key: usize,
        scratch: &mut [u8],
        batch: &mut Vec<Event>,
        targets: &mut ShardSet,
    ) -> Result<(), String> {
        let Some(l) = self.links.get_mut(key) else {
            return Ok(());
        };
        let mut failed = None;
        loop {
            match l.stream.read(scratch) {
                Ok(0) => {
                    failed = Some("connection closed by Redis".to_string());
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
        // Replies already read are handled even when the connection then failed.
        let inbuf = std::mem::take(&mut l.inbuf);
        let mut used = 0;
        while let Some((reply, n)) =
            resp::parse(&inbuf[used..], MAX_REPLY_BULK).map_err(|e| e.to_string())?
        {
            used += n;
            self.on_reply(key, &reply, batch, targets)?;
        }
        if let Some(l) = self.links.get_mut(key) {
            l.inbuf = inbuf;
            l.inbuf.drain(..used);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Handles one reply on connection `key`.
    fn on_reply(
        &mut self,
        key: usize,
        reply: &Reply,
        batch: &mut Vec<Event>,
        targets: &mut ShardSet,
    ) -> Result<(), String> {
        if let Some(m) = resp::pubsub_message(reply) {
            let Some(ws) = wire::workspace_of(m.channel) else {
                return Ok(());
            };
            if !self.wants.get(ws).is_some_and(|w| w.live) {
                return Ok(()); // a message racing an unsubscribe
            }
            match wire::decode(m.payload, self.limits) {
                Ok(got) => {
                    targets.union(self.shards.interest().shards_for(ws));
                    batch.push(Event {
                        workspace_id: ws.into(),
                        user_id: got.user_id,
                        frame: got.frame,
                        accepted_at: Instant::now(),
                    });
                }
                Err(why) => {
                    ShardStats::add(&self.bus.stats.bus_invalid, 1);
                    log::warn!(workspace = ws, reason = why.as_str(); "cluster bus: dropped an invalid message");
                }
            }
            return Ok(());
        }
        if let Reply::Error(e) = reply {
            // The slot moved before the subscription arrived: every subscription to it on this
            // connection is made again at the new master, once the layout is read.
            let Some((slot, owner)) = topology::redirect(e) else {
                return Err(format!(
                    "Redis refused a subscription: {}{}",
                    String::from_utf8_lossy(e),
                    if self.bus.cfg.cluster {
                        " (sharded pub/sub needs Redis 7.0 or later)"
                    } else {
                        ""
                    }
                ));
            };
            ShardStats::add(&self.bus.stats.bus_redirects, 1);
            // This node's publishes to the slot wait, as for any slot that changed masters.
            self.bus.slots_moved(&[slot]);
            self.layout_hint = Some(owner.clone());
            Arc::make_mut(&mut self.topo).moved(slot, owner);
            self.stale = true;
            self.forget_subscriptions(key, |ws| topology::slot(&wire::channel(ws)) == slot);
            return Ok(());
        }
        // A subscription confirmation: [kind, channel, count].
        let Reply::Array(Some(items)) = reply else {
            return Ok(());
        };
        let (Some(kind), Some(channel)) = (
            items.first().and_then(Reply::as_bytes),
            items.get(1).and_then(Reply::as_bytes),
        ) else {
            return Ok(());
        };
        let Some(ws) = wire::workspace_of(channel) else {
            return Ok(());
        };
        let Some((ws, w)) = self.wants.get_key_value(ws) else {
            return Ok(());
        };
        let ws = ws.clone();
        if w.link != Some(key) {
            return Ok(()); // about a subscription this node has since made elsewhere
        }
        let w = self.wants.get_mut(&ws).expect("present above");
        let dialect = self.bus.dialect;
        if kind == dialect.unsubscribed && w.in_flight == 0 && w.requested {
            // Nothing asked for this: a cluster moved the slot and ended the subscription.
            // Subscribe again at the slot's new master.
            log::info!(
                workspace = &*ws;
                "cluster bus: Redis moved the workspace's hash slot {}; subscribing at its new master",
                topology::slot(channel)
            );
            w.reset();
            self.pending.insert(ws);
            self.stale = true;
            self.layout_hint = self.links.get(key).map(|l| l.node.clone());
            self.bus.slots_moved(&[topology::slot(channel)]);
            return Ok(());
        }
        w.in_flight = w.in_flight.saturating_sub(1);
        if w.in_flight > 0 {
            return Ok(()); // a later command for this channel will settle it
        }
        if kind == dialect.subscribed && w.requested {
            w.live = true;
            for i in w.shards.iter().take_while(|&i| i < self.shards.len()) {
                let _ = self.shards.shard(i).send(ShardMsg::Live(ws.clone()));
            }
        } else if !w.requested && w.shards.is_empty() {
            self.wants.remove(&ws);
        } else if !w.requested {
            // Wanted again while its unsubscribe was on the way.
            w.link = None;
            self.pending.insert(ws);
        }
        Ok(())
    }
}

/// Asks `candidates` in turn for the cluster's layout (`CLUSTER SLOTS`).
fn read_layout(cfg: &RedisConfig, candidates: &[RedisNode]) -> Result<Topology, String> {
    let mut errors = Vec::new();
    for node in candidates {
        let asked = RedisConn::connect(node, cfg, CONNECT_TIMEOUT)
            .and_then(|mut c| c.call(&[b"CLUSTER", b"SLOTS"]));
        match asked {
            Ok(reply) => match Topology::from_cluster_slots(&reply, node) {
                Ok(t) if !t.nodes.is_empty() => return Ok(t),
                Ok(_) => errors.push(format!("{node} knows no slot owner yet")),
                Err(e) => errors.push(format!("{node}: {e}")),
            },
            Err(e) => errors.push(format!("{node}: {e}")),
        }
    }
    Err(format!(
        "no Redis Cluster node gave its layout ({})",
        errors.join("; ")
    ))
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
