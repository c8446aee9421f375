//! A blocking Redis connection for commands: connect with a deadline, `AUTH` and `SELECT`, then
//! pipelined commands and their replies. Publishers use one under a mutex; the cluster bus
//! thread uses one for its handshake before switching the socket to non-blocking pub/sub.

use super::resp::{self, Reply};
use crate::config::{RedisConfig, RedisNode};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest reply element read from Redis. Replies here are integers, statuses and pub/sub
/// messages, which are publishes bounded by `--max-event-bytes` plus the wire format's envelope.
pub const MAX_REPLY_BULK: usize = 64 << 20;

/// One connection.
pub struct RedisConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn protocol_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl RedisConn {
    /// Connects to `node` within `timeout` (which also bounds every later read and write),
    /// authenticates when a password is configured, and selects the database.
    pub fn connect(
        node: &RedisNode,
        cfg: &RedisConfig,
        timeout: Duration,
    ) -> io::Result<RedisConn> {
        let addr = (node.host.as_str(), node.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = RedisConn {
            stream,
            buf: Vec::new(),
        };
        if let Some(pw) = &cfg.password {
            match conn.call(&[b"AUTH", pw.expose()])? {
                Reply::Simple(_) => {}
                // Redis's own message ("WRONGPASS …") names no secret; pass it on.
                Reply::Error(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("AUTH: {}", String::from_utf8_lossy(&e)),
                    ))
                }
                other => return Err(protocol_error(format!("AUTH answered {other:?}"))),
            }
        }
        if cfg.db != 0 {
            let db = cfg.db.to_string();
            if let Reply::Error(e) = conn.call(&[b"SELECT", db.as_bytes()])? {
                return Err(protocol_error(format!(
                    "SELECT {db}: {}",
                    String::from_utf8_lossy(&e)
                )));
            }
        }
        Ok(conn)
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        let mut out = Vec::new();
        resp::command(&mut out, args);
        self.stream.write_all(&out)?;
        self.read_reply()
    }

    /// Sends already-encoded commands in one write and reads `count` replies, in order.
    pub fn pipeline(&mut self, encoded: &[u8], count: usize) -> io::Result<Vec<Reply>> {
        self.stream.write_all(encoded)?;
        (0..count).map(|_| self.read_reply()).collect()
    }

    /// Reads the next reply (or pushed pub/sub message).
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) =
                resp::parse(&self.buf, MAX_REPLY_BULK).map_err(protocol_error)?
            {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Bytes read past the last reply (a pub/sub connection hands these on with its socket).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }
}
