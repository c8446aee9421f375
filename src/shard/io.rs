//! Reading from connections (request heads and client frames) and writing to them (queueing
//! shared frames, flushing each dirty connection once per loop turn).
//!
//! A TLS connection differs only at the socket: what it reads goes through its session
//! (`shard::tls`) before the same `on_bytes`, and its flush has the session encrypt the queued
//! shared frames, several per record, into the shard's buffer and write the records out. The
//! frame is built once per event either way; what a TLS connection adds is its encryption.

use super::conn::Phase;
use super::{Next, Shard, Turn};
use crate::fault::{self, Point};
use crate::metrics::ShardStats;
use crate::ws::close::{close_frame, CloseReason};
use crate::ws::decoder::Control;
use crate::ws::deflate::{InflateError, Inflater};
use crate::ws::extensions::Agreed;
use crate::ws::frame::{encode, OpCode};
use crate::ws::SharedFrame;
use mio::{Interest, Token};
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::Shutdown;

/// Bytes read from one connection per iteration.
const READ_BUDGET: usize = 64 * 1024;

/// What a compressed message from a connection without an agreement would be inflated with
/// (never used: the decoder refuses RSV1 unless the extension was negotiated).
const NO_AGREEMENT: Agreed = Agreed {
    client_window_bits: 15,
    client_no_context_takeover: true,
};

/// A compressed client message ended. A client without context takeover starts afresh with
/// each message, so its inflater (its 32 KiB window and state) goes until the next one; one
/// with context takeover keeps it for the connection's life.
fn finish_message(inflaters: &mut HashMap<usize, Box<Inflater>>, key: usize) {
    if inflaters.get(&key).is_some_and(|i| i.resets_each()) {
        inflaters.remove(&key);
    }
}

impl Shard {
    /// Reads what the socket holds. `peer_closed` (the event carried RDHUP or an error) reads on
    /// to the end so the EOF is seen: no further edge will announce it. What the bytes call for
    /// is applied as it comes; a connection that is closing is still read (the peer's close
    /// frame, or its end of stream, may follow).
    pub(super) fn on_readable(&mut self, key: usize, turn: &Turn, peer_closed: bool) -> Next {
        if self.conns.get(key).is_some_and(|c| c.tls.is_some()) {
            return self.on_readable_tls(key, turn, peer_closed);
        }
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

    /// Reads a TLS connection: bytes from the socket into the shard's buffer as a plain read
    /// does, through the session (which answers the handshake and decrypts records in place of
    /// a copy per connection), and the plaintext on to `on_bytes`. A TLS error sends rustls'
    /// alert, best effort, and drops the connection; the peer's close_notify ends it like an end
    /// of stream. A bounded number of handshake steps run per loop turn.
    fn on_readable_tls(&mut self, key: usize, turn: &Turn, peer_closed: bool) -> Next {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut plain = std::mem::take(&mut self.tls_plain);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) {
            let (stream, Some(tls)) = (&mut conn.stream, conn.tls.as_mut()) else {
                break;
            };
            if tls.is_handshaking() {
                // Handshakes are the costly part of TLS: a bounded number per turn, the rest
                // in the next (their bytes wait in the socket meanwhile).
                if self.handshakes_left == 0 {
                    ShardStats::add(&self.stats_all[self.index].tls_handshakes_deferred, 1);
                    self.read_again.push(key as u32);
                    break;
                }
                self.handshakes_left -= 1;
            }
            let n = match stream.read(&mut scratch) {
                Ok(0) => {
                    self.apply(key, Next::Drop, turn);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.apply(key, Next::Drop, turn);
                    break;
                }
            };
            total += n;
            plain.clear();
            let received = tls.receive(&mut scratch[..n], &mut plain);
            let wants_write = tls.wants_write();
            let mut next = match received {
                Err(e) => {
                    log::debug!("shard {}: connection {key}: TLS: {e:?}", self.index);
                    tls.write_pending_now(stream);
                    Next::Drop
                }
                Ok(r) => {
                    if r.handshake_done {
                        ShardStats::add(&self.stats_all[self.index].tls_handshakes, 1);
                    }
                    if wants_write || (r.handshake_done && !conn.out.is_empty()) {
                        self.mark_dirty(key);
                    }
                    let next = if plain.is_empty() {
                        Next::Continue
                    } else {
                        self.on_bytes(key, &plain, turn)
                    };
                    // The peer's close_notify: nothing more will come.
                    if r.peer_closed && next == Next::Continue {
                        Next::Drop
                    } else {
                        next
                    }
                }
            };
            if !matches!(self.conns.get(key), Some(c) if !c.dead) {
                next = Next::Continue;
            }
            let more = next == Next::Continue;
            self.apply(key, next, turn);
            if !more {
                break;
            }
            if n < scratch.len() && !peer_closed {
                break; // the socket is empty (see `on_readable`)
            }
            if total >= READ_BUDGET {
                self.read_again.push(key as u32);
                break;
            }
        }
        self.scratch = scratch;
        self.tls_plain = plain;
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
        let inflaters = &mut self.inflaters;
        let conn = &mut self.conns[key];
        let super::conn::Conn {
            decoder,
            out,
            inbuf,
            phase,
            deflate,
            ..
        } = conn;
        let agreed = *deflate;
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
        // A compressed client message is inflated as it arrives, counted and dropped (the
        // server reads no client message); the first refusal ends the connection.
        let mut refused: Option<InflateError> = None;
        let result = decoder.feed_with(inbuf, data, max, agreed.is_some(), &mut |c| {
            if let Control::Compressed(masked) = c {
                if refused.is_none() {
                    if let Some(i) = inflaters.get_mut(&key) {
                        match i.bytes(masked, max) {
                            Ok(true) => finish_message(inflaters, key),
                            Ok(false) => {}
                            Err(e) => refused = Some(e),
                        }
                    }
                }
                return; // payload, not a frame
            }
            // Every frame counts against the allowance; past it nothing more is answered, and
            // the connection closes once this read is decoded.
            *frames = frames.saturating_add(1);
            let within = u32::from(*frames) <= allowance;
            match c {
                Control::CompressedFrame { mask, len, fin } if refused.is_none() => {
                    let a = agreed.unwrap_or(NO_AGREEMENT);
                    let i = inflaters.entry(key).or_insert_with(|| {
                        Box::new(Inflater::new(
                            a.client_window_bits,
                            a.client_no_context_takeover,
                        ))
                    });
                    match i.frame(mask, len, fin, max) {
                        Ok(true) => finish_message(inflaters, key),
                        Ok(false) => {}
                        Err(e) => refused = Some(e),
                    }
                }
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
        if let Some(e) = refused {
            log::debug!(
                "shard {}: connection {key}: compressed message refused: {e:?}",
                self.index
            );
            self.inflaters.remove(&key);
            return Next::Fail(match e {
                InflateError::TooLarge => CloseReason::TooBig,
                InflateError::Invalid => CloseReason::InvalidPayload,
            });
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
        let tls_scratch = &mut self.tls_scratch;
        let conn = &mut self.conns[key];
        let (done, blocked) = match &mut conn.tls {
            Some(tls) => match tls.flush(&mut conn.out, &mut conn.stream, tls_scratch) {
                Ok(d) => d,
                Err(_) => return Next::Drop,
            },
            None => match conn.out.write_to(&mut conn.stream) {
                Ok(done) => (done, !conn.out.is_empty()),
                Err(_) => return Next::Drop,
            },
        };
        ShardStats::add(&stats.frames_written, done.frames as u64);
        if done.records > 0 {
            ShardStats::add(&stats.tls_records, done.records as u64);
        }
        ShardStats::add(&stats.bytes_written, done.bytes as u64);
        // Write readiness is watched only while bytes wait: registering it for good would
        // deliver an EPOLLOUT wake-up for nearly every ACK.
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
        if !blocked && conn.out.is_empty() && conn.close_when_flushed && !conn.record_pending {
            return self.linger(key, turn);
        }
        Next::Continue
    }

    /// Everything is flushed: shut our side and discard input until the peer's FIN.
    fn linger(&mut self, key: usize, turn: &Turn) -> Next {
        let conn = &mut self.conns[key];
        conn.close_when_flushed = false;
        if let Some(tls) = &mut conn.tls {
            // close_notify, into a socket that has just taken everything else: best effort (a
            // WebSocket peer has the close frame already).
            tls.close_notify();
            tls.write_pending_now(&mut conn.stream);
        }
        if conn.stream.shutdown(Shutdown::Write).is_err() {
            return Next::Drop;
        }
        self.unsubscribe(key, turn);
        self.conns[key].phase = Phase::Lingering;
        self.set_timer(key, turn.tick + self.limits.close_ticks);
        Next::Continue
    }
}
