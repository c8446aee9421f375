//! The publish handle: a cheap, cloneable, thread-safe way to put events on the stream.
//!
//! An event is validated, then encoded once (`ts` stamped here): into a shared frame for the
//! local bus, or into the Redis command that carries it for the cluster bus, its payload copied
//! once either way (its frame's size is computed, not built, to check it against the bound).
//! Then it is sent:
//!
//! - local bus: to each shard whose interest bits say it may hold subscribers of the event's
//!   workspace, a batch as one message per shard, so the order of events from one publisher is
//!   the order every subscriber sees;
//! - cluster bus: to the bus thread, which hands it to Redis and reports back.
//!
//! [`Publisher::publish`] and friends wait (they are for threads that may): for room in a
//! shard's inbox, or for Redis's answer. Publishing never waits on a client. Event loops that
//! must not block (the internal listener) use [`Publisher::prepare`] and send what it gives
//! without waiting (see [`Prepared`]).

use super::body::EventSpec;
use super::cluster::{BusJob, BusUnavailable, ClusterBus};
use super::wire::Publish;
use crate::clock;
use crate::config::Config;
use crate::dispatch::{Links, PendingBatch};
use crate::event::{check_id, check_type, encode_with, frame_len, Event, EventError};
use crate::history::{HistoryStore, Position};
use crate::http::Status;
use crate::lifecycle::Lifecycle;
use crate::metrics::{BusStats, ShardStats};
use serde::Serialize;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a publish was refused. Nothing of a refused publish reaches any subscriber.
#[derive(Debug)]
pub enum PublishError {
    /// The event itself is invalid.
    Invalid(EventError),
    /// One event of a batch is invalid: its index and why. Nothing of the batch was published.
    InvalidItem(usize, EventError),
    /// The server is draining or stopped.
    Draining,
    /// The cluster bus cannot take the publish (Redis, or the master of one of its slots,
    /// unreachable, or its queue full); nothing was published unless Redis failed mid-publish
    /// (see [`BusUnavailable`]).
    BusUnavailable(BusUnavailable),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Invalid(e) => e.fmt(f),
            PublishError::InvalidItem(i, e) => write!(f, "item {i}: {e}"),
            PublishError::Draining => f.write_str("server is draining; publish to another node"),
            PublishError::BusUnavailable(why) => why.fmt(f),
        }
    }
}

impl std::error::Error for PublishError {}

impl PublishError {
    /// The HTTP status `POST /v1/publish` answers this refusal with: the one table of it (the
    /// same table is in docs/protocol.md).
    pub fn status(&self) -> Status {
        match self {
            PublishError::Invalid(EventError::TooLarge(..))
            | PublishError::InvalidItem(_, EventError::TooLarge(..)) => Status::PayloadTooLarge,
            PublishError::Invalid(_) | PublishError::InvalidItem(..) => Status::BadRequest,
            PublishError::Draining | PublishError::BusUnavailable(_) => Status::Unavailable,
        }
    }

    fn at(i: usize, of: usize, e: EventError) -> PublishError {
        if of == 1 {
            PublishError::Invalid(e)
        } else {
            PublishError::InvalidItem(i, e)
        }
    }
}

impl From<EventError> for PublishError {
    fn from(e: EventError) -> Self {
        PublishError::Invalid(e)
    }
}

impl From<BusUnavailable> for PublishError {
    fn from(e: BusUnavailable) -> Self {
        PublishError::BusUnavailable(e)
    }
}

/// The limits every event is held to.
#[derive(Clone, Copy, Debug)]
struct EventLimits {
    max_id_bytes: usize,
    max_event_bytes: usize,
    max_json_depth: usize,
}

/// What the publish path uses, and nothing more.
struct Path {
    limits: EventLimits,
    lifecycle: Arc<Lifecycle>,
    links: Arc<Links>,
    stats: Arc<BusStats>,
    shard_stats: Arc<[ShardStats]>,
    bus: Option<Arc<ClusterBus>>,
    history: Option<Arc<dyn HistoryStore>>,
}

/// A handle for publishing events. Clone it freely; all clones feed the same server.
#[derive(Clone)]
pub struct Publisher {
    path: Arc<Path>,
}

/// A validated, encoded publish, ready to be sent without waiting.
pub enum Prepared {
    /// For the shards (local bus): advance it with [`PendingBatch::advance`] until done.
    Local(PendingBatch, usize),
    /// For the cluster bus: hand it to [`Publisher::submit`].
    Bus(BusJob),
    /// Nothing to send (an empty batch).
    Empty,
}

/// The Redis command of one validated event of a publish body.
fn spec_publish<'a>(bus: &ClusterBus, s: &'a EventSpec<'_>, ts_ms: u64, len: usize) -> Publish<'a> {
    Publish {
        command: bus.publish_command(),
        v2: bus.v2_call(),
        workspace_id: &s.workspace_id,
        kind: &s.kind,
        user_id: s.user_id.as_deref(),
        ts_ms,
        payload_len: len,
    }
}

/// How long a library publish through the cluster bus waits for Redis's answer at most (the
/// bus answers sooner: a publish it cannot deliver within its own deadline is failed).
const BUS_ANSWER_DEADLINE: Duration = Duration::from_secs(5);

thread_local! {
    /// A library publisher's payload, serialized here before it is copied into its command.
    static PAYLOAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Publisher {
    /// A publisher over the shards' `links`, or `bus` when there is one.
    pub(crate) fn new(
        cfg: &Config,
        lifecycle: Arc<Lifecycle>,
        links: Arc<Links>,
        stats: Arc<BusStats>,
        shard_stats: Arc<[ShardStats]>,
        bus: Option<Arc<ClusterBus>>,
        history: Option<Arc<dyn HistoryStore>>,
    ) -> Publisher {
        Publisher {
            path: Arc::new(Path {
                limits: EventLimits {
                    max_id_bytes: cfg.max_id_bytes,
                    max_event_bytes: cfg.max_event_bytes,
                    max_json_depth: cfg.max_json_depth,
                },
                lifecycle,
                links,
                stats,
                shard_stats,
                bus,
                history,
            }),
        }
    }

    /// Publishes to every connection of `workspace_id`.
    pub fn publish<P: Serialize + ?Sized>(
        &self,
        workspace_id: &str,
        event_type: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        self.publish_one(workspace_id, None, event_type, payload)
    }

    /// Publishes to every connection of `user_id` in `workspace_id`.
    pub fn publish_user<P: Serialize + ?Sized>(
        &self,
        workspace_id: &str,
        user_id: &str,
        event_type: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        self.publish_one(workspace_id, Some(user_id), event_type, payload)
    }

    fn publish_one<P: Serialize + ?Sized>(
        &self,
        ws: &str,
        user: Option<&str>,
        kind: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        let limits = self.path.limits;
        check_id(ws, "workspace_id", limits.max_id_bytes)?;
        if let Some(u) = user {
            check_id(u, "user_id", limits.max_id_bytes)?;
        }
        check_type(kind)?;
        let ts = clock::now_ms();
        let prepared = match &self.path.bus {
            None => {
                let mut err = None;
                let frame = encode_with(kind, 64, ts, |buf| {
                    err = serialize_payload(buf, payload, limits).err();
                });
                if let Some(e) = err {
                    return Err(e.into());
                }
                if frame.len() > limits.max_event_bytes {
                    return Err(EventError::TooLarge(frame.len(), limits.max_event_bytes).into());
                }
                let event = Event {
                    workspace_id: ws.into(),
                    user_id: user.map(Into::into),
                    frame,
                    accepted_at: Instant::now(),
                    ts_ms: ts,
                    pos: Position::default(),
                    deflated: Default::default(),
                };
                self.local(vec![event])
            }
            Some(bus) => PAYLOAD.with(|cell| {
                let mut buf = cell.borrow_mut();
                buf.clear();
                serialize_payload(&mut buf, payload, limits)?;
                let size = frame_len(kind, buf.len());
                if size > limits.max_event_bytes {
                    return Err(EventError::TooLarge(size, limits.max_event_bytes).into());
                }
                let mut job = BusJob::default();
                let publish = Publish {
                    command: bus.publish_command(),
                    v2: bus.v2_call(),
                    workspace_id: ws,
                    kind,
                    user_id: user,
                    ts_ms: ts,
                    payload_len: buf.len(),
                };
                job.push(&publish, |out| out.extend_from_slice(&buf));
                Ok::<_, PublishError>(Prepared::Bus(job))
            })?,
        };
        self.send_and_wait(prepared).map(|_| ())
    }

    /// Validates and encodes the events of a publish body, all or nothing, ready to be sent.
    pub fn prepare(&self, specs: &[EventSpec<'_>]) -> Result<Prepared, PublishError> {
        if self.path.lifecycle.is_draining() {
            ShardStats::add(&self.path.stats.rejected_draining, 1);
            return Err(PublishError::Draining);
        }
        if specs.is_empty() {
            return Ok(Prepared::Empty);
        }
        let ts = clock::now_ms();
        let max = self.path.limits.max_event_bytes;
        // Sized first, arithmetically: nothing is encoded for a body with an event too large.
        let mut sizes = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let payload_len = crate::json::minified_len(s.payload.as_bytes());
            let size = frame_len(&s.kind, payload_len);
            if size > max {
                return Err(PublishError::at(
                    i,
                    specs.len(),
                    EventError::TooLarge(size, max),
                ));
            }
            sizes.push(payload_len);
        }
        match &self.path.bus {
            None => {
                let now = Instant::now();
                let events: Vec<Event> = specs
                    .iter()
                    .zip(&sizes)
                    .map(|(s, &len)| Event {
                        workspace_id: (*s.workspace_id).into(),
                        user_id: s.user_id.as_deref().map(Into::into),
                        frame: encode_with(&s.kind, len, ts, |buf| {
                            crate::json::minify_into(buf, s.payload.as_bytes())
                        }),
                        accepted_at: now,
                        ts_ms: ts,
                        pos: Position::default(),
                        deflated: Default::default(),
                    })
                    .collect();
                Ok(self.local(events))
            }
            Some(bus) => {
                let publish = |s, len| spec_publish(bus, s, ts, len);
                let bytes = specs
                    .iter()
                    .zip(&sizes)
                    .map(|(s, &len)| publish(s, len).command_len())
                    .sum();
                let mut job = BusJob::with_capacity(bytes, specs.len());
                for (s, &len) in specs.iter().zip(&sizes) {
                    job.push(&publish(s, len), |out| {
                        crate::json::minify_into(out, s.payload.as_bytes())
                    });
                }
                Ok(Prepared::Bus(job))
            }
        }
    }

    fn local(&self, mut events: Vec<Event>) -> Prepared {
        // Positions first, then the interest bits: a shard whose first connection of a
        // workspace reads the history's head after setting its bit either finds an event
        // there or is among the targets of the publish that appends it (the store's lock
        // orders the two).
        if let Some(history) = &self.path.history {
            history.append(&mut events, Instant::now());
        }
        let targets = self.path.links.targets(&events);
        let n = events.len();
        Prepared::Local(PendingBatch::new(events.into(), targets), n)
    }

    /// Publishes already-validated events from a publish body, in order, all or nothing,
    /// waiting as [`Publisher::publish`] does. Returns how many were accepted.
    pub fn publish_specs(&self, specs: &[EventSpec<'_>]) -> Result<usize, PublishError> {
        let prepared = self.prepare(specs)?;
        self.send_and_wait(prepared)
    }

    /// Sends what [`Publisher::prepare`] gave, waiting for room or for Redis.
    fn send_and_wait(&self, prepared: Prepared) -> Result<usize, PublishError> {
        let path = &self.path;
        if path.lifecycle.is_draining() {
            ShardStats::add(&path.stats.rejected_draining, 1);
            return Err(PublishError::Draining);
        }
        match prepared {
            Prepared::Empty => Ok(0),
            Prepared::Local(pending, n) => {
                let (batch, targets) = pending.into_parts();
                path.links
                    .send_blocking(&batch, targets, |i| {
                        ShardStats::add(&path.shard_stats[i].inbox_waits, 1)
                    })
                    // The shard has exited: only happens once a drain has finished.
                    .map_err(|_| PublishError::Draining)?;
                self.accepted(n);
                Ok(n)
            }
            Prepared::Bus(job) => {
                let n = job.len();
                let (tx, rx) = crossbeam_channel::bounded(1);
                self.submit(
                    job,
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                )?;
                match rx.recv_timeout(BUS_ANSWER_DEADLINE) {
                    Ok(Ok(())) => Ok(n),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(BusUnavailable::timed_out().into()),
                }
            }
        }
    }

    /// Hands a cluster-bus publish to the bus thread; `done` is called (on the bus thread)
    /// with Redis's answer, unless this returns an error, in which case it is never called.
    pub fn submit(
        &self,
        job: BusJob,
        done: Box<dyn FnOnce(Result<(), BusUnavailable>) + Send>,
    ) -> Result<(), PublishError> {
        let path = &self.path;
        let bus = path.bus.as_ref().expect("a bus job needs the cluster bus");
        let n = job.len() as u64;
        let stats = path.stats.clone();
        let counted = Box::new(move |r: Result<(), BusUnavailable>| {
            match &r {
                Ok(()) => ShardStats::add(&stats.published, n),
                Err(_) => ShardStats::add(&stats.rejected_bus_unavailable, 1),
            }
            done(r)
        });
        bus.submit(job, counted).map_err(|e| {
            ShardStats::add(&path.stats.rejected_bus_unavailable, 1);
            PublishError::BusUnavailable(e)
        })
    }

    /// Counts `n` events accepted (local bus; the cluster bus counts when Redis has them).
    pub fn accepted(&self, n: usize) {
        ShardStats::add(&self.path.stats.published, n as u64);
    }

    /// The shards' links (for loops that send prepared batches themselves).
    pub fn links(&self) -> &Arc<Links> {
        &self.path.links
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.path.lifecycle.is_draining()
    }

    /// Whether publishes go through the cluster bus.
    pub fn has_bus(&self) -> bool {
        self.path.bus.is_some()
    }
}

/// Serializes a library payload into `buf` and checks it as a publish body's would be.
fn serialize_payload<P: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    payload: &P,
    limits: EventLimits,
) -> Result<(), EventError> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, payload).map_err(|e| EventError::Serialize(e.to_string()))?;
    let written = &buf[start..];
    if written.first() != Some(&b'{') {
        return Err(EventError::PayloadNotObject);
    }
    if crate::json::max_depth(written) > limits.max_json_depth {
        return Err(EventError::TooDeep(limits.max_json_depth));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_one_status() {
        let big = EventError::TooLarge(2, 1);
        assert_eq!(
            PublishError::Invalid(big.clone()).status(),
            Status::PayloadTooLarge
        );
        assert_eq!(
            PublishError::InvalidItem(3, big).status(),
            Status::PayloadTooLarge
        );
        assert_eq!(
            PublishError::Invalid(EventError::PayloadNotObject).status(),
            Status::BadRequest
        );
        assert_eq!(PublishError::Draining.status(), Status::Unavailable);
        assert_eq!(
            PublishError::BusUnavailable(BusUnavailable::timed_out()).status(),
            Status::Unavailable
        );
    }
}
