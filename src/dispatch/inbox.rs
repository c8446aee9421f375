//! What crosses into a shard: messages on a bounded crossbeam channel, plus the shard's mio
//! `Waker`. Wake-ups are coalesced: a sender wakes the shard only when it flips `notified` from
//! false to true, and the shard clears it before draining, so a burst of N publishes costs one
//! `eventfd` write, not N.
//!
//! A full inbox is back-pressure. Threads that may wait (library publishers) block in
//! [`ShardLink::send`]. Event loops that must never block (the internal listener, the cluster
//! bus) use [`ShardLink::try_send`] and, when it finds the inbox full, register in the [`Room`]:
//! every shard that drains messages wakes the registered loops, which then retry. Registration
//! is followed by one more attempt, so a drain that happens between the failed attempt and the
//! registration is never missed.

use crate::auth::keys::KeySet;
use crate::event::Event;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// A message to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// Events to deliver to this shard's subscribers, in order.
    Events(Arc<[Event]>),
    /// A freshly loaded key set (SIGHUP).
    Keys(Arc<KeySet>),
    /// Begin the graceful drain.
    Drain,
    /// The cluster bus's subscription to this workspace is in force: its waiting connections
    /// may be sent `connected`.
    /// With history on, where the node's stream of the workspace stands (what the bus has
    /// handed on before this message; epoch 0 for a stream not begun): a shard that has not
    /// seen it yet starts there.
    Live(Arc<str>, Option<crate::history::Position>),
    /// A connection opened with a token whose earlier connection may still be open here
    /// without a peer (reset, vanished): ping the connections with this resume key and drop
    /// those that do not answer in time, so their records are made.
    Probe(crate::history::records::RecordKey),
    /// A connection with this resume key answered a probe: it is alive (a second tab), so a
    /// connection waiting for its record need not wait for it.
    TwinAlive(crate::history::records::RecordKey),
    /// The cluster bus could not give this workspace's events in full (the history stream no
    /// longer held what the node missed, or Redis lost it): its connections here are sent
    /// `stream.gap` (`since`: the `ts` of the last event delivered before it) and the
    /// workspace's stream starts over from the next event.
    Gap(Arc<str>, crate::event::GapReason, Option<u64>),
    /// The answer to a [`crate::dispatch::RecordOp::Take`]: the record (none if Redis holds
    /// none), or `Err` if Redis could not be asked; and where the node's stream of the
    /// workspace stood when the answer was sent, and the history copy holds what a replay
    /// from the record needs (as far as Redis still had it).
    Record(RecordAnswer),
    /// Redis has the resume record of connection (key, generation), or could not take it: its
    /// socket may close.
    RecordKept(u32, u32),
}

/// See [`ShardMsg::Record`].
#[derive(Debug, Clone)]
pub struct RecordAnswer {
    /// The connection that asked.
    pub conn: u32,
    /// Its generation.
    pub gen: u32,
    /// The record, or `Err` when Redis could not be asked.
    pub record: Result<Option<crate::history::records::Record>, ()>,
    /// The node's stream of the workspace then (epoch 0: not known yet).
    pub head: crate::history::Position,
}

/// The loops that wait for room in a shard's inbox without blocking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// The internal listener (HTTP publishes).
    Internal = 0,
    /// The cluster bus thread (events received from Redis).
    Bus = 1,
}

const WAITERS: usize = 2;

/// Who is waiting for room in any shard's inbox, and how to wake them.
#[derive(Default)]
pub struct Room {
    wakers: [OnceLock<Arc<Waker>>; WAITERS],
    wanted: [AtomicBool; WAITERS],
}

impl Room {
    /// Gives `waiter`'s waker (once, when its loop is built).
    pub fn register(&self, waiter: Waiter, waker: Arc<Waker>) {
        let _ = self.wakers[waiter as usize].set(waker);
    }

    /// `waiter` found an inbox full: wake it after the next drain.
    fn want(&self, waiter: Waiter) {
        self.wanted[waiter as usize].store(true, Ordering::SeqCst);
        // Ordered before the retry that follows, so that a shard draining in between either
        // sees the flag or leaves the room the retry finds.
        fence(Ordering::SeqCst);
    }

    /// Called by a shard after it took messages from its inbox: wakes whoever waits for room.
    /// Two loads when nobody waits.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        for (i, wanted) in self.wanted.iter().enumerate() {
            if wanted.load(Ordering::Relaxed) && wanted.swap(false, Ordering::AcqRel) {
                if let Some(w) = self.wakers[i].get() {
                    let _ = w.wake();
                }
            }
        }
    }
}

/// The sending side of a shard's inbox.
pub struct ShardLink {
    tx: Sender<ShardMsg>,
    waker: Waker,
    notified: AtomicBool,
    room: Arc<Room>,
}

/// The shard is gone (its thread has exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardGone;

/// What a non-blocking send achieved.
#[derive(Debug)]
pub enum TrySend {
    /// Queued.
    Sent,
    /// The inbox is full; the message comes back, and the sender is woken once there is room.
    Full(ShardMsg),
    /// The shard has exited.
    Gone,
}

impl ShardLink {
    /// A link sending on `tx` and waking `waker`; `room` is shared by every shard's link.
    pub fn new(tx: Sender<ShardMsg>, waker: Waker, room: Arc<Room>) -> Self {
        ShardLink {
            tx,
            waker,
            notified: AtomicBool::new(false),
            room,
        }
    }

    /// Sends `msg`, waiting while the inbox is full (back-pressure), and wakes the shard if it
    /// may be asleep. Returns whether it had to wait. For threads that may block only.
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
        self.wake();
        Ok(waited)
    }

    /// Sends `msg` if the inbox has room; never blocks. When it is full, `waiter` is woken
    /// after the shard next drains.
    pub fn try_send(&self, msg: ShardMsg, waiter: Waiter) -> TrySend {
        let msg = match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake();
                return TrySend::Sent;
            }
            Err(TrySendError::Disconnected(_)) => return TrySend::Gone,
            Err(TrySendError::Full(msg)) => msg,
        };
        self.room.want(waiter);
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake();
                TrySend::Sent
            }
            Err(TrySendError::Disconnected(_)) => TrySend::Gone,
            Err(TrySendError::Full(msg)) => TrySend::Full(msg),
        }
    }

    /// Sends `msg` if the inbox has room, registering no waiter: for messages whose loss costs
    /// only time (a probe). Returns whether it was queued.
    pub fn offer(&self, msg: ShardMsg) -> bool {
        if self.tx.try_send(msg).is_ok() {
            self.wake();
            return true;
        }
        false
    }

    fn wake(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            // A failed wake means the poll is gone, which the next send will report.
            let _ = self.waker.wake();
        }
    }

    /// Called by the shard before it drains its inbox.
    pub fn clear_notified(&self) {
        self.notified.store(false, Ordering::Release);
    }

    /// Called by the shard after it took messages: wakes loops waiting for room.
    pub fn drained(&self) {
        self.room.notify();
    }

    /// Messages waiting in the inbox.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether the inbox is empty.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

/// The receiving side, owned by the shard.
pub type Inbox = Receiver<ShardMsg>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_inbox_hands_the_message_back_and_wakes_the_waiter_after_a_drain() {
        let poll = mio::Poll::new().unwrap();
        let shard_waker = Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let mut waiter_poll = mio::Poll::new().unwrap();
        let waiter_waker = Arc::new(Waker::new(waiter_poll.registry(), mio::Token(7)).unwrap());
        let room = Arc::new(Room::default());
        room.register(Waiter::Internal, waiter_waker);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let link = ShardLink::new(tx, shard_waker, room);
        assert!(matches!(
            link.try_send(ShardMsg::Drain, Waiter::Internal),
            TrySend::Sent
        ));
        let back = link.try_send(ShardMsg::Drain, Waiter::Internal);
        assert!(matches!(back, TrySend::Full(ShardMsg::Drain)));
        // The shard drains and notifies: the waiter's poll returns with its token.
        rx.try_recv().unwrap();
        link.drained();
        let mut events = mio::Events::with_capacity(4);
        waiter_poll
            .poll(&mut events, Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(7)));
        assert!(matches!(
            link.try_send(ShardMsg::Drain, Waiter::Internal),
            TrySend::Sent
        ));
        drop(rx);
        assert!(matches!(
            link.try_send(ShardMsg::Drain, Waiter::Internal),
            TrySend::Gone
        ));
    }
}
