//! The delivery guarantee on a shard (history on): how a connection's stream begins (fresh, a
//! replay of what it missed, or `stream.gap`), the replay paced by the outbox, the seam between
//! the history and the live stream, acknowledgements by ping payload, and the resume record a
//! connection leaves when it ends.
//!
//! The seam. The shard keeps, per workspace, where its live stream stands ([`Stream`]: every
//! active connection has been queued every event addressed to it before `next`, none after).
//! Events normally arrive in position order; one that arrives early (two publishers raced
//! between taking positions and reaching this inbox) makes the shard take the ones before it
//! from the history first, and the late ones are skipped when they come. A resuming connection
//! is a member but not a recipient while it is replayed the events between its record and
//! `next`, read from the history a piece at a time as its outbox drains; when it reaches
//! `next` it becomes a recipient, so the live stream takes over exactly where the replay ends:
//! nothing missing, nothing twice, whatever the publish rate.
//!
//! Records. A connection that ends leaves where it stood: everything queued before the
//! server's close frame if the server closed and the client answered the close; otherwise the
//! last position the client acknowledged (a pong echoing an acknowledgement ping).

use super::registry::{Admit, Stream};
use super::{Next, Shard, Turn};
use crate::dispatch::inbox::ShardMsg;
use crate::event::{gap_frame, is_event_frame, GapReason};
use crate::history::ack::{self, AckState};
use crate::history::records::{Found, Record, RecordKey};
use crate::history::ring::Miss;
use crate::history::{plan, DeliveryStats, Outcome, Position, Start};
use crate::ws::close::CloseReason;
use crate::ws::close::DEAD_PEER;
use crate::ws::frame::{encode, ping_frame, OpCode};
use crate::ws::SharedFrame;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the shard keeps about every open connection for the delivery guarantee: about 110
/// bytes, in a `Vec` by slab key (nothing with history off). What only a replay needs lives in
/// [`Replay`], for the connections being replayed.
pub(super) struct Tracked {
    record_key: RecordKey,
    /// Its workspace's name, shared with the registry (the record is made after it leaves).
    workspace: Arc<str>,
    ack: AckState,
    /// No acknowledgement ping before this tick (`--ack-interval`).
    next_ack_tick: u64,
    /// Where the stream stood when the server queued its close frame (`close_set`).
    close_at: Position,
    close_set: bool,
    /// The client answered the server's close frame.
    close_done: bool,
    /// A handler panicked on it: what was queued is not known event by event, so its record
    /// comes from its acknowledgement whatever the close.
    unsure: bool,
}

/// How long a connection that found an open twin waits for the twin's record: the probe's
/// timeout (`--resume-probe-timeout`) and half as long again, so the record of a twin that does
/// not answer is made while its replacement still waits for it.
fn twin_wait(probe_timeout: Duration) -> Duration {
    probe_timeout + probe_timeout / 2
}

/// A replay under way: the last position queued (or passed over as not addressed to the
/// client).
#[derive(Clone, Copy, Debug)]
pub(super) struct Replay {
    cursor: Position,
    since: Option<u64>,
    /// Some frame of the replay has been queued (a gap found later can no longer be reported
    /// right after `connected`).
    started: bool,
    /// Waiting, until then, for an open twin's record; `cursor` is where the stream stood at
    /// connect, the start if no record comes.
    wait_until: Option<Instant>,
    /// The token's `iat`, for the restart rule once the wait ends.
    iat: Option<u64>,
    /// Twins that answered a probe while this connection waits.
    answered: u32,
    /// Twins open when the wait began (this connection not counted).
    twins: u32,
    /// No record: it starts from where the stream stood at connect (counted fresh).
    fresh: bool,
}

/// A connection waiting for its resume record from Redis (cluster bus).
pub(super) struct RecordWait {
    key: u32,
    gen: u32,
    iat: Option<u64>,
    /// Where the shard's stream stood when it asked (`None`: not known then): with no record,
    /// the connection starts there.
    at: Option<Position>,
    deadline: Instant,
}

fn position(s: Stream) -> Position {
    Position {
        epoch: s.epoch,
        offset: s.next.saturating_sub(1),
    }
}

impl Shard {
    fn tracked(&mut self, key: usize) -> Option<&mut Tracked> {
        self.tracked.get_mut(key).and_then(Option::as_mut)
    }

    /// Opens an authenticated connection's stream with history on: takes its resume record,
    /// decides how it begins, and queues what follows `connected`. The connection is a member
    /// of its workspace already; it becomes a recipient here or when its replay ends.
    ///
    /// A connection that finds no record while another with its token is open waits (see
    /// `twin_wait`) for that one's record: it may be the connection this one replaces, not
    /// yet seen to end (a reset not read yet, a client gone without a FIN), which a probe asks
    /// every shard to settle. If no record comes, it starts from where the stream stood when it
    /// connected: nothing it could have had is lost, it is only delayed.
    pub(super) fn start_stream(
        &mut self,
        key: usize,
        record_key: RecordKey,
        iat: Option<u64>,
        turn: &Turn,
    ) -> Next {
        let Some(d) = self.delivery.clone() else {
            return Next::Continue;
        };
        let Some(workspace) = self.registry.workspace_of(key) else {
            return Next::Continue;
        };
        let found = d.records.begin(record_key, turn.now);
        let head = self
            .registry
            .stream_of(key)
            .map(position)
            .unwrap_or_default();
        if self.tracked.len() <= key {
            self.tracked.resize_with(key + 1, || None);
        }
        self.tracked[key] = Some(Tracked {
            record_key,
            workspace,
            ack: AckState::starting_at(head),
            next_ack_tick: turn.tick + self.limits.ack_ticks,
            close_at: Position::default(),
            close_set: false,
            close_done: false,
            unsure: false,
        });
        let record = match found {
            Found::Record(r) => Some(r),
            // On the cluster bus the records are in Redis, wherever the last connection was.
            Found::Nothing if d.from_bus => return self.ask_record(key, iat, turn),
            Found::Nothing => None,
            Found::Twin => {
                let twins = d.records.open_count(&record_key).saturating_sub(1);
                self.replays.insert(
                    key as u32,
                    Replay {
                        cursor: head,
                        since: None,
                        started: false,
                        wait_until: Some(turn.now + twin_wait(self.limits.probe_timeout)),
                        iat,
                        answered: 0,
                        twins,
                        fresh: false,
                    },
                );
                for i in 0..self.links.len() {
                    self.links.shard(i).offer(ShardMsg::Probe(record_key));
                }
                return Next::Continue;
            }
        };
        self.begin_with(key, record, iat, turn)
    }

    /// Decides how connection `key` begins from its record (or none) and starts it.
    fn begin_with(
        &mut self,
        key: usize,
        record: Option<Record>,
        iat: Option<u64>,
        turn: &Turn,
    ) -> Next {
        let Some(d) = self.delivery.clone() else {
            return Next::Continue;
        };
        let head = self
            .registry
            .stream_of(key)
            .map(position)
            .unwrap_or_default();
        // A node's restart loses nothing on the cluster bus (the records are in Redis).
        let restarted = !d.from_bus
            && turn.now.saturating_duration_since(d.started) < d.window
            && iat.map_or(true, |iat| iat < d.started_unix);
        let evicted = !d.from_bus
            && d.records
                .evicted_since(turn.now.checked_sub(d.window).unwrap_or(d.started));
        let dropped_early = record.is_some_and(|r| d.history.dropped_early_since(r.made));
        match plan(record, head, restarted || evicted, dropped_early) {
            Start::Fresh => {
                self.outcome(Outcome::Fresh);
                if let Some(t) = self.tracked(key) {
                    t.ack = AckState::starting_at(head);
                }
                self.replays.remove(&(key as u32));
                self.registry.activate(key);
                Next::Continue
            }
            Start::Gap { reason, since } => {
                self.open_with_gap(key, reason, since, turn);
                Next::Continue
            }
            Start::Replay { after, since } => {
                if let Some(t) = self.tracked(key) {
                    t.ack = AckState::starting_at(after);
                }
                self.replays.insert(
                    key as u32,
                    Replay {
                        cursor: after,
                        since,
                        started: false,
                        wait_until: None,
                        iat,
                        answered: 0,
                        twins: 0,
                        fresh: false,
                    },
                );
                self.pump(key, turn)
            }
        }
    }

    /// Connection `key` waits for the cluster bus to confirm its workspace; its stream starts
    /// then ([`Shard::take_stream_waits`]).
    pub(super) fn await_stream(&mut self, key: usize, gen: u32, rk: RecordKey, iat: Option<u64>) {
        if self.stream_waits.len() >= 64 && self.stream_waits.len().is_power_of_two() {
            // Entries of connections that closed while waiting go now and then.
            let conns = &self.conns;
            self.stream_waits.retain(|&(k, g, _, _)| {
                conns.get(k as usize).is_some_and(|c| c.gen == g && !c.dead)
            });
        }
        self.stream_waits.push((key as u32, gen, rk, iat));
    }

    /// The connections of `workspace` that wait for it to go live (still open).
    pub(super) fn take_stream_waits(
        &mut self,
        workspace: &str,
    ) -> Vec<(usize, RecordKey, Option<u64>)> {
        let mut ready = Vec::new();
        let (conns, registry) = (&self.conns, &self.registry);
        self.stream_waits.retain(|&(k, g, rk, iat)| {
            let k = k as usize;
            let alive = conns.get(k).is_some_and(|c| c.gen == g && !c.dead);
            if !alive {
                return false;
            }
            if registry.names(k).is_some_and(|(ws, _)| ws == workspace) {
                ready.push((k, rk, iat));
                return false;
            }
            true
        });
        ready
    }

    /// Asks Redis for connection `key`'s resume record (cluster bus); its stream begins with
    /// the answer ([`Shard::on_record_answer`]), or with `stream.gap` if none comes within
    /// `--handshake-timeout` or the bus cannot be asked.
    fn ask_record(&mut self, key: usize, iat: Option<u64>, turn: &Turn) -> Next {
        self.replays.remove(&(key as u32));
        let (Some(workspace), Some(rk)) = (
            self.registry.workspace_of(key),
            self.tracked(key).map(|t| t.record_key),
        ) else {
            return Next::Continue;
        };
        let gen = self.conns[key].gen;
        let at = self
            .registry
            .stream_of(key)
            .filter(|s| *s != Stream::UNKNOWN)
            .map(position);
        let asked = self.ask_bus(crate::dispatch::RecordOp::Take {
            workspace,
            key: rk,
            shard: self.index,
            conn: key as u32,
            gen,
        });
        if !asked {
            self.open_with_gap(key, GapReason::HistoryLost, None, turn);
            return Next::Continue;
        }
        self.record_waits.push(RecordWait {
            key: key as u32,
            gen,
            iat,
            at,
            deadline: turn.now + self.limits.handshake_timeout,
        });
        Next::Continue
    }

    /// Redis answered a connection's resume record.
    pub(super) fn on_record_answer(
        &mut self,
        a: crate::dispatch::inbox::RecordAnswer,
        turn: &Turn,
    ) {
        let Some(i) = self
            .record_waits
            .iter()
            .position(|w| w.key == a.conn && w.gen == a.gen)
        else {
            return; // gone meanwhile, or its wait ran out
        };
        let RecordWait { iat, at, .. } = self.record_waits.swap_remove(i);
        let key = a.conn as usize;
        if self
            .conns
            .get(key)
            .map_or(true, |c| c.gen != a.gen || c.dead)
        {
            return;
        }
        if let Some(ws) = self.registry.workspace_of(key) {
            if let Some(s) = self.registry.stream_mut(&ws) {
                // No event of the workspace reached this shard yet: everything up to the head
                // the answer carries was published before the connection's start.
                if *s == Stream::UNKNOWN && a.head.epoch != 0 {
                    *s = Stream {
                        epoch: a.head.epoch,
                        next: a.head.offset + 1,
                    };
                }
            }
        }
        match (a.record, at) {
            (Ok(Some(record)), _) => {
                self.guarded(key, turn, |s| s.begin_with(key, Some(record), iat, turn));
            }
            // No record: everything from where the stream stood when it asked.
            (Ok(None), Some(at)) => {
                self.replays.insert(
                    key as u32,
                    Replay {
                        cursor: at,
                        since: None,
                        started: false,
                        wait_until: None,
                        iat,
                        answered: 0,
                        twins: 0,
                        fresh: true,
                    },
                );
                self.guarded(key, turn, |s| s.pump(key, turn));
            }
            // Where it started is not known (the stream started over just then), unless no
            // event has come since.
            (Ok(None), None) if self.registry.stream_of(key) == Some(Stream::UNKNOWN) => {
                self.guarded(key, turn, |s| s.begin_with(key, None, iat, turn));
            }
            (Ok(None), None) | (Err(()), _) => {
                self.open_with_gap(key, GapReason::HistoryLost, None, turn)
            }
        }
    }

    /// Connections whose resume record did not come from Redis in time start with
    /// `stream.gap`: they may have missed something, and nothing can say what.
    pub(super) fn check_record_waits(&mut self, turn: &Turn) {
        if self.record_waits.is_empty() {
            return;
        }
        let mut overdue = Vec::new();
        self.record_waits.retain(|w| {
            if turn.now < w.deadline {
                return true;
            }
            overdue.push((w.key as usize, w.gen));
            false
        });
        for (key, gen) in overdue {
            if self.conns.get(key).is_some_and(|c| c.gen == gen && !c.dead) {
                self.open_with_gap(key, GapReason::HistoryLost, None, turn);
            }
        }
    }

    /// Whether some connection waits for a twin's record (the loop then wakes every tick).
    pub(super) fn has_waiting(&self) -> bool {
        self.replays.values().any(|r| r.wait_until.is_some())
    }

    /// A twin with resume key `rk` answered its probe: connections waiting with that key count
    /// it; one whose twins have all answered stops waiting (at its next pump).
    pub(super) fn on_twin_alive(&mut self, rk: &RecordKey) {
        let waiting: Vec<u32> = self
            .replays
            .iter()
            .filter(|(_, r)| r.wait_until.is_some())
            .map(|(&k, _)| k)
            .filter(|&k| {
                self.tracked
                    .get(k as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|t| t.record_key == *rk)
            })
            .collect();
        for k in waiting {
            if let Some(r) = self.replays.get_mut(&k) {
                r.answered += 1;
            }
        }
    }

    /// Another shard (or this one) asks about the connections with resume key `rk`: noted,
    /// and settled once per turn by [`Shard::check_probes`] (one walk over the connections for
    /// however many probes came in).
    pub(super) fn on_probe(&mut self, rk: &RecordKey, _turn: &Turn) {
        self.probe_keys.push(*rk);
    }

    /// Pings every open connection whose resume key was asked about this turn (all but one
    /// that is itself waiting), to be dropped if it does not answer within
    /// `--resume-probe-timeout`.
    fn start_probes(&mut self, turn: &Turn) {
        let keys = std::mem::take(&mut self.probe_keys);
        let mut hit = Vec::new();
        for (k, t) in self.tracked.iter().enumerate() {
            let Some(t) = t else { continue };
            if keys.contains(&t.record_key)
                && !self
                    .replays
                    .get(&(k as u32))
                    .is_some_and(|r| r.wait_until.is_some())
            {
                hit.push(k);
            }
        }
        for k in hit {
            let Some(conn) = self.conns.get_mut(k).filter(|c| !c.dead) else {
                continue;
            };
            let gen = conn.gen;
            let Some(open) = conn.open() else { continue };
            let fresh = !open.ping_outstanding;
            open.ping_outstanding = true;
            if fresh {
                self.enqueue(k, ping_frame());
            }
            self.probes
                .push((k as u32, gen, turn.now + self.limits.probe_timeout));
        }
    }

    /// Drops probed connections whose answer is overdue (their records are made as they go);
    /// forgets those that answered.
    pub(super) fn check_probes(&mut self, turn: &Turn) {
        if !self.probe_keys.is_empty() {
            self.start_probes(turn);
        }
        if self.probes.is_empty() {
            return;
        }
        let probes = std::mem::take(&mut self.probes);
        for (k, gen, deadline) in probes {
            let k = k as usize;
            let Some(conn) = self.conns.get_mut(k).filter(|c| c.gen == gen && !c.dead) else {
                continue;
            };
            let Some(open) = conn.open() else { continue };
            if !open.ping_outstanding {
                // Answered: alive, a second tab. Waiting connections with its key need not
                // wait for a record from it.
                if let Some(rk) = self
                    .tracked
                    .get(k)
                    .and_then(Option::as_ref)
                    .map(|t| t.record_key)
                {
                    for i in 0..self.links.len() {
                        self.links.shard(i).offer(ShardMsg::TwinAlive(rk));
                    }
                }
                continue;
            }
            if turn.now < deadline {
                self.probes.push((k as u32, gen, deadline));
                continue;
            }
            conn.close_code = DEAD_PEER;
            log::debug!(
                "shard {}: connection {k}: no pong to a resume probe within --resume-probe-timeout; dropped",
                self.index
            );
            self.kill(k);
        }
    }

    fn outcome(&self, o: Outcome) {
        if let Some(d) = &self.delivery {
            DeliveryStats::add(&d.stats.outcomes[o as usize], 1);
        }
    }

    /// `stream.gap`, then the live stream from where the shard stands.
    fn open_with_gap(&mut self, key: usize, reason: GapReason, since: Option<u64>, turn: &Turn) {
        self.outcome(match reason {
            GapReason::HistoryTrimmed => Outcome::GapTrimmed,
            GapReason::HistoryLost => Outcome::GapLost,
        });
        let head = self
            .registry
            .stream_of(key)
            .map(position)
            .unwrap_or_default();
        if let Some(t) = self.tracked(key) {
            t.ack = AckState::starting_at(head);
        }
        self.replays.remove(&(key as u32));
        self.enqueue(key, gap_frame(reason, since, turn.now_ms));
        self.registry.activate(key);
    }

    /// The replay is done: the connection receives the live stream from here.
    fn join_live(&mut self, key: usize, turn: &Turn) {
        let fresh = self.replays.remove(&(key as u32)).is_some_and(|r| r.fresh);
        self.outcome(if fresh {
            Outcome::Fresh
        } else {
            Outcome::Replayed
        });
        if let Some(t) = self.tracked(key) {
            // An acknowledgement goes with the next heartbeat.
            t.next_ack_tick = turn.tick;
        }
        self.registry.activate(key);
    }

    /// Runs every replay that has room in its outbox (and every wait for a twin's record).
    pub(super) fn pump_replays(&mut self, turn: &Turn) {
        if self.replays.is_empty() {
            return;
        }
        let keys: Vec<u32> = self.replays.keys().copied().collect();
        for key in keys {
            if self.conns.get(key as usize).is_none() {
                self.replays.remove(&key);
                continue;
            }
            self.guarded(key as usize, turn, |s| s.pump(key as usize, turn));
        }
    }

    /// Whether some replay can move on now (its outbox has room).
    pub(super) fn replay_ready(&self) -> bool {
        let fill = self.limits.max_outbound / 2;
        self.replays.iter().any(|(&k, r)| {
            r.wait_until.is_none()
                && self
                    .conns
                    .get(k as usize)
                    .is_some_and(|c| !c.dead && c.out.pending_bytes() < fill)
        })
    }

    /// Queues the next piece of connection `key`'s replay: events of its workspace addressed
    /// to it, read from the history up to where the shard's live stream stands, until its
    /// outbox holds half of `--max-outbound-bytes` (the rest follows as it drains).
    fn pump(&mut self, key: usize, turn: &Turn) -> Next {
        let Some(d) = self.delivery.clone() else {
            return Next::Continue;
        };
        let Some(&rp) = self.replays.get(&(key as u32)) else {
            return Next::Continue;
        };
        if let Some(until) = rp.wait_until {
            let rk = self.tracked(key).map(|t| t.record_key);
            if let Some(r) = rk.and_then(|rk| d.records.take(&rk, turn.now)) {
                DeliveryStats::add(&d.stats.twin_waits[0], 1);
                return self.begin_with(key, Some(r), rp.iat, turn);
            }
            let all_answered = rp.twins > 0 && rp.answered >= rp.twins;
            if turn.now < until && !all_answered {
                return Next::Continue;
            }
            // No record came: the twins are other live connections (second tabs). Start from
            // where the stream stood at connect (on the cluster bus, from the record Redis
            // holds, if any: the twin's, or one left on another node).
            let end = if all_answered { 1 } else { 2 };
            DeliveryStats::add(&d.stats.twin_waits[end], 1);
            if d.from_bus {
                return self.ask_record(key, rp.iat, turn);
            }
            if let Some(r) = self.replays.get_mut(&(key as u32)) {
                r.wait_until = None;
                r.fresh = true;
            }
        }
        let fill = self.limits.max_outbound / 2;
        if !self.conns[key].is_open() || self.conns[key].out.pending_bytes() >= fill {
            return Next::Continue;
        }
        let Some(stream) = self.registry.stream_of(key) else {
            return Next::Continue;
        };
        let mut rp = rp;
        if rp.cursor == Position::default() && stream.epoch != 0 {
            // It started before its workspace had a stream: it stands before the first event
            // of the one that began since.
            rp.cursor.epoch = stream.epoch;
            if let Some(r) = self.replays.get_mut(&(key as u32)) {
                r.cursor.epoch = stream.epoch;
            }
        }
        if rp.cursor.epoch != stream.epoch {
            // The workspace's stream started over while this replay ran.
            if !rp.started {
                self.open_with_gap(key, GapReason::HistoryLost, rp.since, turn);
                return Next::Continue;
            }
            return Next::Close(CloseReason::SlowConsumer);
        }
        if rp.cursor.offset + 1 >= stream.next {
            if rp.cursor.offset + 1 > stream.next {
                // The record is ahead of this shard's stream (the client was served by a
                // shard further along): bring this shard's stream there from the history.
                if let Some(ws) = self.registry.workspace_of(key) {
                    self.advance_stream(&ws, rp.cursor.offset + 1, turn);
                }
            }
            self.join_live(key, turn);
            return Next::Continue;
        }
        // The names stay in the registry and the queue in the slab: two fields borrowed side
        // by side, nothing copied per piece.
        let Some((ws, user)) = self.registry.names(key) else {
            return Next::Continue;
        };
        let conn = &mut self.conns[key];
        let (out, deflate) = (&mut conn.out, conn.deflate.is_some());
        let mut queued = 0u64;
        let read = d
            .history
            .read(ws, rp.cursor, stream.next, turn.now, &mut |e| {
                if e.user.as_deref().is_some_and(|u| u != user) {
                    return true;
                }
                if out.pending_bytes() >= fill {
                    return false;
                }
                // The compressed bytes live subscribers were sent, when there are some (never
                // compressed here, under the history's lock); otherwise the plain frame, which
                // a compressed connection takes as well.
                let compressed = e
                    .deflated
                    .as_ref()
                    .filter(|_| deflate)
                    .and_then(|c| c.get())
                    .and_then(Option::as_ref);
                out.push(compressed.unwrap_or(&e.frame).clone());
                queued += 1;
                true
            });
        if queued > 0 {
            DeliveryStats::add(&d.stats.replayed_frames, queued);
            self.mark_dirty(key);
        }
        match read {
            Ok(end) => {
                if let Some(r) = self.replays.get_mut(&(key as u32)) {
                    r.cursor.offset = end - 1;
                    r.started |= queued > 0;
                }
                if end >= stream.next {
                    self.join_live(key, turn);
                }
                Next::Continue
            }
            Err(miss) if !rp.started && queued == 0 => {
                let reason = match miss {
                    Miss::Trimmed => GapReason::HistoryTrimmed,
                    Miss::OtherEpoch => GapReason::HistoryLost,
                };
                self.open_with_gap(key, reason, rp.since, turn);
                Next::Continue
            }
            // The history moved past a replay under way (a client reading more slowly than
            // its workspace publishes): closed like any slow consumer. Its record keeps what
            // it was queued, so its next connection is told of the gap right after
            // `connected`.
            Err(_) => Next::Close(CloseReason::SlowConsumer),
        }
    }

    /// Where an event stands against the shard's live stream of its workspace
    /// ([`Stream::admit`]): true to deliver it, false if it was delivered already. Takes the
    /// events before it from the history when it arrives early.
    pub(super) fn seam(&mut self, ws: &str, pos: Position, turn: &Turn) -> bool {
        let Some(stream) = self.registry.stream_mut(ws) else {
            return true;
        };
        match stream.admit(pos) {
            Admit::Deliver | Admit::Straggler => true,
            Admit::Skip => false,
            Admit::FillThenDeliver { from } => {
                let after = Position {
                    epoch: pos.epoch,
                    offset: from - 1,
                };
                self.fill(ws, after, pos.offset, turn);
                true
            }
        }
    }

    /// Moves the shard's stream of `ws` up to offset `to` (a record ahead of it), delivering
    /// the events before `to` from the history to their recipients here.
    fn advance_stream(&mut self, ws: &str, to: u64, turn: &Turn) {
        let Some(stream) = self.registry.stream_mut(ws) else {
            return;
        };
        let after = position(*stream);
        stream.next = stream.next.max(to);
        self.fill(ws, after, to, turn);
    }

    /// Delivers the events of `ws` after `after` and before `to` from the history to their
    /// recipients here. If the history no longer has them all, every recipient is sent
    /// `stream.gap` instead: never a silent hole.
    fn fill(&mut self, ws: &str, after: Position, to: u64, turn: &Turn) {
        let Some(d) = self.delivery.clone() else {
            return;
        };
        let mut missed: Vec<(SharedFrame, Option<Box<str>>)> = Vec::new();
        let read = d.history.read(ws, after, to, turn.now, &mut |e| {
            missed.push((e.frame.clone(), e.user.clone()));
            true
        });
        if read.is_ok_and(|end| end >= to) {
            DeliveryStats::add(&d.stats.gap_fills, missed.len() as u64);
            for (frame, user) in &missed {
                self.fan_out_one(ws, user.as_deref(), frame);
            }
        } else {
            let gap = gap_frame(GapReason::HistoryTrimmed, None, turn.now_ms);
            let n = self.registry.recipients(ws, None).len();
            DeliveryStats::add(&d.stats.live_gaps, n as u64);
            self.fan_out_one(ws, None, &gap);
        }
    }

    /// The cluster bus could not give `ws`'s events in full: every recipient here is sent
    /// `stream.gap`, and the shard's stream starts over from the next event.
    pub(super) fn on_bus_gap(
        &mut self,
        ws: &str,
        reason: GapReason,
        since: Option<u64>,
        turn: &Turn,
    ) {
        let Some(d) = self.delivery.clone() else {
            return;
        };
        let Some(stream) = self.registry.stream_mut(ws) else {
            return;
        };
        *stream = Stream::UNKNOWN;
        let gap = gap_frame(reason, since, turn.now_ms);
        let n = self.registry.recipients(ws, None).len();
        DeliveryStats::add(&d.stats.live_gaps, n as u64);
        self.fan_out_one(ws, None, &gap);
    }

    /// Queues an acknowledgement ping on connection `key` if it is due: events reached it since
    /// the last one and `--ack-interval` has passed. Called at each heartbeat, so it goes out in
    /// the heartbeat's write, and nothing is checked between heartbeats (the interval is
    /// therefore rounded up to whole heartbeats).
    pub(super) fn maybe_ack(&mut self, key: usize, turn: &Turn) {
        let Some(Some(t)) = self.tracked.get(key) else {
            return;
        };
        if turn.tick < t.next_ack_tick || t.close_set || self.replays.contains_key(&(key as u32)) {
            return;
        }
        let Some(stream) = self.registry.stream_of(key) else {
            return;
        };
        let pos = position(stream);
        if pos.epoch == 0 || pos == t.ack.sent {
            return;
        }
        let frame = match &self.ack_frame {
            Some((p, f)) if *p == pos => f.clone(),
            _ => {
                let f = encode(OpCode::Ping, &ack::payload(pos));
                self.ack_frame = Some((pos, f.clone()));
                f
            }
        };
        let ack_ticks = self.limits.ack_ticks;
        if let Some(t) = self.tracked(key) {
            t.ack.sent = pos;
            t.next_ack_tick = turn.tick + ack_ticks;
        }
        self.conns[key].out.push(frame);
        if let Some(d) = &self.delivery {
            DeliveryStats::add(&d.stats.acks_sent, 1);
        }
    }

    /// A pong's payload claimed `claim`: taken if it is a position this connection was sent.
    pub(super) fn on_ack_claim(&mut self, key: usize, claim: Position) {
        let Some(t) = self.tracked(key) else { return };
        let taken = t.ack.on_pong(claim);
        if let Some(d) = &self.delivery {
            let c = if taken {
                &d.stats.acks_received
            } else {
                &d.stats.acks_refused
            };
            DeliveryStats::add(c, 1);
        }
    }

    /// A handler panicked on connection `key` (see `Tracked::unsure`).
    pub(super) fn distrust_queue(&mut self, key: usize) {
        if let Some(t) = self.tracked(key) {
            t.unsure = true;
            t.close_set = false;
        }
    }

    /// The server is about to queue its close frame on connection `key`: everything queued
    /// before it is what the client will have read if it answers the close.
    pub(super) fn mark_server_close(&mut self, key: usize) {
        let at = match self.replays.remove(&(key as u32)) {
            Some(r) => Some(r.cursor),
            None => self.registry.stream_of(key).map(position),
        };
        let Some(t) = self.tracked(key) else { return };
        if t.close_set || t.unsure {
            return;
        }
        if let Some(at) = at {
            t.close_at = at;
            t.close_set = true;
        }
    }

    /// A slow consumer's unstarted frames are about to be dropped: where its stream stands
    /// before the first event among them. When that event is no longer in the history to be
    /// placed, the record falls back to the acknowledgement (never ahead of what was written).
    pub(super) fn mark_slow_close(&mut self, key: usize) {
        let Some(d) = self.delivery.clone() else {
            return;
        };
        let Some(stream) = self.registry.stream_of(key) else {
            return;
        };
        let Some(Some(t)) = self.tracked.get(key) else {
            return;
        };
        if self.replays.contains_key(&(key as u32)) {
            return self.mark_server_close(key);
        }
        let ws = t.workspace.clone();
        let mut at = Some(position(stream));
        // (A compressed frame is placed by the compressed form the history keeps with its
        // event.)
        if let Some(f) = self.conns[key].out.unstarted().find(|f| is_event_frame(f)) {
            at = d.history.offset_of(&ws, stream.epoch, f).map(|o| Position {
                epoch: stream.epoch,
                offset: o - 1,
            });
        }
        if let Some(t) = self.tracked(key) {
            if !t.unsure {
                // None: the record falls back to the acknowledgement, whatever the close that
                // follows (the server close queued next must not set its own position: frames
                // before it are being dropped).
                t.close_at = at.unwrap_or_default();
                t.close_set = at.is_some();
                t.close_done = false;
                t.unsure = at.is_none();
            }
        }
    }

    /// The client answered the server's close frame.
    pub(super) fn mark_close_answered(&mut self, key: usize) {
        if let Some(t) = self.tracked(key) {
            if t.close_set {
                t.close_done = true;
            }
        }
    }

    /// Whether connection `key` still waits for the client's answer to the server's close
    /// (its input is read for it even while lingering).
    pub(super) fn awaits_close_answer(&self, key: usize) -> bool {
        self.tracked
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|t| t.close_set && !t.close_done)
    }

    /// Connection `key` is being removed: it leaves its resume record.
    pub(super) fn end_stream(&mut self, key: usize, turn: &Turn) {
        let Some(t) = self.tracked.get_mut(key).and_then(Option::take) else {
            return;
        };
        self.replays.remove(&(key as u32));
        let Some(d) = &self.delivery else { return };
        let (at, from_ack) = if t.close_set && t.close_done {
            (t.close_at, false)
        } else {
            (t.ack.acked, true)
        };
        let from_bus = d.from_bus;
        let record = d.record(t.record_key, &t.workspace, at, from_ack, turn.now);
        if from_bus {
            // A connection still here (it answered a close, or closed first) keeps its socket
            // until Redis has the record.
            let waiting = self
                .conns
                .get(key)
                .filter(|c| !c.dead)
                .map(|c| (self.index, key as u32, c.gen));
            let put = crate::dispatch::RecordOp::Put {
                waiting,
                workspace: t.workspace,
                key: t.record_key,
                value: record.encode(),
            };
            if self.ask_bus(put) {
                if waiting.is_some() {
                    self.conns[key].record_pending = true;
                }
            } else if let Some(d) = &self.delivery {
                DeliveryStats::add(&d.stats.records_not_kept, 1);
            }
        }
    }
}

#[cfg(test)]
mod size_probe {
    /// Every open connection carries one (history on): keep it in view, as `Conn` is.
    #[test]
    fn the_per_connection_state_stays_small() {
        let size = std::mem::size_of::<Option<super::Tracked>>();
        assert!(size <= 120, "Tracked grew to {size} bytes");
    }
}
