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
//! Layout, for memory (a million records must stay small): each record is one slab node holding
//! its key; nodes whose keys share a fingerprint (their first eight bytes) are chained from one
//! map entry, oldest first; `order` lists (node, seq) pairs oldest first for expiry and the bound.
//!
//! Invariants: every node is in exactly one chain, the one of its key's fingerprint, and chains
//! are in `seq` order; every node has an entry with its `seq` in `order`, which is sorted by
//! `seq` and may also hold entries of nodes already taken (their slot empty or reused with
//! another `seq`), compacted when those outnumber the live ones.

use super::Position;
use slab::Slab;
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

impl Record {
    /// The record as the cluster bus keeps it in Redis: `epoch offset since caught_up
    /// from_ack` (`since` is `-` when unknown; the flags are 0 or 1). Deterministic, so the
    /// same record always gives the same text.
    pub fn encode(&self) -> String {
        let since = self.since_ms.map_or("-".to_string(), |t| t.to_string());
        format!(
            "{} {} {since} {} {}",
            self.at.epoch,
            self.at.offset,
            u8::from(self.caught_up),
            u8::from(self.from_ack)
        )
    }

    /// A record read back from Redis (made `now` as far as this process knows), if well formed.
    pub fn decode(text: &[u8], now: Instant) -> Option<Record> {
        let text = std::str::from_utf8(text).ok()?;
        let mut f = text.split(' ');
        let epoch = f.next()?.parse().ok()?;
        let offset = f.next()?.parse().ok()?;
        let since_ms = match f.next()? {
            "-" => None,
            t => Some(t.parse().ok()?),
        };
        let flag = |t: Option<&str>| match t {
            Some("0") => Some(false),
            Some("1") => Some(true),
            _ => None,
        };
        let caught_up = flag(f.next())?;
        let from_ack = flag(f.next())?;
        if f.next().is_some() {
            return None;
        }
        Some(Record {
            at: Position { epoch, offset },
            since_ms,
            caught_up,
            from_ack,
            made: now,
        })
    }
}

/// Marks the end of a chain.
const NONE: u32 = u32::MAX;

/// One record in the slab.
struct Node {
    key: RecordKey,
    record: Record,
    seq: u64,
    /// The next node of the same fingerprint's chain.
    next: u32,
}

/// Every resume record of a node.
pub struct Records {
    max: usize,
    window: Duration,
    nodes: Slab<Node>,
    /// The first node of each fingerprint's chain.
    chains: HashMap<u64, u32>,
    order: VecDeque<(u32, u64)>,
    next_seq: u64,
    evicted: u64,
    expired: u64,
    last_eviction: Option<Instant>,
    /// Open connections per key, by the key's fingerprint (a shared fingerprint only ever makes
    /// a connection wait for a twin that is not one: a delay, never a loss).
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

impl Records {
    /// At most `max` records, each kept for `window`.
    pub fn new(max: usize, window: Duration) -> Records {
        Records {
            max: max.max(1),
            window,
            nodes: Slab::new(),
            chains: HashMap::new(),
            order: VecDeque::new(),
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
        while self.nodes.len() >= self.max {
            if !self.pop_oldest() {
                break;
            }
            self.evicted += 1;
            self.last_eviction = Some(now);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // Its window runs from now, when it is recorded.
        let record = Record {
            made: now,
            ..record
        };
        let idx = self.nodes.insert(Node {
            key,
            record,
            seq,
            next: NONE,
        }) as u32;
        // Appended at its chain's tail: chains stay oldest first.
        match self.chains.get(&fingerprint(&key)).copied() {
            None => {
                self.chains.insert(fingerprint(&key), idx);
            }
            Some(mut at) => {
                while self.nodes[at as usize].next != NONE {
                    at = self.nodes[at as usize].next;
                }
                self.nodes[at as usize].next = idx;
            }
        }
        self.order.push_back((idx, seq));
    }

    /// Takes the oldest live record under `key`.
    pub fn take(&mut self, key: &RecordKey, now: Instant) -> Option<Record> {
        self.expire(now);
        let mut at = *self.chains.get(&fingerprint(key))?;
        while self.nodes[at as usize].key != *key {
            at = self.nodes[at as usize].next;
            if at == NONE {
                return None;
            }
        }
        let node = self.unlink(at);
        self.compact();
        Some(node.record)
    }

    /// Removes node `idx` from its chain and the slab.
    fn unlink(&mut self, idx: u32) -> Node {
        let fp = fingerprint(&self.nodes[idx as usize].key);
        let next = self.nodes[idx as usize].next;
        let head = self.chains[&fp];
        if head == idx {
            if next == NONE {
                self.chains.remove(&fp);
            } else {
                self.chains.insert(fp, next);
            }
        } else {
            let mut at = head;
            while self.nodes[at as usize].next != idx {
                at = self.nodes[at as usize].next;
            }
            self.nodes[at as usize].next = next;
        }
        self.nodes.remove(idx as usize)
    }

    /// How many connections with `key` are open (counted by fingerprint, so at least that).
    pub fn open_count(&self, key: &RecordKey) -> u32 {
        self.live.get(&fingerprint(key)).copied().unwrap_or(0)
    }

    /// Whether a record was evicted at the bound at or after `t`.
    pub fn evicted_since(&self, t: Instant) -> bool {
        self.last_eviction.is_some_and(|e| e >= t)
    }

    /// Drops the records whose window has passed.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(idx, seq)) = self.order.front() {
            let Some(node) = self.nodes.get(idx as usize).filter(|n| n.seq == seq) else {
                self.order.pop_front();
                continue;
            };
            if now.saturating_duration_since(node.record.made) < self.window {
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
        while let Some((idx, seq)) = self.order.pop_front() {
            if self.nodes.get(idx as usize).is_some_and(|n| n.seq == seq) {
                self.unlink(idx);
                return true;
            }
        }
        false
    }

    /// Rebuilds `order` without the entries of taken records once those are the majority.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.nodes.len() + 64 {
            return;
        }
        let nodes = &self.nodes;
        self.order
            .retain(|&(idx, seq)| nodes.get(idx as usize).is_some_and(|n| n.seq == seq));
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
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
        assert!(self.nodes.len() <= self.max);
        let mut chained = 0;
        for (&fp, &head) in &self.chains {
            let mut at = head;
            let mut prev_seq = None;
            while at != NONE {
                let n = &self.nodes[at as usize];
                assert_eq!(
                    fingerprint(&n.key),
                    fp,
                    "a node in another fingerprint's chain"
                );
                assert!(prev_seq.map_or(true, |p| p < n.seq), "a chain out of order");
                assert!(self.order.iter().any(|&(i, s)| i == at && s == n.seq));
                prev_seq = Some(n.seq);
                chained += 1;
                at = n.next;
            }
        }
        assert_eq!(chained, self.nodes.len(), "a node in no chain");
        assert!(self
            .order
            .iter()
            .zip(self.order.iter().skip(1))
            .all(|(a, b)| a.1 < b.1));
    }
}

#[cfg(test)]
mod encoding {
    use super::*;

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        let now = Instant::now();
        for (since, caught_up, from_ack) in
            [(None, false, true), (Some(1_764_373_560_123), true, false)]
        {
            let r = Record {
                at: Position {
                    epoch: 1_796_484_471_511,
                    offset: 42,
                },
                since_ms: since,
                caught_up,
                from_ack,
                made: now,
            };
            assert_eq!(Record::decode(r.encode().as_bytes(), now), Some(r));
        }
        for bad in [
            "",
            "1 2",
            "1 2 - 1",
            "1 2 - 1 2",
            "1 2 x 1 0",
            "1 2 - 1 0 9",
            "a 2 - 1 0",
        ] {
            assert_eq!(Record::decode(bad.as_bytes(), now), None, "{bad:?}");
        }
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
        assert_eq!(r.take(&k, now).map(|x| x.at.offset), Some(5));
        assert_eq!(r.take(&k, now).map(|x| x.at.offset), Some(9));
        assert_eq!(r.take(&k, now).map(|x| x.at.offset), None);
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
        assert!(matches!(r.begin(k, now), Found::Record(x) if x.at.offset == 4));
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
    fn keys_that_share_a_fingerprint_keep_their_own_records_in_order() {
        let now = Instant::now();
        let mut r = Records::new(3, Duration::from_secs(120));
        let key = |tail: u8| {
            let mut k = [1u8; 32];
            k[8..].fill(tail);
            k
        };
        let (a, b) = (key(2), key(3));
        r.put(a, rec(1), now);
        r.put(b, rec(2), now);
        r.put(a, rec(3), now);
        r.check();
        assert_eq!(r.take(&b, now).map(|x| x.at.offset), Some(2));
        r.check();
        // At the bound the oldest of the whole store goes, wherever it sits in its chain.
        r.put(b, rec(4), now);
        r.put(b, rec(5), now);
        assert_eq!(r.evicted(), 1);
        r.check();
        assert_eq!(r.take(&a, now).map(|x| x.at.offset), Some(3));
        assert_eq!(r.take(&a, now).map(|x| x.at.offset), None);
        assert_eq!(r.take(&b, now).map(|x| x.at.offset), Some(4));
        assert_eq!(r.take(&b, now).map(|x| x.at.offset), Some(5));
        assert!(r.is_empty());
        r.check();
    }

    #[test]
    fn records_expire_after_the_window() {
        let t0 = Instant::now();
        let mut r = Records::new(10, Duration::from_secs(120));
        let k = record_key(b"t", "w");
        r.put(k, rec(1), t0);
        r.put(k, rec(2), t0 + Duration::from_secs(60));
        assert_eq!(
            r.take(&k, t0 + Duration::from_secs(121))
                .map(|x| x.at.offset),
            Some(2)
        );
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
        assert_eq!(r.take(&a, t1).map(|x| x.at.offset), None);
        assert_eq!(r.take(&b, t1).map(|x| x.at.offset), Some(2));
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
