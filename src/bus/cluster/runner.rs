//! The bus thread: one mio poll loop over every Redis connection of this node (a subscriber and
//! a command connection per server, and a layout read when one is under way), the publishers'
//! queue and the shards' interest changes. Each wake-up takes at most a budget of each input
//! ([`READ_BUDGET`] per connection, [`PUBLISHES_PER_TURN`], [`INTEREST_PER_TURN`]) and polls
//! again without waiting when one ran out, so one busy peer cannot starve the rest. Nothing here
//! blocks: not on Redis (every connection is non-blocking, every wait a deadline), not on DNS
//! (a helper thread), not on a shard (a batch a full inbox cannot take waits here, and Redis is
//! not read while [`SHARD_BACKLOG`] batches wait).

use super::layout::{LayoutRead, Resolver};
use super::link::{Drain, Incoming, Link, LinkError, MAX_OUTPUT};
use super::order::{self, Out, Read, Streams};
use super::publish::{Msg, Publishing};
use super::subscriptions::{Action, Command, Confirmation, Subscriptions};
use super::{BusUnavailable, ClusterBus, Inputs, Submitted, PUBLISH_DEADLINE};
use crate::bus::resp::{self, Reply};
use crate::bus::topology::{self, Topology};
use crate::bus::wire::{self, WireLimits};
use crate::config::{RedisConfig, RedisNode};
use crate::dispatch::inbox::RecordAnswer;
use crate::dispatch::inbox::{ShardMsg, TrySend, Waiter};
use crate::dispatch::interest::ShardSet;
use crate::dispatch::RecordOp;
use crate::dispatch::{BusInterest, Links, PendingBatch, Progress};
use crate::event::{Event, GapReason};
use crate::history::records::{Record, RecordKey};
use crate::history::{HistoryStore, Position};
use crate::metrics::{BusStats, ShardStats};
use crossbeam_channel::Receiver;
use mio::{Events, Poll, Token};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connection `k` of the slab is token `LINK_BASE + k`.
const LINK_BASE: usize = 1;
/// Connect and handshake deadline for each connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short on purpose: Redis pub/sub keeps no backlog, so the time between Redis coming back and a
/// node re-subscribing is a window in which that node's subscribers miss events that other nodes
/// already publish again. A connect attempt a second per node costs Redis nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After a reconnect, a node holds its publishes back this long (answering 503) so that the
/// other nodes, which lost Redis at the same moment, have re-subscribed before the backlog its
/// publishers resend goes out: Redis would deliver it only to the nodes already back. Twice the
/// longest jittered backoff, plus a margin for the connect itself.
pub const PUBLISH_SETTLE: Duration = Duration::from_millis(2000);
/// A silent subscriber connection is pinged after this long, and given up after as long again:
/// a Redis that vanished without a FIN is noticed within ten seconds.
const IDLE_PING: Duration = Duration::from_secs(5);
/// The layout is read at most this often, so that masters whose views of it disagree for a
/// moment (while a change spreads through the cluster) cannot spin the bus thread.
const LAYOUT_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes read from one connection per wake-up.
const READ_BUDGET: usize = 256 * 1024;
/// Publishes taken from the queue per wake-up.
const PUBLISHES_PER_TURN: usize = 256;
/// Interest changes taken from the shards per wake-up.
const INTEREST_PER_TURN: usize = 4096;
/// Batches waiting for room in a shard's inbox above which no subscriber connection is read:
/// the back-pressure reaches Redis, which buffers for this node up to its own limit.
pub const SHARD_BACKLOG: usize = 64;
/// How long a stopping bus thread takes at most to hand Redis the last resume records.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// The longest the loop sleeps while a connect, a handshake or a publish is outstanding (their
/// deadlines are checked on each turn).
const DEADLINE_TICK: Duration = Duration::from_millis(50);

/// A command on a command connection waiting for its answer.
enum Pending {
    /// A message of a publish.
    Publish(Msg),
    /// A read of a workspace's stream ([`order::Read`]), with its id.
    Read(Arc<str>, u64, Read),
    /// `causeloop_fence`, or a resume record kept or dropped: the answer only logged if an
    /// error.
    Quiet(&'static str),
    /// `RPUSH` of a resume record (its workspace, key and value, to keep it again should the
    /// cluster not be ready for it).
    Keep(Arc<str>, RecordKey, String),
    /// `LPOP` of a resume record for a connection.
    Take(TakeAsk),
    /// The last command of keeping a resume record: its answer lets the connection that
    /// waits for it (shard, connection, generation) close.
    Kept(Option<(usize, u32, u32)>),
    /// The events a resume needs that this node's history copy lacks (`XRANGE`), read
    /// before the record is handed over.
    Backfill(TakeAsk, Record, Position),
}

/// A shard's connection waiting for its resume record.
#[derive(Clone, Debug)]
struct TakeAsk {
    ws: Arc<str>,
    key: RecordKey,
    shard: usize,
    conn: u32,
    gen: u32,
    /// Times Redis redirected it (a slot moving).
    redirects: u8,
    /// When the shard asked: it is asked again (a cluster settling) until [`TAKE_DEADLINE`].
    asked: Instant,
}

/// Resume records kept on the node while Redis is away, at most (beyond: counted in
/// `causeloop_bus_records_lost_total`).
const DEFERRED_RECORDS: usize = 65_536;

/// How long a master that answered `CLUSTERDOWN` is given before publishes go to it again.
const CLUSTER_SETTLE: Duration = Duration::from_millis(250);

/// How long a resume record's take is asked again while its master is settling (the shard
/// waits up to `--handshake-timeout`).
const TAKE_DEADLINE: Duration = Duration::from_secs(5);

/// The message field of a history stream entry (`[id, [field, value, ...]]`, field `m`).
fn entry_message(entry: &Reply) -> Option<&[u8]> {
    let Reply::Array(Some(parts)) = entry else {
        return None;
    };
    let Some(Reply::Array(Some(fields))) = parts.get(1) else {
        return None;
    };
    fields
        .chunks(2)
        .find(|f| f[0].as_bytes() == Some(b"m"))
        .and_then(|f| f.get(1))
        .and_then(Reply::as_bytes)
}

/// What a connection is for.
enum Role {
    /// `(S)SUBSCRIBE`s and the messages they bring.
    Subscriber,
    /// Publishes, the library load and stream reads, pipelined: the commands sent and not
    /// answered yet, in order, with when.
    Publisher(VecDeque<(Pending, Instant)>),
    /// One `CLUSTER SLOTS`.
    Layout,
}

struct Conn {
    link: Link,
    role: Role,
    /// Its readiness was acted on.
    announced: bool,
}

/// Something on its way to the shards, in order.
enum Outgoing {
    Events(PendingBatch),
    /// A message for the shards in the set that have not taken it yet.
    One(ShardMsgKind, ShardSet),
}

/// The per-workspace messages the bus sends its shards.
#[derive(Clone)]
enum ShardMsgKind {
    Live(Arc<str>, Option<Position>),
    Gap(Arc<str>, GapReason, Option<u64>),
    Record(RecordAnswer),
    Kept(u32, u32),
}

impl ShardMsgKind {
    fn message(&self) -> ShardMsg {
        match self {
            ShardMsgKind::Live(ws, head) => ShardMsg::Live(ws.clone(), *head),
            ShardMsgKind::Gap(ws, reason, since) => ShardMsg::Gap(ws.clone(), *reason, *since),
            ShardMsgKind::Record(a) => ShardMsg::Record(a.clone()),
            ShardMsgKind::Kept(k, g) => ShardMsg::RecordKept(*k, *g),
        }
    }
}

/// What taking in a message from Redis needs: borrowed from the bus thread's state beside the
/// connection the message is read from, in place.
struct Intake<'a> {
    subs: &'a Subscriptions,
    limits: WireLimits,
    stats: &'a BusStats,
    batch: &'a mut Vec<Event>,
    /// With history on (`--bus-wire 2`): where each workspace's stream stands, and what it
    /// asks for.
    streams: Option<&'a mut Streams<wire::Received>>,
    outs: &'a mut Vec<Out<wire::Received>>,
}

impl Intake<'_> {
    /// Checks a message like an HTTP publish and adds its event, its frame built once, to this
    /// wake-up's batch; an invalid one is counted and logged, never delivered.
    fn take(&mut self, channel: &[u8], payload: &[u8], now: Instant) {
        let Some(ws) = wire::workspace_of(channel) else {
            return;
        };
        if !self.subs.is_live(ws) {
            return; // a message racing an unsubscribe
        }
        match wire::decode(payload, self.limits) {
            Ok(got) => match (&mut self.streams, got.pos) {
                (Some(streams), Some(pos)) => {
                    if let Some(name) = self.subs.name(ws) {
                        streams.live(&name, pos, got.ts_ms, got, now, self.outs);
                    }
                }
                _ => self.batch.push(Event {
                    workspace_id: ws.into(),
                    user_id: got.user_id,
                    frame: got.frame,
                    accepted_at: now,
                    ts_ms: got.ts_ms,
                    pos: Position::default(),
                    deflated: Default::default(),
                }),
            },
            Err(why) => {
                ShardStats::add(&self.stats.bus_invalid, 1);
                log::warn!(workspace = ws, reason = why.as_str(); "cluster bus: dropped an invalid message");
            }
        }
    }
}

/// What the bus thread starts from (built before the shards, started after them).
pub struct BusThread {
    bus: Arc<ClusterBus>,
    cfg: RedisConfig,
    poll: Poll,
    inputs: Inputs,
}

impl BusThread {
    pub(super) fn new(
        bus: Arc<ClusterBus>,
        cfg: RedisConfig,
        poll: Poll,
        interest: Receiver<BusInterest>,
        publishes: Receiver<Submitted>,
    ) -> BusThread {
        BusThread {
            bus,
            cfg,
            poll,
            inputs: Inputs {
                interest,
                publishes,
            },
        }
    }

    /// Runs the bus until [`ClusterBus::stop`].
    pub fn run(self, shards: Arc<Links>, limits: WireLimits) {
        let mirror = self.bus.mirror.clone();
        shards.room().register(Waiter::Bus, self.bus.waker.clone());
        let resolver = match Resolver::start(self.bus.waker.clone()) {
            Ok(r) => r,
            Err(e) => {
                log::error!("cluster bus: cannot start its resolver thread: {e}");
                return;
            }
        };
        let topo = if self.cfg.redis_cluster {
            Topology::unknown()
        } else {
            Topology::single(self.cfg.nodes[0].clone())
        };
        let mut r = Runner {
            bus: self.bus,
            cfg: self.cfg,
            shards,
            limits,
            poll: self.poll,
            inputs: self.inputs,
            subs: Subscriptions::default(),
            publishing: Publishing::default(),
            conns: Slab::new(),
            subscriber_of: HashMap::new(),
            publisher_of: HashMap::new(),
            publish_from: HashMap::new(),
            topo,
            stale: true,
            layout: None,
            layout_conn: None,
            layout_hint: None,
            last_layout: None,
            lost: false,
            backoff: BACKOFF_MIN,
            retry_at: Instant::now(),
            resolver,
            outgoing: VecDeque::new(),
            actions: Vec::new(),
            batch: Vec::new(),
            streams: mirror.as_ref().map(|_| Streams::default()),
            outs: Vec::new(),
            mirror,
            retry_reads: Vec::new(),
            retry_reads_at: Instant::now(),
            live_waits: HashMap::new(),
            retry_takes: Vec::new(),
            deferred_records: Vec::new(),
            failed: Vec::new(),
            more: false,
            paused: false,
        };
        r.run();
    }
}

struct Runner {
    bus: Arc<ClusterBus>,
    cfg: RedisConfig,
    shards: Arc<Links>,
    limits: WireLimits,
    poll: Poll,
    inputs: Inputs,
    subs: Subscriptions,
    publishing: Publishing,
    conns: Slab<Conn>,
    subscriber_of: HashMap<RedisNode, usize>,
    publisher_of: HashMap<RedisNode, usize>,
    /// The servers with a ready subscriber connection, each with the instant publishes to it
    /// may start: at once after the first connection, [`PUBLISH_SETTLE`] after a reconnect. A
    /// publish goes only to these: what goes elsewhere would miss this node's own subscribers.
    publish_from: HashMap<RedisNode, Instant>,
    topo: Topology,
    /// The layout must be read (again): at start, after a redirect, after a lost connection (a
    /// master may have failed over).
    stale: bool,
    layout: Option<LayoutRead>,
    layout_conn: Option<usize>,
    /// The server to ask for the layout first: the one that said a slot moved.
    layout_hint: Option<RedisNode>,
    last_layout: Option<Instant>,
    /// A connection was lost since the last one was made: the next one is a reconnect.
    lost: bool,
    backoff: Duration,
    retry_at: Instant,
    resolver: Resolver,
    outgoing: VecDeque<Outgoing>,
    actions: Vec<Action>,
    /// The events read this turn.
    batch: Vec<Event>,
    /// With history on (`--bus-wire 2`): each workspace's stream ([`order`]), what it asked
    /// for and not done yet, and this node's copy of the recent history (positions from
    /// Redis), which the shards replay from.
    streams: Option<Streams<wire::Received>>,
    outs: Vec<Out<wire::Received>>,
    mirror: Option<Arc<dyn HistoryStore>>,
    /// Stream reads that found no connection to go out on, asked again on a later turn.
    retry_reads: Vec<(Arc<str>, u64)>,
    retry_reads_at: Instant,
    /// Record takes asked again on a later turn.
    retry_takes: Vec<TakeAsk>,
    /// Resume records made while their master was unreachable, with when: kept in Redis once
    /// it is back, if their resume window has not passed.
    deferred_records: Vec<(Instant, Arc<str>, RecordKey, String)>,
    /// Shards to tell that a workspace is live once its stream is located.
    live_waits: HashMap<Arc<str>, ShardSet>,
    /// Connections to drop at the end of the step that found them failed.
    failed: Vec<(usize, String)>,
    /// A budget ran out: poll again without waiting.
    more: bool,
    /// Subscriber connections are not read (the shards' backlog is full).
    paused: bool,
}

impl Runner {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if self.bus.stop.load(Ordering::Acquire) {
                return self.shutdown();
            }
            let now = Instant::now();
            self.more = false;
            for (node, why) in self.resolver.take_answers(now) {
                if self.layout.as_ref().and_then(|l| l.current()) == Some(&node) {
                    self.layout.as_mut().expect("checked").failed(why);
                } else {
                    self.retry_later(format!("redis {node}: {why}"));
                }
            }
            self.start_attempts(now);
            self.take_interest();
            self.subscribe_pending();
            self.take_publishes(now);
            for msg in self.publishing.release(now) {
                self.send(msg, now);
            }
            self.publishing.expire(now);
            self.retry_stream_reads(now);
            self.advance_outgoing();
            self.flush_all();
            self.drop_failed();
            self.announce_ready(now);
            self.update_up();
            self.gauges();

            let timeout = if self.more {
                Duration::ZERO
            } else {
                self.next_timeout(now)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("cluster bus: poll failed: {e}");
                    return self.shutdown();
                }
            }
            for ev in events.iter() {
                let Some(key) = ev.token().0.checked_sub(LINK_BASE) else {
                    continue;
                };
                let Some(c) = self.conns.get_mut(key) else {
                    continue;
                };
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    c.link.readable = true;
                }
                if ev.is_writable() || ev.is_error() {
                    if let Err(e) = c.link.on_writable() {
                        self.failed.push((key, e.to_string()));
                    }
                }
            }
            self.drop_failed();
            self.read_all();
            // Deadlines are checked after reading, so that answers that arrived while this
            // thread was not running (a busy machine) count before a connection is given up
            // as silent: giving up a live one answers 503 to publishes Redis did take.
            self.check_deadlines(Instant::now());
            self.drop_failed();
        }
    }

    /// How long the loop may sleep.
    fn next_timeout(&self, now: Instant) -> Duration {
        let mut until = now + IDLE_PING;
        let waiting_connect = self
            .topo
            .nodes
            .iter()
            .any(|n| !self.subscriber_of.contains_key(n))
            || (self.stale && self.layout.is_none());
        if waiting_connect {
            let mut at = self.retry_at;
            if let Some(t) = self.last_layout.filter(|_| self.stale) {
                at = at.max(t + LAYOUT_MIN_INTERVAL);
            }
            until = until.min(at);
        }
        if let Some(t) = self.publishing.next_due() {
            until = until.min(t);
        }
        let outstanding = self.conns.iter().any(|(_, c)| {
            !c.link.is_ready() || matches!(&c.role, Role::Publisher(sent) if !sent.is_empty())
        });
        if outstanding
            || self.layout.is_some()
            || !self.retry_reads.is_empty()
            || !self.retry_takes.is_empty()
            || !self.deferred_records.is_empty()
        {
            until = until.min(now + DEADLINE_TICK);
        }
        until.saturating_duration_since(now)
    }

    fn shutdown(&mut self) {
        self.keep_last_records();
        self.bus.up.store(false, Ordering::Release);
        self.publishing.fail_all(BusUnavailable::Stopped);
        while let Ok(s) = self.inputs.publishes.try_recv() {
            (s.done)(Err(BusUnavailable::Stopped));
        }
        for (_, c) in std::mem::take(&mut self.conns) {
            c.link.close(self.poll.registry());
        }
    }

    /// The resume records of the connections a drain just ended are kept in Redis before
    /// the connections to it close (for up to [`FINAL_FLUSH`]): their clients reconnect to
    /// another node, which resumes them from these.
    fn keep_last_records(&mut self) {
        if self.streams.is_none() {
            return;
        }
        let until = Instant::now() + FINAL_FLUSH;
        let mut events = Events::with_capacity(64);
        loop {
            self.take_interest();
            self.flush_all();
            self.drop_failed();
            let waiting = self.conns.iter().any(|(_, c)| {
                c.link.unsent() > 0 || matches!(&c.role, Role::Publisher(q) if !q.is_empty())
            });
            let now = Instant::now();
            if (!waiting && self.inputs.interest.is_empty()) || now >= until {
                return;
            }
            let _ = self
                .poll
                .poll(&mut events, Some((until - now).min(DEADLINE_TICK)));
            for ev in events.iter() {
                let Some(key) = ev.token().0.checked_sub(LINK_BASE) else {
                    continue;
                };
                if let Some(c) = self.conns.get_mut(key) {
                    c.link.readable = true;
                    if ev.is_writable() {
                        if let Err(e) = c.link.on_writable() {
                            self.failed.push((key, e.to_string()));
                        }
                    }
                }
            }
            self.read_all();
            self.drop_failed();
        }
    }

    fn gauges(&self) {
        let s = &self.bus.stats;
        s.bus_pending
            .store(self.subs.pending() as u64, Ordering::Relaxed);
        s.bus_shard_backlog
            .store(self.outgoing.len() as u64, Ordering::Relaxed);
        if let Some(streams) = &self.streams {
            s.bus_stream_held
                .store(streams.held() as u64, Ordering::Relaxed);
            s.bus_stream_overflows
                .store(streams.overflows, Ordering::Relaxed);
        }
        s.bus_publish_queue.store(
            (self.publishing.len() + self.inputs.publishes.len()) as u64,
            Ordering::Relaxed,
        );
    }

    /// Up when the layout is complete and every server in it has a ready subscriber connection.
    /// (A layout being read again after a slot moved does not count as down: publishes follow
    /// redirects.)
    fn update_up(&self) {
        let up = !self.topo.nodes.is_empty()
            && self.topo.uncovered() == 0
            && self
                .topo
                .nodes
                .iter()
                .all(|n| self.publish_from.contains_key(n));
        if up != self.bus.up.load(Ordering::Relaxed) {
            self.bus
                .stats
                .bus_up
                .store(u64::from(up), Ordering::Relaxed);
            self.bus.up.store(up, Ordering::Release);
        }
    }

    // ---- connections -------------------------------------------------------------------

    /// Opens a connection to `node` for `role`, if its address is known (otherwise it is being
    /// resolved, and the caller tries again on a later turn).
    fn open(
        &mut self,
        node: &RedisNode,
        role: Role,
        now: Instant,
    ) -> Result<Option<usize>, String> {
        let Some(addr) = self.resolver.address(node, now) else {
            return Ok(None);
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // With `--bus-wire 2` the library is there before any subscription or publish.
        let functions =
            (self.bus.v2.is_some() && !matches!(role, Role::Layout)).then_some(super::FUNCTIONS);
        let link = Link::connect(
            node.clone(),
            addr,
            &self.cfg,
            functions,
            self.poll.registry(),
            Token(LINK_BASE + key),
            now + CONNECT_TIMEOUT,
        )
        .map_err(|e| format!("redis {node}: {e}"))?;
        entry.insert(Conn {
            link,
            role,
            announced: false,
        });
        Ok(Some(key))
    }

    /// Opens a command connection to `node`.
    fn open_publisher(&mut self, node: &RedisNode, now: Instant) -> Result<Option<usize>, String> {
        self.open(node, Role::Publisher(VecDeque::new()), now)
    }

    /// The command connection to the master of `ws`'s slot, opened if there is none; `None`
    /// when this node cannot reach that master now.
    fn command_conn_for(&mut self, ws: &str, now: Instant) -> Option<usize> {
        let n = self.topo.node_for(&wire::channel(ws))?;
        let node = self.topo.nodes[n].clone();
        if !self.publish_from.contains_key(&node) {
            return None;
        }
        if let Some(&k) = self.publisher_of.get(&node) {
            return Some(k);
        }
        let k = self.open_publisher(&node, now).ok()??;
        self.publisher_of.insert(node, k);
        Some(k)
    }

    /// Sends a stream read ([`order::Read`]) for `ws` to its master.
    fn send_read(&mut self, ws: Arc<str>, id: u64, read: Read, now: Instant) {
        let Some(key) = self.command_conn_for(&ws, now) else {
            self.retry_reads.push((ws, id));
            return;
        };
        let base = wire::key_base(&ws);
        let c = &mut self.conns[key];
        let sent = match read {
            Read::Locate => c.link.command(&[
                b"HMGET",
                format!("{base}{}", wire::META_SUFFIX).as_bytes(),
                b"epoch",
                b"offset",
            ]),
            Read::After { offset, .. } => c.link.command(&[
                b"XRANGE",
                format!("{base}{}", wire::HISTORY_SUFFIX).as_bytes(),
                format!("{}-0", offset + 1).as_bytes(),
                b"+",
                b"COUNT",
                order::READ_PAGE.to_string().as_bytes(),
            ]),
        };
        if let Err(e) = sent {
            self.failed.push((key, e.to_string()));
        }
        ShardStats::add(&self.bus.stats.bus_stream_reads, 1);
        if let Role::Publisher(q) = &mut c.role {
            q.push_back((Pending::Read(ws, id, read), now));
        }
    }

    /// Asks Redis to start a new epoch for `ws` if `epoch` is still in force.
    fn send_fence(&mut self, ws: &str, epoch: u64, now: Instant) {
        let Some(key) = self.command_conn_for(ws, now) else {
            return; // every node that saw the offsets go back asks too
        };
        let base = wire::key_base(ws);
        let c = &mut self.conns[key];
        if let Err(e) = c.link.command(&[
            b"FCALL",
            b"causeloop_fence",
            b"2",
            format!("{base}{}", wire::META_SUFFIX).as_bytes(),
            format!("{base}{}", wire::HISTORY_SUFFIX).as_bytes(),
            epoch.to_string().as_bytes(),
        ]) {
            self.failed.push((key, e.to_string()));
        }
        if let Role::Publisher(q) = &mut c.role {
            q.push_back((Pending::Quiet("fencing an epoch"), now));
        }
    }

    /// A shard's request about a resume record.
    fn on_record_op(&mut self, op: RecordOp, now: Instant) {
        match op {
            RecordOp::Put {
                waiting,
                workspace,
                key,
                value,
            } => {
                let Some(k) = self.command_conn_for(&workspace, now) else {
                    // Redis is away: kept here until it is back (within the resume window),
                    // for a client that returns after it; the socket need not wait for it.
                    self.record_kept(waiting);
                    if self.deferred_records.len() >= DEFERRED_RECORDS {
                        ShardStats::add(&self.bus.stats.bus_records_lost, 1);
                        return;
                    }
                    self.deferred_records.push((now, workspace, key, value));
                    return;
                };
                let rk = wire::record_key(&workspace, &key);
                let window = self.bus.window.as_millis().max(1).to_string();
                let c = &mut self.conns[k];
                let sent = c
                    .link
                    .command(&[b"RPUSH", rk.as_bytes(), value.as_bytes()])
                    .and_then(|()| {
                        c.link
                            .command(&[b"PEXPIRE", rk.as_bytes(), window.as_bytes()])
                    });
                if let Err(e) = sent {
                    self.failed.push((k, e.to_string()));
                }
                if let Role::Publisher(q) = &mut c.role {
                    q.push_back((Pending::Keep(workspace, key, value), now));
                    q.push_back((Pending::Kept(waiting), now));
                }
            }
            RecordOp::Drop {
                workspace,
                key,
                value,
            } => {
                let Some(k) = self.command_conn_for(&workspace, now) else {
                    return;
                };
                let rk = wire::record_key(&workspace, &key);
                let c = &mut self.conns[k];
                if let Err(e) = c
                    .link
                    .command(&[b"LREM", rk.as_bytes(), b"1", value.as_bytes()])
                {
                    self.failed.push((k, e.to_string()));
                }
                if let Role::Publisher(q) = &mut c.role {
                    q.push_back((Pending::Quiet("dropping a resume record"), now));
                }
            }
            RecordOp::Take {
                workspace,
                key,
                shard,
                conn,
                gen,
            } => {
                let ask = TakeAsk {
                    ws: workspace,
                    key,
                    shard,
                    conn,
                    gen,
                    redirects: 0,
                    asked: now,
                };
                self.send_take(ask, now);
            }
        }
    }

    /// Sends the `LPOP` of `ask`'s record to its workspace's master.
    fn send_take(&mut self, ask: TakeAsk, now: Instant) {
        let Some(k) = self.command_conn_for(&ask.ws, now) else {
            return self.answer_take(ask, Err(()));
        };
        let rk = wire::record_key(&ask.ws, &ask.key);
        let c = &mut self.conns[k];
        if let Err(e) = c.link.command(&[b"LPOP", rk.as_bytes()]) {
            self.failed.push((k, e.to_string()));
        }
        if let Role::Publisher(q) = &mut c.role {
            q.push_back((Pending::Take(ask), now));
        }
    }

    /// Redis answered the `LPOP` of a resume record. A record behind what this node's history
    /// copy holds has the missing events read first (the client was served by another node).
    fn on_take_reply(&mut self, ask: TakeAsk, reply: Reply, now: Instant) {
        let record = match &reply {
            Reply::Bulk(None) => return self.answer_take(ask, Ok(None)),
            Reply::Bulk(Some(v)) => match Record::decode(v, now) {
                Some(r) => r,
                None => {
                    log::warn!(workspace = &*ask.ws; "cluster bus: an unreadable resume record in Redis; the client is told of a gap");
                    return self.answer_take(ask, Err(()));
                }
            },
            Reply::Error(e) if ask.redirects < 3 && self.note_redirect(e, now) => {
                let mut ask = ask;
                ask.redirects += 1;
                return self.send_take(ask, now);
            }
            Reply::Error(e) if e.starts_with(b"CLUSTERDOWN") && now < ask.asked + TAKE_DEADLINE => {
                // A master back, the cluster not settled yet: asked again shortly.
                self.retry_takes.push(ask);
                return;
            }
            _ => {
                log::warn!(workspace = &*ask.ws; "cluster bus: taking a resume record failed; the client is told of a gap");
                return self.answer_take(ask, Err(()));
            }
        };
        let head = self.stream_head(&ask.ws);
        // A record from before any event of the stream (epoch 0) resumes from its start.
        let after = if record.at.epoch == 0 {
            Position {
                epoch: head.epoch,
                offset: 0,
            }
        } else {
            record.at
        };
        let needs = head.epoch != 0 && after.epoch == head.epoch && after.offset < head.offset;
        let held = self.mirror.as_ref().and_then(|m| m.oldest(&ask.ws));
        let covered = held.is_some_and(|o| o.epoch == head.epoch && o.offset <= after.offset + 1);
        if !needs || covered {
            return self.answer_take(ask, Ok(Some(record)));
        }
        let Some(k) = self.command_conn_for(&ask.ws, now) else {
            return self.answer_take(ask, Ok(Some(record)));
        };
        let size = self.bus.v2.map_or(1, |v| v.size) as u64;
        let from = (after.offset + 1).max((head.offset + 1).saturating_sub(size));
        let hist = format!("{}{}", wire::key_base(&ask.ws), wire::HISTORY_SUFFIX);
        let c = &mut self.conns[k];
        if let Err(e) = c.link.command(&[
            b"XRANGE",
            hist.as_bytes(),
            format!("{from}-0").as_bytes(),
            format!("{}-0", head.offset).as_bytes(),
            b"COUNT",
            size.to_string().as_bytes(),
        ]) {
            self.failed.push((k, e.to_string()));
        }
        ShardStats::add(&self.bus.stats.bus_stream_reads, 1);
        if let Role::Publisher(q) = &mut c.role {
            q.push_back((Pending::Backfill(ask, record, head), now));
        }
    }

    /// The events a resume needed, read: kept in front of this node's history copy, then the
    /// record handed over.
    fn on_backfill_reply(
        &mut self,
        ask: TakeAsk,
        record: Record,
        head: Position,
        reply: Reply,
        now: Instant,
    ) {
        if let (Some(m), Reply::Array(Some(entries))) = (&self.mirror, &reply) {
            let mut older = Vec::with_capacity(entries.len());
            for msg in entries.iter().filter_map(entry_message) {
                if let Ok(r) = wire::decode(msg, self.limits) {
                    if let Some(pos) = r.pos.filter(|p| p.epoch == head.epoch) {
                        older.push(crate::history::ring::Older {
                            offset: pos.offset,
                            ts_ms: r.ts_ms,
                            user: r.user_id,
                            frame: r.frame,
                        });
                    }
                }
            }
            // Whatever was not there any more shows as a gap when the replay reaches it.
            m.rebase(&ask.ws, head.epoch, older, now);
        }
        self.answer_take(ask, Ok(Some(record)));
    }

    /// A command other than a publish was answered `MOVED`, `ASK` or `TRYAGAIN` (a slot on the
    /// move): the layout is noted and read again. Returns whether it was one of those.
    fn note_redirect(&mut self, error: &[u8], now: Instant) -> bool {
        if error.starts_with(b"TRYAGAIN") {
            return true;
        }
        let Some((slot, owner)) = topology::redirect(error) else {
            return false;
        };
        ShardStats::add(&self.bus.stats.bus_redirects, 1);
        self.topo.moved(slot, owner.clone());
        self.layout_hint = Some(owner);
        self.stale = true;
        self.hold_moved_slot(slot, now);
        true
    }

    /// Holds publishes to a slot that just changed masters (wire format 1 only: with version 2
    /// a node that subscribes at the new master late reads what it missed from the stream, so
    /// holding would only delay).
    fn hold_moved_slot(&mut self, slot: u16, now: Instant) {
        if self.bus.v2.is_none() {
            self.publishing.hold_slot(slot, now);
        }
    }

    /// Tells `shards` that `ws` is live, with where its stream stands (history on) once that
    /// is known: a new subscription waits for it (one more Redis round trip), so that the
    /// shards start their stream there and `connected` keeps its promise.
    fn tell_live(&mut self, ws: Arc<str>, shards: ShardSet) {
        let head = match &self.streams {
            None => None,
            Some(s) => match s.head(&ws) {
                Some(h) => Some(h),
                None => {
                    self.live_waits.entry(ws).or_default().union(shards);
                    return;
                }
            },
        };
        self.flush_batch();
        self.outgoing
            .push_back(Outgoing::One(ShardMsgKind::Live(ws, head), shards));
    }

    /// Where this node's stream of `ws` stands: its epoch and the newest offset handed to the
    /// shards (epoch 0 while not known).
    fn stream_head(&self, ws: &str) -> Position {
        self.streams
            .as_ref()
            .and_then(|s| s.head(ws))
            .unwrap_or_default()
    }

    /// Lets the connection waiting for its record to be kept close (kept or not: the wait
    /// must end).
    fn record_kept(&mut self, waiting: Option<(usize, u32, u32)>) {
        if let Some((shard, conn, gen)) = waiting {
            let mut to = ShardSet::default();
            to.insert(shard);
            self.outgoing
                .push_back(Outgoing::One(ShardMsgKind::Kept(conn, gen), to));
        }
    }

    /// Answers a shard's `Take`, after every event gathered so far (so that the head it
    /// carries is what the shard has been sent before the answer).
    fn answer_take(&mut self, ask: TakeAsk, record: Result<Option<Record>, ()>) {
        self.flush_batch();
        let head = self.stream_head(&ask.ws);
        let mut to = ShardSet::default();
        to.insert(ask.shard);
        self.outgoing.push_back(Outgoing::One(
            ShardMsgKind::Record(RecordAnswer {
                conn: ask.conn,
                gen: ask.gen,
                record,
                head,
            }),
            to,
        ));
    }

    /// Redis answered a stream read.
    fn on_read_reply(&mut self, ws: Arc<str>, id: u64, read: Read, reply: Reply, now: Instant) {
        let Some(streams) = self.streams.as_mut() else {
            return;
        };
        let int = |r: &Reply| {
            r.as_bytes()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|t| t.parse::<u64>().ok())
        };
        match (read, reply) {
            (Read::Locate, Reply::Array(Some(items))) if items.len() == 2 => {
                let head = match (int(&items[0]), int(&items[1])) {
                    (Some(epoch), Some(offset)) if epoch > 0 => Some(Position { epoch, offset }),
                    _ => None,
                };
                streams.located(&ws, id, head, now, &mut self.outs);
                self.apply_outs(now);
                if let Some(shards) = self.live_waits.remove(&ws) {
                    self.tell_live(ws, shards);
                }
            }
            (Read::After { .. }, Reply::Array(entries)) => {
                let entries = entries.unwrap_or_default();
                let complete = entries.len() < order::READ_PAGE;
                let mut got = Vec::with_capacity(entries.len());
                for m in entries.iter().filter_map(entry_message) {
                    match wire::decode(m, self.limits) {
                        Ok(r) => match r.pos {
                            Some(pos) => got.push((pos, r.ts_ms, r)),
                            None => continue,
                        },
                        Err(why) => {
                            // Its offset is taken all the same: nobody receives it, and the
                            // stream goes on after it. Counted and logged like a pushed one.
                            ShardStats::add(&self.bus.stats.bus_invalid, 1);
                            log::warn!(workspace = &*ws, reason = why.as_str(); "cluster bus: an invalid message in the history stream");
                        }
                    }
                }
                streams.filled(&ws, id, got, complete, now, &mut self.outs);
            }
            (_, Reply::Error(e))
                if self.note_redirect(&e, now) || e.starts_with(b"CLUSTERDOWN") =>
            {
                // A slot on the move, or a cluster still settling after a master came back:
                // asked again shortly, quietly.
                log::debug!(workspace = &*ws; "cluster bus: reading the workspace's stream: {}; asking again", String::from_utf8_lossy(&e));
                self.retry_reads.push((ws, id));
            }
            (_, Reply::Error(e)) => {
                log::warn!(
                    workspace = &*ws;
                    "cluster bus: reading the workspace's stream failed ({}); asking again",
                    String::from_utf8_lossy(&e)
                );
                self.retry_reads.push((ws, id));
            }
            _ => {
                log::warn!(workspace = &*ws; "cluster bus: an unexpected answer to a stream read; asking again");
                self.retry_reads.push((ws, id));
            }
        }
    }

    /// Asks again the stream reads that failed or found no connection (at most every
    /// [`DEADLINE_TICK`], so that a master that is away is not asked in a loop).
    fn retry_stream_reads(&mut self, now: Instant) {
        if (self.retry_reads.is_empty()
            && self.retry_takes.is_empty()
            && self.deferred_records.is_empty())
            || now < self.retry_reads_at
        {
            return;
        }
        self.retry_reads_at = now + DEADLINE_TICK;
        for ask in std::mem::take(&mut self.retry_takes) {
            self.send_take(ask, now);
        }
        let window = self.bus.window;
        let deferred = if self.publish_from.is_empty() {
            Vec::new() // Redis still away: nothing to try yet
        } else {
            std::mem::take(&mut self.deferred_records)
        };
        for (made, workspace, key, value) in deferred {
            if now.saturating_duration_since(made) >= window {
                ShardStats::add(&self.bus.stats.bus_records_lost, 1);
                continue;
            }
            if self.command_conn_for(&workspace, now).is_none() {
                self.deferred_records.push((made, workspace, key, value));
                continue;
            }
            self.on_record_op(
                RecordOp::Put {
                    waiting: None,
                    workspace,
                    key,
                    value,
                },
                now,
            );
        }
        let Some(streams) = self.streams.as_mut() else {
            self.retry_reads.clear();
            return;
        };
        for (ws, id) in std::mem::take(&mut self.retry_reads) {
            streams.read_failed(&ws, id, &mut self.outs);
        }
        self.apply_outs(now);
    }

    /// Starts, when due, what the bus lacks: a read of the layout when it is stale, and a
    /// subscriber connection to each server of the layout that has none.
    fn start_attempts(&mut self, now: Instant) {
        if now < self.retry_at {
            return;
        }
        if self.stale && !self.cfg.redis_cluster {
            self.stale = false; // one server: its address is its layout
        }
        if self.stale
            && self.layout.is_none()
            && self
                .last_layout
                .map_or(true, |t| now >= t + LAYOUT_MIN_INTERVAL)
        {
            self.last_layout = Some(now);
            // The server that said a slot moved first, then the known masters, then the seeds.
            let mut candidates: Vec<RedisNode> = self.layout_hint.iter().cloned().collect();
            for known in self.topo.nodes.iter().chain(&self.cfg.nodes) {
                if !candidates.contains(known) {
                    candidates.push(known.clone());
                }
            }
            self.layout = Some(LayoutRead::new(candidates));
        }
        if self.layout.is_some() && self.layout_conn.is_none() {
            self.advance_layout(now);
        }
        for node in self.topo.nodes.clone() {
            if self.subscriber_of.contains_key(&node) {
                continue;
            }
            match self.open(&node, Role::Subscriber, now) {
                Ok(Some(key)) => {
                    self.subscriber_of.insert(node, key);
                }
                Ok(None) => {}
                Err(why) => return self.retry_later(why),
            }
        }
    }

    /// Asks the next candidate for the layout, or gives up on this read.
    fn advance_layout(&mut self, now: Instant) {
        loop {
            let Some(read) = self.layout.as_mut() else {
                return;
            };
            let Some(node) = read.current().cloned() else {
                let why = self.layout.take().expect("checked").give_up();
                return self.retry_later(why);
            };
            match self.open(&node, Role::Layout, now) {
                Ok(Some(key)) => {
                    if let Err(e) = self.conns[key].link.command(&[b"CLUSTER", b"SLOTS"]) {
                        self.failed.push((key, e.to_string()));
                    }
                    self.layout_conn = Some(key);
                    return;
                }
                Ok(None) => return, // resolving its name
                Err(why) => self.layout.as_mut().expect("checked").failed(why),
            }
        }
    }

    /// Connections whose handshake just finished.
    fn announce_ready(&mut self, now: Instant) {
        let ready: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.announced && c.link.is_ready())
            .map(|(k, _)| k)
            .collect();
        for key in ready {
            let c = &mut self.conns[key];
            c.announced = true;
            if !matches!(c.role, Role::Subscriber) {
                continue;
            }
            let node = c.link.node.clone();
            // Wire format 2 needs no settling: a node back on Redis reads what it missed.
            let settle = self.lost && self.bus.v2.is_none();
            let from = if settle { now + PUBLISH_SETTLE } else { now };
            self.publish_from.insert(node.clone(), from);
            if self.lost {
                ShardStats::add(&self.bus.stats.bus_reconnects, 1);
            }
            log::info!(
                "cluster bus: connected to redis {node} ({})",
                self.cfg.url()
            );
            if self
                .topo
                .nodes
                .iter()
                .all(|n| self.publish_from.contains_key(n))
            {
                self.lost = false;
                self.backoff = BACKOFF_MIN;
            }
            // The command connection for publishes, ready before the first one.
            if !self.publisher_of.contains_key(&node) {
                if let Ok(Some(k)) = self.open_publisher(&node, now) {
                    self.publisher_of.insert(node, k);
                }
            }
        }
        if !self.subs.is_empty() {
            self.subscribe_pending();
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
            self.cfg.url()
        );
    }

    /// Drops the connections found failed.
    fn drop_failed(&mut self) {
        while let Some((key, why)) = self.failed.pop() {
            self.drop_conn(key, &why, true);
        }
    }

    /// Closes connection `key`. `lost`: it failed (as opposed to being closed because its
    /// server left the layout or its work is done).
    fn drop_conn(&mut self, key: usize, why: &str, lost: bool) {
        let Some(c) = self.conns.try_remove(key) else {
            return;
        };
        let node = c.link.node.clone();
        let ready = c.link.is_ready();
        c.link.close(self.poll.registry());
        match c.role {
            Role::Subscriber => {
                self.subscriber_of.remove(&node);
                self.publish_from.remove(&node);
                self.subs.lost(key, &mut self.actions);
                if lost {
                    if ready {
                        log::warn!(
                            "cluster bus: lost redis {node} ({}): {why}; publishes through it answer 503 until it is back",
                            self.cfg.url()
                        );
                        self.lost = true;
                        self.retry_at = Instant::now() + jittered(self.backoff);
                        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    } else {
                        self.retry_later(format!("redis {node}: {why}"));
                    }
                    if self.cfg.redis_cluster {
                        self.stale = true; // a master may have failed over
                    }
                }
                // Publishes to it would miss this node's own subscribers from now on.
                if let Some(p) = self.publisher_of.get(&node).copied() {
                    self.drop_conn(p, why, false);
                }
            }
            Role::Publisher(sent) => {
                self.publisher_of.remove(&node);
                if lost && !sent.is_empty() {
                    log::warn!("cluster bus: publish connection to redis {node} failed: {why}");
                }
                let failure = self.unreachable(&node, 0, why);
                for (pending, _) in sent {
                    let msg = match pending {
                        Pending::Publish(msg) => msg,
                        Pending::Read(ws, id, _) => {
                            self.retry_reads.push((ws, id));
                            continue;
                        }
                        Pending::Take(ask) | Pending::Backfill(ask, ..) => {
                            self.answer_take(ask, Err(()));
                            continue;
                        }
                        Pending::Kept(waiting) => {
                            ShardStats::add(&self.bus.stats.bus_records_lost, 1);
                            self.record_kept(waiting);
                            continue;
                        }
                        Pending::Keep(workspace, key, value) => {
                            // Its connection failed before the answer: kept again later (a
                            // repeat in the list is harmless: a resume takes one).
                            self.deferred_records
                                .push((Instant::now(), workspace, key, value));
                            continue;
                        }
                        Pending::Quiet(_) => continue,
                    };
                    let why = match (&failure, self.publishing.slot(msg)) {
                        (BusUnavailable::Unreachable { node, why, .. }, Some(slot)) => {
                            BusUnavailable::Unreachable {
                                node: node.clone(),
                                slot,
                                why: why.clone(),
                            }
                        }
                        (f, _) => f.clone(),
                    };
                    self.publishing.fail(msg, why);
                }
            }
            Role::Layout => {
                if self.layout_conn == Some(key) {
                    self.layout_conn = None;
                    if lost {
                        if let Some(read) = self.layout.as_mut() {
                            read.failed(why.to_string());
                        }
                    }
                }
            }
        }
    }

    /// Handshake and answer deadlines, and the subscriber connections' PING watchdog.
    fn check_deadlines(&mut self, now: Instant) {
        for (key, c) in self.conns.iter_mut() {
            if c.link.handshake_overdue(now) {
                self.failed
                    .push((key, LinkError::HandshakeTimeout.to_string()));
                continue;
            }
            match &c.role {
                Role::Publisher(sent)
                    if sent
                        .front()
                        .is_some_and(|(_, at)| now >= *at + PUBLISH_DEADLINE) =>
                {
                    self.failed.push((
                        key,
                        format!("no answer to a publish within {PUBLISH_DEADLINE:?}"),
                    ));
                }
                Role::Subscriber if c.link.is_ready() => {
                    // A quiet connection is asked for a sign of life; no answer in time means
                    // Redis is gone even if no FIN or RST ever arrives. (In subscribed mode
                    // PING answers ["pong", ""]; any bytes count.)
                    match c.link.pinged {
                        Some(t) if now >= t + IDLE_PING => {
                            self.failed
                                .push((key, format!("no answer to PING within {IDLE_PING:?}")));
                        }
                        None if now >= c.link.heard + IDLE_PING => {
                            if let Err(e) = c.link.command(&[b"PING"]) {
                                self.failed.push((key, e.to_string()));
                            }
                            c.link.pinged = Some(now);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    fn flush_all(&mut self) {
        for (key, c) in self.conns.iter_mut() {
            if c.link.unsent() > 0 {
                if let Err(e) = c.link.flush() {
                    self.failed.push((key, e.to_string()));
                }
            }
        }
    }

    // ---- reading -------------------------------------------------------------------------

    /// Reads every connection with input, each up to its budget, and handles its replies.
    fn read_all(&mut self) {
        let paused = self.outgoing.len() >= SHARD_BACKLOG;
        if paused && !self.paused {
            ShardStats::add(&self.bus.stats.bus_read_pauses, 1);
        }
        self.paused = paused;
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.link.readable)
            .filter(|(_, c)| !(paused && matches!(c.role, Role::Subscriber)))
            .map(|(k, _)| k)
            .collect();
        let mut replies = Vec::new();
        for key in keys {
            let c = &mut self.conns[key];
            let read = c.link.read(READ_BUDGET);
            // Replies already read are handled even when the connection then failed.
            loop {
                match c.link.next_incoming() {
                    Ok(Some(r)) => replies.push(r),
                    Ok(None) => break,
                    Err(e) => {
                        self.failed.push((key, e.to_string()));
                        break;
                    }
                }
            }
            match read {
                Ok(Drain::More) => self.more = true,
                Ok(Drain::Drained) => {}
                Err(e) => self.failed.push((key, e.to_string())),
            }
            let now = Instant::now();
            for reply in replies.drain(..) {
                let Some(c) = self.conns.get(key) else {
                    break;
                };
                let outcome = match (&c.role, reply) {
                    (Role::Subscriber, Incoming::Message(at)) => {
                        let (conns, mut intake) = self.intake();
                        let link = &conns[key].link;
                        intake.take(link.bytes(at.channel), link.bytes(at.payload), now);
                        Ok(())
                    }
                    (Role::Subscriber, Incoming::Reply(r)) => self.on_subscriber_reply(key, r, now),
                    (Role::Publisher(_), Incoming::Reply(r)) => self.on_publish_reply(key, r, now),
                    (Role::Layout, Incoming::Reply(r)) => self.on_layout_reply(key, r),
                    (_, Incoming::Message(_)) => {
                        Err("a pub/sub message on a connection that subscribes to nothing".into())
                    }
                };
                if let Err(why) = outcome {
                    self.failed.push((key, why));
                    break;
                }
            }
            self.apply_actions(now);
            self.apply_outs(now);
        }
        self.flush_batch();
    }

    /// Hands the events gathered so far to the shards, as one batch, after keeping them in
    /// this node's copy of the history (before the interest bits are read: a shard whose first
    /// connection of a workspace reads that copy after setting its bit either finds an event
    /// there or is among the batch's targets).
    fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        ShardStats::add(&self.bus.stats.bus_received, self.batch.len() as u64);
        if let Some(m) = &self.mirror {
            m.place(&self.batch, Instant::now());
        }
        let targets = self.shards.targets(&self.batch);
        let batch: Arc<[Event]> = std::mem::take(&mut self.batch).into();
        self.outgoing
            .push_back(Outgoing::Events(PendingBatch::new(batch, targets)));
        self.advance_outgoing();
    }

    /// Carries out what the streams asked for, in order.
    fn apply_outs(&mut self, now: Instant) {
        while !self.outs.is_empty() {
            for out in std::mem::take(&mut self.outs) {
                match out {
                    Out::Deliver(ws, pos, got) => self.batch.push(Event {
                        workspace_id: (*ws).into(),
                        user_id: got.user_id,
                        frame: got.frame,
                        accepted_at: now,
                        ts_ms: got.ts_ms,
                        pos,
                        deflated: Default::default(),
                    }),
                    Out::Gap(ws, reason, since) => {
                        self.flush_batch();
                        if let Some(m) = &self.mirror {
                            m.forget(&ws);
                        }
                        ShardStats::add(&self.bus.stats.bus_stream_gaps, 1);
                        log::warn!(
                            workspace = &*ws, reason = reason.as_str();
                            "cluster bus: events of the workspace are missing here (the history stream no longer holds them, or Redis lost it); its clients here are sent stream.gap"
                        );
                        let shards = self.shards.interest().shards_for(&ws);
                        self.outgoing
                            .push_back(Outgoing::One(ShardMsgKind::Gap(ws, reason, since), shards));
                    }
                    Out::Read(ws, id, read) => self.send_read(ws, id, read, now),
                    Out::Fence(ws, epoch) => self.send_fence(&ws, epoch, now),
                }
            }
        }
    }

    /// The connections, and apart from them what taking in a message needs.
    fn intake(&mut self) -> (&Slab<Conn>, Intake<'_>) {
        let Runner {
            conns,
            subs,
            limits,
            bus,
            batch,
            streams,
            outs,
            ..
        } = self;
        let intake = Intake {
            subs,
            limits: *limits,
            stats: &bus.stats,
            batch,
            streams: streams.as_mut(),
            outs,
        };
        (conns, intake)
    }

    fn on_subscriber_reply(
        &mut self,
        key: usize,
        reply: Reply,
        now: Instant,
    ) -> Result<(), String> {
        if let Some(m) = resp::pubsub_message(&reply) {
            // A message the in-place reader left to the parser (not as Redis writes them).
            self.intake().1.take(m.channel, m.payload, now);
            return Ok(());
        }
        if let Reply::Error(e) = &reply {
            // The slot moved before the subscription arrived: the error answers the oldest
            // command on this connection, and the workspace is subscribed again at the master
            // the redirect names (the layout is read again meanwhile).
            let Some((slot, owner)) = topology::redirect(e) else {
                return Err(format!(
                    "Redis refused a subscription: {}{}",
                    String::from_utf8_lossy(e),
                    if self.cfg.redis_cluster {
                        " (sharded pub/sub needs Redis 7.0 or later)"
                    } else {
                        ""
                    }
                ));
            };
            ShardStats::add(&self.bus.stats.bus_redirects, 1);
            self.hold_moved_slot(slot, now);
            self.layout_hint = Some(owner.clone());
            self.topo.moved(slot, owner);
            self.stale = true;
            if self.subs.refused(key, &mut self.actions).is_none() {
                return Err("Redis answered a subscription that was not asked for".into());
            }
            return Ok(());
        }
        // A subscription confirmation: [kind, channel, count].
        let Reply::Array(Some(items)) = &reply else {
            return Ok(());
        };
        let (Some(kind), Some(channel)) = (
            items.first().and_then(Reply::as_bytes),
            items.get(1).and_then(Reply::as_bytes),
        ) else {
            return Ok(());
        };
        let kind = if kind == self.bus.dialect.subscribed {
            Confirmation::Subscribed
        } else if kind == self.bus.dialect.unsubscribed {
            Confirmation::Unsubscribed
        } else {
            return Ok(()); // ["pong", ""]
        };
        if let Some(ws) = wire::workspace_of(channel) {
            self.subs.confirmed(key, kind, ws, &mut self.actions);
            if kind == Confirmation::Subscribed && self.subs.is_live(ws) {
                if let (Some(streams), Some(name)) = (self.streams.as_mut(), self.subs.name(ws)) {
                    // Made or made again: where the stream stands, or what this node missed
                    // while it was away, is read first.
                    streams.subscribed(&name, &mut self.outs);
                }
            }
        }
        Ok(())
    }

    fn on_publish_reply(&mut self, key: usize, reply: Reply, now: Instant) -> Result<(), String> {
        let Role::Publisher(sent) = &mut self.conns[key].role else {
            return Ok(());
        };
        let Some((pending, _)) = sent.pop_front() else {
            return Err("Redis answered a publish that was not sent".into());
        };
        let msg = match pending {
            Pending::Publish(msg) => msg,
            Pending::Quiet(what) => {
                if let Reply::Error(e) = &reply {
                    log::warn!("cluster bus: {what} failed: {}", String::from_utf8_lossy(e));
                }
                return Ok(());
            }
            Pending::Take(ask) => {
                self.on_take_reply(ask, reply, now);
                return Ok(());
            }
            Pending::Keep(workspace, key, value) => {
                if let Reply::Error(e) = &reply {
                    if e.starts_with(b"CLUSTERDOWN") || self.note_redirect(e, now) {
                        // Kept again once the slot's master is ready.
                        self.deferred_records.push((now, workspace, key, value));
                    } else {
                        log::warn!(
                            "cluster bus: keeping a resume record failed: {}",
                            String::from_utf8_lossy(e)
                        );
                        ShardStats::add(&self.bus.stats.bus_records_lost, 1);
                    }
                }
                return Ok(());
            }
            Pending::Kept(waiting) => {
                // (A cluster not ready answers the RPUSH before it the same way: kept again.)
                let failed = match &reply {
                    Reply::Error(e) if !e.starts_with(b"CLUSTERDOWN") => Some(e),
                    _ => None,
                };
                if let Some(e) = failed {
                    log::warn!(
                        "cluster bus: setting a resume record's expiry failed: {}",
                        String::from_utf8_lossy(e)
                    );
                }
                self.record_kept(waiting);
                return Ok(());
            }
            Pending::Backfill(ask, record, head) => {
                self.on_backfill_reply(ask, record, head, reply, now);
                return Ok(());
            }
            Pending::Read(ws, id, read) => {
                self.on_read_reply(ws, id, read, reply, now);
                return Ok(());
            }
        };
        let Reply::Error(e) = reply else {
            self.publishing.accepted(msg);
            return Ok(());
        };
        if e.starts_with(b"TRYAGAIN") {
            // A Redis Cluster moving the slot's keys has some of the function's keys on
            // either side: asked again shortly, until the move is done (or the deadline).
            self.publishing.redirected(msg, now);
            return Ok(());
        }
        if e.starts_with(b"CLUSTERDOWN") {
            // A master that came back before its cluster has settled: new publishes to it are
            // refused before anything of them is sent (so that a request is never half
            // published) until it stops saying so, and this one is asked again shortly.
            let node = self.conns[key].link.node.clone();
            self.publish_from.insert(node, now + CLUSTER_SETTLE);
            self.publishing.redirected(msg, now);
            return Ok(());
        }
        match topology::redirect(&e) {
            Some((slot, owner)) => {
                ShardStats::add(&self.bus.stats.bus_redirects, 1);
                self.topo.moved(slot, owner.clone());
                self.layout_hint = Some(owner);
                self.stale = true;
                self.publishing.redirected(msg, now);
            }
            None => self.publishing.fail(
                msg,
                BusUnavailable::Refused(String::from_utf8_lossy(&e).into_owned()),
            ),
        }
        Ok(())
    }

    fn on_layout_reply(&mut self, key: usize, reply: Reply) -> Result<(), String> {
        let node = self.conns[key].link.node.clone();
        let got = Topology::from_cluster_slots(&reply, &node);
        self.drop_conn(key, "", false);
        self.layout_conn = None;
        let Some(read) = self.layout.as_mut() else {
            return Ok(());
        };
        match got {
            Ok(t) if !t.nodes.is_empty() => {
                self.layout = None;
                self.on_layout(t);
            }
            Ok(_) => read.failed("knows no slot owner yet".into()),
            Err(e) => read.failed(e),
        }
        Ok(())
    }

    /// A layout was read.
    fn on_layout(&mut self, topo: Topology) {
        self.layout_hint = None;
        self.stale = false;
        ShardStats::add(&self.bus.stats.bus_layout_reads, 1);
        let now = Instant::now();
        for slot in self.topo.changed_slots(&topo) {
            self.hold_moved_slot(slot, now);
        }
        // Connections to servers that no longer own slots (a failed master that came back as a
        // replica) go; their subscriptions are made again where they belong.
        let gone: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.role, Role::Layout) && !topo.nodes.contains(&c.link.node))
            .map(|(k, _)| k)
            .collect();
        for key in gone {
            self.drop_conn(key, "no longer a master", false);
        }
        self.topo = topo;
        self.subs.retry_unrequested();
        let uncovered = self.topo.uncovered();
        if uncovered > 0 {
            // A cluster that is partly down: serve the slots that have a master, and read the
            // layout again until every slot has one.
            self.stale = true;
            self.retry_later(format!("{uncovered} hash slots have no master"));
        }
    }

    // ---- subscriptions -------------------------------------------------------------------

    fn take_interest(&mut self) {
        for _ in 0..INTEREST_PER_TURN {
            match self.inputs.interest.try_recv() {
                Ok(BusInterest::Add(ws, shard)) => self.subs.add(ws, shard, &mut self.actions),
                Ok(BusInterest::Record(op)) => {
                    self.on_record_op(op, Instant::now());
                    self.apply_outs(Instant::now());
                }
                Ok(BusInterest::Remove(ws, shard)) => {
                    self.subs.remove(&ws, shard, &mut self.actions);
                    if !self.subs.is_wanted(&ws) {
                        if let Some(streams) = self.streams.as_mut() {
                            // Nothing of it reaches this node from now on: its copy of the
                            // history would fall behind unseen.
                            streams.forget(&ws);
                            if let Some(m) = &self.mirror {
                                m.forget(&ws);
                            }
                        }
                        self.live_waits.remove(&ws);
                    }
                }
                Err(_) => {
                    self.apply_actions(Instant::now());
                    return;
                }
            }
        }
        self.more = true;
        self.apply_actions(Instant::now());
    }

    /// Subscribes every pending workspace whose server has a ready subscriber connection.
    fn subscribe_pending(&mut self) {
        let (topo, subscriber_of, conns) = (&self.topo, &self.subscriber_of, &self.conns);
        self.subs.subscribe_pending(
            |ws| {
                let n = topo.node_for(&wire::channel(ws))?;
                let key = *subscriber_of.get(&topo.nodes[n])?;
                conns[key].link.is_ready().then_some(key)
            },
            &mut self.actions,
        );
        self.apply_actions(Instant::now());
    }

    fn apply_actions(&mut self, now: Instant) {
        for action in std::mem::take(&mut self.actions) {
            match action {
                Action::Send(key, command, ws) => {
                    let verb = match command {
                        Command::Subscribe => self.bus.dialect.subscribe,
                        Command::Unsubscribe => self.bus.dialect.unsubscribe,
                    };
                    if let Some(c) = self.conns.get_mut(key) {
                        if let Err(e) = c.link.command(&[verb, &wire::channel(&ws)]) {
                            self.failed.push((key, e.to_string()));
                        }
                    }
                }
                Action::Live(ws, shards) => self.tell_live(ws, shards),
                Action::Ended(key, ws) => {
                    let slot = topology::slot(&wire::channel(&ws));
                    log::info!(
                        workspace = &*ws;
                        "cluster bus: Redis moved the workspace's hash slot {slot}; subscribing at its new master"
                    );
                    self.stale = true;
                    self.layout_hint = self.conns.get(key).map(|c| c.link.node.clone());
                    self.hold_moved_slot(slot, now);
                }
            }
        }
        self.apply_outs(now);
    }

    /// Hands what waits to the shards that have room, in order per shard.
    fn advance_outgoing(&mut self) {
        let mut blocked = ShardSet::default();
        let mut i = 0;
        while i < self.outgoing.len() {
            let done = match &mut self.outgoing[i] {
                Outgoing::Events(p) => {
                    p.advance(&self.shards, Waiter::Bus, &mut blocked) != Progress::Waiting
                }
                Outgoing::One(kind, remaining) => {
                    for s in remaining.clone().iter() {
                        if s >= self.shards.len() {
                            remaining.remove(s);
                            continue;
                        }
                        if blocked.contains(s) {
                            continue;
                        }
                        match self.shards.shard(s).try_send(kind.message(), Waiter::Bus) {
                            TrySend::Sent | TrySend::Gone => remaining.remove(s),
                            TrySend::Full(_) => blocked.insert(s),
                        }
                    }
                    blocked.union(*remaining);
                    remaining.is_empty()
                }
            };
            if done {
                self.outgoing.remove(i);
            } else {
                i += 1;
            }
        }
    }

    // ---- publishing ----------------------------------------------------------------------

    fn take_publishes(&mut self, now: Instant) {
        for _ in 0..PUBLISHES_PER_TURN {
            let Ok(s) = self.inputs.publishes.try_recv() else {
                return;
            };
            let (topo, from, publishers, conns, cluster, stats) = (
                &self.topo,
                &self.publish_from,
                &self.publisher_of,
                &self.conns,
                self.cfg.redis_cluster,
                &self.bus.stats,
            );
            let msgs = self.publishing.admit(s, |slot| {
                let n = topo
                    .node_for_slot(slot)
                    .ok_or(BusUnavailable::NoMaster(slot))?;
                let node = &topo.nodes[n];
                match from.get(node) {
                    None => Err(BusUnavailable::Unreachable {
                        node: cluster.then(|| node.clone()),
                        slot,
                        why: "this node is not connected to it".into(),
                    }),
                    Some(t) if now < *t => Err(BusUnavailable::Settling {
                        node: node.clone(),
                        resume_in_ms: (*t - now).as_millis().max(1) as u64,
                    }),
                    _ if publishers
                        .get(node)
                        .is_some_and(|k| conns[*k].link.unsent() > MAX_OUTPUT / 2) =>
                    {
                        ShardStats::add(&stats.bus_publish_busy, 1);
                        Err(BusUnavailable::Busy)
                    }
                    _ => Ok(()),
                }
            });
            for msg in msgs {
                if !self.publishing.must_hold(msg, now) {
                    self.send(msg, now);
                }
            }
        }
        self.more = true;
    }

    /// Sends `msg` to its slot's master over the command connection.
    fn send(&mut self, msg: Msg, now: Instant) {
        let Some(slot) = self.publishing.slot(msg) else {
            return;
        };
        let Some(n) = self.topo.node_for_slot(slot) else {
            return self.publishing.fail(msg, BusUnavailable::NoMaster(slot));
        };
        let node = self.topo.nodes[n].clone();
        if !self.publish_from.contains_key(&node) {
            let why = self.unreachable(&node, slot, "this node is not connected to it");
            return self.publishing.fail(msg, why);
        }
        let key = match self.publisher_of.get(&node) {
            Some(k) => *k,
            None => match self.open_publisher(&node, now) {
                Ok(Some(k)) => {
                    self.publisher_of.insert(node.clone(), k);
                    k
                }
                Ok(None) => {
                    let why = self.unreachable(&node, slot, "its address is being resolved");
                    return self.publishing.fail(msg, why);
                }
                Err(e) => {
                    let why = self.unreachable(&node, slot, &e);
                    return self.publishing.fail(msg, why);
                }
            },
        };
        let c = &mut self.conns[key];
        if c.link.unsent() > MAX_OUTPUT / 2 {
            ShardStats::add(&self.bus.stats.bus_publish_busy, 1);
            return self.publishing.fail(msg, BusUnavailable::Busy);
        }
        let command = self.publishing.command(msg).expect("open above");
        if let Err(e) = c.link.encoded(command) {
            self.failed.push((key, e.to_string()));
        }
        if let Role::Publisher(sent) = &mut c.role {
            sent.push_back((Pending::Publish(msg), now));
        }
    }

    /// The 503 for a server a publish cannot reach, in one wording whichever step found it.
    fn unreachable(&self, node: &RedisNode, slot: u16, why: &str) -> BusUnavailable {
        BusUnavailable::Unreachable {
            node: self.cfg.redis_cluster.then(|| node.clone()),
            slot,
            why: why.to_string(),
        }
    }
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
