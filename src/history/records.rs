//! Resume records: where each ended connection stood, for `--resume-window`, so that the next
//! connection with the same token and workspace resumes from there.
//!
//! A pure core: no lock, no clock. Keys are a SHA-256 over the token and the workspace
//! ([`record_key`]): the token itself is never held. One record per ended connection; a key
//! holds several when several connections shared a token (two tabs), and a resume takes the
//! oldest.
//!
//! Bounded by `--resume-max-records`: at the bound the oldest record goes (counted), and the
//! time of that eviction is kept ([`Records::evicted_since`]) so that a connection that finds
//! no record while records were being evicted is told it may have missed something instead of
//! being taken for a fresh one.
//!
//! It also counts the open connections of each key (`live`), under the same lock, so that a
//! connection that finds no record can tell "nothing to resume" from "a connection with this
//! token is still open here": the connection it replaces may not have been seen to end yet
//! (a reset not yet read, a client that vanished without a FIN). [`Records::begin`] answers
//! both at once; [`Records::end`] records and stops counting at once.
//!
//! Invariants: `count` is the number of records in `map`; every record in `map` has an entry
//! with its `seq` in `order`; `order` is sorted by `seq` (and so by time); it may also hold
//! entries of records already taken, and is compacted when those outnumber the live ones.

use super::Position;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A record's key: SHA-256 over the token, a zero byte, and the workspace.
pub type RecordKey = [u8; 32];

/// The key of a connection's records.
pub fn record_key(token: &[u8], workspace: &str) -> RecordKey {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(token);
    ctx.update(&[0]);
    ctx.update(workspace.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// Where an ended connection stood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// The last position the client is known to have received.
    pub at: Position,
    /// The `ts` of the event at `at`, when the history knew it.
    pub since_ms: Option<u64>,
    /// `at` was the workspace's newest position when the record was made: nothing had been
    /// published that the client had not received.
    pub caught_up: bool,
    /// The position came from the client's acknowledgement (events written after it may be
    /// sent again: the contract's one case of duplicates).
    pub from_ack: bool,
    /// When the connection ended.
    pub made: Instant,
}

struct Held {
    seq: u64,
    record: Record,
}

/// Every resume record of a node.
pub struct Records {
    max: usize,
    window: Duration,
    map: HashMap<RecordKey, Vec<Held>>,
    order: VecDeque<(u64, Instant, RecordKey)>,
    count: usize,
    next_seq: u64,
    evicted: u64,
    expired: u64,
    last_eviction: Option<Instant>,
    /// Open connections per key, by the key's first eight bytes (a shared fingerprint only
    /// ever makes a connection wait for a twin that is not one: a delay, never a loss).
    live: HashMap<u64, u32>,
}

fn fingerprint(key: &RecordKey) -> u64 {
    u64::from_le_bytes(key[..8].try_into().expect("8 of 32 bytes"))
}

/// What a connection that opens finds under its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A record: the oldest, now taken.
    Record(Record),
    /// No record, but another connection with this key is open (it may be the one this
    /// connection replaces, not yet seen to end).
    Twin,
    /// Nothing.
    Nothing,
}

/// Fixed bytes of one record: its map share, its held entry, its order entry.
pub const RECORD_BYTES: usize = std::mem::size_of::<Held>()
    + std::mem::size_of::<(u64, Instant, RecordKey)>()
    + std::mem::size_of::<(RecordKey, Vec<Held>)>()
    + 16;

impl Records {
    /// At most `max` records, each kept for `window`.
    pub fn new(max: usize, window: Duration) -> Records {
        Records {
            max: max.max(1),
            window,
            map: HashMap::new(),
            order: VecDeque::new(),
            count: 0,
            next_seq: 0,
            evicted: 0,
            expired: 0,
            last_eviction: None,
            live: HashMap::new(),
        }
    }

    /// A connection with `key` opens: takes the oldest record under `key`, or says whether
    /// another connection with it is open; then counts this one open.
    pub fn begin(&mut self, key: RecordKey, now: Instant) -> Found {
        let found = match self.take(&key, now) {
            Some(r) => Found::Record(r),
            None if self.live.get(&fingerprint(&key)).is_some_and(|&n| n > 0) => Found::Twin,
            None => Found::Nothing,
        };
        *self.live.entry(fingerprint(&key)).or_default() += 1;
        found
    }

    /// A connection with `key` ended, leaving `record` (none: it leaves nothing, say it never
    /// had a stream).
    pub fn end(&mut self, key: RecordKey, record: Option<Record>, now: Instant) {
        if let Some(r) = record {
            self.put(key, r, now);
        }
        let fp = fingerprint(&key);
        if let Some(n) = self.live.get_mut(&fp) {
            *n -= 1;
            if *n == 0 {
                self.live.remove(&fp);
            }
        }
    }

    /// Keeps `record` under `key` until the window passes (or the bound takes it).
    pub fn put(&mut self, key: RecordKey, record: Record, now: Instant) {
        self.expire(now);
        while self.count >= self.max {
            if !self.pop_oldest() {
                break;
            }
            self.evicted += 1;
            self.last_eviction = Some(now);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.map.entry(key).or_default().push(Held { seq, record });
        self.order.push_back((seq, now, key));
        self.count += 1;
    }

    /// Takes the oldest live record under `key`.
    pub fn take(&mut self, key: &RecordKey, now: Instant) -> Option<Record> {
        self.expire(now);
        let held = self.map.get_mut(key)?;
        let first = held.remove(0);
        if held.is_empty() {
            self.map.remove(key);
        }
        self.count -= 1;
        self.compact();
        Some(first.record)
    }

    /// Whether a record was evicted at the bound at or after `t`.
    pub fn evicted_since(&self, t: Instant) -> bool {
        self.last_eviction.is_some_and(|e| e >= t)
    }

    /// Drops the records whose window has passed.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(_, made, _)) = self.order.front() {
            if now.saturating_duration_since(made) < self.window {
                break;
            }
            if self.pop_oldest() {
                self.expired += 1;
            }
        }
    }

    /// Removes the oldest entry of `order` and its record, if that is still held; returns
    /// whether a record went.
    fn pop_oldest(&mut self) -> bool {
        while let Some((seq, _, key)) = self.order.pop_front() {
            let Some(held) = self.map.get_mut(&key) else {
                continue;
            };
            let Some(i) = held.iter().position(|h| h.seq == seq) else {
                continue;
            };
            held.remove(i);
            if held.is_empty() {
                self.map.remove(&key);
            }
            self.count -= 1;
            return true;
        }
        false
    }

    /// Rebuilds `order` without the entries of taken records once those are the majority.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.count + 64 {
            return;
        }
        let map = &self.map;
        self.order.retain(|(seq, _, key)| {
            map.get(key)
                .is_some_and(|held| held.iter().any(|h| h.seq == *seq))
        });
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records evicted at the bound so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Records whose window passed so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    #[cfg(test)]
    fn check(&self) {
        let held: usize = self.map.values().map(Vec::len).sum();
        assert_eq!(held, self.count);
        assert!(self.count <= self.max);
        for v in self.map.values() {
            assert!(!v.is_empty());
            for h in v {
                assert!(self.order.iter().any(|(s, _, _)| *s == h.seq));
            }
        }
        assert!(self
            .order
            .iter()
            .zip(self.order.iter().skip(1))
            .all(|(a, b)| a.0 < b.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(offset: u64) -> Record {
        Record {
            at: Position { epoch: 1, offset },
            since_ms: None,
            caught_up: false,
            from_ack: false,
            made: *T0,
        }
    }

    static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

    #[test]
    fn the_key_covers_token_and_workspace_and_is_not_the_token() {
        let a = record_key(b"tok", "ws_1");
        assert_ne!(a, record_key(b"tok", "ws_2"));
        assert_ne!(a, record_key(b"tok2", "ws_1"));
        // The zero byte keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(record_key(b"ab", "c"), record_key(b"a", "bc"));
        assert_eq!(a, record_key(b"tok", "ws_1"));
    }

    #[test]
    fn two_connections_sharing_a_token_leave_two_records_taken_oldest_first() {
        let now = Instant::now();
        let mut r = Records::new(10, Duration::from_secs(120));
        let k = record_key(b"t", "w");
        r.put(k, rec(5), now);
        r.put(k, rec(9), now);
        assert_eq!(r.len(), 2);
        assert_eq!(r.take(&k, now), Some(rec(5)));
        assert_eq!(r.take(&k, now), Some(rec(9)));
        assert_eq!(r.take(&k, now), None);
        r.check();
    }

    #[test]
    fn an_open_twin_is_told_apart_from_nothing() {
        let now = Instant::now();
        let mut r = Records::new(10, Duration::from_secs(120));
        let k = record_key(b"t", "w");
        assert_eq!(r.begin(k, now), Found::Nothing);
        assert_eq!(r.begin(k, now), Found::Twin, "the first is still open");
        r.end(k, Some(rec(4)), now);
        assert_eq!(r.begin(k, now), Found::Record(rec(4)));
        r.end(k, None, now);
        r.end(k, None, now);
        assert_eq!(
            r.begin(k, now),
            Found::Nothing,
            "all ended, nothing recorded"
        );
        r.check();
    }

    #[test]
    fn records_expire_after_the_window() {
        let t0 = Instant::now();
        let mut r = Records::new(10, Duration::from_secs(120));
        let k = record_key(b"t", "w");
        r.put(k, rec(1), t0);
        r.put(k, rec(2), t0 + Duration::from_secs(60));
        assert_eq!(r.take(&k, t0 + Duration::from_secs(121)), Some(rec(2)));
        assert_eq!(r.expired(), 1);
        r.check();
    }

    #[test]
    fn at_the_bound_the_oldest_goes_and_that_is_remembered() {
        let t0 = Instant::now();
        let mut r = Records::new(2, Duration::from_secs(120));
        let (a, b, c) = (
            record_key(b"a", "w"),
            record_key(b"b", "w"),
            record_key(b"c", "w"),
        );
        r.put(a, rec(1), t0);
        r.put(b, rec(2), t0);
        assert!(!r.evicted_since(t0));
        let t1 = t0 + Duration::from_secs(1);
        r.put(c, rec(3), t1);
        assert_eq!(r.evicted(), 1);
        assert!(r.evicted_since(t1));
        assert_eq!(r.take(&a, t1), None);
        assert_eq!(r.take(&b, t1), Some(rec(2)));
        r.check();
    }

    proptest! {
        /// Any mix of puts, takes and time: the invariants hold, the bound is never passed,
        /// and what is taken under a key is what was put under it, oldest first.
        #[test]
        fn any_sequence_keeps_the_invariants(
            ops in proptest::collection::vec((any::<bool>(), 0u8..5, 0u64..30_000), 1..400),
            max in 1usize..20,
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut r = Records::new(max, Duration::from_secs(60));
            let mut n = 0u64;
            let mut last_taken: HashMap<u8, u64> = HashMap::new();
            for (put, who, step) in ops {
                now += Duration::from_millis(step);
                let k = record_key(&[who], "w");
                if put {
                    n += 1;
                    r.put(k, rec(n), now);
                } else if let Some(got) = r.take(&k, now) {
                    // Oldest first: offsets taken under one key only grow.
                    let prev = last_taken.insert(who, got.at.offset).unwrap_or(0);
                    prop_assert!(got.at.offset > prev);
                }
                r.check();
            }
        }
    }
}
