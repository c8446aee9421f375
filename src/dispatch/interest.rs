//! Which shards hold subscribers of which workspaces, readable without a lock.
//!
//! Workspaces hash into a fixed number of buckets; each bucket has one bit per shard, set while
//! that shard has at least one subscriber of any workspace in the bucket. A shard flips its own
//! bits when its local count for a bucket moves between 0 and 1 (it keeps the counts itself); a
//! publisher reads the bits of an event's bucket and hands the event only to those shards. A hash
//! collision costs a wasted hand-off, never a lost event.
//!
//! Ordering: a shard sets its bit before it queues the `connected` frame, so a client that has
//! seen `connected` is reachable by every publish that starts after that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::config::MAX_SHARDS;
/// Buckets in the table.
pub const BUCKETS: usize = 4096;
const WORDS: usize = MAX_SHARDS / 64;

/// A set of shard indexes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardSet([u64; WORDS]);

impl ShardSet {
    /// Adds every shard of `other`.
    pub fn union(&mut self, other: ShardSet) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }

    /// Whether `shard` is in the set.
    pub fn contains(&self, shard: usize) -> bool {
        self.0[shard / 64] & (1 << (shard % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Adds `shard`.
    pub fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    /// Removes `shard`.
    pub fn remove(&mut self, shard: usize) {
        self.0[shard / 64] &= !(1 << (shard % 64));
    }

    /// The shards in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }
}

/// The shared interest table.
pub struct Interest {
    bits: Box<[AtomicU64]>,
}

impl Default for Interest {
    fn default() -> Self {
        Interest {
            bits: (0..BUCKETS * WORDS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The bucket of a workspace id (FNV-1a; stable across threads and runs).
pub fn bucket(workspace_id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in workspace_id.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as usize & (BUCKETS - 1)
}

impl Interest {
    /// The shards that may hold subscribers of `workspace_id`.
    pub fn shards_for(&self, workspace_id: &str) -> ShardSet {
        let base = bucket(workspace_id) * WORDS;
        let mut set = ShardSet::default();
        for (i, w) in set.0.iter_mut().enumerate() {
            *w = self.bits[base + i].load(Ordering::Acquire);
        }
        set
    }

    /// Marks `shard` as holding subscribers in `bucket`.
    pub fn set(&self, bucket: usize, shard: usize) {
        self.bits[bucket * WORDS + shard / 64].fetch_or(1 << (shard % 64), Ordering::Release);
    }

    /// Marks `shard` as holding no subscriber in `bucket`.
    pub fn clear(&self, bucket: usize, shard: usize) {
        self.bits[bucket * WORDS + shard / 64].fetch_and(!(1 << (shard % 64)), Ordering::Release);
    }
}

/// One shard's side of the table: its count of subscribed workspaces per bucket, and its bits.
pub struct ShardInterest {
    table: Arc<Interest>,
    shard: usize,
    counts: Box<[u32]>,
}

impl ShardInterest {
    /// Shard `shard`'s view of `table`.
    pub fn new(table: Arc<Interest>, shard: usize) -> Self {
        ShardInterest {
            table,
            shard,
            counts: vec![0; BUCKETS].into_boxed_slice(),
        }
    }

    /// The shard's first subscriber of `workspace` arrived: its bucket's bit is set before the
    /// call returns (so before `connected` is queued).
    pub fn gained(&mut self, workspace: &str) {
        let b = bucket(workspace);
        self.counts[b] += 1;
        if self.counts[b] == 1 {
            self.table.set(b, self.shard);
        }
    }

    /// The shard's last subscriber of `workspace` left.
    pub fn lost(&mut self, workspace: &str) {
        let b = bucket(workspace);
        debug_assert!(self.counts[b] > 0, "lost a workspace never gained");
        self.counts[b] = self.counts[b].saturating_sub(1);
        if self.counts[b] == 0 {
            self.table.clear(b, self.shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_lists_its_shards_in_order() {
        let mut s = ShardSet::default();
        for i in [200, 3, 64, 0, 255] {
            s.insert(i);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 3, 64, 200, 255]);
        assert_eq!(ShardSet::default().iter().count(), 0);
    }

    #[test]
    fn set_and_clear_per_shard() {
        let t = Interest::default();
        let b = bucket("ws_1");
        t.set(b, 3);
        t.set(b, 200);
        let s = t.shards_for("ws_1");
        assert!(s.contains(3) && s.contains(200) && !s.contains(4));
        t.clear(b, 3);
        assert!(!t.shards_for("ws_1").contains(3));
        t.clear(b, 200);
        assert!(t.shards_for("ws_1").is_empty());
    }

    #[test]
    fn a_shard_holds_its_bit_while_any_workspace_of_the_bucket_is_there() {
        let t = Arc::new(Interest::default());
        let mut s = ShardInterest::new(t.clone(), 5);
        s.gained("ws_a");
        s.gained("ws_a");
        s.lost("ws_a");
        assert!(t.shards_for("ws_a").contains(5));
        s.lost("ws_a");
        assert!(!t.shards_for("ws_a").contains(5));
    }

    #[test]
    fn buckets_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(bucket(&format!("ws_{i}")));
        }
        assert!(
            seen.len() > 850,
            "{} distinct buckets of 1000 ids",
            seen.len()
        );
    }
}
