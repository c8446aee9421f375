//! The internal listener: `POST /v1/publish`, `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! One thread, one mio loop, HTTP/1.1 with keep-alive (publishers reuse their connection). Every
//! input is bounded before it is buffered: the head by `--max-request-head-bytes`, the body by
//! `--max-publish-bytes` (checked against `Content-Length` before a byte of it is read), the
//! number of connections by `--max-internal-connections`, and idle or stalled connections by a
//! deadline. This listener keeps serving during a drain, so probes see 503 and publishers get a
//! clear answer until the shards are gone.

mod publish_key;

use crate::bus::body;
use crate::bus::{PublishError, Publisher};
use crate::http::request::{parse_head, Head};
use crate::http::{response, Status};
use crate::metrics::{render, ShardStats};
use crate::server::Shared;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use publish_key::PublishKey;
use slab::Slab;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// A connection with no request in progress is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    close_after: bool,
    deadline: Instant,
}

/// The internal listener's loop and state.
pub struct Internal {
    poll: Poll,
    listener: TcpListener,
    waker: Arc<Waker>,
    conns: Slab<HttpConn>,
    shared: Arc<Shared>,
    publisher: Publisher,
    key: Option<PublishKey>,
    stop: Arc<AtomicBool>,
    scratch: Vec<u8>,
}

enum Outcome {
    /// Keep the connection.
    Keep,
    /// Close it now.
    Close,
}

impl Internal {
    /// Builds the loop over `listener`. It runs until `stop` is set and the waker fires.
    pub fn new(
        mut listener: TcpListener,
        shared: Arc<Shared>,
        publisher: Publisher,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let key = shared
            .config
            .publish_key
            .as_ref()
            .map(|k| PublishKey::new(k.expose()));
        Ok(Internal {
            poll,
            listener,
            waker,
            conns: Slab::new(),
            shared,
            publisher,
            key,
            stop,
            scratch: vec![0; 64 * 1024],
        })
    }

    /// The waker that interrupts the loop (used to stop it).
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Runs until stopped.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut next_sweep = Instant::now() + Duration::from_secs(1);
        while !self.stop.load(Ordering::Acquire) {
            let timeout = next_sweep.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("internal listener: poll failed: {e}");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(k) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(k);
                        }
                        if event.is_writable() && self.conns.contains(k) {
                            self.on_writable(k);
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_secs(1);
                let expired: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.deadline <= now)
                    .map(|(k, _)| k)
                    .collect();
                for k in expired {
                    self.conns.remove(k);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= self.shared.config.max_internal_connections {
                        let _ = stream.write(&response::json_error(
                            Status::Unavailable,
                            "too many connections",
                            true,
                        ));
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    if self
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(entry.key()),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_ok()
                    {
                        entry.insert(HttpConn {
                            stream,
                            buf: Vec::new(),
                            out: Vec::new(),
                            written: 0,
                            close_after: false,
                            deadline: Instant::now() + IDLE_TIMEOUT,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("internal listener: accept: {e}");
                    return;
                }
            }
        }
    }

    fn on_readable(&mut self, k: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(k) else {
                return;
            };
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.conns.remove(k);
                    return;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&self.scratch[..n]);
                    if conn.buf.len() == n {
                        // First bytes of a request: it must complete within the handshake timeout.
                        conn.deadline = Instant::now() + self.shared.config.handshake_timeout;
                    }
                    if let Outcome::Close = self.process(k) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conns.remove(k);
                    return;
                }
            }
        }
    }

    /// Serves every complete request in the connection's buffer.
    fn process(&mut self, k: usize) -> Outcome {
        loop {
            let conn = &mut self.conns[k];
            if conn.close_after {
                // A response that closes the connection is queued: ignore anything after it.
                conn.buf.clear();
                return Outcome::Keep;
            }
            let max_head = self.shared.config.max_request_head_bytes;
            let max_headers = self.shared.config.max_request_headers;
            let (resp, consumed, close) = match parse_head(&conn.buf, max_head, max_headers) {
                Ok(None) => return Outcome::Keep,
                Err(e) => (response::plain(e.status(), true), conn.buf.len(), true),
                Ok(Some(head)) => {
                    let close = head.connection_close || head.minor_version == 0;
                    match route(
                        &head,
                        &conn.buf,
                        &self.shared,
                        &self.publisher,
                        self.key.as_ref(),
                    ) {
                        Route::NeedBody => {
                            if conn.buf.capacity() < head.len + self.shared.config.max_publish_bytes
                            {
                                let want =
                                    head.len + head.content_length.flatten().unwrap_or(0) as usize;
                                conn.buf.reserve(want.saturating_sub(conn.buf.len()));
                            }
                            return Outcome::Keep;
                        }
                        Route::Respond {
                            bytes,
                            consumed,
                            close: force_close,
                        } => (bytes, consumed, close || force_close),
                    }
                }
            };
            conn.buf.drain(..consumed.min(conn.buf.len()));
            conn.out.extend_from_slice(&resp);
            conn.close_after |= close;
            conn.deadline = Instant::now() + IDLE_TIMEOUT;
            if let Outcome::Close = self.on_writable(k) {
                return Outcome::Close;
            }
            if self.conns[k].buf.is_empty() {
                return Outcome::Keep;
            }
        }
    }

    fn on_writable(&mut self, k: usize) -> Outcome {
        let conn = &mut self.conns[k];
        while conn.written < conn.out.len() {
            match conn.stream.write(&conn.out[conn.written..]) {
                Ok(0) => break,
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conns.remove(k);
                    return Outcome::Close;
                }
            }
        }
        conn.out.clear();
        conn.written = 0;
        if conn.close_after {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            // Give the peer a moment to read the response before the socket goes away.
            conn.deadline = Instant::now() + Duration::from_secs(2);
            return Outcome::Keep;
        }
        Outcome::Keep
    }
}

enum Route {
    NeedBody,
    Respond {
        bytes: Vec<u8>,
        consumed: usize,
        close: bool,
    },
}

fn respond(bytes: Vec<u8>, consumed: usize) -> Route {
    Route::Respond {
        bytes,
        consumed,
        close: false,
    }
}

fn route(
    head: &Head<'_>,
    buf: &[u8],
    shared: &Shared,
    publisher: &Publisher,
    key: Option<&PublishKey>,
) -> Route {
    let head_only = head.len;
    let get = head.method == "GET" || head.method == "HEAD";
    match head.path {
        b"/v1/publish" if head.method == "POST" => publish(head, buf, shared, publisher, key),
        b"/v1/publish" => respond(
            response::json_error(Status::MethodNotAllowed, "use POST", false),
            head_only,
        ),
        b"/metrics" if get => {
            let body = render(shared.shard_stats.clone(), shared.bus_stats.clone());
            respond(
                response::build(
                    Status::Ok,
                    crate::metrics::CONTENT_TYPE,
                    body.as_bytes(),
                    false,
                    "",
                ),
                head_only,
            )
        }
        b"/healthz" if get => respond(
            response::build(Status::Ok, "text/plain", b"ok\n", false, ""),
            head_only,
        ),
        b"/readyz" if get => {
            let r = if shared.is_ready() {
                response::build(Status::Ok, "text/plain", b"ready\n", false, "")
            } else {
                response::build(Status::Unavailable, "text/plain", b"draining\n", false, "")
            };
            respond(r, head_only)
        }
        b"/metrics" | b"/healthz" | b"/readyz" => {
            respond(response::plain(Status::MethodNotAllowed, false), head_only)
        }
        _ => respond(response::plain(Status::NotFound, false), head_only),
    }
}

fn publish(
    head: &Head<'_>,
    buf: &[u8],
    shared: &Shared,
    publisher: &Publisher,
    key: Option<&PublishKey>,
) -> Route {
    let stats = &shared.bus_stats;
    let reject = |status: Status, msg: &str, counter: &std::sync::atomic::AtomicU64| {
        ShardStats::add(counter, 1);
        // The body (if any) is not read: the connection must close after this answer.
        Route::Respond {
            bytes: response::json_error(status, msg, true),
            consumed: buf.len(),
            close: true,
        }
    };
    let authorized = match (key, head.authorization) {
        (Some(k), Some(value)) => k.check_bearer(value),
        _ => false,
    };
    if !authorized {
        return reject(
            Status::Unauthorized,
            "missing or invalid publish key",
            &stats.rejected_unauthorized,
        );
    }
    let len = match head.content_length {
        Some(Some(n)) => n,
        Some(None) => {
            return reject(
                Status::BadRequest,
                "invalid Content-Length",
                &stats.rejected_invalid,
            )
        }
        None if head.transfer_encoding => {
            return reject(
                Status::LengthRequired,
                "chunked bodies are not accepted; send Content-Length",
                &stats.rejected_invalid,
            )
        }
        None => {
            return reject(
                Status::LengthRequired,
                "Content-Length is required",
                &stats.rejected_invalid,
            )
        }
    };
    let max = shared.config.max_publish_bytes;
    if len > max as u64 {
        let msg = format!("body of {len} bytes is over the limit of {max} bytes");
        return reject(Status::PayloadTooLarge, &msg, &stats.rejected_too_large);
    }
    let total = head.len + len as usize;
    if buf.len() < total {
        return Route::NeedBody;
    }
    if shared.is_draining() {
        ShardStats::add(&stats.rejected_draining, 1);
        return respond(
            response::json_error(
                Status::Unavailable,
                "server is draining; publish to another node",
                false,
            ),
            total,
        );
    }
    let limits = body::BodyLimits::of(&shared.config);
    let bytes = match body::parse(&buf[head.len..total], limits) {
        Err(e) => {
            ShardStats::add(&stats.rejected_invalid, 1);
            response::json_error(Status::BadRequest, &e.0, false)
        }
        Ok(specs) => match publisher.publish_specs(&specs) {
            Ok(n) => response::build(
                Status::Accepted,
                "application/json",
                format!("{{\"accepted\":{n}}}").as_bytes(),
                false,
                "",
            ),
            Err(PublishError::Draining) => response::json_error(
                Status::Unavailable,
                "server is draining; publish to another node",
                false,
            ),
            Err(e @ PublishError::BusUnavailable(_)) => {
                response::json_error(Status::Unavailable, &e.to_string(), false)
            }
            Err(e) if e.is_too_large() => {
                ShardStats::add(&stats.rejected_too_large, 1);
                response::json_error(Status::PayloadTooLarge, &e.to_string(), false)
            }
            Err(e @ (PublishError::Invalid(_) | PublishError::InvalidItem(..))) => {
                ShardStats::add(&stats.rejected_invalid, 1);
                response::json_error(Status::BadRequest, &e.to_string(), false)
            }
        },
    };
    respond(bytes, total)
}
