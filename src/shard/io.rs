//! Reading from connections (request heads and client frames) and writing to them (queueing
//! shared frames, flushing each dirty connection once per loop turn).
//!
//! A TLS connection differs only at the socket: its bytes go through `read_tls`,
//! `process_new_packets` and the session's reader before the same `on_bytes`, and its flush
//! hands the queued shared frames to the session (one vectored write: as few records as their
//! sizes allow, up to [`TLS_PENDING`] encrypted bytes at a time) and writes the records out.
//! The frame is built once per event either way; what a TLS connection adds is its encryption.

use super::conn::Phase;
use super::outbox::{Flushed, Outbox};
use super::{Next, Shard, Turn};
use crate::fault::{self, Point};
use crate::metrics::ShardStats;
use crate::ws::close::{close_frame, CloseReason};
use crate::ws::decoder::Control;
use crate::ws::frame::{encode, OpCode};
use crate::ws::SharedFrame;
use mio::{Interest, Token};
use std::io::{self, Read, Write};
use std::net::Shutdown;

/// Bytes read from one connection per iteration.
const READ_BUDGET: usize = 64 * 1024;
/// Bytes a TLS session may hold for its socket. Past it the frames wait in the outbox, shared,
/// until the socket takes more. rustls takes plaintext up to this bound less what it already
/// holds, so a drained session takes exactly four full records' worth: a bound that is a
/// multiple of the record size keeps bursts in full records.
pub(super) const TLS_PENDING: usize = 4 * 16 * 1024;

/// Frames handed to a TLS session per call: enough that a burst of small frames fills whole
/// records (512 frames of 32 bytes are one), few enough for the stack (8 KiB of slices).
const TLS_IOV: usize = 512;

/// The plaintext side of a TLS session as a writer the outbox can flush into: a session whose
/// buffer is full takes nothing, which the outbox must see as `WouldBlock`, not as a zero-length
/// write.
struct Plaintext<'a>(&'a mut rustls::ServerConnection);

impl Write for Plaintext<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.writer().write(buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self.0.writer().write_vectored(bufs)? {
            0 if bufs.iter().any(|b| !b.is_empty()) => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Flushes a TLS connection: queued frames into the session, records onto the socket, until
/// both are empty or the socket would block. Returns what was done and whether the socket
/// blocked (bytes still wait).
fn flush_tls<W: Write>(
    out: &mut Outbox,
    tls: &mut rustls::ServerConnection,
    socket: &mut W,
) -> io::Result<(Flushed, bool)> {
    let mut done = Flushed::default();
    loop {
        // Frames wait for the handshake (the session would hold them as plaintext meanwhile).
        if !out.is_empty() && !tls.is_handshaking() {
            done.frames += out.write_to_n::<_, TLS_IOV>(&mut Plaintext(tls))?.frames;
        }
        while tls.wants_write() {
            match tls.write_tls(socket) {
                Ok(n) => done.bytes += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((done, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if out.is_empty() || tls.is_handshaking() {
            return Ok((done, false));
        }
    }
}

impl Shard {
    /// Reads what the socket holds. `peer_closed` (the event carried RDHUP or an error) reads on
    /// to the end so the EOF is seen: no further edge will announce it. What the bytes call for
    /// is applied as it comes; a connection that is closing is still read (the peer's close
    /// frame, or its end of stream, may follow).
    pub(super) fn on_readable(&mut self, key: usize, turn: &Turn, peer_closed: bool) -> Next {
        if self.conns.get(key).is_some_and(|c| c.tls.is_some()) {
            return self.on_readable_tls(key, turn);
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

    /// Reads a TLS connection: records from the socket until it would block (a TLS reader
    /// cannot tell a short read from a full one, so it always reads to `WouldBlock`), each
    /// batch decrypted and its plaintext handed to `on_bytes` as a plain connection's would be.
    /// A TLS error (garbage instead of a ClientHello, a bad record) sends rustls' alert and drops
    /// the connection.
    fn on_readable_tls(&mut self, key: usize, turn: &Turn) -> Next {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut total = 0;
        while let Some(conn) = self.conns.get_mut(key).filter(|c| !c.dead) {
            let (stream, Some(tls)) = (&mut conn.stream, conn.tls.as_mut()) else {
                break;
            };
            let next = match tls.read_tls(stream) {
                Ok(0) => Next::Drop,
                Ok(n) => {
                    total += n;
                    let handshaking = tls.is_handshaking();
                    match tls.process_new_packets() {
                        Ok(_) => {
                            if handshaking && !tls.is_handshaking() {
                                ShardStats::add(&self.stats_all[self.index].tls_handshakes, 1);
                            }
                            self.on_plaintext(key, &mut scratch, turn)
                        }
                        Err(e) => {
                            log::debug!("shard {}: connection {key}: TLS: {e}", self.index);
                            // The alert rustls queued for it, best effort.
                            let _ = tls.write_tls(stream);
                            Next::Drop
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Next::Drop,
            };
            let more = next == Next::Continue;
            self.apply(key, next, turn);
            if more && total >= READ_BUDGET {
                self.read_again.push(key as u32);
                break;
            }
        }
        self.scratch = scratch;
        Next::Continue
    }

    /// Hands a TLS connection's decrypted bytes to `on_bytes`, and has its flush send whatever
    /// the session wants to write (handshake messages, alerts, key updates).
    fn on_plaintext(&mut self, key: usize, scratch: &mut [u8], turn: &Turn) -> Next {
        loop {
            let Some(tls) = self.conns[key].tls.as_mut() else {
                return Next::Continue;
            };
            let wants_write = tls.wants_write();
            let n = match tls.reader().read(scratch) {
                // The peer's close_notify: nothing more will come.
                Ok(0) => return Next::Drop,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if wants_write || !self.conns[key].out.is_empty() {
                        self.mark_dirty(key);
                    }
                    return Next::Continue;
                }
                Err(_) => return Next::Drop,
            };
            let next = self.on_bytes(key, &scratch[..n], turn);
            if next != Next::Continue || !matches!(self.conns.get(key), Some(c) if !c.dead) {
                return next;
            }
        }
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
        let (done, blocked) = match &mut conn.tls {
            Some(tls) => match flush_tls(&mut conn.out, tls, &mut conn.stream) {
                Ok(d) => d,
                Err(_) => return Next::Drop,
            },
            None => match conn.out.write_to(&mut conn.stream) {
                Ok(done) => (done, !conn.out.is_empty()),
                Err(_) => return Next::Drop,
            },
        };
        ShardStats::add(&stats.frames_written, done.frames as u64);
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
            tls.send_close_notify();
            let _ = tls.write_tls(&mut conn.stream);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;

    /// A client and a server session over memory, handshake done.
    #[allow(deprecated)] // ring, as src/tls.rs explains
    fn sessions() -> (rustls::ClientConnection, rustls::ServerConnection) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        s.set_buffer_limit(Some(TLS_PENDING));
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        // The server's session tickets, so that what follows is application data only.
        let mut wire = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
        (c, s)
    }

    /// The TLS records in `wire`: (content type, length) each.
    fn records(wire: &[u8]) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut rest = wire;
        while rest.len() >= 5 {
            let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            out.push((rest[0], len));
            rest = &rest[5 + len..];
        }
        assert!(rest.is_empty(), "a partial record");
        out
    }

    /// What the client reads from `wire`.
    fn decrypt(c: &mut rustls::ClientConnection, wire: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        let mut input = wire;
        while !input.is_empty() {
            c.read_tls(&mut input).unwrap();
            c.process_new_packets().unwrap();
            let _ = c.reader().read_to_end(&mut plain);
        }
        plain
    }

    fn burst(count: usize, size: usize) -> (Outbox, Vec<u8>) {
        let mut out = Outbox::default();
        let mut all = Vec::new();
        for i in 0..count {
            let frame = vec![b'a' + (i % 26) as u8; size];
            all.extend_from_slice(&frame);
            out.push(SharedFrame::from(frame));
        }
        (out, all)
    }

    #[test]
    fn a_burst_of_frames_leaves_in_as_few_records_as_their_sizes_allow() {
        for (count, size) in [(1, 200), (50, 200), (100, 300), (3, 40_000)] {
            let (mut c, mut s) = sessions();
            let (mut out, all) = burst(count, size);
            let mut wire = Vec::new();
            let (done, blocked) = flush_tls(&mut out, &mut s, &mut wire).unwrap();
            assert!(!blocked && out.is_empty());
            assert_eq!(done.frames, count);
            assert_eq!(done.bytes, wire.len());
            let recs = records(&wire);
            // Full records of 16 KiB of plaintext, and the remainder.
            let want = all.len().div_ceil(16 * 1024);
            assert_eq!(recs.len(), want, "{count} frames of {size} bytes: {recs:?}");
            assert!(recs.iter().all(|&(t, _)| t == 0x17));
            assert_eq!(decrypt(&mut c, &wire), all);
        }
    }

    /// A socket that takes `room` bytes, then blocks.
    struct Full {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_socket_leaves_the_rest_queued_and_nothing_is_lost() {
        let (mut c, mut s) = sessions();
        let (mut out, all) = burst(400, 1000);
        let mut sock = Full {
            got: Vec::new(),
            room: 20_000,
        };
        let (_, blocked) = flush_tls(&mut out, &mut s, &mut sock).unwrap();
        assert!(blocked);
        // The session holds at most TLS_PENDING encrypted bytes; the rest waits as frames.
        assert!(out.pending_bytes() >= all.len() - 20_000 - TLS_PENDING);
        let mut rounds = 0;
        loop {
            sock.room = 7_000;
            let (_, blocked) = flush_tls(&mut out, &mut s, &mut sock).unwrap();
            rounds += 1;
            if !blocked {
                break;
            }
            assert!(rounds < 1000);
        }
        assert!(out.is_empty());
        assert_eq!(decrypt(&mut c, &sock.got), all);
    }
}
