//! What comes through the inbox: event batches fanned out to their recipients, new key sets,
//! the cluster bus's notice that a workspace is live, and the drain.

use super::conn::Phase;
use super::fanout::{self, Queues};
use super::{Drain, Next, Shard, Turn};
use crate::dispatch::inbox::ShardMsg;
use crate::event::{connected_frame, Event};
use crate::fault::{self, Point};
use crate::metrics::ShardStats;
use crate::ws::close::CloseReason;
use crate::ws::SharedFrame;
use std::panic::{catch_unwind, AssertUnwindSafe};

impl Shard {
    pub(super) fn drain_inbox(&mut self, turn: &Turn) {
        let link = self.links.shard(self.index);
        link.clear_notified();
        let mut took = 0;
        let mut empty = false;
        while took < super::INBOX_BUDGET {
            match self.inbox.try_recv() {
                Ok(msg) => {
                    took += 1;
                    self.on_message(msg, turn);
                }
                Err(_) => {
                    empty = true;
                    break;
                }
            }
        }
        self.inbox_pending = !empty;
        if took > 0 {
            // Loops that found this inbox full retry now.
            self.links.shard(self.index).drained();
        }
    }

    fn on_message(&mut self, msg: ShardMsg, turn: &Turn) {
        match msg {
            ShardMsg::Events(batch) => self.deliver(&batch, turn),
            ShardMsg::Keys(keys) => self.keys = keys,
            ShardMsg::Drain => self.start_drain(turn),
            ShardMsg::Live(ws, head) => self.on_live(&ws, head, turn),
            ShardMsg::Probe(key) => self.on_probe(&key, turn),
            ShardMsg::TwinAlive(key) => self.on_twin_alive(&key),
            ShardMsg::Gap(ws, reason, since) => self.on_bus_gap(&ws, reason, since, turn),
            ShardMsg::Record(answer) => self.on_record_answer(answer, turn),
            ShardMsg::RecordKept(key, gen) => {
                if let Some(c) = self.conns.get_mut(key as usize).filter(|c| c.gen == gen) {
                    c.record_pending = false;
                    self.mark_dirty(key as usize);
                }
            }
        }
    }

    /// Queues every event of `batch` on its recipients. A panic while queueing on one
    /// connection closes that connection (1011); the event still reaches every other recipient.
    /// The close waits until the event has been offered to the rest: closing unsubscribes,
    /// which reorders the recipient list being walked.
    fn deliver(&mut self, batch: &[Event], turn: &Turn) {
        if let Some(first) = batch.first() {
            self.fanout_started.push(first.accepted_at);
        }
        for event in batch {
            if event.pos.epoch != 0 && !self.seam(&event.workspace_id, event.pos, turn) {
                continue;
            }
            let mut from = 0;
            let mut raised: Vec<usize> = Vec::new();
            loop {
                let mut done = 0;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let recipients = self
                        .registry
                        .recipients(&event.workspace_id, event.user_id.as_deref());
                    let Some(rest) = recipients.get(from..) else {
                        return;
                    };
                    let (registry, faults) = (&self.registry, &self.faults);
                    let mut q = Queues {
                        dirty: &mut self.dirty.now,
                        slow: &mut self.slow.now,
                        max_outbound: self.limits.max_outbound,
                    };
                    let min = self.limits.compression_min;
                    let stats = &self.stats_all[self.index];
                    let sent_deflated = std::cell::Cell::new(0u64);
                    let deflated = || {
                        let f = event
                            .deflated
                            .get_or_init(|| {
                                let c = crate::ws::deflate::compress_shared(&event.frame, min);
                                ShardStats::add(&stats.deflate_in, event.frame.len() as u64);
                                ShardStats::add(
                                    &stats.deflate_out,
                                    c.as_ref().map_or(event.frame.len(), |c| c.len()) as u64,
                                );
                                c
                            })
                            .as_ref();
                        if f.is_some() {
                            sent_deflated.set(sent_deflated.get() + 1);
                        }
                        f
                    };
                    fanout::fan_out_with(
                        &event.frame,
                        &deflated,
                        rest,
                        &mut self.conns,
                        &mut q,
                        &mut done,
                        |k| {
                            fault::point(faults, Point::Deliver, || {
                                registry.names(k as usize).map(|(_, user)| user)
                            })
                        },
                    );
                    if sent_deflated.get() > 0 {
                        ShardStats::add(&stats.deflate_frames, sent_deflated.get());
                    }
                }));
                if result.is_ok() {
                    break;
                }
                // The recipient at `from + done` raised it; the rest still get the event.
                let bad = self
                    .registry
                    .recipients(&event.workspace_id, event.user_id.as_deref())
                    .get(from + done)
                    .copied();
                from += done + 1;
                match bad {
                    Some(key) => raised.push(key as usize),
                    None => break,
                }
            }
            for key in raised {
                self.after_panic(key, turn);
            }
        }
    }

    /// Queues `frame` on the recipients of `workspace` (of `user` in it, when given).
    pub(super) fn fan_out_one(&mut self, workspace: &str, user: Option<&str>, frame: &SharedFrame) {
        let recipients = self.registry.recipients(workspace, user);
        let mut q = Queues {
            dirty: &mut self.dirty.now,
            slow: &mut self.slow.now,
            max_outbound: self.limits.max_outbound,
        };
        let mut done = 0;
        fanout::fan_out(
            frame,
            recipients,
            &mut self.conns,
            &mut q,
            &mut done,
            |_| {},
        );
    }

    /// The cluster bus confirmed `workspace`: its waiting connections get `connected` now, and
    /// their heartbeats start from here.
    pub(super) fn on_live(
        &mut self,
        workspace: &str,
        head: Option<crate::history::Position>,
        turn: &Turn,
    ) {
        if let (Some(h), Some(s)) = (head, self.registry.stream_mut(workspace)) {
            if *s == super::registry::Stream::UNKNOWN {
                *s = super::registry::Stream {
                    epoch: h.epoch,
                    next: h.offset + 1,
                };
            }
        }
        let waiting: Vec<u32> = self.registry.set_live(workspace).to_vec();
        for key in waiting {
            let key = key as usize;
            self.guarded(key, turn, |s| s.send_connected(key, turn));
        }
        // With history on they are members, not recipients yet: `connected`, then the stream.
        for (key, rk, iat) in self.take_stream_waits(workspace) {
            self.guarded(key, turn, |s| {
                let _ = s.send_connected(key, turn);
                s.start_stream(key, rk, iat, turn)
            });
        }
    }

    fn send_connected(&mut self, key: usize, turn: &Turn) -> Next {
        let Some((ws, user)) = self.registry.names(key) else {
            return Next::Continue;
        };
        let frame = connected_frame(ws, user, turn.now_ms);
        let heartbeat = turn.tick + self.limits.heartbeat_ticks;
        let Some(open) = self.conns[key].open() else {
            return Next::Continue;
        };
        if !std::mem::take(&mut open.awaiting_live) {
            return Next::Continue;
        }
        open.next_heartbeat = heartbeat;
        ShardStats::add(&self.stats().subscribed, 1);
        self.arm_open_timer(key);
        self.enqueue(key, frame);
        Next::Continue
    }

    fn start_drain(&mut self, turn: &Turn) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(turn.now + self.limits.drain_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_pending = false;
        // Open connections get 1001, all now or spread over --drain-spread. One still sending its
        // request head is left to finish it: its upgrade is answered with 101 and 1001 (see
        // `upgrade`), so a client caught by a restart sees a clean close and reconnects, never a
        // reset.
        let pending: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_open())
            .map(|(k, c)| (k as u32, c.gen))
            .collect();
        self.drain = Some(Drain {
            started: turn.now,
            pending,
            closed: 0,
        });
        self.spread_drain(turn);
    }

    /// Sends the drain's 1001s that are due: `pending × elapsed ÷ spread` of them by now, all at
    /// once without a spread. Connections that already closed, or whose slot was reused, are
    /// skipped (the generation is checked).
    pub(super) fn spread_drain(&mut self, turn: &Turn) {
        let Some(d) = self.drain.as_mut() else { return };
        let total = d.pending.len();
        if d.closed >= total {
            return;
        }
        let spread = self.limits.drain_spread;
        let due = if spread.is_zero() || turn.now >= d.started + spread {
            total
        } else {
            ((total as f64) * turn.now.duration_since(d.started).as_secs_f64()
                / spread.as_secs_f64())
            .ceil() as usize
        };
        let (from, to) = (d.closed, due.clamp(d.closed, total));
        d.closed = to;
        for i in from..to {
            let Some(&(key, gen)) = self.drain.as_ref().and_then(|d| d.pending.get(i)) else {
                break;
            };
            let key = key as usize;
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.gen == gen && matches!(c.phase, Phase::Open(_)))
            {
                self.guarded(key, turn, |_| Next::Close(CloseReason::GoingAway));
            }
        }
    }
}
