//! One connection's TLS, on rustls' unbuffered API: the session owns its keys and handshake
//! state and nothing else. Records are decrypted from the shard's read buffer and encrypted into
//! the shard's write buffer; a connection keeps bytes of its own only while a record is split
//! across reads (`incoming`) or the socket would not take all of a write (`outgoing`), and gives
//! the memory back as soon as either empties. An idle TLS connection therefore holds its session
//! and two empty vectors: no 4 KiB read buffer, no queue of encrypted records.
//!
//! Writing takes queued frames out of the outbox into the shard's plaintext buffer (as many as
//! fill four records) and encrypts them in one call: a burst leaves as full 16 KiB records and
//! one short one, never one record per frame. The frame is built once per event; what TLS adds
//! per connection is the copy into the plaintext buffer and its encryption.

use super::outbox::{Flushed, Outbox};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::io::{self, Write};

/// Plaintext per record (rustls' fragment size, TLS's maximum).
const MAX_FRAGMENT: usize = 16 * 1024;
/// Plaintext encrypted per call: four full records.
pub const PLAIN_BATCH: usize = 4 * MAX_FRAGMENT;
/// Room for the records of one batch: each adds at most a header, a content type, padding it
/// does not use here, and a tag (29 bytes for TLS 1.2, 22 for 1.3); 256 each is ample.
pub const CIPHER_BATCH: usize = PLAIN_BATCH + 4 * 256;
/// Most bytes a connection may hold of records not yet complete: a handshake message may span
/// records up to 64 KiB (rustls' bound), an application record is at most 16 KiB and change.
const MAX_INCOMING: usize = 64 * 1024 + 5 + 256;

/// The shard's buffers every TLS connection shares: plaintext gathered from an outbox, and the
/// records encrypted from it.
pub struct TlsScratch {
    plain: Box<[u8]>,
    cipher: Box<[u8]>,
}

impl TlsScratch {
    /// No buffers (a shard without TLS).
    pub fn none() -> TlsScratch {
        TlsScratch {
            plain: Box::new([]),
            cipher: Box::new([]),
        }
    }
}

impl Default for TlsScratch {
    fn default() -> Self {
        TlsScratch {
            plain: vec![0; PLAIN_BATCH].into_boxed_slice(),
            cipher: vec![0; CIPHER_BATCH].into_boxed_slice(),
        }
    }
}

/// Why a TLS connection cannot go on.
#[derive(Debug)]
pub enum TlsFailure {
    /// The peer broke the protocol (or sent what is not TLS); rustls' alert, if it made one, is
    /// in `outgoing` and worth a best-effort write.
    Protocol(rustls::Error),
    /// A record split across reads grew past the bound (64 KiB, a handshake message's).
    TooLarge,
}

/// What a call to [`TlsConn::receive`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed in this call.
    pub handshake_done: bool,
    /// The peer sent close_notify: nothing more will come.
    pub peer_closed: bool,
}

/// One connection's TLS session and the few bytes it must keep between calls.
pub struct TlsConn {
    session: UnbufferedServerConnection,
    /// The start of a record that did not arrive whole.
    incoming: Vec<u8>,
    /// Encrypted bytes (handshake messages, records, alerts) the socket has not taken yet, from
    /// `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// close_notify was queued.
    closing: bool,
}

impl TlsConn {
    /// A session for a freshly accepted connection.
    pub fn new(config: std::sync::Arc<rustls::ServerConfig>) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            session: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            closing: false,
        })
    }

    /// The handshake is not done yet.
    pub fn is_handshaking(&self) -> bool {
        self.session.is_handshaking()
    }

    /// Encrypted bytes are waiting for the socket.
    pub fn wants_write(&self) -> bool {
        self.sent < self.outgoing.len()
    }

    /// Bytes a connection holds of its own right now (for the idle-memory figure and tests).
    pub fn held_bytes(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity()
    }

    /// Takes bytes read from the socket: answers the handshake (its records go to `outgoing`)
    /// and appends decrypted application data to `plain`. A record that is not complete is
    /// kept (bounded) until the next read completes it.
    pub fn receive(
        &mut self,
        read: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<Received, TlsFailure> {
        if self.incoming.is_empty() {
            let used = self.process(read, plain)?;
            let rest = &read[used.0..];
            if !rest.is_empty() {
                if rest.len() > MAX_INCOMING {
                    return Err(TlsFailure::TooLarge);
                }
                self.incoming.extend_from_slice(rest);
            }
            return Ok(used.1);
        }
        if self.incoming.len() + read.len() > MAX_INCOMING {
            return Err(TlsFailure::TooLarge);
        }
        self.incoming.extend_from_slice(read);
        let mut buf = std::mem::take(&mut self.incoming);
        let result = self.process(&mut buf, plain);
        match result {
            Ok((used, received)) => {
                if used < buf.len() {
                    buf.drain(..used);
                    self.incoming = buf;
                }
                // Whole again: the buffer goes back to the allocator.
                Ok(received)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the session over `input`; returns the bytes it used (whole records) and what
    /// happened.
    fn process(
        &mut self,
        input: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<(usize, Received), TlsFailure> {
        let was_handshaking = self.session.is_handshaking();
        let mut used = 0;
        let mut received = Received::default();
        loop {
            let UnbufferedStatus { discard, state } =
                self.session.process_tls_records(&mut input[used..]);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    used += discard;
                    self.queue_alert(&mut input[used..]);
                    return Err(TlsFailure::Protocol(e));
                }
            };
            let mut extra = 0;
            let done = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(TlsFailure::Protocol)?;
                        extra += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(&mut self.outgoing, |buf| e.encode(buf));
                    false
                }
                // What was encoded is in `outgoing`, ahead of anything written later; the flush
                // sends it.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::PeerClosed => {
                    received.peer_closed = true;
                    false
                }
                ConnectionState::BlockedHandshake
                | ConnectionState::WriteTraffic(_)
                | ConnectionState::Closed => true,
                // Early data is not enabled, so it never comes; anything newer is left alone.
                _ => true,
            };
            used += discard + extra;
            if done {
                break;
            }
        }
        received.handshake_done = was_handshaking && !self.session.is_handshaking();
        Ok((used, received))
    }

    /// An alert rustls made for a fatal error, queued if it made one. `rest` is what the failed
    /// call did not discard: rustls' deframer may still point into it, so it is what the
    /// session is shown again (never an empty buffer in its place).
    fn queue_alert(&mut self, rest: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.session.process_tls_records(rest);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            encode_into(&mut self.outgoing, |buf| e.encode(buf));
        }
    }

    /// Runs the session with no new input, for sending: it is shown the bytes it holds in
    /// `incoming` (a record not complete yet), which its deframer may have looked at, and what
    /// it discards of them is dropped. `act` gets the state.
    fn idle<R>(
        &mut self,
        act: impl FnOnce(
            Result<ConnectionState<'_, '_, rustls::server::ServerConnectionData>, rustls::Error>,
            &mut Vec<u8>,
        ) -> R,
    ) -> R {
        let mut pending = std::mem::take(&mut self.incoming);
        let UnbufferedStatus { discard, state } = self.session.process_tls_records(&mut pending);
        let r = act(state, &mut self.outgoing);
        if discard > 0 {
            pending.drain(..discard.min(pending.len()));
        }
        if !pending.is_empty() {
            self.incoming = pending;
        }
        r
    }

    /// Encrypts queued frames and writes the records, until both the outbox and the pending
    /// records are empty or the socket would block. Returns what was done and whether the socket
    /// blocked (bytes still wait). Frames wait while the handshake is in progress.
    pub fn flush<W: Write>(
        &mut self,
        out: &mut Outbox,
        socket: &mut W,
        scratch: &mut TlsScratch,
    ) -> io::Result<(Flushed, bool)> {
        let mut done = Flushed::default();
        loop {
            if !self.write_pending(socket, &mut done.bytes)? {
                return Ok((done, true));
            }
            if out.is_empty() || self.session.is_handshaking() {
                return Ok((done, false));
            }
            let mut gather = Gather {
                buf: &mut scratch.plain,
                len: 0,
            };
            done.frames += out.write_to_n::<_, TLS_IOV>(&mut gather)?.frames;
            let n = gather.len;
            let sealed = self.encrypt(&scratch.plain[..n], &mut scratch.cipher)?;
            done.records += n.div_ceil(MAX_FRAGMENT);
            // Straight from the shard's buffer; only what the socket leaves is kept.
            let mut from = 0;
            while from < sealed {
                match socket.write(&scratch.cipher[from..sealed]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(k) => {
                        from += k;
                        done.bytes += k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if from < sealed {
                self.outgoing
                    .extend_from_slice(&scratch.cipher[from..sealed]);
                return Ok((done, true));
            }
        }
    }

    /// Writes what `outgoing` holds; false if the socket would block first. Gives the buffer
    /// back once it is empty.
    fn write_pending<W: Write>(&mut self, socket: &mut W, bytes: &mut usize) -> io::Result<bool> {
        while self.sent < self.outgoing.len() {
            match socket.write(&self.outgoing[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    self.sent += k;
                    *bytes += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.outgoing.is_empty() {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        Ok(true)
    }

    /// Seals `plain` into records in `cipher`; returns their length. Handshake messages the
    /// session still has to send (session tickets, a key update) go to `outgoing` first.
    fn encrypt(&mut self, plain: &[u8], cipher: &mut [u8]) -> io::Result<usize> {
        loop {
            let step = self.idle(|state, outgoing| match state.map_err(io::Error::other)? {
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(outgoing, |buf| e.encode(buf));
                    Ok(None)
                }
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    Ok(None)
                }
                ConnectionState::WriteTraffic(mut w) => match w.encrypt(plain, cipher) {
                    Ok(n) if outgoing.is_empty() => Ok(Some(n)),
                    // Handshake bytes came first: the records follow them in `outgoing`.
                    Ok(n) => {
                        outgoing.extend_from_slice(&cipher[..n]);
                        Ok(Some(0))
                    }
                    Err(EncryptError::InsufficientSize(s)) => Err(io::Error::other(format!(
                        "TLS records need {} bytes",
                        s.required_size
                    ))),
                    Err(e) => Err(io::Error::other(e)),
                },
                other => Err(io::Error::other(format!(
                    "TLS session cannot send application data ({other:?})"
                ))),
            })?;
            if let Some(n) = step {
                return Ok(n);
            }
        }
    }

    /// Queues close_notify (once), to be written by the next flush.
    pub fn close_notify(&mut self) {
        if std::mem::replace(&mut self.closing, true) {
            return;
        }
        self.idle(|state, outgoing| {
            if let Ok(ConnectionState::WriteTraffic(mut w)) = state {
                let mut buf = [0u8; 64];
                if let Ok(n) = w.queue_close_notify(&mut buf) {
                    outgoing.extend_from_slice(&buf[..n]);
                }
            }
        });
    }

    /// Best-effort, non-blocking write of `frame` (and anything pending before it), for a last
    /// word on a connection about to be dropped.
    pub fn write_now<W: Write>(&mut self, frame: &[u8], socket: &mut W, scratch: &mut TlsScratch) {
        let mut out = Outbox::default();
        out.push(crate::ws::SharedFrame::from(frame.to_vec()));
        let _ = self.flush(&mut out, socket, scratch);
    }

    /// Writes what is pending, best effort (an alert before the socket is dropped).
    pub fn write_pending_now<W: Write>(&mut self, socket: &mut W) {
        let mut n = 0;
        let _ = self.write_pending(socket, &mut n);
    }
}

/// Frames gathered per batch: enough that small frames fill four records (512 of 128 bytes).
const TLS_IOV: usize = 512;

/// Encodes a handshake record at the end of `outgoing`, growing it to the size rustls asks.
fn encode_into(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) {
    let start = outgoing.len();
    let mut room = 1024;
    loop {
        outgoing.resize(start + room, 0);
        match encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(start);
                return;
            }
        }
    }
}

/// The shard's plaintext buffer as a writer the outbox can flush into: full means `WouldBlock`.
struct Gather<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Gather<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.buf.len() - self.len);
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs {
            if self.len == self.buf.len() {
                break;
            }
            total += self.write(b)?;
        }
        if total == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::SharedFrame;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::Read;
    use std::sync::Arc;

    /// A client session and a server connection over memory, handshake done (and the server's
    /// session tickets delivered), so what follows is application data only.
    #[allow(deprecated)] // ring, as src/tls.rs explains
    fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (rustls::ClientConnection, TlsConn, TlsScratch) {
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
            .with_protocol_versions(versions)
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
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = TlsConn::new(Arc::new(server)).unwrap();
        let mut scratch = TlsScratch::default();
        let mut plain = Vec::new();
        let mut empty = Outbox::default();
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            // One byte at a time: records split across reads are kept and completed.
            for b in wire.chunks(1) {
                s.receive(&mut b.to_vec(), &mut plain).unwrap();
            }
            let mut back = Vec::new();
            s.flush(&mut empty, &mut back, &mut scratch).unwrap();
            c.read_tls(&mut &back[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        let mut back = Vec::new();
        s.flush(&mut empty, &mut back, &mut scratch).unwrap();
        let mut input = &back[..];
        while !input.is_empty() {
            c.read_tls(&mut input).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(plain.is_empty());
        (c, s, scratch)
    }

    const BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];

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
        for versions in [BOTH, &[&rustls::version::TLS12][..]] {
            for (count, size) in [(1, 200), (50, 200), (100, 300), (3, 40_000), (2000, 130)] {
                let (mut c, mut s, mut scratch) = pair(versions);
                let (mut out, all) = burst(count, size);
                let mut wire = Vec::new();
                let (done, blocked) = s.flush(&mut out, &mut wire, &mut scratch).unwrap();
                assert!(!blocked && out.is_empty());
                assert_eq!(done.frames, count);
                assert_eq!(done.bytes, wire.len());
                let recs = records(&wire);
                // Full records of 16 KiB of plaintext, and the remainder.
                let want = all.len().div_ceil(16 * 1024);
                assert_eq!(recs.len(), want, "{count} frames of {size} bytes: {recs:?}");
                assert!(recs.iter().all(|&(t, _)| t == 0x17));
                assert_eq!(decrypt(&mut c, &wire), all);
                assert_eq!(s.held_bytes(), 0, "nothing kept once written");
            }
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
    fn a_full_socket_keeps_one_batch_at_most_and_nothing_is_lost() {
        let (mut c, mut s, mut scratch) = pair(BOTH);
        let (mut out, all) = burst(400, 1000);
        let mut sock = Full {
            got: Vec::new(),
            room: 20_000,
        };
        let (_, blocked) = s.flush(&mut out, &mut sock, &mut scratch).unwrap();
        assert!(blocked);
        // The connection keeps what one batch's records the socket did not take; the rest
        // waits as frames.
        assert!(s.held_bytes() <= CIPHER_BATCH, "{}", s.held_bytes());
        assert!(out.pending_bytes() >= all.len() - PLAIN_BATCH);
        let mut rounds = 0;
        loop {
            sock.room = 7_000;
            let (_, blocked) = s.flush(&mut out, &mut sock, &mut scratch).unwrap();
            rounds += 1;
            if !blocked {
                break;
            }
            assert!(rounds < 1000);
        }
        assert!(out.is_empty());
        assert_eq!(s.held_bytes(), 0);
        assert_eq!(decrypt(&mut c, &sock.got), all);
    }

    #[test]
    fn client_records_split_anywhere_come_out_whole_and_in_order() {
        let (mut c, mut s, _) = pair(BOTH);
        let mut sent = Vec::new();
        for i in 0..20u8 {
            sent.extend(vec![i; 100 + usize::from(i) * 900]);
        }
        // What a client sends: the messages as records (of every size up to 16 KiB).
        let seal = |c: &mut rustls::ClientConnection| {
            let mut wire = Vec::new();
            for msg in sent.chunks(7000) {
                c.writer().write_all(msg).unwrap();
                while c.wants_write() {
                    c.write_tls(&mut wire).unwrap();
                }
            }
            wire
        };
        let mut wire = seal(&mut c);
        for cut in [1, 5, 333, 4096, 16 * 1024, wire.len()] {
            let (mut c2, mut s2, _) = pair(BOTH);
            let w2 = seal(&mut c2);
            let mut got = Vec::new();
            for piece in w2.chunks(cut) {
                s2.receive(&mut piece.to_vec(), &mut got).unwrap();
            }
            assert_eq!(got, sent, "cut {cut}");
            assert_eq!(s2.held_bytes(), 0, "cut {cut}: a record left over");
        }
        let mut got = Vec::new();
        s.receive(&mut wire, &mut got).unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn close_notify_is_seen_and_garbage_is_refused_with_an_alert() {
        let (mut c, mut s, _) = pair(BOTH);
        c.send_close_notify();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let r = s.receive(&mut wire, &mut Vec::new()).unwrap();
        assert!(r.peer_closed);

        let (mut c, mut s, _) = pair(BOTH);
        let mut junk = b"\x17\x03\x03\x00\x20 thirty-two bytes of not a record".to_vec();
        let e = s.receive(&mut junk, &mut Vec::new());
        assert!(matches!(e, Err(TlsFailure::Protocol(_))), "{e:?}");
        // The client is told why (an alert, encrypted under TLS 1.3).
        let mut alert = Vec::new();
        s.write_pending_now(&mut alert);
        c.read_tls(&mut &alert[..]).unwrap();
        let told = c.process_new_packets();
        assert!(
            matches!(told, Err(rustls::Error::AlertReceived(_))),
            "{told:?}"
        );
    }

    #[test]
    fn an_idle_connection_holds_no_buffer_and_a_record_split_is_bounded() {
        let (mut c, mut s, _) = pair(BOTH);
        assert_eq!(s.held_bytes(), 0);
        // Half a record: kept; the rest: released.
        c.writer().write_all(&[7u8; 5000]).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        let (a, b) = wire.split_at(wire.len() / 2);
        let mut plain = Vec::new();
        s.receive(&mut a.to_vec(), &mut plain).unwrap();
        assert!(plain.is_empty() && s.held_bytes() >= a.len());
        s.receive(&mut b.to_vec(), &mut plain).unwrap();
        assert_eq!(plain, vec![7u8; 5000]);
        assert_eq!(s.held_bytes(), 0);
        // A peer that announces a record larger than any and keeps sending is cut off.
        let mut huge = vec![0x17, 0x03, 0x03, 0xff, 0xff];
        huge.resize(40_000, 0);
        let first = s.receive(&mut huge.clone(), &mut plain);
        let second = first.and_then(|_| s.receive(&mut huge, &mut plain));
        assert!(second.is_err());
    }
}
