//! Reading from connections (request heads and client frames) and writing to them (queueing
//! shared frames, flushing each dirty connection once per loop turn).

use super::conn::Phase;
use super::{Next, Shard, Turn};
use crate::fault::{self, Point};
use crate::metrics::ShardStats;
use crate::ws::close::{close_frame, CloseReason};
use crate::ws::decoder::Control;
use crate::ws::frame::{encode, OpCode};
use crate::ws::SharedFrame;
use mio::{Interest, Token};
use std::io::{self, Read};
use std::net::Shutdown;

/// Bytes read from one connection per iteration.
const READ_BUDGET: usize = 64 * 1024;

impl Shard {
    /// Reads what the socket holds. `peer_closed` (the event carried RDHUP or an error) reads on
    /// to the end so the EOF is seen: no further edge will announce it. What the bytes call for
    /// is applied as it comes; a connection that is closing is still read (the peer's close
    /// frame, or its end of stream, may follow).
    pub(super) fn on_readable(&mut self, key: usize, turn: &Turn, peer_closed: bool) -> Next {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) {
            let next = match conn.stream.read(&mut scratch) {
                // Peer closed its side. Nothing more will arrive; whatever we still owe it
                // cannot be answered by a close handshake.
                Ok(0) => Next::Drop,
                Ok(n) => {
                    total += n;
                    let next = self.on_bytes(key, &scratch[..n], turn);
                    if next == Next::Continue {
                        if n < scratch.len() && !peer_closed {
                            // A short read emptied the socket's receive queue; anything that
                            // arrives later raises a new edge. Skipping the read that would
                            // return WouldBlock saves a system call per wake-up.
                            break;
                        }
                        if total >= READ_BUDGET {
                            self.read_again.push(key as u32);
                            break;
                        }
                    }
                    next
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Next::Drop,
            };
            self.apply(key, next, turn);
        }
        self.scratch = scratch;
        Next::Continue
    }

    fn on_bytes(&mut self, key: usize, data: &[u8], turn: &Turn) -> Next {
        let (faults, registry) = (&self.faults, &self.registry);
        fault::point(faults, Point::Read, || registry.names(key).map(|(_, u)| u));
        match self.conns[key].phase {
            Phase::Head => self.on_head_bytes(key, data, turn),
            Phase::Open(_) | Phase::Closing => self.on_frame_bytes(key, data, turn),
            // A client's answer to our close still decides its resume record.
            Phase::Lingering if self.awaits_close_answer(key) => {
                self.on_frame_bytes(key, data, turn)
            }
            Phase::Http | Phase::Lingering => Next::Continue,
        }
    }

    pub(super) fn on_frame_bytes(&mut self, key: usize, data: &[u8], turn: &Turn) -> Next {
        let max = self.limits.max_client_message;
        let allowance = self.limits.max_client_frames;
        let conn = &mut self.conns[key];
        let super::conn::Conn {
            decoder,
            out,
            inbuf,
            phase,
            deflate,
            ..
        } = conn;
        let deflate = *deflate;
        // A closing connection answers nothing and counts nothing: only its close matters.
        let mut closing_frames = 0u16;
        let (frames, may_reply) = match phase {
            Phase::Open(o) => (&mut o.frames, true),
            _ => (&mut closing_frames, false),
        };
        let mut peer_close: Option<Option<u16>> = None;
        let mut replied = false;
        let mut ponged = false;
        // Acknowledgements in this read, in order (the last kept if a peer sends more).
        let mut claims = [crate::history::Position::default(); 4];
        let mut nclaims = 0;
        let result = decoder.feed_with(inbuf, data, max, deflate, &mut |c| {
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
                Control::Pong(p) => {
                    ponged = true;
                    if let Some(c) = crate::history::ack::parse(p) {
                        claims[nclaims.min(claims.len() - 1)] = c;
                        nclaims = (nclaims + 1).min(claims.len());
                    }
                }
                _ => {}
            }
        });
        let flooded = u32::from(*frames) > allowance;
        if let Some(open) = conn.open() {
            if ponged {
                // Any pong proves the peer is there (RFC 6455 allows unsolicited ones; a late
                // answer to an earlier ping is as good as the latest).
                open.ping_outstanding = false;
            }
        }
        for &c in &claims[..nclaims] {
            self.on_ack_claim(key, c);
        }
        if replied {
            self.mark_dirty(key);
            // A peer that pings without reading its pongs is bounded like any slow consumer.
            if self.conns[key].out.pending_bytes() > self.limits.max_outbound {
                return Next::Fail(CloseReason::SlowConsumer);
            }
        }
        if let Err(e) = result {
            log::debug!("shard {}: connection {key}: {e:?}", self.index);
            return Next::Fail(e.close_reason());
        }
        if let Some(code) = peer_close {
            self.on_peer_close(key, code, turn);
            return Next::Continue;
        }
        if flooded && self.conns[key].is_open() {
            log::debug!(
                "shard {}: connection {key}: over --max-client-frames-per-sec",
                self.index
            );
            return Next::Fail(CloseReason::TooManyFrames);
        }
        Next::Continue
    }

    fn on_peer_close(&mut self, key: usize, code: Option<u16>, turn: &Turn) {
        // Its resume record is decided now (the client sends nothing after its close): made
        // before the echo goes out, so a client that reconnects the moment it has the echo
        // finds it.
        self.mark_close_answered(key);
        self.end_stream(key, turn);
        if self.conns[key].phase == Phase::Lingering {
            return;
        }
        if self.conns[key].is_open() {
            self.conns[key].close_code = code.unwrap_or(1005);
            self.unsubscribe(key, turn);
            let echo = match code {
                Some(c) => close_frame(c, ""),
                None => encode(OpCode::Close, &[]),
            };
            self.conns[key].phase = Phase::Closing;
            self.enqueue(key, echo);
            // The pending timer was the heartbeat's; from here it is the close deadline. (Left
            // as it was, the next heartbeat tick would read as an expired deadline and drop the
            // connection before a backed-up echo could flush.)
            self.set_timer(key, turn.tick + self.limits.close_ticks);
        }
        self.conns[key].close_when_flushed = true;
        self.mark_dirty(key);
    }

    pub(super) fn enqueue(&mut self, key: usize, frame: SharedFrame) {
        let conn = &mut self.conns[key];
        conn.out.push(frame);
        if conn.out.pending_bytes() > self.limits.max_outbound && conn.is_open() {
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

    /// Flushes every connection with queued frames, once each. A panic while flushing one
    /// closes that one (1011); the rest are flushed as usual.
    pub(super) fn flush(&mut self, turn: &Turn) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = self.dirty.take();
        for &key in &dirty {
            let key = key as usize;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            self.guarded(key, turn, |s| s.flush_one(key, turn));
        }
        self.dirty.give_back(dirty);
    }

    fn flush_one(&mut self, key: usize, turn: &Turn) -> Next {
        let (faults, registry) = (&self.faults, &self.registry);
        fault::point(faults, Point::Flush, || registry.names(key).map(|(_, u)| u));
        let stats = &self.stats_all[self.index];
        let conn = &mut self.conns[key];
        let done = match conn.out.write_to(&mut conn.stream) {
            Ok(done) => done,
            Err(_) => return Next::Drop,
        };
        ShardStats::add(&stats.frames_written, done.frames as u64);
        ShardStats::add(&stats.bytes_written, done.bytes as u64);
        // Write readiness is watched only while bytes wait: registering it for good would
        // deliver an EPOLLOUT wake-up for nearly every ACK.
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
                return Next::Drop;
            }
            conn.want_write = blocked;
        }
        if !blocked && conn.close_when_flushed && !conn.record_pending {
            return self.linger(key, turn);
        }
        Next::Continue
    }

    /// Everything is flushed: shut our side and discard input until the peer's FIN.
    fn linger(&mut self, key: usize, turn: &Turn) -> Next {
        let conn = &mut self.conns[key];
        conn.close_when_flushed = false;
        if conn.stream.shutdown(Shutdown::Write).is_err() {
            return Next::Drop;
        }
        self.unsubscribe(key, turn);
        self.conns[key].phase = Phase::Lingering;
        self.set_timer(key, turn.tick + self.limits.close_ticks);
        Next::Continue
    }
}
