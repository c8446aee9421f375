//! Reading from connections (request heads and client frames) and writing to them (queueing
//! shared frames, flushing each dirty connection once per loop turn).

use super::conn::Phase;
use super::outbox::Outbox;
use super::Shard;
use crate::metrics::ShardStats;
use crate::ws::close::{close_frame, CloseReason};
use crate::ws::decoder::Control;
use crate::ws::frame::{encode, OpCode};
use crate::ws::SharedFrame;
use mio::{Interest, Token};
use std::io::{self, Read};
use std::net::Shutdown;
use std::time::Instant;

/// Bytes read from one connection per iteration.
const READ_BUDGET: usize = 64 * 1024;

impl Shard {
    /// Reads what the socket holds. `peer_closed` (the event carried RDHUP or an error) reads on
    /// to the end so the EOF is seen: no further edge will announce it.
    pub(super) fn on_readable(&mut self, key: usize, now: Instant, peer_closed: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) {
            match conn.stream.read(&mut scratch) {
                Ok(0) => {
                    // Peer closed its side. Nothing more will arrive; whatever we still owe it
                    // cannot be answered by a close handshake.
                    self.kill(key);
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.on_bytes(key, &scratch[..n], now);
                    if n < scratch.len() && !peer_closed {
                        // A short read emptied the socket's receive queue; anything that
                        // arrives later raises a new edge. Skipping the read that would return
                        // WouldBlock saves a system call per wake-up.
                        break;
                    }
                    if total >= READ_BUDGET {
                        self.read_again.push(key as u32);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_bytes(&mut self, key: usize, data: &[u8], now: Instant) {
        match self.conns[key].phase {
            Phase::Head => self.on_head_bytes(key, data, now),
            Phase::Open | Phase::Closing => self.on_frame_bytes(key, data),
            Phase::Http | Phase::Lingering => {}
        }
    }

    pub(super) fn on_frame_bytes(&mut self, key: usize, data: &[u8]) {
        let max = self.limits.max_client_message;
        let allowance = self.limits.max_client_frames;
        let conn = &mut self.conns[key];
        let may_reply = conn.phase == Phase::Open;
        let mut peer_close: Option<Option<u16>> = None;
        let mut replied = false;
        let mut ponged = false;
        let super::conn::Conn {
            decoder,
            out,
            inbuf,
            frames,
            ..
        } = conn;
        let result = decoder.feed(inbuf, data, max, &mut |c| {
            // Every frame counts against the allowance; past it nothing more is answered, and
            // the connection closes once this read is decoded.
            *frames = frames.saturating_add(1);
            let within = u32::from(*frames) <= allowance;
            match c {
                Control::Ping(p) if within && may_reply && peer_close.is_none() => {
                    out.push(encode(OpCode::Pong, p));
                    replied = true;
                }
                Control::Close(code) if peer_close.is_none() => peer_close = Some(code),
                Control::Pong => ponged = true,
                _ => {}
            }
        });
        if ponged {
            // Any pong proves the peer is there (RFC 6455 allows unsolicited ones; a late
            // answer to an earlier ping is as good as the latest).
            self.conns[key].ping_outstanding = false;
        }
        let flooded = u32::from(self.conns[key].frames) > allowance;
        if let (Some(magic), true) = (&self.shared.config.fault_injection_ping, replied) {
            if injected_fault(&self.conns[key].out, magic) {
                panic!("fault injection: a ping asked this connection's handler to fail");
            }
        }
        if replied {
            self.mark_dirty(key);
            // A peer that pings without reading its pongs is bounded like any slow consumer.
            if self.conns[key].out.pending_bytes() > self.limits.max_outbound {
                self.slow.push(key as u32);
                self.close_slow();
            }
        }
        if let Err(e) = result {
            log::debug!("shard {}: connection {key}: {e:?}", self.index);
            return self.fail(key, e.close_reason());
        }
        if let Some(code) = peer_close {
            return self.on_peer_close(key, code);
        }
        if flooded && self.conns[key].phase == Phase::Open {
            log::debug!(
                "shard {}: connection {key}: over --max-client-frames-per-sec",
                self.index
            );
            self.fail(key, CloseReason::TooManyFrames);
        }
    }

    fn on_peer_close(&mut self, key: usize, code: Option<u16>) {
        if self.conns[key].phase == Phase::Open {
            self.conns[key].close_code = code.unwrap_or(1005);
            self.unsubscribe(key);
            let echo = match code {
                Some(c) => close_frame(c, ""),
                None => encode(OpCode::Close, &[]),
            };
            let conn = &mut self.conns[key];
            conn.phase = Phase::Closing;
            conn.close_sent = true;
            self.enqueue(key, echo);
            // The pending timer was the heartbeat's; from here it is the close deadline. (Left
            // as it was, the next heartbeat tick would read as an expired deadline and drop the
            // connection before a backed-up echo could flush.)
            let due = self.tick_of(Instant::now()) + self.limits.close_ticks;
            self.set_timer(key, due);
        }
        self.conns[key].close_when_flushed = true;
        self.mark_dirty(key);
    }

    pub(super) fn enqueue(&mut self, key: usize, frame: SharedFrame) {
        let conn = &mut self.conns[key];
        conn.out.push(frame);
        if conn.out.pending_bytes() > self.limits.max_outbound && conn.phase == Phase::Open {
            self.slow.push(key as u32);
        }
        self.mark_dirty(key);
    }

    pub(super) fn mark_dirty(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key as u32);
        }
    }

    pub(super) fn flush(&mut self) {
        let shared = self.shared.clone();
        let stats = &shared.shard_stats[self.index];
        for key in std::mem::take(&mut self.dirty) {
            let key = key as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.dead {
                continue;
            }
            match conn.out.write_to(&mut conn.stream) {
                Ok(done) => {
                    ShardStats::add(&stats.frames_written, done.frames as u64);
                    ShardStats::add(&stats.bytes_written, done.bytes as u64);
                    // Write readiness is watched only while bytes wait: registering it for good
                    // would deliver an EPOLLOUT wake-up for nearly every ACK.
                    let blocked = !conn.out.is_empty();
                    if blocked != conn.want_write {
                        let interest = if blocked {
                            Interest::READABLE | Interest::WRITABLE
                        } else {
                            Interest::READABLE
                        };
                        if self
                            .poll
                            .registry()
                            .reregister(&mut conn.stream, Token(key), interest)
                            .is_err()
                        {
                            self.kill(key);
                            continue;
                        }
                        conn.want_write = blocked;
                    }
                    if !blocked && conn.close_when_flushed {
                        self.linger(key);
                    }
                }
                Err(_) => self.kill(key),
            }
        }
    }

    /// Everything is flushed: shut our side and discard input until the peer's FIN.
    fn linger(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.close_when_flushed = false;
        if conn.stream.shutdown(Shutdown::Write).is_err() {
            return self.kill(key);
        }
        self.unsubscribe(key);
        self.conns[key].phase = Phase::Lingering;
        let due = self.tick_of(Instant::now()) + self.limits.close_ticks;
        self.set_timer(key, due);
    }
}

/// Whether the last queued frame is the pong answering the fault-injection ping.
fn injected_fault(out: &Outbox, magic: &[u8]) -> bool {
    out.last().is_some_and(|f| f.len() >= 2 && &f[2..] == magic)
}
