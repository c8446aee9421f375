//! Ending connections: the server's close handshake, failures, slow consumers, and removal at the
//! end of a loop turn (deferred, so no slab slot is reused while the same poll batch may still
//! name it).

use super::conn::Phase;
use super::Shard;
use crate::metrics::ShardStats;
use crate::ws::close::CloseReason;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Shard {
    /// Sends a close frame for `reason` and waits (up to `--close-timeout`, or to the drain
    /// deadline for a drain) for the peer's.
    pub(super) fn close_ws(&mut self, key: usize, reason: CloseReason) {
        let conn = &mut self.conns[key];
        if conn.dead || conn.close_sent || !conn.upgraded() {
            return;
        }
        conn.close_code = reason.code();
        self.unsubscribe(key);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Closing;
        conn.close_sent = true;
        self.stats().close(reason);
        self.enqueue(key, reason.frame());
        let now = Instant::now();
        let due = match self.drain_deadline {
            Some(d) if reason == CloseReason::GoingAway => {
                self.tick_of(d).max(self.tick_of(now) + 1)
            }
            _ => self.tick_of(now) + self.limits.close_ticks,
        };
        self.set_timer(key, due);
    }

    /// Closes after a protocol failure or server error: close frame, then shut down once flushed
    /// without waiting for the peer's close frame.
    pub(super) fn fail(&mut self, key: usize, reason: CloseReason) {
        if !self.conns.get(key).is_some_and(|c| !c.dead) {
            return;
        }
        if self.conns[key].upgraded() {
            self.close_ws(key, reason);
            self.conns[key].close_when_flushed = true;
            self.mark_dirty(key);
        } else {
            self.kill(key);
        }
    }

    pub(super) fn close_slow(&mut self) {
        for key in std::mem::take(&mut self.slow) {
            let key = key as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.dead || conn.phase != Phase::Open {
                continue;
            }
            conn.out.discard_unstarted();
            self.close_ws(key, CloseReason::SlowConsumer);
            self.conns[key].close_when_flushed = true;
        }
    }

    /// Ends a subscription; logs the connection's close line (at debug) while its names are
    /// still known.
    pub(super) fn unsubscribe(&mut self, key: usize) {
        if log::log_enabled!(log::Level::Debug) {
            if let Some((ws, user)) = self.registry.names(key) {
                let conn = &self.conns[key];
                let peer = conn
                    .stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                log::debug!(
                    conn = key, shard = self.index, workspace = ws, user = user, peer = peer.as_str(),
                    code = conn.close_code, duration_ms = self.age_ms(conn.opened_ms);
                    "connection closed"
                );
            }
        }
        if self.registry.remove(key) {
            self.stats().open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn age_ms(&self, opened_ms: u64) -> u64 {
        (Instant::now()
            .saturating_duration_since(self.started)
            .as_millis() as u64)
            .saturating_sub(opened_ms)
    }

    /// Marks a connection for removal at the end of the iteration.
    pub(super) fn kill(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dead {
                conn.dead = true;
                self.dead.push(key as u32);
            }
        }
    }

    pub(super) fn reap(&mut self) {
        for key in std::mem::take(&mut self.dead) {
            let key = key as usize;
            self.unsubscribe(key);
            self.cancel_timer(key);
            let conn = self.conns.remove(key);
            if conn.phase != Phase::Lingering {
                ShardStats::add(&self.stats().dropped, 1);
            }
            // Every WebSocket connection (upgraded: subscribed, or refused with a close code)
            // is counted once, by the code it ended with; plain HTTP exchanges are not.
            if conn.was_open || conn.close_code != 0 {
                self.stats().closed_with(conn.close_code);
            }
            self.shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
            if !conn.was_open {
                // Never subscribed (refused, probe, bad request): its close line is this one. A
                // refused connection's peer is on its `connection refused` line; by now the
                // socket may be past telling it.
                log::debug!(
                    conn = key, shard = self.index, code = conn.close_code, duration_ms = self.age_ms(conn.opened_ms);
                    "connection closed"
                );
            }
            // Dropping the stream closes the socket and removes it from the poll.
        }
    }

    /// Drops every connection at once. With `reason`, open connections whose queue is empty get
    /// one best-effort, non-blocking write of that close frame first (a connection with queued
    /// bytes cannot take a frame in the middle of another).
    pub(super) fn abort_all(&mut self, reason: Option<CloseReason>) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            let conn = &mut self.conns[k];
            if let Some(r) = reason {
                if conn.phase == Phase::Open && !conn.close_sent && conn.out.is_empty() {
                    let _ = std::io::Write::write(&mut conn.stream, &r.frame());
                    self.stats().close(r);
                }
            }
            self.kill(k);
        }
        self.reap();
    }
}
