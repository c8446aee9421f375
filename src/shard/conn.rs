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

use crate::auth::Identity;
use crate::shard::outbox::Outbox;
use crate::timer::wheel::TimerId;
use crate::ws::decoder::Decoder;
use mio::net::TcpStream;
use std::net::SocketAddr;
use std::time::Instant;

/// Where a connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// Reading the HTTP request head into this buffer (bounded by the head limit).
    Head(Vec<u8>),
    /// A plain HTTP response is queued; the socket closes once it is flushed.
    Http,
    /// Upgraded and subscribed: receives events and heartbeats.
    Open,
    /// A close frame was sent (or is queued); waiting for the peer's close frame.
    Closing,
    /// Everything flushed, write side shut; discarding input until EOF or the deadline.
    Lingering,
}

/// A connection owned by a shard.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// The peer's address (for logs at debug level).
    pub peer: SocketAddr,
    /// Distinguishes this connection from earlier ones in the same slab slot.
    pub gen: u32,
    /// See [`Phase`].
    pub phase: Phase,
    /// Frames waiting to be written.
    pub out: Outbox,
    /// Client frame decoder (used from the upgrade on).
    pub decoder: Decoder,
    /// Set while subscribed (phase `Open`).
    pub identity: Option<Identity>,
    /// Handshake, close or linger deadline.
    pub deadline: Option<TimerId>,
    /// Next heartbeat.
    pub heartbeat: Option<TimerId>,
    /// Token expiry.
    pub expiry: Option<TimerId>,
    /// In the shard's flush list.
    pub dirty: bool,
    /// Registered for write readiness (only while the outbox could not be flushed).
    pub want_write: bool,
    /// Scheduled for removal at the end of the loop iteration.
    pub dead: bool,
    /// Shut down once the outbox is flushed.
    pub close_when_flushed: bool,
    /// A close frame has been queued; nothing else may follow it.
    pub close_sent: bool,
    /// Accepted while `--max-connections` was reached: answered 1013 after the upgrade.
    pub over_limit: bool,
    /// When the socket was accepted.
    pub opened_at: Instant,
}

impl Conn {
    /// A freshly accepted connection, reading its request head.
    pub fn new(
        stream: TcpStream,
        peer: SocketAddr,
        gen: u32,
        over_limit: bool,
        now: Instant,
    ) -> Self {
        Conn {
            stream,
            peer,
            gen,
            phase: Phase::Head(Vec::new()),
            out: Outbox::default(),
            decoder: Decoder::default(),
            identity: None,
            deadline: None,
            heartbeat: None,
            expiry: None,
            dirty: false,
            want_write: false,
            dead: false,
            close_when_flushed: false,
            close_sent: false,
            over_limit,
            opened_at: now,
        }
    }

    /// Whether the WebSocket upgrade has been answered (frames may be sent).
    pub fn upgraded(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Closing)
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
}
