//! One non-blocking connection to one Redis server, driven by the bus thread's poll loop: the
//! connect, the `AUTH`/`SELECT` handshake, then commands out and replies in. Every buffer is
//! bounded: replies by [`MAX_REPLY_BULK`] per element, what one wake-up reads by the caller's
//! budget, what waits to be written by [`MAX_OUTPUT`].
//!
//! The handshake is pipelined: its commands are queued before the socket is even connected, and
//! a caller may queue its own commands behind them at once; their replies come back after the
//! handshake's, which the link checks and keeps to itself.

use crate::bus::resp::{self, MessageAt, Reply, RespError};
use crate::config::{RedisConfig, RedisNode};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

/// Largest reply element read from Redis. Replies are integers, statuses, layouts and pub/sub
/// messages, which are publishes bounded by `--max-event-bytes` plus the wire format's envelope.
pub const MAX_REPLY_BULK: usize = 64 << 20;

/// Most bytes queued for one connection and not yet written. Commands are small (subscriptions,
/// pings) or bounded publishes; a server that stops reading this much is not taking commands,
/// and the connection is given up (see [`LinkError::Stalled`]).
pub const MAX_OUTPUT: usize = 32 << 20;

/// Bytes read from the socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Why a connection is unusable. Each ends it; the bus says which in its log line.
#[derive(Debug)]
pub enum LinkError {
    /// The socket failed (refused, reset, timed out in the kernel).
    Io(io::Error),
    /// Redis closed the connection.
    Closed,
    /// Not RESP2, or a reply element over the bound.
    Protocol(RespError),
    /// `AUTH` or `SELECT` was refused (Redis's own words, which name no secret).
    Refused(String),
    /// The connect and handshake did not finish by their deadline.
    HandshakeTimeout,
    /// Redis stopped reading: [`MAX_OUTPUT`] bytes wait to be written.
    Stalled,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Closed => f.write_str("connection closed by Redis"),
            LinkError::Protocol(e) => write!(f, "{e}"),
            LinkError::Refused(why) => f.write_str(why),
            LinkError::HandshakeTimeout => {
                f.write_str("no answer to the connect and handshake in time")
            }
            LinkError::Stalled => write!(f, "Redis stopped reading ({MAX_OUTPUT} bytes unsent)"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The TCP connect is under way.
    Connecting,
    /// Connected; this many handshake replies are still owed.
    Handshake(u8),
    /// Ready for commands.
    Ready,
}

/// What a link read next ([`Link::next_incoming`]).
#[derive(Debug)]
pub enum Incoming {
    /// A pub/sub message, read in place: its bytes are in the link's buffer
    /// ([`Link::bytes`]) until the next [`Link::read`].
    Message(MessageAt),
    /// Any other reply.
    Reply(Reply),
}

/// What one [`Link::read`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// The socket is drained; wait for the next readable event.
    Drained,
    /// The budget ran out with more to read: call again on a later turn.
    More,
}

/// One connection.
pub struct Link {
    /// The server.
    pub node: RedisNode,
    stream: TcpStream,
    state: State,
    /// Handshake replies to expect once connected.
    handshake: u8,
    /// The handshake's last command loads the function library: an answer that it exists
    /// already is fine.
    loads_functions: bool,
    inbuf: Vec<u8>,
    /// Replies already taken from the front of `inbuf`.
    used: usize,
    outbuf: Vec<u8>,
    /// Bytes of `outbuf` already written.
    written: usize,
    writable: bool,
    /// A readable event has not been read to `WouldBlock` yet.
    pub readable: bool,
    /// The connect and handshake must be done by then.
    deadline: Instant,
    /// When bytes last arrived.
    pub heard: Instant,
    /// When a `PING` went out with nothing heard since.
    pub pinged: Option<Instant>,
}

impl Link {
    /// Starts connecting to `node` at `addr`, queues the handshake (`AUTH` when a password is
    /// configured, `SELECT` when the database is not 0, `FUNCTION LOAD` of `functions` when
    /// given) and registers the socket as `token`.
    pub fn connect(
        node: RedisNode,
        addr: SocketAddr,
        cfg: &RedisConfig,
        functions: Option<&str>,
        registry: &Registry,
        token: Token,
        deadline: Instant,
    ) -> io::Result<Link> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut outbuf = Vec::new();
        let mut owed = 0u8;
        if let Some(pw) = &cfg.password {
            resp::command(&mut outbuf, &[b"AUTH", pw.expose()]);
            owed += 1;
        }
        if cfg.db != 0 {
            resp::command(&mut outbuf, &[b"SELECT", cfg.db.to_string().as_bytes()]);
            owed += 1;
        }
        if let Some(f) = functions {
            resp::command(&mut outbuf, &[b"FUNCTION", b"LOAD", f.as_bytes()]);
            owed += 1;
        }
        let now = Instant::now();
        Ok(Link {
            node,
            stream,
            state: State::Connecting,
            handshake: owed,
            loads_functions: functions.is_some(),
            inbuf: Vec::new(),
            used: 0,
            outbuf,
            written: 0,
            writable: false,
            readable: false,
            deadline,
            heard: now,
            pinged: None,
        })
    }

    /// Whether the handshake is done.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// Whether the connect and handshake missed their deadline.
    pub fn handshake_overdue(&self, now: Instant) -> bool {
        self.state != State::Ready && now >= self.deadline
    }

    /// Queues one command. Fails (and the connection must be dropped) when Redis has stopped
    /// reading.
    pub fn command(&mut self, args: &[&[u8]]) -> Result<(), LinkError> {
        resp::command(&mut self.outbuf, args);
        self.check_output()
    }

    /// Queues already-encoded commands.
    pub fn encoded(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.outbuf.extend_from_slice(bytes);
        self.check_output()
    }

    /// Bytes queued and not written yet.
    pub fn unsent(&self) -> usize {
        self.outbuf.len() - self.written
    }

    fn check_output(&self) -> Result<(), LinkError> {
        if self.unsent() > MAX_OUTPUT {
            return Err(LinkError::Stalled);
        }
        Ok(())
    }

    /// Takes a writable event: finishes the connect if it was under way.
    pub fn on_writable(&mut self) -> Result<(), LinkError> {
        self.writable = true;
        if self.state == State::Connecting {
            if let Some(e) = self.stream.take_error()? {
                return Err(e.into());
            }
            match self.stream.peer_addr() {
                Ok(_) => {
                    self.state = match self.handshake {
                        0 => State::Ready,
                        owed => State::Handshake(owed),
                    };
                    let _ = self.stream.set_nodelay(true);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => self.writable = false,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes what is queued until the socket would block.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        if self.state == State::Connecting {
            return Ok(());
        }
        while self.writable && self.written < self.outbuf.len() {
            match self.stream.write(&self.outbuf[self.written..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.written == self.outbuf.len() {
            self.outbuf.clear();
            self.written = 0;
        } else if self.written > self.outbuf.len() / 2 {
            self.outbuf.drain(..self.written);
            self.written = 0;
        }
        Ok(())
    }

    /// Reads at most `budget` bytes from the socket, straight into the reply buffer.
    pub fn read(&mut self, budget: usize) -> Result<Drain, LinkError> {
        if self.state == State::Connecting {
            return Ok(Drain::Drained);
        }
        self.compact();
        let mut taken = 0;
        while taken < budget {
            let len = self.inbuf.len();
            self.inbuf.resize(len + READ_CHUNK, 0);
            let got = self.stream.read(&mut self.inbuf[len..]);
            self.inbuf.truncate(len + got.as_ref().map_or(0, |n| *n));
            match got {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => {
                    taken += n;
                    self.heard = Instant::now();
                    self.pinged = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(Drain::Drained);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Drain::More)
    }

    /// The next complete message or reply read, if any, after the handshake's (which the link
    /// checks). A pub/sub message is found in place, without a copy.
    pub fn next_incoming(&mut self) -> Result<Option<Incoming>, LinkError> {
        if self.state == State::Ready {
            if let Some((at, n)) = resp::message_at(&self.inbuf[self.used..], MAX_REPLY_BULK) {
                let base = self.used;
                self.used += n;
                return Ok(Some(Incoming::Message(MessageAt {
                    channel: at.channel.start + base..at.channel.end + base,
                    payload: at.payload.start + base..at.payload.end + base,
                })));
            }
        }
        Ok(self.next_reply()?.map(Incoming::Reply))
    }

    /// The bytes of `range` of the read buffer: where [`Incoming::Message`] says a message's
    /// parts are, until the next [`Link::read`].
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.inbuf[range]
    }

    /// The next complete reply read, if any, after the handshake's (which the link checks).
    fn next_reply(&mut self) -> Result<Option<Reply>, LinkError> {
        loop {
            let Some((reply, n)) = resp::parse(&self.inbuf[self.used..], MAX_REPLY_BULK)
                .map_err(LinkError::Protocol)?
            else {
                return Ok(None);
            };
            self.used += n;
            let State::Handshake(owed) = self.state else {
                return Ok(Some(reply));
            };
            if let Reply::Error(e) = &reply {
                let loaded = owed == 1
                    && self.loads_functions
                    && e.windows(14).any(|w| w == b"already exists");
                if !loaded {
                    return Err(LinkError::Refused(format!(
                        "handshake refused: {}{}",
                        String::from_utf8_lossy(e),
                        if owed == 1 && self.loads_functions {
                            " (loading the causeloop function library for --bus-wire 2, which needs Redis 7.0 or later)"
                        } else {
                            ""
                        }
                    )));
                }
            }
            self.state = if owed > 1 {
                State::Handshake(owed - 1)
            } else {
                State::Ready
            };
        }
    }

    /// Drops the replies already taken from the buffer.
    fn compact(&mut self) {
        if self.used > 0 {
            self.inbuf.drain(..self.used);
            self.used = 0;
        }
    }

    /// Deregisters the socket (it closes when the link is dropped).
    pub fn close(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }
}
