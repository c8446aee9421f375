//! The history of every workspace: positions assigned in publish order, and the recent events
//! kept as the frames already built for them (a reference to the shared frame, never a copy).
//!
//! A pure core: no lock, no clock, no thread. [`crate::history::Delivery`] puts it behind one
//! short lock and passes `now`.
//!
//! Each workspace has a *space*: its epoch, the next offset to assign, and a ring of its recent
//! events. Offsets grow by one per event within an epoch. A space whose ring is empty is kept
//! (so its offsets carry on) until it has been idle for `keep_idle` (the resume window), then
//! dropped; a later event starts a new epoch. Epochs come from one counter, so they only grow.
//!
//! Bounds, each with its own eviction cause:
//! - `size` events per workspace (`--history-size`): the oldest of that workspace goes;
//! - `ttl` (`--history-ttl`): events older than that go, oldest first;
//! - `max_bytes` (`--history-max-bytes`) over every workspace together, frames plus the fixed
//!   cost of each entry and space: the oldest event of all goes first (an ordered set of each
//!   ring's front finds it); when no event is left, idle spaces go, oldest first (an *early
//!   drop*, remembered so that a resume across it is never taken as complete).
//!
//! Invariants: `bytes` is the sum of `entry_cost` over every ring entry plus `space_cost`
//! over every space; `fronts` holds exactly one `(seq, slot)` per non-empty ring, `seq` being
//! its front entry's; within a ring, offsets are consecutive and `seq` grows.

use super::Position;
use crate::ws::SharedFrame;
use slab::Slab;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What bounds the history.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Events kept per workspace (`--history-size`, at least 1 here).
    pub size: usize,
    /// Age past which an event goes (`--history-ttl`).
    pub ttl: Duration,
    /// Bytes for every workspace together (`--history-max-bytes`).
    pub max_bytes: usize,
    /// How long a workspace with no event left keeps its offsets (`--resume-window`).
    pub keep_idle: Duration,
}

/// One event in a workspace's history.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its offset in the workspace's epoch.
    pub offset: u64,
    /// Its `ts`, Unix milliseconds.
    pub ts_ms: u64,
    /// The user it is addressed to, for a user-scoped event.
    pub user: Option<Box<str>>,
    /// The frame every subscriber was sent.
    pub frame: SharedFrame,
    /// Its compressed form, shared with the event (`permessage-deflate`), when kept.
    pub deflated: Option<crate::event::Deflated>,
    at: Instant,
    seq: u64,
}

/// An event read back from Redis for [`History::rebase`].
#[derive(Clone, Debug)]
pub struct Older {
    /// Its offset.
    pub offset: u64,
    /// Its `ts`, Unix milliseconds.
    pub ts_ms: u64,
    /// The user it is addressed to, for a user-scoped event.
    pub user: Option<Box<str>>,
    /// Its frame, built from the message read.
    pub frame: SharedFrame,
}

/// Why events left the history, in [`Evictions`] order.
pub const EVICTION_CAUSES: [&str; 3] = ["size", "ttl", "bytes"];

/// Events evicted so far, by cause ([`EVICTION_CAUSES`]).
pub type Evictions = [u64; 3];

/// Fixed bytes of one ring entry: the struct in its queue slot, the frame's shared reference
/// counts (16), and 24 for the queues' spare capacity, the ordered set and the allocator's
/// rounding (`benches/history.rs` measures 367 live bytes per event of a 248-byte frame: this
/// counts 352). The frame and the user id are counted on top.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>() + 40;

/// Fixed bytes of one workspace's space (the struct, its map slot and name key), its name
/// counted twice on top.
pub const SPACE_BYTES: usize = std::mem::size_of::<Space>() + 48;

/// What an entry costs against `max_bytes`.
fn entry_cost(e: &Entry) -> usize {
    ENTRY_BYTES + e.frame.len() + e.user.as_ref().map_or(0, |u| u.len())
}

fn space_cost(name: &str) -> usize {
    SPACE_BYTES + 2 * name.len()
}

struct Space {
    name: Box<str>,
    epoch: u64,
    /// The next offset to assign.
    next: u64,
    ring: VecDeque<Entry>,
    /// `ts` of the newest event, kept when the ring empties.
    last_ts: Option<u64>,
    last_append: Instant,
    /// Queued in `idle`.
    in_idle: bool,
}

/// Why a read could not give every event asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// Some of the events asked for were evicted.
    Trimmed,
    /// The position is of another epoch than the workspace's.
    OtherEpoch,
}

/// Every workspace's history.
pub struct History {
    limits: Limits,
    by_name: HashMap<Box<str>, u32>,
    spaces: Slab<Space>,
    /// `(seq of the front entry, slot)` of every non-empty ring: the first is the oldest event.
    fronts: BTreeSet<(u64, u32)>,
    /// Spaces whose ring emptied, oldest first (each at most once: `in_idle`).
    idle: VecDeque<u32>,
    next_seq: u64,
    next_epoch: u64,
    bytes: usize,
    events: usize,
    evictions: Evictions,
    /// The last time a space was dropped before its idle time was up (bytes pressure).
    early_drop: Option<Instant>,
}

impl History {
    /// An empty history; its first epoch is `first_epoch` (chosen at random by the caller, so
    /// that a restarted process never reuses its predecessor's epochs).
    pub fn new(limits: Limits, first_epoch: u64) -> History {
        History {
            limits: Limits {
                size: limits.size.max(1),
                ..limits
            },
            by_name: HashMap::new(),
            spaces: Slab::new(),
            fronts: BTreeSet::new(),
            idle: VecDeque::new(),
            next_seq: 0,
            next_epoch: first_epoch.max(1),
            bytes: 0,
            events: 0,
            evictions: [0; 3],
            early_drop: None,
        }
    }

    /// Appends one event of `workspace` and returns its position. The frame is kept by
    /// reference. Evicts what the bounds call for.
    pub fn append(
        &mut self,
        workspace: &str,
        user: Option<&str>,
        frame: &SharedFrame,
        ts_ms: u64,
        now: Instant,
    ) -> Position {
        self.append_with(workspace, user, frame, None, ts_ms, now)
    }

    /// [`History::append`], keeping the event's compressed form with it.
    pub fn append_with(
        &mut self,
        workspace: &str,
        user: Option<&str>,
        frame: &SharedFrame,
        deflated: Option<&crate::event::Deflated>,
        ts_ms: u64,
        now: Instant,
    ) -> Position {
        let slot = match self.by_name.get(workspace) {
            Some(&s) => s,
            None => {
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                self.new_space(workspace, epoch, 1, now)
            }
        };
        self.push(slot, user, frame, deflated, ts_ms, now)
    }

    /// Keeps an event whose position was assigned elsewhere (by Redis, on the cluster bus).
    /// A workspace's events come in position order; one after a hole, or of another epoch,
    /// starts its ring over from it (what was kept before cannot be read across the hole). An
    /// event at or before the newest kept is ignored. Returns whether it was kept.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        workspace: &str,
        pos: Position,
        user: Option<&str>,
        frame: &SharedFrame,
        ts_ms: u64,
        now: Instant,
    ) -> bool {
        self.place_with(workspace, pos, user, frame, None, ts_ms, now)
    }

    /// [`History::place`], keeping the event's compressed form with it.
    #[allow(clippy::too_many_arguments)]
    pub fn place_with(
        &mut self,
        workspace: &str,
        pos: Position,
        user: Option<&str>,
        frame: &SharedFrame,
        deflated: Option<&crate::event::Deflated>,
        ts_ms: u64,
        now: Instant,
    ) -> bool {
        let slot = match self.by_name.get(workspace) {
            Some(&s) => {
                let space = &self.spaces[s as usize];
                if space.epoch == pos.epoch && pos.offset < space.next {
                    return false;
                }
                if space.epoch != pos.epoch || pos.offset > space.next {
                    while !self.spaces[s as usize].ring.is_empty() {
                        self.pop_front(s, 0);
                        self.evictions[0] -= 1; // not a bound: the stream moved on
                    }
                    let space = &mut self.spaces[s as usize];
                    space.epoch = pos.epoch;
                    space.next = pos.offset;
                }
                s
            }
            None => self.new_space(workspace, pos.epoch, pos.offset, now),
        };
        self.push(slot, user, frame, deflated, ts_ms, now);
        true
    }

    /// Where `workspace`'s kept events begin: its epoch and the offset of its oldest kept
    /// event (its next offset when none is kept); `None` when it has no space.
    pub fn oldest(&self, workspace: &str) -> Option<Position> {
        let space = &self.spaces[*self.by_name.get(workspace)? as usize];
        Some(Position {
            epoch: space.epoch,
            offset: space.ring.front().map_or(space.next, |e| e.offset),
        })
    }

    /// Rebuilds `workspace`'s ring with `older` events of `epoch` (read back from Redis for a
    /// resume: in order, contiguous offsets) in front of the kept events after them, so that a
    /// replay can start further back than this node had kept. Every event of the rebuilt ring
    /// is kept as if appended `now` (a full `ttl` from the read). Does nothing (false) unless
    /// `older` ends where the kept events begin or later, and begins before them.
    pub fn rebase(&mut self, workspace: &str, epoch: u64, older: Vec<Older>, now: Instant) -> bool {
        let (Some(first), Some(last)) = (older.first(), older.last()) else {
            return false;
        };
        let (first, last) = (first.offset, last.offset);
        if older
            .iter()
            .enumerate()
            .any(|(i, e)| e.offset != first + i as u64)
        {
            return false;
        }
        let kept: Vec<Entry> = match self.by_name.get(workspace) {
            Some(&s) if self.spaces[s as usize].epoch == epoch => {
                let space = &self.spaces[s as usize];
                let front = space.ring.front().map_or(space.next, |e| e.offset);
                if front > last + 1 || front <= first {
                    return false;
                }
                space
                    .ring
                    .iter()
                    .filter(|e| e.offset > last)
                    .cloned()
                    .collect()
            }
            _ => Vec::new(),
        };
        self.forget(workspace);
        let slot = self.new_space(workspace, epoch, first, now);
        for e in older {
            self.push(slot, e.user.as_deref(), &e.frame, None, e.ts_ms, now);
        }
        for e in kept {
            self.push(
                slot,
                e.user.as_deref(),
                &e.frame,
                e.deflated.as_ref(),
                e.ts_ms,
                now,
            );
        }
        true
    }

    /// Drops `workspace`'s space (its stream is known to have a hole here).
    pub fn forget(&mut self, workspace: &str) {
        let Some(&slot) = self.by_name.get(workspace) else {
            return;
        };
        while !self.spaces[slot as usize].ring.is_empty() {
            self.pop_front(slot, 0);
            self.evictions[0] -= 1;
        }
        if let Some(i) = self.idle.iter().position(|&s| s == slot) {
            self.idle.remove(i);
        }
        let space = self.spaces.remove(slot as usize);
        self.by_name.remove(&*space.name);
        self.bytes -= space_cost(&space.name);
    }

    fn new_space(&mut self, workspace: &str, epoch: u64, next: u64, now: Instant) -> u32 {
        let s = self.spaces.insert(Space {
            name: workspace.into(),
            epoch,
            next,
            ring: VecDeque::new(),
            last_ts: None,
            last_append: now,
            in_idle: false,
        }) as u32;
        self.by_name.insert(workspace.into(), s);
        self.bytes += space_cost(workspace);
        s
    }

    /// Appends an event at `slot`'s next offset.
    fn push(
        &mut self,
        slot: u32,
        user: Option<&str>,
        frame: &SharedFrame,
        deflated: Option<&crate::event::Deflated>,
        ts_ms: u64,
        now: Instant,
    ) -> Position {
        let seq = self.next_seq;
        self.next_seq += 1;
        let space = &mut self.spaces[slot as usize];
        let offset = space.next;
        space.next += 1;
        space.last_ts = Some(ts_ms);
        space.last_append = now;
        let entry = Entry {
            offset,
            ts_ms,
            user: user.map(Into::into),
            frame: frame.clone(),
            deflated: deflated.cloned(),
            at: now,
            seq,
        };
        self.bytes += entry_cost(&entry);
        self.events += 1;
        if space.ring.is_empty() {
            self.fronts.insert((seq, slot));
        }
        space.ring.push_back(entry);
        let epoch = space.epoch;
        if space.ring.len() > self.limits.size {
            self.pop_front(slot, 0);
        }
        self.enforce(now);
        Position { epoch, offset }
    }

    /// Removes the front entry of `slot`'s ring, counting it under `cause`.
    fn pop_front(&mut self, slot: u32, cause: usize) {
        let space = &mut self.spaces[slot as usize];
        let Some(e) = space.ring.pop_front() else {
            return;
        };
        self.fronts.remove(&(e.seq, slot));
        self.bytes -= entry_cost(&e);
        self.events -= 1;
        self.evictions[cause] += 1;
        match space.ring.front() {
            Some(f) => {
                self.fronts.insert((f.seq, slot));
            }
            None if !space.in_idle => {
                space.in_idle = true;
                self.idle.push_back(slot);
            }
            None => {}
        }
    }

    /// Applies the age and byte bounds, and drops spaces idle for `keep_idle`.
    pub fn enforce(&mut self, now: Instant) {
        while let Some(&(_, slot)) = self.fronts.first() {
            let front = self.spaces[slot as usize]
                .ring
                .front()
                .expect("fronts: non-empty");
            if now.saturating_duration_since(front.at) < self.limits.ttl {
                break;
            }
            self.pop_front(slot, 1);
        }
        while self.bytes > self.limits.max_bytes {
            match self.fronts.first() {
                Some(&(_, slot)) => self.pop_front(slot, 2),
                None => {
                    if !self.drop_idle(now, true) {
                        break;
                    }
                }
            }
        }
        while self.drop_idle(now, false) {}
    }

    /// Drops the oldest idle space if its time is up (or, `early`, whatever its time). Returns
    /// whether the queue moved.
    fn drop_idle(&mut self, now: Instant, early: bool) -> bool {
        let Some(&slot) = self.idle.front() else {
            return false;
        };
        let space = &mut self.spaces[slot as usize];
        if !space.ring.is_empty() {
            // Events came back: not idle any more.
            space.in_idle = false;
            self.idle.pop_front();
            return true;
        }
        let idle_for = now.saturating_duration_since(space.last_append);
        if !early && idle_for < self.limits.keep_idle {
            return false;
        }
        self.idle.pop_front();
        if idle_for < self.limits.keep_idle {
            self.early_drop = Some(now);
        }
        let space = self.spaces.remove(slot as usize);
        self.by_name.remove(&*space.name);
        self.bytes -= space_cost(&space.name);
        true
    }

    /// Where `workspace` stands: its epoch and the offset of its newest event (offset 0 when it
    /// has had none in this epoch; epoch 0 when it has no space: its first event starts one).
    pub fn head(&mut self, workspace: &str, now: Instant) -> Position {
        self.enforce(now);
        match self.by_name.get(workspace) {
            Some(&s) => {
                let space = &self.spaces[s as usize];
                Position {
                    epoch: space.epoch,
                    offset: space.next - 1,
                }
            }
            None => Position::default(),
        }
    }

    /// Visits, in order, the events of `workspace` after `after` and before offset `until` (or
    /// its newest, if that comes first), while `visit` returns true. Returns the offset after
    /// the last event visited (where a next read starts), or why some of them are not here.
    pub fn read(
        &mut self,
        workspace: &str,
        after: Position,
        until: u64,
        now: Instant,
        mut visit: impl FnMut(&Entry) -> bool,
    ) -> Result<u64, Miss> {
        self.enforce(now);
        let from = after.offset + 1;
        let Some(&slot) = self.by_name.get(workspace) else {
            return Err(Miss::OtherEpoch);
        };
        let space = &self.spaces[slot as usize];
        if space.epoch != after.epoch {
            return Err(Miss::OtherEpoch);
        }
        let until = until.min(space.next);
        if from >= until {
            return Ok(from);
        }
        let Some(first) = space.ring.front() else {
            return Err(Miss::Trimmed);
        };
        if first.offset > from {
            return Err(Miss::Trimmed);
        }
        let skip = (from - first.offset) as usize;
        let mut at = from;
        for e in space.ring.iter().skip(skip) {
            if e.offset >= until {
                break;
            }
            if !visit(e) {
                return Ok(at);
            }
            at = e.offset + 1;
        }
        Ok(at)
    }

    /// The `ts` of the event at `pos`, if the history knows it (the event is kept, or it is
    /// the workspace's newest).
    pub fn ts_at(&self, workspace: &str, pos: Position) -> Option<u64> {
        let space = &self.spaces[*self.by_name.get(workspace)? as usize];
        if space.epoch != pos.epoch || pos.offset == 0 {
            return None;
        }
        if pos.offset + 1 == space.next {
            return space.last_ts;
        }
        let first = space.ring.front()?.offset;
        let i = pos.offset.checked_sub(first)? as usize;
        space.ring.get(i).map(|e| e.ts_ms)
    }

    /// The offset of the kept event whose frame is `frame` (the same allocation), searching
    /// back from the newest.
    pub fn offset_of(&self, workspace: &str, epoch: u64, frame: &SharedFrame) -> Option<u64> {
        let space = &self.spaces[*self.by_name.get(workspace)? as usize];
        if space.epoch != epoch {
            return None;
        }
        space
            .ring
            .iter()
            .rev()
            .find(|e| {
                SharedFrame::ptr_eq(&e.frame, frame)
                    || e.deflated
                        .as_ref()
                        .and_then(|d| d.get())
                        .and_then(Option::as_ref)
                        .is_some_and(|d| SharedFrame::ptr_eq(d, frame))
            })
            .map(|e| e.offset)
    }

    /// Whether a space was dropped early (under byte pressure) after `t`.
    pub fn dropped_early_since(&self, t: Instant) -> bool {
        self.early_drop.is_some_and(|d| d >= t)
    }

    /// Events held.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Bytes held, as counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Workspaces with a space.
    pub fn spaces(&self) -> usize {
        self.spaces.len()
    }

    /// Events evicted so far, by cause.
    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// Checks the invariants (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut bytes = 0;
        let mut fronts = 0;
        for (slot, s) in &self.spaces {
            bytes += space_cost(&s.name);
            let mut prev: Option<&Entry> = None;
            for e in &s.ring {
                bytes += entry_cost(e);
                if let Some(p) = prev {
                    assert_eq!(p.offset + 1, e.offset);
                    assert!(p.seq < e.seq);
                }
                prev = Some(e);
            }
            if let Some(f) = s.ring.front() {
                assert!(self.fronts.contains(&(f.seq, slot as u32)));
                fronts += 1;
            }
            assert_eq!(prev.map_or(s.next - 1, |p| p.offset), s.next - 1);
        }
        assert_eq!(fronts, self.fronts.len());
        assert_eq!(bytes, self.bytes);
        assert!(self.bytes <= self.limits.max_bytes || self.events == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(size: usize, max_bytes: usize) -> Limits {
        Limits {
            size,
            ttl: Duration::from_secs(120),
            max_bytes,
            keep_idle: Duration::from_secs(120),
        }
    }

    fn frame(n: u8, len: usize) -> SharedFrame {
        SharedFrame::from(vec![n; len])
    }

    fn offsets(h: &mut History, ws: &str, after: Position, now: Instant) -> Result<Vec<u64>, Miss> {
        let mut got = Vec::new();
        h.read(ws, after, u64::MAX, now, |e| {
            got.push(e.offset);
            true
        })
        .map(|_| got)
    }

    fn at(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    #[test]
    fn events_placed_at_given_positions_start_over_after_a_hole_or_another_epoch() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 1 << 20), 1);
        let f = frame(1, 50);
        assert!(h.place("a", at(9, 41), None, &f, 1, now));
        assert!(h.place("a", at(9, 42), None, &f, 1, now));
        assert!(
            !h.place("a", at(9, 42), None, &f, 1, now),
            "a repeat is ignored"
        );
        assert_eq!(h.head("a", now), at(9, 42));
        assert_eq!(h.oldest("a"), Some(at(9, 41)));
        assert_eq!(offsets(&mut h, "a", at(9, 40), now), Ok(vec![41, 42]));
        assert_eq!(offsets(&mut h, "a", at(9, 39), now), Err(Miss::Trimmed));
        // A hole: what was kept cannot be read across it.
        assert!(h.place("a", at(9, 50), None, &f, 1, now));
        assert_eq!(h.oldest("a"), Some(at(9, 50)));
        assert_eq!(offsets(&mut h, "a", at(9, 42), now), Err(Miss::Trimmed));
        // Another epoch starts the stream over.
        assert!(h.place("a", at(11, 1), None, &f, 1, now));
        assert_eq!(h.head("a", now), at(11, 1));
        assert_eq!(
            h.evictions(),
            [0, 0, 0],
            "starting over evicts nothing by a bound"
        );
        h.check();
        h.forget("a");
        assert_eq!(h.oldest("a"), None);
        assert_eq!(h.head("a", now), Position::default());
        assert_eq!((h.events(), h.spaces()), (0, 0));
        h.check();
    }

    #[test]
    fn older_events_read_back_go_in_front_of_those_kept() {
        let now = Instant::now();
        let mut h = History::new(limits(100, 1 << 20), 1);
        let f = frame(2, 50);
        let older = |range: std::ops::RangeInclusive<u64>| -> Vec<Older> {
            range
                .map(|offset| Older {
                    offset,
                    ts_ms: offset,
                    user: None,
                    frame: frame(3, 40),
                })
                .collect()
        };
        for o in 20..=25 {
            h.place("a", at(9, o), None, &f, o, now);
        }
        // Read back 10..=22 (overlapping what is kept): 10..=25 then.
        assert!(h.rebase("a", 9, older(10..=22), now));
        assert_eq!(h.oldest("a"), Some(at(9, 10)));
        assert_eq!(
            offsets(&mut h, "a", at(9, 9), now),
            Ok((10..=25).collect::<Vec<_>>())
        );
        assert_eq!(h.ts_at("a", at(9, 12)), Some(12));
        h.check();
        // Nothing to do when they are held already, or when they would leave a hole, or when
        // they are not contiguous.
        assert!(!h.rebase("a", 9, older(12..=14), now));
        assert!(!h.rebase("a", 9, older(1..=5), now));
        let mut broken = older(1..=9);
        broken.remove(3);
        assert!(!h.rebase("a", 9, broken, now));
        // A workspace not kept here gets its stream from what was read.
        assert!(h.rebase("b", 4, older(3..=5), now));
        assert_eq!(h.head("b", now), at(4, 5));
        // Another epoch replaces what was kept.
        assert!(h.rebase("a", 10, older(1..=2), now));
        assert_eq!(h.head("a", now), at(10, 2));
        h.check();
    }

    #[test]
    fn positions_grow_by_one_per_workspace_and_frames_are_shared() {
        let now = Instant::now();
        let mut h = History::new(limits(10, 1 << 20), 7);
        let f = frame(1, 100);
        let a1 = h.append("a", None, &f, 1, now);
        let b1 = h.append("b", Some("u"), &f, 2, now);
        let a2 = h.append("a", None, &f, 3, now);
        assert_eq!((a1.epoch, a1.offset), (7, 1));
        assert_eq!((b1.epoch, b1.offset), (8, 1));
        assert_eq!((a2.epoch, a2.offset), (7, 2));
        assert_eq!(SharedFrame::strong_count(&f), 4, "kept by reference");
        assert_eq!(h.head("a", now), a2);
        assert_eq!(h.head("nobody", now), Position::default());
        h.check();
    }

    #[test]
    fn reads_what_follows_a_position_and_says_when_it_cannot() {
        let now = Instant::now();
        let mut h = History::new(limits(3, 1 << 20), 1);
        let mut last = Position::default();
        for i in 0..5 {
            last = h.append("a", None, &frame(i, 10), i as u64, now);
        }
        // Offsets 3, 4, 5 are kept.
        let at = |o| Position {
            epoch: 1,
            offset: o,
        };
        assert_eq!(offsets(&mut h, "a", at(2), now), Ok(vec![3, 4, 5]));
        assert_eq!(offsets(&mut h, "a", at(4), now), Ok(vec![5]));
        assert_eq!(offsets(&mut h, "a", at(5), now), Ok(vec![]));
        assert_eq!(offsets(&mut h, "a", at(1), now), Err(Miss::Trimmed));
        assert_eq!(
            offsets(
                &mut h,
                "a",
                Position {
                    epoch: 2,
                    offset: 3
                },
                now
            ),
            Err(Miss::OtherEpoch)
        );
        // `until` bounds the read, and a visitor may stop early.
        let mut seen = Vec::new();
        assert_eq!(
            h.read("a", at(2), 5, now, |e| {
                seen.push(e.offset);
                true
            }),
            Ok(5)
        );
        assert_eq!(seen, vec![3, 4]);
        assert_eq!(h.read("a", at(2), 6, now, |_| false), Ok(3));
        assert_eq!(h.evictions(), [2, 0, 0]);
        assert_eq!(h.ts_at("a", last), Some(4));
        assert_eq!(h.ts_at("a", at(3)), Some(2));
        assert_eq!(h.ts_at("a", at(1)), None);
        h.check();
    }

    #[test]
    fn old_events_go_by_age_and_an_idle_workspace_goes_after_keep_idle() {
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        let mut h = History::new(
            Limits {
                keep_idle: Duration::from_secs(200),
                ..limits(100, 1 << 20)
            },
            1,
        );
        let f = frame(0, 10);
        h.append("a", None, &f, 1, t0);
        h.append("a", None, &f, 2, secs(60));
        assert_eq!(h.events(), 2);
        h.enforce(secs(121));
        assert_eq!(h.events(), 1);
        assert_eq!(h.evictions(), [0, 1, 0]);
        h.enforce(secs(181));
        assert_eq!(h.events(), 0);
        // Empty, but its offsets are kept until it has idled for keep_idle (from its last
        // event, at 60 s).
        assert_eq!(h.head("a", secs(259)).offset, 2);
        assert_eq!(
            h.ts_at(
                "a",
                Position {
                    epoch: 1,
                    offset: 2
                }
            ),
            Some(2)
        );
        assert_eq!(h.spaces(), 1);
        h.enforce(secs(261));
        assert_eq!(h.spaces(), 0);
        assert!(!h.dropped_early_since(t0));
        // A new epoch.
        let p = h.append("a", None, &f, 3, secs(400));
        assert_eq!((p.epoch, p.offset), (2, 1));
        h.check();
    }

    #[test]
    fn the_byte_bound_takes_the_oldest_event_of_all_first() {
        let now = Instant::now();
        let cost = ENTRY_BYTES + 100;
        let max = 3 * (space_cost("a")) + 4 * cost;
        let mut h = History::new(limits(100, max), 1);
        h.append("a", None, &frame(0, 100), 1, now);
        h.append("b", None, &frame(0, 100), 2, now);
        h.append("c", None, &frame(0, 100), 3, now);
        h.append("b", None, &frame(0, 100), 4, now);
        assert_eq!(h.evictions(), [0, 0, 0]);
        h.append("c", None, &frame(0, 100), 5, now);
        assert_eq!(h.evictions(), [0, 0, 1]);
        // "a"'s only event went; "a" itself is kept (idle).
        assert_eq!(
            offsets(
                &mut h,
                "a",
                Position {
                    epoch: 1,
                    offset: 0
                },
                now
            ),
            Err(Miss::Trimmed)
        );
        assert_eq!(
            offsets(
                &mut h,
                "b",
                Position {
                    epoch: 2,
                    offset: 0
                },
                now
            ),
            Ok(vec![1, 2])
        );
        h.check();
    }

    #[test]
    fn under_byte_pressure_idle_workspaces_go_early_and_that_is_remembered() {
        let t0 = Instant::now();
        let max = 2 * space_cost("w00") + ENTRY_BYTES + 10;
        let mut h = History::new(limits(100, max), 1);
        h.append("w00", None, &frame(0, 10), 1, t0);
        h.append("w01", None, &frame(0, 10), 1, t0);
        h.append("w02", None, &frame(0, 10), 1, t0);
        assert!(h.spaces() <= 2);
        assert!(h.dropped_early_since(t0));
        assert!(h.bytes() <= max);
        h.check();
    }

    proptest! {
        /// Whatever the sequence of appends and time steps: the invariants hold, every
        /// workspace's offsets are consecutive from 1 within an epoch, and a read gives either
        /// every event asked for, in order, or says why not.
        #[test]
        fn any_sequence_keeps_the_invariants(
            ops in proptest::collection::vec((0u8..6, 0usize..300, 0u64..40_000), 1..300),
            size in 1usize..8,
            max_kib in 1usize..16,
        ) {
            let t0 = Instant::now();
            let mut h = History::new(Limits {
                size,
                ttl: Duration::from_secs(20),
                max_bytes: max_kib * 1024,
                keep_idle: Duration::from_secs(30),
            }, 1);
            let mut now = t0;
            let mut expect: HashMap<String, Position> = HashMap::new();
            for (ws, len, step) in ops {
                now += Duration::from_millis(step);
                let name = format!("w{ws}");
                let before = h.head(&name, now);
                let p = h.append(&name, None, &frame(ws, len), 0, now);
                if before.epoch == p.epoch {
                    prop_assert_eq!(p.offset, before.offset + 1);
                } else {
                    prop_assert_eq!(p.offset, 1);
                    prop_assert!(p.epoch > before.epoch);
                }
                expect.insert(name.clone(), p);
                h.check();
                let from = Position { epoch: p.epoch, offset: p.offset.saturating_sub(3) };
                let mut got = Vec::new();
                match h.read(&name, from, p.offset + 1, now, |e| { got.push(e.offset); true }) {
                    Ok(end) => {
                        prop_assert_eq!(end, p.offset + 1);
                        let want: Vec<u64> = (from.offset + 1..=p.offset).collect();
                        prop_assert_eq!(got, want);
                    }
                    // Trimmed by the bounds, or (under byte pressure) the space itself went.
                    Err(m) => prop_assert!(
                        m == Miss::Trimmed || h.head(&name, now).epoch != p.epoch
                    ),
                }
            }
        }
    }
}
