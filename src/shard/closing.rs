//! Ending connections: the server's close handshake, failures, slow consumers, and removal at the
//! end of a loop turn (deferred, so no slab slot is reused while the same poll batch may still
//! name it).

use super::conn::Phase;
use super::{Next, Shard, Turn};
use crate::dispatch::BusInterest;
use crate::fault::{self, Point};
use crate::metrics::ShardStats;
use crate::shard::registry::Removed;
use crate::ws::close::CloseReason;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

impl Shard {
    /// Starts the server's closing handshake on an open connection: the close frame for
    /// `reason`, then a wait (up to `--close-timeout`, or to the drain deadline for a drain) for
    /// the peer's. Anything but an open connection is left as it is.
    pub(super) fn close_ws(&mut self, key: usize, reason: CloseReason, turn: &Turn) {
        if self.conns.get(key).is_some_and(|c| !c.dead && c.is_open()) {
            self.send_close(key, reason, turn);
        }
    }

    /// Queues the close frame for `reason` and moves the connection to `Closing` (the caller
    /// knows the 101 is queued and no close frame is).
    pub(super) fn send_close(&mut self, key: usize, reason: CloseReason, turn: &Turn) {
        self.conns[key].close_code = reason.code();
        self.mark_server_close(key);
        self.unsubscribe(key, turn);
        self.conns[key].phase = Phase::Closing;
        self.stats().close(reason);
        self.enqueue(key, reason.frame());
        let due = match self.drain_deadline {
            Some(d) if reason == CloseReason::GoingAway => self.tick_of(d).max(turn.tick + 1),
            _ => turn.tick + self.limits.close_ticks,
        };
        self.set_timer(key, due);
    }

    /// Closes after a protocol failure, a server error or a slow consumer: the close frame, then
    /// shut down once flushed without waiting for the peer's. A slow consumer's queued frames
    /// that have not started are dropped first (one that has must finish before the close frame
    /// can follow it). A connection not upgraded yet is simply dropped.
    pub(super) fn fail(&mut self, key: usize, reason: CloseReason, turn: &Turn) {
        let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) else {
            return;
        };
        if !conn.upgraded() {
            return self.kill(key);
        }
        if reason == CloseReason::SlowConsumer {
            if !conn.is_open() {
                return;
            }
            self.mark_slow_close(key);
            self.conns[key].out.discard_unstarted();
        }
        self.close_ws(key, reason, turn);
        self.conns[key].close_when_flushed = true;
        self.mark_dirty(key);
    }

    /// Closes the connections whose unsent bytes passed `--max-outbound-bytes` this turn.
    pub(super) fn close_slow(&mut self, turn: &Turn) {
        if self.slow.is_empty() {
            return;
        }
        let slow = self.slow.take();
        for &key in &slow {
            let key = key as usize;
            self.guarded(key, turn, |_| Next::Fail(CloseReason::SlowConsumer));
        }
        self.slow.give_back(slow);
    }

    /// Ends a subscription (the interest table and the cluster bus learn of a workspace's last
    /// connection leaving); logs the connection's close line (at debug) while its names are
    /// still known.
    pub(super) fn unsubscribe(&mut self, key: usize, turn: &Turn) {
        if log::log_enabled!(log::Level::Debug) {
            if let Some((ws, user)) = self.registry.names(key) {
                let conn = &self.conns[key];
                log::debug!(
                    conn = key, shard = self.index, workspace = ws, user = user, peer = self.peer(key).as_str(),
                    code = conn.close_code, duration_ms = self.age_ms(conn.opened_ms, turn);
                    "connection closed"
                );
            }
        }
        match self.registry.remove(key) {
            Removed::NotSubscribed => return,
            Removed::Member => {}
            Removed::LastInWorkspace(ws) => {
                self.interest.lost(&ws);
                self.tell_bus(BusInterest::Remove((*ws).into(), self.index));
            }
        }
        self.stats().open.fetch_sub(1, Ordering::Relaxed);
    }

    fn age_ms(&self, opened_ms: u64, turn: &Turn) -> u64 {
        (turn.now.saturating_duration_since(self.started).as_millis() as u64)
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

    /// Removes the connections that ended this turn. A panic while removing one still removes
    /// it (and counts its socket closed), and the others are removed as usual.
    pub(super) fn reap(&mut self, turn: &Turn) {
        if self.dead.is_empty() {
            return;
        }
        let dead = self.dead.take();
        for &key in &dead {
            let key = key as usize;
            if catch_unwind(AssertUnwindSafe(|| self.remove(key, turn))).is_err() {
                ShardStats::add(&self.stats().handler_panics, 1);
                log::error!(
                    "shard {}: removing a connection panicked; removed it anyway",
                    self.index
                );
                // Unsubscribing again is harmless if it got that far (the registry no longer
                // knows the key), and needed if it did not (the interest table, the bus and the
                // open count must learn of it).
                let _ = catch_unwind(AssertUnwindSafe(|| self.unsubscribe(key, turn)));
                // Its resume record (and the count of open connections with its token).
                let _ = catch_unwind(AssertUnwindSafe(|| self.end_stream(key, turn)));
                if let Some(conn) = self.conns.try_remove(key) {
                    if let Some(t) = conn.timer {
                        self.wheel.cancel(t);
                    }
                    self.lifecycle.socket_closed();
                }
            }
        }
        self.dead.give_back(dead);
    }

    fn remove(&mut self, key: usize, turn: &Turn) {
        let faults = &self.faults;
        let registry = &self.registry;
        fault::point(faults, Point::Reap, || registry.names(key).map(|(_, u)| u));
        self.end_stream(key, turn);
        self.unsubscribe(key, turn);
        self.cancel_timer(key);
        let conn = self.conns.remove(key);
        self.inflaters.remove(&key);
        self.lifecycle.socket_closed();
        if conn.phase != Phase::Lingering {
            ShardStats::add(&self.stats().dropped, 1);
        }
        // A TLS connection that ends before its handshake completed failed it: garbage, no
        // shared version or suite, or a peer that stopped (its deadline dropped it).
        if conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
            ShardStats::add(&self.stats().tls_handshake_failures, 1);
        }
        // Every WebSocket connection (upgraded: subscribed, or refused with a close code)
        // is counted once, by the code it ended with; plain HTTP exchanges are not.
        if conn.was_open || conn.close_code != 0 {
            self.stats().closed_with(conn.close_code);
        }
        if !conn.was_open {
            // Never subscribed (refused, probe, bad request): its close line is this one. A
            // refused connection's peer is on its `connection refused` line; by now the
            // socket may be past telling it.
            log::debug!(
                conn = key, shard = self.index, code = conn.close_code, duration_ms = self.age_ms(conn.opened_ms, turn);
                "connection closed"
            );
        }
        // Dropping the stream closes the socket and removes it from the poll.
    }

    /// Drops every connection at once. With `reason`, open connections whose queue is empty get
    /// one best-effort, non-blocking write of that close frame first (a connection with queued
    /// bytes cannot take a frame in the middle of another).
    pub(super) fn abort_all(&mut self, reason: Option<CloseReason>) {
        let turn = self.turn();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            let conn = &mut self.conns[k];
            if let Some(r) = reason {
                if conn.is_open() && conn.out.is_empty() {
                    match &mut conn.tls {
                        Some(tls) => {
                            tls.write_now(&r.frame(), &mut conn.stream, &mut self.tls_scratch)
                        }
                        None => {
                            let _ = std::io::Write::write(&mut conn.stream, &r.frame());
                        }
                    }
                    self.stats().close(r);
                }
            }
            self.kill(k);
        }
        self.reap(&turn);
    }
}
