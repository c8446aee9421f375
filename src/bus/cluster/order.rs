//! Where each workspace's stream stands on this node (wire format version 2), as a pure state
//! machine: the bus thread feeds it the messages Redis pushes, the answers to the reads it asked
//! for and its subscriptions coming back, and carries out what it returns ([`Out`]).
//!
//! Redis gives every event of a workspace the next offset of its epoch. A node delivers them in
//! that order, each once:
//! - a message after a hole (the node missed some: a lost connection, Redis killing a slow
//!   subscriber, a slot that moved) is held, and the missing range is read from the workspace's
//!   history stream ([`Read::After`]) and delivered first; messages that arrive meanwhile are held
//!   too, and those the read already delivered are skipped;
//! - a subscription that comes back after a loss reads from where the node stood, so that what
//!   was published while it was away comes first;
//! - a new subscription asks where the stream stands ([`Read::Locate`]), so that a loss before its
//!   first message is noticed too;
//! - what the history no longer holds is reported ([`Out::Gap`], `history_trimmed`) right where it
//!   is missing, and a new epoch (Redis lost the stream) as `history_lost`, unless the old stream
//!   ended idle long enough for its epoch to expire ([`META_IDLE`]);
//! - offsets that go backwards within an epoch on the subscription itself mean Redis lost writes
//!   it had published (a failover to a replica that was behind): reported as `history_lost`, and
//!   the epoch is fenced ([`Out::Fence`]) so that every node and every record learns of it.
//!
//! Everything held is bounded ([`MAX_HELD`] per workspace): past it the read is given up and the
//! workspace's clients are told of the gap.

use crate::event::GapReason;
use crate::history::Position;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long Redis keeps an idle workspace's epoch (`META_IDLE_MS` in `causeloop.lua`). A new
/// epoch after at least this long without an event of the old one lost nothing.
pub const META_IDLE: Duration = Duration::from_secs(86_400);

/// Messages held per workspace while a read is under way, at most.
pub const MAX_HELD: usize = 65_536;

/// Entries asked for per read of a history stream.
pub const READ_PAGE: usize = 512;

/// A read of Redis the machine asks for, answered by [`Streams::located`] or
/// [`Streams::filled`] with the same `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// Where the stream stands (`HMGET <base>:meta epoch offset`).
    Locate,
    /// The entries after `offset` (`XRANGE <base>:history <offset+1>-0 + COUNT READ_PAGE`).
    After {
        /// The epoch the entries should be of.
        epoch: u64,
        /// The last offset the node has.
        offset: u64,
    },
}

/// What the bus thread must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Out<T> {
    /// Hand the event to the shards (after everything before it).
    Deliver(Arc<str>, Position, T),
    /// Tell the workspace's clients here that events are missing (`since`: the `ts` of the last
    /// event delivered here before the gap).
    Gap(Arc<str>, GapReason, Option<u64>),
    /// Read Redis; the answer carries `id`.
    Read(Arc<str>, u64, Read),
    /// Start a new epoch in Redis if `epoch` is still in force (`causeloop_fence`).
    Fence(Arc<str>, u64),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Pushed by the subscription.
    Live,
    /// Pushed by the subscription and held while a read of the missing events ran (so a hole
    /// before it is one the history no longer fills).
    Released,
    /// Pushed by the subscription and held while the node located the stream's head (a hole
    /// before it is read like one found live).
    Located,
    /// Read from the history stream.
    Read,
}

struct Cursor<T> {
    /// 0: no stream known (the next one seen starts it).
    epoch: u64,
    /// The next offset to deliver; 0 while unknown (the first message seen sets it).
    next: u64,
    /// The highest offset the subscription itself pushed in this epoch.
    live_max: u64,
    /// `ts` of the last event delivered.
    last_ts: Option<u64>,
    /// When the last event was delivered.
    last_at: Option<Instant>,
    /// Messages pushed while a read runs, in arrival order.
    held: VecDeque<(Position, u64, T)>,
    /// The read under way (its id).
    reading: Option<u64>,
    /// The read under way, to ask again if it failed.
    read: Option<Read>,
}

impl<T> Cursor<T> {
    fn new() -> Self {
        Cursor {
            epoch: 0,
            next: 0,
            live_max: 0,
            last_ts: None,
            last_at: None,
            held: VecDeque::new(),
            reading: None,
            read: None,
        }
    }
}

/// Every workspace this node subscribes to.
pub struct Streams<T> {
    map: HashMap<Arc<str>, Cursor<T>>,
    next_id: u64,
    /// Reads given up at [`MAX_HELD`].
    pub overflows: u64,
}

impl<T> Default for Streams<T> {
    fn default() -> Self {
        Streams {
            map: HashMap::new(),
            next_id: 1,
            overflows: 0,
        }
    }
}

impl<T> Streams<T> {
    fn start_read(&mut self, ws: &Arc<str>, read: Read, out: &mut Vec<Out<T>>) {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(c) = self.map.get_mut(ws) {
            c.reading = Some(id);
            c.read = Some(read);
        }
        out.push(Out::Read(ws.clone(), id, read));
    }

    /// The subscription to `ws` is in force (first made, or made again after a loss).
    pub fn subscribed(&mut self, ws: &Arc<str>, out: &mut Vec<Out<T>>) {
        let c = self.map.entry(ws.clone()).or_insert_with(Cursor::new);
        let read = if c.next == 0 {
            Read::Locate
        } else {
            Read::After {
                epoch: c.epoch,
                offset: c.next - 1,
            }
        };
        self.start_read(ws, read, out);
    }

    /// The subscription pushed a message at `pos`.
    pub fn live(
        &mut self,
        ws: &Arc<str>,
        pos: Position,
        ts_ms: u64,
        msg: T,
        now: Instant,
        out: &mut Vec<Out<T>>,
    ) {
        let c = self.map.entry(ws.clone()).or_insert_with(Cursor::new);
        if c.reading.is_some() {
            if c.held.len() >= MAX_HELD {
                return self.overflow(ws, out);
            }
            c.held.push_back((pos, ts_ms, msg));
            return;
        }
        self.accept(ws, pos, ts_ms, msg, Via::Live, now, out);
    }

    /// The answer to [`Read::Locate`]: the stream's epoch and newest offset, or none yet.
    pub fn located(
        &mut self,
        ws: &Arc<str>,
        id: u64,
        head: Option<Position>,
        now: Instant,
        out: &mut Vec<Out<T>>,
    ) {
        let Some(c) = self.map.get_mut(ws).filter(|c| c.reading == Some(id)) else {
            return; // a stale answer
        };
        if c.next == 0 {
            // What arrived since the subscription is what follows it; with nothing held, the
            // stream's head is where the node starts (a stream not begun yet starts at 1 of
            // whatever epoch comes).
            match (c.held.front(), head) {
                (Some((p, _, _)), _) => {
                    c.epoch = p.epoch;
                    c.next = p.offset;
                }
                (None, Some(h)) => {
                    c.epoch = h.epoch;
                    c.next = h.offset + 1;
                }
                (None, None) => c.next = 1,
            }
        }
        self.release(ws, Via::Located, now, out);
    }

    /// The answer to [`Read::After`]: the entries read, in order; `complete` when there are no
    /// more (fewer than a page).
    pub fn filled(
        &mut self,
        ws: &Arc<str>,
        id: u64,
        entries: Vec<(Position, u64, T)>,
        complete: bool,
        now: Instant,
        out: &mut Vec<Out<T>>,
    ) {
        let Some(c) = self.map.get(ws).filter(|c| c.reading == Some(id)) else {
            return;
        };
        let asked = c.read;
        let mut any = false;
        for (pos, ts, msg) in entries {
            any = true;
            self.accept(ws, pos, ts, msg, Via::Read, now, out);
        }
        let Some(c) = self.map.get(ws) else { return };
        if !complete && any {
            let read = Read::After {
                epoch: c.epoch,
                offset: c.next - 1,
            };
            if Some(read) != asked {
                return self.start_read(ws, read, out);
            }
        }
        self.release(ws, Via::Released, now, out);
    }

    /// The read under way for `ws` failed (its connection was lost): it is asked again.
    pub fn read_failed(&mut self, ws: &Arc<str>, id: u64, out: &mut Vec<Out<T>>) {
        let Some(read) = self
            .map
            .get(ws)
            .filter(|c| c.reading == Some(id))
            .and_then(|c| c.read)
        else {
            return;
        };
        self.start_read(ws, read, out);
    }

    /// The node no longer serves `ws`.
    pub fn forget(&mut self, ws: &str) {
        self.map.remove(ws);
    }

    /// Workspaces tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Where `ws` stands: its epoch and the newest offset handed on (`None` while not known;
    /// epoch 0 and offset 0 for a stream that has not begun).
    pub fn head(&self, ws: &str) -> Option<Position> {
        let c = self.map.get(ws)?;
        (c.next > 0).then(|| Position {
            epoch: c.epoch,
            offset: c.next - 1,
        })
    }

    /// Messages held for every workspace.
    pub fn held(&self) -> usize {
        self.map.values().map(|c| c.held.len()).sum()
    }

    /// The read is done: what was held goes through, in order, until one of them needs a read
    /// again.
    fn release(&mut self, ws: &Arc<str>, via: Via, now: Instant, out: &mut Vec<Out<T>>) {
        let Some(c) = self.map.get_mut(ws) else {
            return;
        };
        c.reading = None;
        c.read = None;
        while let Some((pos, ts, msg)) = self.map.get_mut(ws).and_then(|c| c.held.pop_front()) {
            self.accept(ws, pos, ts, msg, via, now, out);
            if self.map.get(ws).is_some_and(|c| c.reading.is_some()) {
                return;
            }
        }
    }

    /// Too much held: the read is given up, the clients told, and the next message starts
    /// the stream again.
    fn overflow(&mut self, ws: &Arc<str>, out: &mut Vec<Out<T>>) {
        self.overflows += 1;
        if let Some(c) = self.map.get_mut(ws) {
            out.push(Out::Gap(ws.clone(), GapReason::HistoryTrimmed, c.last_ts));
            c.held.clear();
            c.reading = None;
            c.read = None;
            c.next = 0;
            c.live_max = 0;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        ws: &Arc<str>,
        pos: Position,
        ts_ms: u64,
        msg: T,
        via: Via,
        now: Instant,
        out: &mut Vec<Out<T>>,
    ) {
        let Some(c) = self.map.get_mut(ws) else {
            return;
        };
        let pushed = via != Via::Read;
        let hole_unread = matches!(via, Via::Live | Via::Located);
        if c.next == 0 {
            c.epoch = pos.epoch;
            c.next = pos.offset;
        }
        if pos.epoch != c.epoch {
            if via == Via::Read && pos.epoch < c.epoch {
                return; // an entry older than what the node already follows
            }
            let idle = c
                .last_at
                .map_or(true, |t| now.saturating_duration_since(t) >= META_IDLE);
            if c.epoch != 0 && !idle {
                out.push(Out::Gap(ws.clone(), GapReason::HistoryLost, c.last_ts));
            }
            c.epoch = pos.epoch;
            c.next = 1;
            c.live_max = 0;
        } else if pushed && pos.offset <= c.live_max {
            // The subscription went back: Redis lost what it had published.
            out.push(Out::Gap(ws.clone(), GapReason::HistoryLost, c.last_ts));
            out.push(Out::Fence(ws.clone(), pos.epoch));
            c.next = pos.offset;
            c.live_max = 0;
        }
        if pos.offset > c.next && hole_unread {
            // Held (in arrival order): its offset counts as pushed when it is released.
            if via == Via::Located {
                c.held.push_front((pos, ts_ms, msg));
            } else {
                c.held.push_back((pos, ts_ms, msg));
            }
            let read = Read::After {
                epoch: c.epoch,
                offset: c.next - 1,
            };
            return self.start_read(ws, read, out);
        }
        if pushed {
            c.live_max = c.live_max.max(pos.offset);
        }
        if pos.offset < c.next {
            return; // delivered already (by a read)
        }
        if pos.offset > c.next {
            // Read after the hole was known: the history no longer has what is missing.
            out.push(Out::Gap(ws.clone(), GapReason::HistoryTrimmed, c.last_ts));
        }
        c.next = pos.offset + 1;
        c.last_ts = Some(ts_ms);
        c.last_at = Some(now);
        out.push(Out::Deliver(ws.clone(), pos, msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    fn ws() -> Arc<str> {
        "ws".into()
    }

    /// Runs `out` against a model Redis stream (`stream`: every offset of epoch `epoch` still
    /// held from `first`): answers reads, collects deliveries and gaps.
    struct Harness {
        s: Streams<u64>,
        delivered: Vec<u64>,
        gaps: Vec<GapReason>,
        fences: usize,
        reads: VecDeque<(u64, Read)>,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                s: Streams::default(),
                delivered: Vec::new(),
                gaps: Vec::new(),
                fences: 0,
                reads: VecDeque::new(),
            }
        }

        fn take(&mut self, out: Vec<Out<u64>>) {
            for o in out {
                match o {
                    Out::Deliver(_, p, m) => {
                        assert_eq!(p.offset, m);
                        self.delivered.push(m)
                    }
                    Out::Gap(_, r, _) => self.gaps.push(r),
                    Out::Read(_, id, r) => self.reads.push_back((id, r)),
                    Out::Fence(..) => self.fences += 1,
                }
            }
        }

        /// The subscription is (again) in force.
        fn subscribe(&mut self) {
            let mut out = Vec::new();
            self.s.subscribed(&ws(), &mut out);
            self.take(out);
        }

        fn live(&mut self, epoch: u64, offset: u64) {
            let mut out = Vec::new();
            self.s.live(
                &ws(),
                at(epoch, offset),
                0,
                offset,
                Instant::now(),
                &mut out,
            );
            self.take(out);
        }

        /// Answers the oldest read from a stream of `epoch` holding `first..=last`.
        fn answer(&mut self, epoch: u64, first: u64, last: u64) {
            let (id, read) = self.reads.pop_front().expect("a read");
            let mut out = Vec::new();
            match read {
                Read::Locate => self.s.located(
                    &ws(),
                    id,
                    (last > 0).then_some(at(epoch, last)),
                    Instant::now(),
                    &mut out,
                ),
                Read::After { epoch: e, offset } => {
                    let from = if e == epoch { offset + 1 } else { 1 };
                    let entries: Vec<_> = (from.max(first)..=last)
                        .take(READ_PAGE)
                        .map(|o| (at(epoch, o), 0, o))
                        .collect();
                    let complete = entries.len() < READ_PAGE;
                    self.s
                        .filled(&ws(), id, entries, complete, Instant::now(), &mut out)
                }
            }
            self.take(out);
        }
    }

    #[test]
    fn a_new_subscription_starts_at_the_head_and_delivers_in_order() {
        let mut h = Harness::new();
        h.subscribe();
        h.live(7, 11);
        h.live(7, 12);
        assert!(h.delivered.is_empty(), "held while it locates");
        h.answer(7, 1, 11);
        assert_eq!(h.delivered, [11, 12]);
        h.live(7, 13);
        assert_eq!(h.delivered, [11, 12, 13]);
        assert!(h.gaps.is_empty());
    }

    #[test]
    fn a_hole_is_read_from_the_history_before_anything_newer() {
        let mut h = Harness::new();
        h.subscribe();
        h.answer(7, 1, 3);
        h.live(7, 4);
        h.live(7, 9); // 5..8 missed
        h.live(7, 10);
        assert_eq!(h.delivered, [4]);
        h.answer(7, 1, 10);
        assert_eq!(h.delivered, [4, 5, 6, 7, 8, 9, 10]);
        assert!(h.gaps.is_empty());
    }

    #[test]
    fn a_subscription_back_after_a_loss_reads_what_was_missed_first() {
        let mut h = Harness::new();
        h.subscribe();
        h.answer(7, 1, 0);
        h.live(7, 1);
        // Lost; 2..1500 published meanwhile (three pages); back.
        h.subscribe();
        h.live(7, 1501);
        let mut answers = 0;
        while !h.reads.is_empty() {
            h.answer(7, 1, 1501);
            answers += 1;
        }
        assert_eq!(answers, 3, "pages of {READ_PAGE}");
        assert_eq!(h.delivered, (1..=1501).collect::<Vec<_>>());
        assert!(h.reads.is_empty());
    }

    #[test]
    fn what_the_history_lost_is_a_gap_where_it_is_missing() {
        let mut h = Harness::new();
        h.subscribe();
        h.answer(7, 1, 0);
        h.live(7, 1);
        h.live(7, 50);
        h.answer(7, 40, 50); // 2..39 trimmed
        assert_eq!(h.gaps, [GapReason::HistoryTrimmed]);
        assert_eq!(h.delivered, [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]);
        // A new epoch (Redis lost the stream): lost, then the new stream from its start.
        h.live(8, 2);
        h.answer(8, 1, 2);
        assert_eq!(h.gaps, [GapReason::HistoryTrimmed, GapReason::HistoryLost]);
        assert_eq!(&h.delivered[12..], [1, 2]);
    }

    #[test]
    fn offsets_going_back_are_lost_writes_and_fence_the_epoch() {
        let mut h = Harness::new();
        h.subscribe();
        h.answer(7, 1, 0);
        for o in 1..=5 {
            h.live(7, o);
        }
        h.live(7, 4); // a failover lost 4 and 5, and a new 4 was published
        assert_eq!(h.gaps, [GapReason::HistoryLost]);
        assert_eq!(h.fences, 1);
        assert_eq!(h.delivered, [1, 2, 3, 4, 5, 4]);
    }

    #[test]
    fn an_epoch_that_expired_idle_is_no_gap() {
        let mut s: Streams<u64> = Streams::default();
        let mut out = Vec::new();
        s.subscribed(&ws(), &mut out);
        let Some(Out::Read(_, id, _)) = out.pop() else {
            panic!()
        };
        let t0 = Instant::now();
        s.located(&ws(), id, Some(at(7, 3)), t0, &mut out);
        s.live(&ws(), at(7, 4), 0, 4, t0, &mut out);
        s.live(&ws(), at(9, 1), 0, 1, t0 + META_IDLE, &mut out);
        assert!(out.iter().all(|o| matches!(o, Out::Deliver(..))), "{out:?}");
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn holding_is_bounded() {
        let mut h = Harness::new();
        h.subscribe();
        for o in 1..=(MAX_HELD as u64 + 1) {
            h.live(7, o);
        }
        assert_eq!(h.gaps, [GapReason::HistoryTrimmed]);
        assert_eq!(h.s.held(), 0);
        assert_eq!(h.s.overflows, 1);
        // The stale answer changes nothing; the next message starts the stream again.
        h.answer(7, 1, 100);
        assert!(h.delivered.is_empty());
        h.live(7, MAX_HELD as u64 + 2);
        assert_eq!(h.delivered, [MAX_HELD as u64 + 2]);
    }

    proptest! {
        /// Whatever the subscription drops and however late reads are answered, every offset
        /// of the stream is delivered once and in order, or a gap is reported.
        #[test]
        fn every_event_once_in_order(
            total in 1u64..300,
            drops in proptest::collection::vec(any::<bool>(), 300),
            losses in proptest::collection::vec(0u64..300, 0..4),
            answer_after in proptest::collection::vec(0usize..4, 300),
        ) {
            let mut h = Harness::new();
            h.subscribe();
            for o in 1..=total {
                if losses.contains(&o) {
                    h.subscribe();
                }
                if !drops[o as usize % drops.len()] {
                    h.live(7, o);
                }
                for _ in 0..answer_after[o as usize % answer_after.len()].min(h.reads.len()) {
                    h.answer(7, 1, o);
                }
            }
            while !h.reads.is_empty() {
                h.answer(7, 1, total);
            }
            prop_assert!(h.gaps.is_empty(), "{:?}", h.gaps);
            // Everything after where the node started (the first delivered), once, in order.
            if let Some(&first) = h.delivered.first() {
                let want: Vec<u64> = (first..=h.delivered[h.delivered.len() - 1]).collect();
                prop_assert_eq!(&h.delivered, &want);
            }
        }
    }
}
