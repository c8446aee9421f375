//! What crosses into a shard: messages on a bounded crossbeam channel, plus the shard's mio
//! `Waker`. Wake-ups are coalesced: a sender wakes the shard only when it flips `notified` from
//! false to true, and the shard clears it before draining, so a burst of N publishes costs one
//! `eventfd` write, not N.

use crate::auth::keys::KeySet;
use crate::bus::event::Event;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A message to a shard.
pub enum ShardMsg {
    /// Events to deliver to this shard's subscribers, in order.
    Events(Arc<[Event]>),
    /// A freshly loaded key set (SIGHUP).
    Keys(Arc<KeySet>),
    /// Begin the graceful drain.
    Drain,
    /// The cluster bus's subscription to this workspace is in force: its waiting connections
    /// may be sent `connected`.
    Live(Arc<str>),
}

/// The sending side of a shard's inbox.
pub struct ShardLink {
    tx: Sender<ShardMsg>,
    waker: Waker,
    notified: AtomicBool,
}

/// The shard is gone (its thread has exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardGone;

impl ShardLink {
    /// A link sending on `tx` and waking `waker`.
    pub fn new(tx: Sender<ShardMsg>, waker: Waker) -> Self {
        ShardLink {
            tx,
            waker,
            notified: AtomicBool::new(false),
        }
    }

    /// Sends `msg`, waiting while the inbox is full (back-pressure), and wakes the shard if it
    /// may be asleep. Returns whether it had to wait.
    pub fn send(&self, msg: ShardMsg) -> Result<bool, ShardGone> {
        // A full inbox means the shard already holds a wake-up it has not acted on (it clears
        // `notified` only as it starts draining), so blocking here cannot sleep forever.
        let waited = match self.tx.try_send(msg) {
            Ok(()) => false,
            Err(TrySendError::Full(msg)) => {
                self.tx.send(msg).map_err(|_| ShardGone)?;
                true
            }
            Err(TrySendError::Disconnected(_)) => return Err(ShardGone),
        };
        if !self.notified.swap(true, Ordering::AcqRel) {
            // A failed wake means the poll is gone, which the next send will report.
            let _ = self.waker.wake();
        }
        Ok(waited)
    }

    /// Called by the shard before it drains its inbox.
    pub fn clear_notified(&self) {
        self.notified.store(false, Ordering::Release);
    }
}

/// The receiving side, owned by the shard.
pub type Inbox = Receiver<ShardMsg>;
