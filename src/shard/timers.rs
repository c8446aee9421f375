//! A connection's one timer. What it means follows from the phase: the handshake deadline in
//! `Head`/`Http`, the earlier of the next heartbeat and the token's expiry in `Open` (or, while
//! an open connection waits for the cluster bus, the deadline for that), the close deadline in
//! `Closing`/`Lingering`. One wheel entry per connection, replaced as the phase moves.
//!
//! Each heartbeat turn builds its frame once and queues the same bytes on every connection due.

use super::conn::Phase;
use super::{recycle_timers, Next, Shard, Timer, Turn};
use crate::event::heartbeat_frame;
use crate::fault::{self, Point};
use crate::ws::close::CloseReason;
use crate::ws::close::DEAD_PEER;
use crate::ws::frame::ping_frame;
use crate::ws::SharedFrame;

impl Shard {
    /// Replaces connection `key`'s timer with one due at tick `due`.
    pub(super) fn set_timer(&mut self, key: usize, due: u64) {
        self.cancel_timer(key);
        let gen = self.conns[key].gen;
        let id = self.wheel.insert(
            due,
            Timer {
                key: key as u32,
                gen,
            },
        );
        self.conns[key].timer = Some(id);
    }

    pub(super) fn cancel_timer(&mut self, key: usize) {
        if let Some(old) = self.conns.get_mut(key).and_then(|c| c.timer.take()) {
            self.wheel.cancel(old);
        }
    }

    /// An open connection wakes at its next heartbeat or its expiry, whichever is first.
    pub(super) fn arm_open_timer(&mut self, key: usize) {
        let Phase::Open(o) = self.conns[key].phase else {
            return;
        };
        self.set_timer(key, o.next_heartbeat.min(o.expires));
    }

    pub(super) fn fire_timers(&mut self, turn: &Turn) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(turn.tick, &mut fired);
        let mut heartbeat: Option<SharedFrame> = None;
        for &t in &fired {
            let key = t.key as usize;
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.gen == t.gen) else {
                debug_assert!(false, "timer for a connection that is gone");
                continue;
            };
            // The timer is out of the wheel: forget its id before anything can cancel it.
            conn.timer = None;
            self.guarded(key, turn, |s| s.on_timer(key, turn, &mut heartbeat));
        }
        self.fired = recycle_timers(fired);
    }

    /// Connection `key`'s timer fired.
    fn on_timer(&mut self, key: usize, turn: &Turn, heartbeat: &mut Option<SharedFrame>) -> Next {
        let (faults, registry) = (&self.faults, &self.registry);
        fault::point(faults, Point::Timer, || registry.names(key).map(|(_, u)| u));
        if self.conns[key].is_open()
            && fault::drain_one(faults, || registry.names(key).map(|(_, u)| u))
        {
            return Next::Close(CloseReason::GoingAway);
        }
        let limits = &self.limits;
        let conn = &mut self.conns[key];
        let Phase::Open(open) = &mut conn.phase else {
            // Handshake, close or linger deadline.
            return Next::Drop;
        };
        if open.awaiting_live {
            // The cluster bus did not confirm the workspace within --handshake-timeout.
            open.awaiting_live = false;
            return Next::Close(CloseReason::TryAgainLater);
        }
        if turn.tick >= open.expires {
            return Next::Close(CloseReason::TokenExpired);
        }
        if turn.tick < open.next_heartbeat {
            self.arm_open_timer(key);
            return Next::Continue;
        }
        let due = self.started + limits.tick * (open.next_heartbeat.min(u32::MAX as u64) as u32);
        self.stats_all[self.index]
            .heartbeat_lateness
            .record(turn.now.saturating_duration_since(due));
        open.next_heartbeat = (open.next_heartbeat + limits.heartbeat_ticks).max(turn.tick + 1);
        open.frames = 0;
        let mut send_ping = false;
        if limits.ping_every != 0 {
            open.beats_since_ping = open.beats_since_ping.saturating_add(1);
            if open.ping_outstanding && open.beats_since_ping >= limits.ping_timeout_beats {
                // No pong for --ping-timeout: the peer is gone without a FIN, or stuck.
                // Nothing it could read is worth sending; drop the connection.
                conn.close_code = DEAD_PEER;
                log::debug!(
                    "shard {}: connection {key}: no pong within --ping-timeout; dropped",
                    self.index
                );
                return Next::Drop;
            }
            if !open.ping_outstanding && open.beats_since_ping >= limits.ping_every {
                open.ping_outstanding = true;
                open.beats_since_ping = 0;
                send_ping = true;
            }
        }
        let frame = heartbeat
            .get_or_insert_with(|| heartbeat_frame(turn.now_ms))
            .clone();
        self.enqueue(key, frame);
        if send_ping {
            self.enqueue(key, ping_frame());
        }
        // The acknowledgement ping rides the heartbeat's write: no cost between heartbeats.
        self.maybe_ack(key, turn);
        self.arm_open_timer(key);
        Next::Continue
    }
}
