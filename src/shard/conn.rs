//! One connection's state as its shard sees it.
//!
//! A connection moves through the phases in one direction only:
//!
//! ```text
//! Head ──(bad request / probe)──▶ Http ──(response flushed)──▶ Lingering ──▶ gone
//!   │
//!   └──(upgrade: 101 queued)──▶ Open ──(close sent or received)──▶ Closing ──▶ Lingering ──▶ gone
//!                          └──(auth refused, 4401/4003/1013/1001)──▶ Closing
//! ```
//!
//! `Lingering` means our last bytes are flushed and our write side is shut: we read and discard
//! until the peer's FIN (or a deadline), so that unread input never turns our final frame into a
//! TCP reset.
//!
//! The struct is kept small because there are a million of them: no names (the registry holds
//! the workspace and user), one timer at a time (the phase says what it is for), what only an
//! open connection needs inside [`Phase::Open`], the first queued frame inline in the outbox,
//! and one input buffer that serves the request head and then any partial client frame.

use crate::shard::outbox::Outbox;
use crate::timer::wheel::TimerId;
use crate::ws::decoder::Decoder;
use mio::net::TcpStream;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request head into `inbuf` (bounded by the head limit).
    Head,
    /// A plain HTTP response is queued; the socket closes once it is flushed.
    Http,
    /// Upgraded and subscribed: receives events and heartbeats.
    Open(Open),
    /// A close frame was sent (or is queued), ours or the echo of the peer's; nothing else may
    /// follow it. Waiting for the peer's close frame, or for the flush.
    Closing,
    /// Everything flushed, write side shut; discarding input until EOF or the deadline.
    Lingering,
}

/// What only an open connection keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    /// Tick of the next heartbeat.
    pub next_heartbeat: u64,
    /// Tick at which the token's `exp` plus leeway passes.
    pub expires: u64,
    /// Frames received from the client since its last heartbeat (`--max-client-frames-per-sec`).
    pub frames: u16,
    /// Heartbeats since the last ping was sent (or since the upgrade).
    pub beats_since_ping: u16,
    /// A ping was sent and its pong has not come back.
    pub ping_outstanding: bool,
    /// Authenticated and registered, but its workspace is not live on the cluster bus yet:
    /// `connected` has not been sent, and its timer is the deadline for that.
    pub awaiting_live: bool,
}

impl Open {
    /// An open connection expiring at tick `expires`, its first heartbeat at `next_heartbeat`.
    pub fn new(next_heartbeat: u64, expires: u64, awaiting_live: bool) -> Open {
        Open {
            next_heartbeat,
            expires,
            frames: 0,
            beats_since_ping: 0,
            ping_outstanding: false,
            awaiting_live,
        }
    }
}

/// A connection owned by a shard.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// With `--tls-cert`: the TLS session over the socket. Everything above it (the request
    /// head, frames, the outbox) is the same as on a plain connection.
    pub tls: Option<Box<super::tls::TlsConn>>,
    /// Distinguishes this connection from earlier ones in the same slab slot.
    pub gen: u32,
    /// See [`Phase`].
    pub phase: Phase,
    /// In the shard's flush list.
    pub dirty: bool,
    /// Registered for write readiness (only while the outbox could not be flushed).
    pub want_write: bool,
    /// Scheduled for removal at the end of the loop iteration.
    pub dead: bool,
    /// Negotiated `permessage-deflate` (with what the client offered): event frames go
    /// compressed when that pays, and its data messages may come compressed (RSV1).
    pub deflate: Option<crate::ws::extensions::Agreed>,
    /// Shut down once the outbox is flushed.
    pub close_when_flushed: bool,
    /// Its resume record is on its way to Redis (cluster bus): the socket is shut only once
    /// Redis has it (or the close deadline passes), so that a client reconnecting the moment
    /// its connection closes finds it on any node.
    pub record_pending: bool,
    /// Accepted while `--max-connections` was reached: answered 1013 after the upgrade.
    pub over_limit: bool,
    /// Was subscribed at some point (its close line was logged when it unsubscribed).
    pub was_open: bool,
    /// The close code sent or received (0 until there is one), for the close log line.
    pub close_code: u16,
    /// The request head while in `Head`; afterwards the start of a client frame split across reads.
    pub inbuf: Vec<u8>,
    /// Client frame decoder state (used from the upgrade on).
    pub decoder: Decoder,
    /// Frames waiting to be written.
    pub out: Outbox,
    /// The one pending timer: the handshake deadline (`Head`, `Http`), the next heartbeat or the
    /// token's expiry, whichever is first (`Open`), or the close deadline (`Closing`, `Lingering`).
    pub timer: Option<TimerId>,
    /// Milliseconds since the shard started, at accept (for the connection's age in logs).
    pub opened_ms: u64,
}

impl Conn {
    /// A freshly accepted connection, reading its request head.
    pub fn new(
        stream: TcpStream,
        tls: Option<Box<super::tls::TlsConn>>,
        gen: u32,
        over_limit: bool,
        opened_ms: u64,
    ) -> Self {
        Conn {
            stream,
            tls,
            gen,
            phase: Phase::Head,
            dirty: false,
            want_write: false,
            dead: false,
            close_when_flushed: false,
            record_pending: false,
            deflate: None,
            over_limit,
            was_open: false,
            close_code: 0,
            inbuf: Vec::new(),
            decoder: Decoder::default(),
            out: Outbox::default(),
            timer: None,
            opened_ms,
        }
    }

    /// The open connection's state, if it is open.
    pub fn open(&mut self) -> Option<&mut Open> {
        match &mut self.phase {
            Phase::Open(o) => Some(o),
            _ => None,
        }
    }

    /// Whether it is open (subscribed, or waiting for the cluster bus).
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Whether the WebSocket upgrade has been answered (frames may be sent).
    pub fn upgraded(&self) -> bool {
        matches!(self.phase, Phase::Open(_) | Phase::Closing)
    }
}

impl crate::shard::fanout::Subscriber for Conn {
    #[inline]
    fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    #[inline]
    fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    #[inline]
    fn deflate(&self) -> bool {
        self.deflate.is_some()
    }
}

#[cfg(test)]
mod size_probe {
    /// The per-connection footprint is a design figure (docs/performance.md): keep it in view.
    #[test]
    fn connection_state_stays_small() {
        // mio's stream carries a selector id in debug builds only; count the release layout.
        let debug_extra = std::mem::size_of::<mio::net::TcpStream>() - 4;
        let size = std::mem::size_of::<super::Conn>() - debug_extra;
        assert!(size <= 152, "Conn grew to {size} bytes");
    }
}
