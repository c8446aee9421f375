//! A connection's one timer. What it means follows from the phase: the handshake deadline in
//! `Head`/`Http`, the earlier of the next heartbeat and the token's expiry in `Open`, the close
//! deadline in `Closing`/`Lingering`. One wheel entry per connection, replaced as the phase moves.
//!
//! Each heartbeat turn builds its frame once and queues the same bytes on every connection due.

use super::conn::Phase;
use super::{Shard, Timer};
use crate::bus::event::heartbeat_frame;
use crate::clock;
use crate::ws::close::CloseReason;
use crate::ws::close::DEAD_PEER;
use crate::ws::frame::ping_frame;
use crate::ws::SharedFrame;
use std::time::Instant;

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
        let c = &self.conns[key];
        let due = c.next_heartbeat.min(c.expires);
        self.set_timer(key, due);
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        let tick = self.tick_of(now);
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(tick, &mut fired);
        let mut heartbeat: Option<SharedFrame> = None;
        for t in fired.drain(..) {
            let key = t.key as usize;
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.gen == t.gen) else {
                debug_assert!(false, "timer for a connection that is gone");
                continue;
            };
            // The timer is out of the wheel: forget its id before anything can cancel it.
            conn.timer = None;
            if conn.dead {
                continue;
            }
            if conn.phase != Phase::Open {
                // Handshake, close or linger deadline.
                self.kill(key);
                continue;
            }
            if conn.awaiting_live {
                // The cluster bus did not confirm the workspace within --handshake-timeout.
                conn.awaiting_live = false;
                self.guarded(key, |s| s.close_ws(key, CloseReason::TryAgainLater));
                continue;
            }
            if tick >= conn.expires {
                self.guarded(key, |s| s.close_ws(key, CloseReason::TokenExpired));
                continue;
            }
            if tick >= conn.next_heartbeat {
                let due = self.started
                    + self.limits.tick * (conn.next_heartbeat.min(u32::MAX as u64) as u32);
                self.shared.shard_stats[self.index]
                    .heartbeat_lateness
                    .record(now.saturating_duration_since(due));
                conn.next_heartbeat =
                    (conn.next_heartbeat + self.limits.heartbeat_ticks).max(tick + 1);
                conn.frames = 0;
                let ping = self.limits.ping_every;
                let mut send_ping = false;
                if ping != 0 {
                    conn.beats_since_ping = conn.beats_since_ping.saturating_add(1);
                    if conn.ping_outstanding
                        && conn.beats_since_ping >= self.limits.ping_timeout_beats
                    {
                        // No pong for --ping-timeout: the peer is gone without a FIN, or stuck.
                        // Nothing it could read is worth sending; drop the connection.
                        conn.close_code = DEAD_PEER;
                        log::debug!(
                            "shard {}: connection {key}: no pong within --ping-timeout; dropped",
                            self.index
                        );
                        self.kill(key);
                        continue;
                    }
                    if !conn.ping_outstanding && conn.beats_since_ping >= ping {
                        conn.ping_outstanding = true;
                        conn.beats_since_ping = 0;
                        send_ping = true;
                    }
                }
                let frame = heartbeat
                    .get_or_insert_with(|| heartbeat_frame(clock::now_ms()))
                    .clone();
                self.enqueue(key, frame);
                if send_ping {
                    self.enqueue(key, ping_frame());
                }
            }
            self.arm_open_timer(key);
        }
        self.fired = fired;
        self.close_slow();
    }
}
