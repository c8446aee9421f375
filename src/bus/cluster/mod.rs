//! The Redis bus: every node of a cluster publishes through Redis and delivers what it receives
//! from it, including its own publishes, so that the order Redis gives a workspace's channel is
//! the order every subscriber everywhere sees.
//!
//! Two dialects of the same design: on one Redis server (`redis://`) every channel lives on that
//! server (`SUBSCRIBE`/`PUBLISH`); on a Redis Cluster (`redis-cluster://`) each channel lives on
//! the master that owns its hash slot and uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), so a
//! message travels only within its shard instead of being broadcast to every Redis node.
//! [`Topology`](crate::bus::topology::Topology) says which server a channel goes to.
//!
//! One thread per node, one mio poll loop, owns everything that talks to Redis:
//!
//! - [`link`]: each connection, non-blocking from the connect on (no thread per attempt, no
//!   blocking read under a lock), with bounded buffers;
//! - [`subscriptions`]: the subscription protocol as a pure state machine (which workspaces,
//!   on which connection, when in force), unit-tested and fuzzed against a model of Redis;
//! - [`publish`]: the publish client: jobs from the publishers' bounded queue, pipelined per
//!   server on a command connection of its own, each with a deadline, `MOVED` followed by
//!   holding the message (a timer, not a sleep) and sending it to the new master;
//! - [`layout`]: reading a Redis Cluster's layout (`CLUSTER SLOTS`) and resolving host names on
//!   one helper thread, so a slow DNS answer never stalls the loop;
//! - [`order`] (wire format 2): each workspace's stream on this node as a pure state machine,
//!   delivering in position order, reading what was missed from the workspace's history stream,
//!   and reporting what cannot be read back; the Redis side is the function library
//!   [`FUNCTIONS`] (`causeloop.lua`), which gives each event its position.
//!
//! Shards tell the thread when a workspace gets its first subscriber on that shard and when it
//! loses its last ([`BusInterest`]); the thread subscribes on the
//! first and unsubscribes after the last, so a node receives only the traffic of workspaces it
//! serves. When Redis confirms a subscription, the shards that asked are told the workspace is
//! live ([`ShardMsg::Live`](crate::dispatch::inbox::ShardMsg)); until then their new connections
//! wait for their `connected` frame, so that `connected` keeps meaning "every event published
//! from now on reaches you", as it does on one node.
//!
//! Messages are read in place in the connection's buffer
//! ([`resp::message_at`](crate::bus::resp::message_at)), checked like HTTP publishes
//! ([`wire::decode`]), each frame is built once (the payload's one
//! copy), and the events of one wake-up go to the shards as one batch, exactly like a local
//! publish. The thread never blocks on a shard: a batch a full inbox cannot take
//! waits in the thread, which stops reading Redis while more than `SHARD_BACKLOG` (64)
//! batches wait (Redis then buffers for this node, up to its own limit for a subscriber).
//!
//! When a connection drops, the thread reconnects with exponential backoff and jitter (on a
//! cluster, after reading the layout again: a master may have failed over) and re-subscribes
//! every live interest; meanwhile open connections keep their heartbeats, and publishes are
//! refused (503) instead of vanishing.

pub mod layout;
pub mod link;
pub mod order;
pub mod publish;
mod runner;
pub mod subscriptions;

use crate::bus::topology;
use crate::bus::wire;
use crate::config::{RedisConfig, RedisNode};
use crate::dispatch::{BusInterest, ToBus};
use crate::metrics::BusStats;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::{Poll, Token, Waker};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use runner::BusThread;

const WAKE: Token = Token(0);

/// Publishes waiting for the bus thread to take them, at most. At the bound a publish is
/// refused at once ([`BusUnavailable::Busy`], 503) rather than queued without limit; the queue's
/// length is `causeloop_bus_publish_queue`.
pub const PUBLISH_QUEUE: usize = 4096;

/// How long a publish may take from its submission to Redis's last answer. Past it the
/// publisher gets [`BusUnavailable::TimedOut`] and the command connection it waits on is given
/// up (a Redis that stopped answering, a frozen process). Short: an HTTP publisher's request is
/// open for as long, and publishers retry.
pub const PUBLISH_DEADLINE: Duration = Duration::from_millis(1000);

/// Why a publish through the bus failed (HTTP 503). Unless Redis failed, or a cluster moved one
/// of the request's slots to a master this node cannot reach, during the publish itself, nothing
/// of the request was published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUnavailable {
    /// Redis (on a cluster, the master of `slot`) cannot be reached from this node.
    Unreachable {
        /// The server, on a cluster.
        node: Option<RedisNode>,
        /// A hash slot of the request on that server, on a cluster.
        slot: u16,
        /// What failed.
        why: String,
    },
    /// No master serves the slot right now (a Redis Cluster partly down).
    NoMaster(u16),
    /// The server came back less than `PUBLISH_SETTLE` (2 s) ago.
    Settling {
        /// The server.
        node: RedisNode,
        /// Milliseconds until publishes to it resume.
        resume_in_ms: u64,
    },
    /// Redis refused the command (its own words).
    Refused(String),
    /// The cluster kept redirecting (its slots are moving).
    Redirecting,
    /// Redis did not answer within [`PUBLISH_DEADLINE`].
    TimedOut,
    /// The publish queue ([`PUBLISH_QUEUE`]) or the command connection's output bound is full.
    Busy,
    /// The node is shutting down.
    Stopped,
}

impl fmt::Display for BusUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusUnavailable::Unreachable {
                node: Some(node),
                slot,
                why,
            } => write!(
                f,
                "the cluster bus (Redis {node}, master of hash slot {slot}) is unreachable ({why}); publish again once it is back"
            ),
            BusUnavailable::Unreachable { node: None, why, .. } => write!(
                f,
                "the cluster bus (Redis) is unreachable ({why}); publish again once it is back"
            ),
            BusUnavailable::NoMaster(slot) => write!(
                f,
                "no Redis Cluster master serves hash slot {slot} right now; publish again shortly"
            ),
            BusUnavailable::Settling { node, resume_in_ms } => write!(
                f,
                "the cluster bus (Redis {node}) is back; publishes resume in {resume_in_ms} ms, once every node has re-subscribed"
            ),
            BusUnavailable::Refused(why) => {
                write!(f, "the cluster bus refused the publish: {why}")
            }
            BusUnavailable::Redirecting => f.write_str(
                "the Redis Cluster kept redirecting the publish (its slots are moving); publish again",
            ),
            BusUnavailable::TimedOut => {
                f.write_str("the cluster bus did not answer in time; publish again")
            }
            BusUnavailable::Busy => f.write_str(
                "the cluster bus has too many publishes waiting for Redis; publish again shortly",
            ),
            BusUnavailable::Stopped => f.write_str("the node is shutting down; publish to another"),
        }
    }
}

impl std::error::Error for BusUnavailable {}

impl BusUnavailable {
    /// The bus did not answer within the publisher's deadline.
    pub fn timed_out() -> BusUnavailable {
        BusUnavailable::TimedOut
    }
}

/// One publish for the bus: its events' Redis commands in one buffer, each with its hash slot.
#[derive(Default, Debug)]
pub struct BusJob {
    commands: Vec<u8>,
    /// Per message: its hash slot and its command's place in `commands`.
    messages: Vec<(u16, std::ops::Range<usize>)>,
}

impl BusJob {
    /// An empty job with room for `bytes` of commands (the sum of their
    /// [`wire::Publish::command_len`]) and `events` events, so that pushing them reallocates
    /// nothing.
    pub fn with_capacity(bytes: usize, events: usize) -> BusJob {
        BusJob {
            commands: Vec::with_capacity(bytes),
            messages: Vec::with_capacity(events),
        }
    }

    /// Appends one event's command. The payload is written once, by `write_payload`, straight
    /// into it.
    pub fn push(&mut self, p: &wire::Publish<'_>, write_payload: impl FnOnce(&mut Vec<u8>)) {
        let start = self.commands.len();
        self.commands.reserve(p.command_len());
        p.write(&mut self.commands, write_payload);
        let workspace_id = p.workspace_id;
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

    /// Message `i`'s hash slot.
    fn slot(&self, i: usize) -> u16 {
        self.messages[i].0
    }

    /// Message `i`'s encoded command.
    fn command(&self, i: usize) -> &[u8] {
        &self.commands[self.messages[i].1.clone()]
    }
}

/// Called once, on the bus thread, with Redis's answer to a publish.
pub type Done = Box<dyn FnOnce(Result<(), BusUnavailable>) + Send>;

/// A publish on its way to the bus thread.
pub struct Submitted {
    job: BusJob,
    done: Done,
    at: Instant,
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

/// The function library the nodes load on every Redis server they publish to (wire format
/// version 2): `causeloop_publish`, `causeloop_spublish` and `causeloop_fence`.
pub const FUNCTIONS: &str = include_str!("causeloop.lua");

/// The handle shards and publishers hold: a bounded queue into the bus thread, its waker, and
/// two flags. No lock: everything else lives on the bus thread.
pub struct ClusterBus {
    dialect: &'static Dialect,
    /// Set with `--bus-wire 2`: how publishes call the function.
    v2: Option<wire::V2Call>,
    /// With `--bus-wire 2`: this node's copy of the recent history, positions from Redis.
    mirror: Option<Arc<dyn crate::history::HistoryStore>>,
    /// `--resume-window`: how long a resume record is kept in Redis.
    window: std::time::Duration,
    stats: Arc<BusStats>,
    waker: Arc<Waker>,
    publishes: Sender<Submitted>,
    up: AtomicBool,
    stop: AtomicBool,
}

/// The delivery guarantee on the cluster bus (`--bus-wire 2`, history on).
pub struct BusHistory {
    /// The history's bounds (`--history-size`, `--history-ttl`).
    pub limits: crate::history::ring::Limits,
    /// `--resume-window`.
    pub window: Duration,
    /// This node's copy of the recent history, which the shards replay from.
    pub mirror: Arc<dyn crate::history::HistoryStore>,
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

impl ClusterBus {
    /// Creates the handle and the thread's state. Nothing connects until [`BusThread::run`].
    pub fn create(
        cfg: RedisConfig,
        stats: Arc<BusStats>,
        history: Option<BusHistory>,
    ) -> io::Result<NewBus> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (to_bus, interest_rx) = ToBus::channel(waker.clone());
        let (publishes, publish_rx) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        let dialect = if cfg.redis_cluster {
            &SHARDED
        } else {
            &CLASSIC
        };
        let window = history.as_ref().map_or(Duration::ZERO, |h| h.window);
        let v2 = match (&history, cfg.wire) {
            (Some(BusHistory { limits, .. }), 2) => Some(wire::V2Call {
                function: if cfg.redis_cluster {
                    b"causeloop_spublish"
                } else {
                    b"causeloop_publish"
                },
                size: limits.size,
                ttl_ms: limits.ttl.as_millis().max(1) as u64,
            }),
            _ => None,
        };
        let bus = Arc::new(ClusterBus {
            dialect,
            mirror: v2.and(history.map(|h| h.mirror)),
            window,
            v2,
            stats,
            waker,
            publishes,
            up: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let thread = BusThread::new(bus.clone(), cfg, poll, interest_rx, publish_rx);
        Ok(NewBus {
            bus,
            thread,
            to_bus,
        })
    }

    /// The dialect's publish command (`PUBLISH`, or `SPUBLISH` on a Redis Cluster).
    pub fn publish_command(&self) -> &'static [u8] {
        self.dialect.publish
    }

    /// How a version 2 publish calls the function (`--bus-wire 2`), or `None` (version 1).
    pub fn v2_call(&self) -> Option<wire::V2Call> {
        self.v2
    }

    /// Hands `job` to the bus thread; `done` is called there with Redis's answer. Never blocks:
    /// a full queue refuses the publish at once, and then `done` is never called.
    pub fn submit(&self, job: BusJob, done: Done) -> Result<(), BusUnavailable> {
        let sent = self.publishes.try_send(Submitted {
            job,
            done,
            at: Instant::now(),
        });
        match sent {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                crate::metrics::ShardStats::add(&self.stats.bus_publish_busy, 1);
                Err(BusUnavailable::Busy)
            }
            Err(TrySendError::Disconnected(_)) => Err(BusUnavailable::Stopped),
        }
    }

    /// Ends the bus thread (after the shards are gone); its connections close, and with them
    /// every subscription of this node. Publishes still queued are answered
    /// [`BusUnavailable::Stopped`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Whether the bus is up: every Redis server that owns channels has a live subscriber
    /// connection from this node.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

/// `Receiver`s the thread owns.
struct Inputs {
    interest: Receiver<BusInterest>,
    publishes: Receiver<Submitted>,
}
