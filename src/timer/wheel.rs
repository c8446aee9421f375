//! A hashed timer wheel with O(1) insert and cancel.
//!
//! Time is counted in ticks (the shard picks the tick length). Slot `t % slots` holds a doubly
//! linked list of the timers due at tick `t`, `t + slots`, `t + 2*slots`…; the list links are
//! indices into one slab, so inserting or cancelling never allocates once the slab has grown to
//! the working set. An occupancy bitmap makes "when is the next non-empty slot" a scan of
//! `slots / 64` words, which is how the shard picks its poll timeout.
//!
//! Invariants: every live entry is in exactly the list of slot `deadline % slots`; `deadline >
//! current` for every live entry after [`Wheel::advance`] returns; a slot's occupancy bit is set
//! iff its list is non-empty.

use slab::Slab;

const NIL: u32 = u32::MAX;

/// A handle to a scheduled timer, for [`Wheel::cancel`]. Valid until the timer fires or is
/// cancelled; the owner must forget it then. Non-zero (entry index + 1), so that an
/// `Option<TimerId>` is four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerId(std::num::NonZeroU32);

struct Entry<T> {
    deadline: u64,
    prev: u32,
    next: u32,
    value: T,
}

/// The wheel. `T` is what a timer carries back when it fires.
pub struct Wheel<T> {
    heads: Box<[u32]>,
    occupied: Box<[u64]>,
    entries: Slab<Entry<T>>,
    mask: u64,
    current: u64,
}

impl<T> Wheel<T> {
    /// A wheel of `slots` slots (rounded up to a power of two, at least 64) starting at tick `now`.
    pub fn new(slots: usize, now: u64) -> Self {
        let slots = slots.max(64).next_power_of_two();
        Wheel {
            heads: vec![NIL; slots].into_boxed_slice(),
            occupied: vec![0u64; slots / 64].into_boxed_slice(),
            entries: Slab::new(),
            mask: slots as u64 - 1,
            current: now,
        }
    }

    /// Number of scheduled timers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no timer is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last tick [`Wheel::advance`] processed.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Schedules `value` to fire at tick `deadline` (a deadline already past fires on the next
    /// advance).
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerId {
        let deadline = deadline.max(self.current + 1);
        let slot = (deadline & self.mask) as usize;
        let head = self.heads[slot];
        let idx = self.entries.insert(Entry {
            deadline,
            prev: NIL,
            next: head,
            value,
        }) as u32;
        debug_assert!(idx != NIL);
        if head != NIL {
            self.entries[head as usize].prev = idx;
        }
        self.heads[slot] = idx;
        self.occupied[slot / 64] |= 1 << (slot % 64);
        TimerId(std::num::NonZeroU32::MIN.saturating_add(idx))
    }

    /// Removes a timer that has not fired; returns its value.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let idx = id.0.get() - 1;
        if !self.entries.contains(idx as usize) {
            return None;
        }
        self.unlink(idx);
        Some(self.entries.remove(idx as usize).value)
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, deadline) = {
            let e = &self.entries[idx as usize];
            (e.prev, e.next, e.deadline)
        };
        let slot = (deadline & self.mask) as usize;
        if prev == NIL {
            self.heads[slot] = next;
            if next == NIL {
                self.occupied[slot / 64] &= !(1 << (slot % 64));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    /// Fires every timer due at or before tick `now`, pushing their values onto `fired` in
    /// deadline order per slot. Visits each slot at most once per call, so a long pause costs at
    /// most one pass over the wheel.
    pub fn advance(&mut self, now: u64, fired: &mut Vec<T>) {
        if now <= self.current {
            return;
        }
        let slots = self.mask + 1;
        let steps = (now - self.current).min(slots);
        for step in 1..=steps {
            let tick = if now - self.current > slots {
                now - slots + step
            } else {
                self.current + step
            };
            let slot = (tick & self.mask) as usize;
            if self.occupied[slot / 64] & (1 << (slot % 64)) == 0 {
                continue;
            }
            let mut idx = self.heads[slot];
            while idx != NIL {
                let next = self.entries[idx as usize].next;
                if self.entries[idx as usize].deadline <= now {
                    self.unlink(idx);
                    fired.push(self.entries.remove(idx as usize).value);
                }
                idx = next;
            }
        }
        self.current = now;
    }

    /// A tick at or before the earliest pending deadline (the next occupied slot's tick), or
    /// `None` when nothing is scheduled. May be early for timers more than one revolution away;
    /// never late.
    pub fn next_tick(&self) -> Option<u64> {
        if self.entries.is_empty() {
            return None;
        }
        let slots = self.mask + 1;
        let words = self.occupied.len();
        let start = ((self.current + 1) & self.mask) as usize;
        // Scan the bitmap from `start`, wrapping once.
        for i in 0..=words {
            let w = (start / 64 + i) % words;
            let mut bits = self.occupied[w];
            if i == 0 {
                bits &= !0u64 << (start % 64);
            } else if i == words {
                bits &= !(!0u64 << (start % 64));
            }
            if bits != 0 {
                let slot = (w * 64 + bits.trailing_zeros() as usize) as u64;
                let base = (self.current + 1) & !self.mask;
                let mut tick = base + slot;
                if tick <= self.current {
                    tick += slots;
                }
                return Some(tick);
            }
        }
        Some(self.current + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(64, 0);
        w.insert(5, "a");
        w.insert(70, "b"); // one revolution later, same slot as 6
        w.insert(6, "c");
        let mut out = Vec::new();
        w.advance(4, &mut out);
        assert!(out.is_empty());
        w.advance(6, &mut out);
        assert_eq!(out, vec!["a", "c"]);
        out.clear();
        w.advance(69, &mut out);
        assert!(out.is_empty());
        w.advance(70, &mut out);
        assert_eq!(out, vec!["b"]);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_unlinks_from_any_position() {
        let mut w = Wheel::new(64, 0);
        let ids: Vec<_> = (0..5).map(|i| w.insert(10, i)).collect();
        assert_eq!(w.cancel(ids[2]), Some(2));
        assert_eq!(w.cancel(ids[4]), Some(4));
        assert_eq!(w.cancel(ids[0]), Some(0));
        assert_eq!(w.cancel(ids[0]), None);
        let mut out = Vec::new();
        w.advance(10, &mut out);
        out.sort();
        assert_eq!(out, vec![1, 3]);
        assert_eq!(w.next_tick(), None);
    }

    #[test]
    fn long_pause_fires_everything_due() {
        let mut w = Wheel::new(64, 100);
        for d in [101, 150, 163, 164, 400, 1000] {
            w.insert(d, d);
        }
        let mut out = Vec::new();
        w.advance(500, &mut out);
        out.sort();
        assert_eq!(out, vec![101, 150, 163, 164, 400]);
        assert_eq!(w.len(), 1);
        assert!(w.next_tick().unwrap() <= 1000);
    }

    #[test]
    fn next_tick_is_never_late_against_a_model() {
        // Deterministic pseudo-random schedule checked against a sorted model.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut w = Wheel::new(128, 0);
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut ids = Vec::new();
        let mut now = 0;
        for round in 0..2000u32 {
            match rnd() % 4 {
                0 | 1 => {
                    let d = now + 1 + rnd() % 500;
                    ids.push((w.insert(d, round), d, round));
                    model.push((d, round));
                }
                2 if !ids.is_empty() => {
                    let (id, d, v) = ids.swap_remove((rnd() % ids.len() as u64) as usize);
                    if model.contains(&(d, v)) {
                        assert_eq!(w.cancel(id), Some(v));
                        model.retain(|&m| m != (d, v));
                    }
                }
                _ => {
                    if let Some(next) = w.next_tick() {
                        let earliest = model.iter().map(|m| m.0).min().unwrap();
                        assert!(next <= earliest, "next {next} > earliest {earliest}");
                        assert!(next > now);
                    }
                    now += 1 + rnd() % 40;
                    let mut out = Vec::new();
                    w.advance(now, &mut out);
                    let mut due: Vec<u32> =
                        model.iter().filter(|m| m.0 <= now).map(|m| m.1).collect();
                    model.retain(|m| m.0 > now);
                    due.sort();
                    out.sort();
                    assert_eq!(out, due);
                    ids.retain(|(_, d, _)| *d > now);
                }
            }
            assert_eq!(w.len(), model.len());
        }
    }
}
