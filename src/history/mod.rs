//! The delivery guarantee: nothing lost across a reconnect (the contract's § "Delivery").
//!
//! - [`ring`]: positions and the history of every workspace, as the frames already built (a
//!   pure core).
//! - [`records`]: resume records keyed by a hash of the token and the workspace (a pure core).
//! - [`ack`]: the acknowledgement carried by ping payloads (pure).
//! - [`Delivery`]: both stores behind the interfaces the rest of the server uses
//!   ([`HistoryStore`], [`ResumeStore`]), the local in-memory implementations of them, and the
//!   counters.
//!
//! Who touches what: every publish on the local bus appends its events (one short lock per
//! batch, never held across I/O or a wait); a shard reads the history when a workspace gets its
//! first connection there, when a connection resumes (a replay, paced by its outbox), and when
//! events reach it out of order (two publishers racing): no lock is taken per delivered frame.
//! Records are put when a connection ends and taken when one opens.
//!
//! On the cluster bus with wire format 2 (`--bus-wire 2`) the positions, the history and the
//! records live in Redis: the bus thread keeps this process's history as a copy of what it
//! delivers ([`HistoryStore::place`], positions from Redis), and the records go to Redis through
//! it; the local record store then only counts each token's open connections. With wire format
//! 1 the cluster bus runs without history.

pub mod ack;
pub mod records;
pub mod ring;

use crate::event::Event;
use crate::ws::SharedFrame;
use records::{Found, Record, RecordKey, Records};
use ring::{Entry, Evictions, History, Limits, Miss};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where an event stands in its workspace's stream: an offset that grows by one per event,
/// within an epoch that changes only when the history behind it is lost. Offset 0 is "before
/// the first event"; epoch 0 is "no stream yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream's epoch.
    pub epoch: u64,
    /// The offset within the epoch.
    pub offset: u64,
}

/// What the history holds, for the gauges.
#[derive(Clone, Copy, Debug, Default)]
pub struct HistoryUsage {
    /// Events held.
    pub events: usize,
    /// Bytes held, as counted against `--history-max-bytes`.
    pub bytes: usize,
    /// Workspaces with a stream.
    pub workspaces: usize,
    /// Events evicted so far, by cause ([`ring::EVICTION_CAUSES`]).
    pub evictions: Evictions,
}

/// What the resume records hold, for the gauges.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordUsage {
    /// Records held.
    pub held: usize,
    /// Records evicted at `--resume-max-records` so far.
    pub evicted: u64,
    /// Records whose `--resume-window` passed so far.
    pub expired: u64,
}

/// Positions and the history of every workspace. The local bus keeps them in memory
/// ([`LocalHistory`]); a cluster store keeps them where every node reaches them.
pub trait HistoryStore: Send + Sync {
    /// Gives each event of a batch the next position of its workspace and keeps it, in order.
    fn append(&self, events: &mut [Event], now: Instant);
    /// Keeps events whose positions were assigned elsewhere (by Redis, on the cluster bus), in
    /// order ([`History::place`]).
    fn place(&self, events: &[Event], now: Instant);
    /// Forgets a workspace's stream (a hole in it on this node).
    fn forget(&self, workspace: &str);
    /// Where the workspace's kept events begin: its epoch and its oldest kept offset (its next
    /// offset when none is kept), if it has a stream here.
    fn oldest(&self, workspace: &str) -> Option<Position>;
    /// Rebuilds the workspace's stream with `older` events (read back from Redis for a resume,
    /// in order, contiguous) in front of those kept ([`History::rebase`]).
    fn rebase(&self, workspace: &str, epoch: u64, older: Vec<ring::Older>, now: Instant) -> bool;
    /// The workspace's epoch and newest offset.
    fn head(&self, workspace: &str, now: Instant) -> Position;
    /// Visits the events after `after` and before `until` in order while `visit` says so;
    /// returns where a next read starts, or why some of them are gone.
    fn read(
        &self,
        workspace: &str,
        after: Position,
        until: u64,
        now: Instant,
        visit: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<u64, Miss>;
    /// The workspace's head and the `ts` of the event at `pos` (when known), read together.
    fn standing(&self, workspace: &str, pos: Position, now: Instant) -> (Position, Option<u64>);
    /// The offset of the kept event whose frame is `frame`.
    fn offset_of(&self, workspace: &str, epoch: u64, frame: &SharedFrame) -> Option<u64>;
    /// Whether a stream was dropped before its time (byte pressure) at or after `t`.
    fn dropped_early_since(&self, t: Instant) -> bool;
    /// What it holds.
    fn usage(&self) -> HistoryUsage;
}

/// Resume records, and which keys have connections open. Kept in memory on the local bus
/// ([`LocalRecords`]).
pub trait ResumeStore: Send + Sync {
    /// A connection with `key` opens: its record, or whether a twin is open (see
    /// [`records::Found`]); it is counted open from here.
    fn begin(&self, key: RecordKey, now: Instant) -> Found;
    /// A connection with `key` ended, leaving `record`.
    fn end(&self, key: RecordKey, record: Option<Record>, now: Instant);
    /// Takes the oldest record under `key` (a connection waiting for its twin's).
    fn take(&self, key: &RecordKey, now: Instant) -> Option<Record>;
    /// How many connections with `key` are open (at least).
    fn open_count(&self, key: &RecordKey) -> u32;
    /// Whether a record was evicted at the bound at or after `t`.
    fn evicted_since(&self, t: Instant) -> bool;
    /// What it holds.
    fn usage(&self) -> RecordUsage;
}

/// Locks a store's core. A panic while it was held (a bug) leaves a core whose invariants a
/// panic mid-update may have broken, but whose every field is still memory-safe: serving on
/// is better than failing every publish.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The in-memory history of the local bus.
pub struct LocalHistory(Mutex<History>);

impl LocalHistory {
    /// An empty history under `limits`, its epochs starting at `first_epoch`.
    pub fn new(limits: Limits, first_epoch: u64) -> Self {
        LocalHistory(Mutex::new(History::new(limits, first_epoch)))
    }
}

impl HistoryStore for LocalHistory {
    fn append(&self, events: &mut [Event], now: Instant) {
        let mut h = lock(&self.0);
        for e in events {
            e.pos = h.append_with(
                &e.workspace_id,
                e.user_id.as_deref(),
                &e.frame,
                Some(&e.deflated),
                e.ts_ms,
                now,
            );
        }
    }

    fn place(&self, events: &[Event], now: Instant) {
        let mut h = lock(&self.0);
        for e in events.iter().filter(|e| e.pos.epoch != 0) {
            h.place_with(
                &e.workspace_id,
                e.pos,
                e.user_id.as_deref(),
                &e.frame,
                Some(&e.deflated),
                e.ts_ms,
                now,
            );
        }
    }

    fn forget(&self, workspace: &str) {
        lock(&self.0).forget(workspace)
    }

    fn oldest(&self, workspace: &str) -> Option<Position> {
        lock(&self.0).oldest(workspace)
    }

    fn rebase(&self, workspace: &str, epoch: u64, older: Vec<ring::Older>, now: Instant) -> bool {
        lock(&self.0).rebase(workspace, epoch, older, now)
    }

    fn head(&self, workspace: &str, now: Instant) -> Position {
        lock(&self.0).head(workspace, now)
    }

    fn read(
        &self,
        workspace: &str,
        after: Position,
        until: u64,
        now: Instant,
        visit: &mut dyn FnMut(&Entry) -> bool,
    ) -> Result<u64, Miss> {
        lock(&self.0).read(workspace, after, until, now, visit)
    }

    fn standing(&self, workspace: &str, pos: Position, now: Instant) -> (Position, Option<u64>) {
        let mut h = lock(&self.0);
        (h.head(workspace, now), h.ts_at(workspace, pos))
    }

    fn offset_of(&self, workspace: &str, epoch: u64, frame: &SharedFrame) -> Option<u64> {
        lock(&self.0).offset_of(workspace, epoch, frame)
    }

    fn dropped_early_since(&self, t: Instant) -> bool {
        lock(&self.0).dropped_early_since(t)
    }

    fn usage(&self) -> HistoryUsage {
        let mut h = lock(&self.0);
        // Age out what is due, so an idle server's gauges fall as the TTL passes.
        h.enforce(Instant::now());
        HistoryUsage {
            events: h.events(),
            bytes: h.bytes(),
            workspaces: h.spaces(),
            evictions: h.evictions(),
        }
    }
}

/// The in-memory resume records of the local bus.
pub struct LocalRecords(Mutex<Records>);

impl LocalRecords {
    /// At most `max` records, each for `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        LocalRecords(Mutex::new(Records::new(max, window)))
    }
}

impl ResumeStore for LocalRecords {
    fn begin(&self, key: RecordKey, now: Instant) -> Found {
        lock(&self.0).begin(key, now)
    }

    fn end(&self, key: RecordKey, record: Option<Record>, now: Instant) {
        lock(&self.0).end(key, record, now)
    }

    fn take(&self, key: &RecordKey, now: Instant) -> Option<Record> {
        lock(&self.0).take(key, now)
    }

    fn evicted_since(&self, t: Instant) -> bool {
        lock(&self.0).evicted_since(t)
    }

    fn open_count(&self, key: &RecordKey) -> u32 {
        lock(&self.0).open_count(key)
    }

    fn usage(&self) -> RecordUsage {
        let mut r = lock(&self.0);
        r.expire(Instant::now());
        RecordUsage {
            held: r.len(),
            evicted: r.evicted(),
            expired: r.expired(),
        }
    }
}

/// How a connection began, in [`RESUME_OUTCOMES`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No record: the live stream from `connected` on.
    Fresh = 0,
    /// A record the history covered: the missed events, then live.
    Replayed = 1,
    /// `stream.gap` `history_trimmed`.
    GapTrimmed = 2,
    /// `stream.gap` `history_lost`.
    GapLost = 3,
}

/// Labels of [`Outcome`].
pub const RESUME_OUTCOMES: [&str; 4] = ["fresh", "replayed", "gap_trimmed", "gap_lost"];

/// Counters of the delivery guarantee (shards write them on rare paths only: a connection's
/// start and end, a replay's steps, an acknowledgement).
#[derive(Default)]
pub struct DeliveryStats {
    /// Connections by how they began ([`RESUME_OUTCOMES`]).
    pub outcomes: [AtomicU64; 4],
    /// Frames sent from the history in replays.
    pub replayed_frames: AtomicU64,
    /// Resume records a shard could not hand to the cluster bus (its channel full).
    pub records_not_kept: AtomicU64,
    /// Acknowledgement pings queued.
    pub acks_sent: AtomicU64,
    /// Acknowledgements taken from pongs.
    pub acks_received: AtomicU64,
    /// Pongs whose payload claimed a position the connection was not sent (ignored).
    pub acks_refused: AtomicU64,
    /// Resume records made.
    pub records_made: AtomicU64,
    /// Events a shard took from the history because they reached it out of order.
    pub gap_fills: AtomicU64,
    /// `stream.gap` frames sent to live connections (the history could not fill a shard's gap).
    pub live_gaps: AtomicU64,
    /// Waits for an open twin's record, by how they ended ([`TWIN_WAIT_ENDS`]).
    pub twin_waits: [AtomicU64; 3],
}

/// How a wait for a twin's record ended, in `DeliveryStats::twin_waits` order: the twin's record
/// came (it was the connection being replaced), every twin answered its probe (second tabs), or
/// the wait ran out.
pub const TWIN_WAIT_ENDS: [&str; 3] = ["record", "answered", "timeout"];

impl DeliveryStats {
    /// Adds `n` to `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// The delivery guarantee's stores and settings, shared by the publish path and the shards.
pub struct Delivery {
    /// The history (the publish path holds it too).
    pub history: std::sync::Arc<dyn HistoryStore>,
    /// The resume records.
    pub records: Box<dyn ResumeStore>,
    /// The counters.
    pub stats: DeliveryStats,
    /// When the process started (monotonic), for the restart rule.
    pub started: Instant,
    /// When the process started, Unix seconds (compared with a token's `iat`).
    pub started_unix: u64,
    /// `--resume-window`.
    pub window: Duration,
    /// Positions come from the cluster bus (Redis), not from this process: a workspace this
    /// node has not seen yet starts wherever its first event here stands.
    pub from_bus: bool,
}

/// What the delivery guarantee is configured with.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryConfig {
    /// The history's bounds.
    pub limits: Limits,
    /// `--resume-max-records`.
    pub max_records: usize,
    /// `--resume-window`.
    pub window: Duration,
    /// Positions come from the cluster bus (`--bus-wire 2`).
    pub from_bus: bool,
}

/// How a connection's stream begins, decided from its resume record (if any) and where the
/// shard's stream of its workspace stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// No record: the live stream from `connected` on.
    Fresh,
    /// The events after `after`, then live; `since` is for a `stream.gap` should the history
    /// turn out not to hold them all.
    Replay {
        /// The last position the client is known to have.
        after: Position,
        /// The `ts` at `after`, when known.
        since: Option<u64>,
    },
    /// `stream.gap` now, then live.
    Gap {
        /// Why.
        reason: crate::event::GapReason,
        /// The `ts` of the last event the client had, when known.
        since: Option<u64>,
    },
}

/// Decides how a connection begins (the contract's resume rules), purely:
/// - `record`: the connection's resume record, if it had one;
/// - `head`: where the shard's stream of the workspace stands (its epoch, its newest offset);
/// - `suspect`: without a record, whether the connection may have missed events all the same
///   (the process started within the resume window and the token is older than the start, or
///   records were evicted at their bound within the window);
/// - `dropped_early`: whether a workspace stream was dropped before its time since the record
///   was made (so a stream that ended may have ended with events the client never had).
pub fn plan(record: Option<Record>, head: Position, suspect: bool, dropped_early: bool) -> Start {
    use crate::event::GapReason;
    let Some(r) = record else {
        return if suspect {
            Start::Gap {
                reason: GapReason::HistoryLost,
                since: None,
            }
        } else {
            Start::Fresh
        };
    };
    if r.at.epoch == head.epoch {
        return Start::Replay {
            after: r.at,
            since: r.since_ms,
        };
    }
    // The record's stream is gone. Streams go only after idling for the whole resume window
    // (unless dropped early), so a record made within the window was made after the stream's
    // last event: if the client had that event, it missed nothing of the old stream, and
    // everything of the new one is what it missed.
    let newer = head.epoch == 0 || r.at.epoch < head.epoch;
    if r.caught_up && newer && !dropped_early {
        return Start::Replay {
            after: Position {
                epoch: head.epoch,
                offset: 0,
            },
            since: r.since_ms,
        };
    }
    Start::Gap {
        reason: GapReason::HistoryLost,
        since: r.since_ms,
    }
}

impl DeliveryConfig {
    /// The delivery guarantee `cfg` asks for: none with `--history-size 0`, and on the
    /// cluster bus only with `--bus-wire 2` (positions and history in Redis).
    pub fn of(cfg: &crate::config::Config) -> Option<DeliveryConfig> {
        let from_bus = match &cfg.bus {
            crate::config::BusConfig::Local => false,
            crate::config::BusConfig::Redis(r) if r.wire == 2 => true,
            crate::config::BusConfig::Redis(_) => return None,
        };
        if cfg.history_size == 0 {
            return None;
        }
        Some(DeliveryConfig {
            limits: Limits {
                size: cfg.history_size,
                ttl: cfg.history_ttl,
                max_bytes: cfg.history_max_bytes,
                keep_idle: cfg.resume_window,
            },
            max_records: cfg.resume_max_records,
            window: cfg.resume_window,
            from_bus,
        })
    }
}

impl Delivery {
    /// In-memory stores (the local bus). The first epoch is random, so that a restarted
    /// process never takes a predecessor's position for one of its own.
    pub fn local(cfg: DeliveryConfig) -> Delivery {
        let mut seed = [0u8; 4];
        let _ = ::ring::rand::SecureRandom::fill(&::ring::rand::SystemRandom::new(), &mut seed);
        // Epochs count up from a random 32-bit start: never 0, never near overflow.
        let first_epoch = (u32::from_be_bytes(seed) as u64) << 16 | 1;
        Delivery {
            history: std::sync::Arc::new(LocalHistory::new(cfg.limits, first_epoch)),
            records: Box::new(LocalRecords::new(cfg.max_records, cfg.window)),
            stats: DeliveryStats::default(),
            started: Instant::now(),
            started_unix: crate::clock::now_ms() / 1000,
            window: cfg.window,
            from_bus: cfg.from_bus,
        }
    }

    /// A connection ended: records where it stood, `at`, for `key`, filling in what the
    /// history knows (the `ts` at `at`, whether `at` was the newest). Returns the record; on
    /// the cluster bus the caller hands it to Redis, and only the count of open connections is
    /// kept here.
    pub fn record(
        &self,
        key: RecordKey,
        workspace: &str,
        at: Position,
        from_ack: bool,
        now: Instant,
    ) -> Record {
        let (head, since_ms) = self.history.standing(workspace, at, now);
        // A client that joined before its workspace had a stream and acknowledged nothing of
        // the one that began since stands before that stream's first event.
        let at = if at.epoch == 0 && head.epoch != 0 {
            Position {
                epoch: head.epoch,
                offset: 0,
            }
        } else {
            at
        };
        let record = Record {
            at,
            since_ms,
            caught_up: head.epoch == at.epoch && head.offset == at.offset,
            from_ack,
            made: now,
        };
        self.records
            .end(key, (!self.from_bus).then_some(record), now);
        DeliveryStats::add(&self.stats.records_made, 1);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::GapReason;

    fn at(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    fn rec(pos: Position, caught_up: bool) -> Record {
        Record {
            at: pos,
            since_ms: Some(42),
            caught_up,
            from_ack: false,
            made: Instant::now(),
        }
    }

    #[test]
    fn no_record_is_fresh_unless_suspect() {
        assert_eq!(plan(None, at(3, 9), false, false), Start::Fresh);
        assert_eq!(
            plan(None, at(3, 9), true, false),
            Start::Gap {
                reason: GapReason::HistoryLost,
                since: None
            }
        );
    }

    #[test]
    fn a_record_of_the_same_epoch_replays_from_it_wherever_it_stands() {
        for offset in [0, 5, 9, 12] {
            assert_eq!(
                plan(Some(rec(at(3, offset), false)), at(3, 9), false, false),
                Start::Replay {
                    after: at(3, offset),
                    since: Some(42)
                }
            );
        }
    }

    #[test]
    fn a_record_of_a_stream_that_ended_idle_replays_the_new_one_only_if_it_had_everything() {
        let new = Start::Replay {
            after: at(5, 0),
            since: Some(42),
        };
        let lost = Start::Gap {
            reason: GapReason::HistoryLost,
            since: Some(42),
        };
        assert_eq!(plan(Some(rec(at(3, 9), true)), at(5, 2), false, false), new);
        assert_eq!(plan(Some(rec(at(0, 0), true)), at(5, 2), false, false), new);
        assert_eq!(
            plan(Some(rec(at(3, 9), true)), at(0, 0), false, false),
            Start::Replay {
                after: at(0, 0),
                since: Some(42)
            }
        );
        assert_eq!(
            plan(Some(rec(at(3, 8), false)), at(5, 2), false, false),
            lost
        );
        assert_eq!(plan(Some(rec(at(3, 9), true)), at(5, 2), false, true), lost);
        // A record of an epoch newer than the shard's stream: the shard is behind a stream
        // it has not seen begin.
        assert_eq!(
            plan(Some(rec(at(7, 1), true)), at(5, 2), false, false),
            lost
        );
    }
}
