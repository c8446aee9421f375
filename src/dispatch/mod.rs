//! How messages reach the shards, and how shards reach the cluster bus: the only things that
//! cross threads besides the read-mostly [`crate::lifecycle::Lifecycle`] and the counters.
//!
//! - [`interest`]: the lock-free table of which shards hold subscribers of which workspaces.
//! - [`inbox`]: each shard's bounded inbox, its waker, and the [`inbox::Room`] that wakes loops
//!   waiting for room without blocking.
//! - [`Links`]: every shard's inbox, with the interest table, as one handle: the local publish
//!   path and the cluster bus hand events to the shards through it.
//! - [`ToBus`]: the shards' bounded channel to the cluster bus thread (first and last
//!   subscriber of a workspace on a shard).
//!
//! Nothing here knows about connections, Redis or HTTP.

pub mod inbox;
pub mod interest;

use crate::event::Event;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use inbox::{Room, ShardGone, ShardLink, ShardMsg, TrySend, Waiter};
use interest::{Interest, ShardSet};
use mio::Waker;
use std::sync::Arc;

/// Every shard's inbox, and the interest table that says which of them want an event.
pub struct Links {
    shards: Box<[ShardLink]>,
    interest: Arc<Interest>,
    room: Arc<Room>,
}

impl Links {
    /// Links to `shards`, which share `room`, reading `interest`.
    pub fn new(shards: Vec<ShardLink>, interest: Arc<Interest>, room: Arc<Room>) -> Self {
        Links {
            shards: shards.into_boxed_slice(),
            interest,
            room,
        }
    }

    /// The number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there is no shard (never, in a running server).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Shard `i`'s inbox.
    pub fn shard(&self, i: usize) -> &ShardLink {
        &self.shards[i]
    }

    /// The interest table.
    pub fn interest(&self) -> &Arc<Interest> {
        &self.interest
    }

    /// The room waiters register their wakers in.
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }

    /// The shards that may hold subscribers of any of `events`' workspaces.
    pub fn targets(&self, events: &[Event]) -> ShardSet {
        let mut targets = ShardSet::default();
        for e in events {
            targets.union(self.interest.shards_for(&e.workspace_id));
        }
        targets
    }

    /// Sends `batch` to every shard in `targets`, waiting while an inbox is full; `waited(i)`
    /// is called for each shard that made it wait. For threads that may block.
    pub fn send_blocking(
        &self,
        batch: &Arc<[Event]>,
        targets: ShardSet,
        mut waited: impl FnMut(usize),
    ) -> Result<(), ShardGone> {
        for i in targets.iter().take_while(|&i| i < self.shards.len()) {
            if self.shards[i].send(ShardMsg::Events(batch.clone()))? {
                waited(i);
            }
        }
        Ok(())
    }

    /// Sends a control message to every shard (drain, keys), waiting for room.
    pub fn broadcast(&self, msg: impl Fn() -> ShardMsg) {
        for link in self.shards.iter() {
            // A shard that is gone has nothing left to drain or verify.
            let _ = link.send(msg());
        }
    }
}

/// A batch on its way to the shards from a loop that must not block: the shards that still
/// have to take it.
pub struct PendingBatch {
    batch: Arc<[Event]>,
    remaining: ShardSet,
}

/// Where a [`PendingBatch`] stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every target shard has it.
    Done,
    /// Some inbox was full; the waiter is woken when there is room.
    Waiting,
    /// A target shard has exited (only once a drain has finished).
    Gone,
}

impl PendingBatch {
    /// `batch` for `targets`.
    pub fn new(batch: Arc<[Event]>, targets: ShardSet) -> Self {
        PendingBatch {
            batch,
            remaining: targets,
        }
    }

    /// The events.
    pub fn events(&self) -> &Arc<[Event]> {
        &self.batch
    }

    /// The events and the shards still to take them.
    pub fn into_parts(self) -> (Arc<[Event]>, ShardSet) {
        (self.batch, self.remaining)
    }

    /// Hands the batch to every remaining shard that has room, except those in `blocked`, which
    /// earlier batches of the same loop still wait for (so every shard takes one loop's batches
    /// in the order they were made). Shards this batch now waits for are added to `blocked`.
    pub fn advance(&mut self, links: &Links, waiter: Waiter, blocked: &mut ShardSet) -> Progress {
        let remaining = self.remaining;
        for i in remaining.iter() {
            if i >= links.len() {
                self.remaining.remove(i);
                continue;
            }
            if blocked.contains(i) {
                continue;
            }
            match links.shards[i].try_send(ShardMsg::Events(self.batch.clone()), waiter) {
                TrySend::Sent => self.remaining.remove(i),
                TrySend::Full(_) => blocked.insert(i),
                TrySend::Gone => return Progress::Gone,
            }
        }
        if self.remaining.is_empty() {
            Progress::Done
        } else {
            blocked.union(self.remaining);
            Progress::Waiting
        }
    }
}

/// A shard's change of interest in a workspace, for the cluster bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusInterest {
    /// The shard's first subscriber of the workspace arrived.
    Add(Arc<str>, usize),
    /// The shard's last subscriber of the workspace left.
    Remove(Arc<str>, usize),
    /// A resume record kept in Redis (`--bus-wire 2`).
    Record(RecordOp),
}

/// What a shard asks of the resume records the cluster bus keeps in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordOp {
    /// Keep a record (a connection ended).
    Put {
        /// The connection waiting for it to be kept before its socket closes, as (shard,
        /// connection, generation); answered with
        /// [`crate::dispatch::inbox::ShardMsg::RecordKept`].
        waiting: Option<(usize, u32, u32)>,
        /// Its workspace (whose hash slot the record's key shares).
        workspace: Arc<str>,
        /// The hash of the token and the workspace.
        key: crate::history::records::RecordKey,
        /// [`crate::history::records::Record::encode`].
        value: String,
    },
    /// Remove one record equal to `value` (it was taken from this node's own copy).
    Drop {
        /// Its workspace.
        workspace: Arc<str>,
        /// The hash of the token and the workspace.
        key: crate::history::records::RecordKey,
        /// The record.
        value: String,
    },
    /// Take the oldest record under `key` for connection `conn` (generation `gen`) of shard
    /// `shard`, which is answered with [`crate::dispatch::inbox::ShardMsg::Record`].
    Take {
        /// Its workspace.
        workspace: Arc<str>,
        /// The hash of the token and the workspace.
        key: crate::history::records::RecordKey,
        /// The asking shard.
        shard: usize,
        /// The connection.
        conn: u32,
        /// Its generation.
        gen: u32,
    },
}

/// Changes the shards have sent that the bus thread has not taken yet, at most.
pub const TO_BUS_CAPACITY: usize = 64 * 1024;

/// The shards' side of the channel into the cluster bus thread. Never blocks: a full channel
/// hands the change back, and the shard keeps it (coalesced) until there is room.
#[derive(Clone)]
pub struct ToBus {
    tx: Sender<BusInterest>,
    waker: Arc<Waker>,
}

impl ToBus {
    /// A bounded channel into the bus thread whose poll `waker` wakes; the bus keeps the
    /// receiver.
    pub fn channel(waker: Arc<Waker>) -> (ToBus, Receiver<BusInterest>) {
        let (tx, rx) = crossbeam_channel::bounded(TO_BUS_CAPACITY);
        (ToBus { tx, waker }, rx)
    }

    /// Sends `change` if there is room; hands it back if not (or if the bus is gone, which only
    /// happens at shutdown: the change is then moot and dropped).
    pub fn try_send(&self, change: BusInterest) -> Result<(), BusInterest> {
        match self.tx.try_send(change) {
            Ok(()) => {
                let _ = self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(c)) => Err(c),
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }
}
