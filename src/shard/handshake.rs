//! Accepting sockets, reading the request head, answering HTTP, and the upgrade: 101, then the
//! token and workspace checks, then the subscription and the `connected` frame.
//!
//! The path allocates as little as a connection needs to live: the head is parsed where it was
//! read, the query, the key and the token are borrowed from it, the token is decoded into the
//! shard's working buffer, and the 101 response and `connected` go out in one shared buffer.
//! What remains per connection is its user id in the registry (shared by that user's
//! connections) and that one buffer.

use super::conn::{Conn, Open, Phase};
use super::registry::Stream;
use super::{Next, Shard, Turn};
use crate::auth::{jwt, AuthError, Identity};
use crate::dispatch::BusInterest;
use crate::event::connected_frame_into;
use crate::fault::{self, Point};
use crate::http::request::{parse_head, route_public, PublicRoute};
use crate::http::{response, Status};
use crate::metrics::ShardStats;
use crate::ws::close::CloseReason;
use crate::ws::{upgrade, SharedFrame};
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// Connections accepted per wake-up before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Pause before accepting again after running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Shard {
    pub(super) fn accept(&mut self, turn: &Turn) {
        for _ in 0..ACCEPT_BUDGET {
            let res = match &self.listener {
                Some(l) => l.accept(),
                None => {
                    self.accept_pending = false;
                    return;
                }
            };
            match res {
                Ok((stream, _peer)) => {
                    if std::mem::take(&mut self.accept_starved) {
                        log::warn!("shard {}: accepting again", self.index);
                    }
                    ShardStats::add(&self.stats().accepted, 1);
                    self.add_conn_guarded(stream, turn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Warn once per episode, not every back-off: the condition lasts as long as
                    // descriptors stay short, and the log must not become the next problem.
                    if !self.accept_starved {
                        self.accept_starved = true;
                        log::warn!(
                            "shard {}: accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?} at a time until descriptors free up",
                            self.index
                        );
                    }
                    ShardStats::add(&self.stats().accept_pauses, 1);
                    self.accept_pending = false;
                    self.accept_retry = Some(turn.now + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => log::debug!("shard {}: accept: {e}", self.index),
            }
        }
        self.accept_pending = true;
    }

    /// Takes in one accepted socket; a panic while doing so closes that socket and nothing else.
    fn add_conn_guarded(&mut self, stream: TcpStream, turn: &Turn) {
        let key = self.conns.vacant_key();
        if catch_unwind(AssertUnwindSafe(|| self.add_conn(stream, turn))).is_err() {
            ShardStats::add(&self.stats().handler_panics, 1);
            log::error!(
                "shard {}: accepting a connection panicked; closing it",
                self.index
            );
            // Dropped while unwinding if it never made it into the slab; removed at the end of
            // the turn if it did.
            self.kill(key);
        }
    }

    fn add_conn(&mut self, mut stream: TcpStream, turn: &Turn) {
        fault::point(&self.faults, Point::Accept, || None);
        // TCP_NODELAY and SO_SNDBUF come from the listening socket (see server::bind).
        let tls = match &self.tls {
            Some(config) => match super::tls::TlsConn::new(config.clone()) {
                Ok(session) => Some(Box::new(session)),
                Err(e) => {
                    log::warn!("shard {}: TLS session: {e}", self.index);
                    return;
                }
            },
            None => None,
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            log::warn!("shard {}: register: {e}", self.index);
            return;
        }
        let over_limit = self.lifecycle.socket_opened() >= self.limits.max_connections;
        self.next_gen = self.next_gen.wrapping_add(1);
        let opened_ms = turn.now.saturating_duration_since(self.started).as_millis() as u64;
        entry.insert(Conn::new(stream, tls, self.next_gen, over_limit, opened_ms));
        self.set_timer(key, turn.tick + self.limits.handshake_ticks);
    }

    /// Bytes of the request head: parsed once complete, where they lie when they came in one
    /// read (the common case), else from the connection's head buffer.
    pub(super) fn on_head_bytes(&mut self, key: usize, data: &[u8], turn: &Turn) -> Next {
        let (max, max_headers) = (self.limits.max_head, self.limits.max_headers);
        let conn = &mut self.conns[key];
        if conn.inbuf.is_empty() {
            return match parse_head(data, max, max_headers) {
                Ok(None) => {
                    conn.inbuf
                        .extend_from_slice(&data[..data.len().min(max + 1)]);
                    Next::Continue
                }
                Err(e) => self.respond_http(key, response::plain(e.status(), true)),
                Ok(Some(head)) => {
                    let route = route_public(&head);
                    if self.awaits_body(&route, head.len, data.len()) {
                        let keep = data.len().min(max + 1);
                        self.conns[key].inbuf.extend_from_slice(&data[..keep]);
                        return Next::Continue;
                    }
                    self.on_route(key, route, &data[head.len..], turn)
                }
            };
        }
        let room = (max + 1).saturating_sub(conn.inbuf.len());
        conn.inbuf.extend_from_slice(&data[..data.len().min(room)]);
        // Out of the connection while its head is routed (the route borrows from it); whatever
        // follows the head is the start of the client's frames.
        let buf = std::mem::take(&mut conn.inbuf);
        match parse_head(&buf, max, max_headers) {
            Ok(None) => {
                self.conns[key].inbuf = buf;
                Next::Continue
            }
            Err(e) => self.respond_http(key, response::plain(e.status(), true)),
            Ok(Some(head)) => {
                let route = route_public(&head);
                if self.awaits_body(&route, head.len, buf.len()) {
                    drop(route);
                    self.conns[key].inbuf = buf;
                    return Next::Continue;
                }
                self.on_route(key, route, &buf[head.len..], turn)
            }
        }
    }

    /// A `--dev` publish whose body has not all arrived, and can within the head buffer's
    /// bound (`have`: the bytes so far, head included). Anything else is answered now.
    fn awaits_body(&self, route: &PublicRoute<'_>, head_len: usize, have: usize) -> bool {
        match route {
            PublicRoute::DevPublish {
                content_length: Some(n),
            } if self.dev.is_some() => {
                let want = head_len.saturating_add(*n as usize);
                *n as usize <= crate::dev_site::MAX_BODY
                    && have < want
                    && want <= self.limits.max_head + 1
            }
            _ => false,
        }
    }

    fn on_route(&mut self, key: usize, route: PublicRoute<'_>, rest: &[u8], turn: &Turn) -> Next {
        let ready = self.lifecycle.is_ready();
        let probe = |body: &'static [u8], status: Status, head: bool| {
            let resp = response::build(status, "text/plain", body, true, "");
            if head {
                response::head_only(resp)
            } else {
                resp
            }
        };
        match route {
            PublicRoute::Reject(status) => self.respond_http(key, response::plain(status, true)),
            PublicRoute::Health { head } => {
                self.respond_http(key, probe(b"ok\n", Status::Ok, head))
            }
            PublicRoute::Ready { head } if ready => {
                self.respond_http(key, probe(b"ready\n", Status::Ok, head))
            }
            PublicRoute::Ready { head } => {
                self.respond_http(key, probe(b"draining\n", Status::Unavailable, head))
            }
            PublicRoute::Root { head } => match &self.dev {
                Some(dev) if head => {
                    self.respond_http(key, response::head_only(dev.page().to_vec()))
                }
                Some(dev) => {
                    let page = dev.page();
                    ShardStats::add(&self.stats().http_responses, 1);
                    let conn = &mut self.conns[key];
                    conn.phase = Phase::Http;
                    conn.close_when_flushed = true;
                    self.enqueue(key, page);
                    Next::Continue
                }
                None => self.respond_http(key, response::plain(Status::NotFound, true)),
            },
            PublicRoute::DevPublish { content_length } => {
                use crate::dev_site::{DevPublish, MAX_BODY};
                let Some(dev) = &self.dev else {
                    return self.respond_http(key, response::plain(Status::NotFound, true));
                };
                let answer = match content_length.map(|n| n as usize) {
                    None => response::plain(Status::LengthRequired, true),
                    Some(n) if n > MAX_BODY || rest.len() < n => {
                        response::plain(Status::PayloadTooLarge, true)
                    }
                    Some(n) => match dev.publish(&rest[..n]) {
                        DevPublish::Queued => response::build(
                            Status::Accepted,
                            "application/json",
                            b"{\"queued\":1}",
                            true,
                            "",
                        ),
                        DevPublish::Invalid(why) => {
                            response::json_error(Status::BadRequest, &why, true)
                        }
                        DevPublish::Busy => response::json_error(
                            Status::Unavailable,
                            "the dev page's publisher is busy; try again",
                            true,
                        ),
                    },
                };
                self.respond_http(key, answer)
            }
            PublicRoute::Stream {
                key: ws_key,
                query,
                deflate,
            } => {
                let deflate = deflate.filter(|_| self.limits.compression);
                self.conns[key].deflate = deflate;
                let next = self.upgrade(
                    key,
                    ws_key,
                    query.token.as_deref(),
                    query.workspace.as_deref(),
                    turn,
                );
                if next != Next::Continue || rest.is_empty() {
                    return next;
                }
                self.on_frame_bytes(key, rest, turn)
            }
        }
    }

    fn respond_http(&mut self, key: usize, bytes: Vec<u8>) -> Next {
        ShardStats::add(&self.stats().http_responses, 1);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Http;
        conn.close_when_flushed = true;
        self.enqueue(key, bytes.into());
        Next::Continue
    }

    /// Answers 101, then decides: refused (one close frame follows the 101, nothing else), or
    /// subscribed.
    fn upgrade(
        &mut self,
        key: usize,
        ws_key: &[u8],
        token: Option<&[u8]>,
        workspace: Option<&str>,
        turn: &Turn,
    ) -> Next {
        self.cancel_timer(key);
        let mut out = Vec::with_capacity(upgrade::RESPONSE_LEN + 160);
        upgrade::write_response_with(&mut out, ws_key, self.conns[key].deflate.is_some());
        if self.drain_deadline.is_some() {
            return self.refuse(key, out, CloseReason::GoingAway, turn);
        }
        if self.conns[key].over_limit {
            return self.refuse(key, out, CloseReason::TryAgainLater, turn);
        }
        let mut buf = std::mem::take(&mut self.token_buf);
        let verified = match token {
            None => Err(AuthError::Missing),
            Some(t) => jwt::verify(t, &self.keys, &self.rules, turn.now_ms / 1000, &mut buf),
        };
        let identity = match verified {
            Ok(id) if workspace == Some(&*id.workspace_id) => Ok(id),
            Ok(_) => Err(AuthError::WorkspaceMismatch),
            Err(e) => Err(e),
        };
        let next = match identity {
            Ok(id) => self.subscribe(key, &id, token.unwrap_or_default(), out, turn),
            Err(e) => {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!(conn = key, shard = self.index, peer = self.peer(key).as_str(), reason = e.label(); "connection refused");
                }
                self.stats().auth_failure(e);
                self.refuse(key, out, e.close_reason(), turn)
            }
        };
        self.token_buf = buf;
        next
    }

    /// The 101 (in `out`) goes out alone, and the close frame for `reason` right behind it.
    fn refuse(&mut self, key: usize, out: Vec<u8>, reason: CloseReason, turn: &Turn) -> Next {
        self.enqueue(key, SharedFrame::from(out));
        self.send_close(key, reason, turn);
        Next::Continue
    }

    fn subscribe(
        &mut self,
        key: usize,
        id: &Identity<'_>,
        token: &[u8],
        mut out: Vec<u8>,
        turn: &Turn,
    ) -> Next {
        // The interest bit is set before `connected` is queued, so a client that has seen
        // `connected` is reachable by every publish that starts after it. With history on, the
        // connection joins as a member only (it becomes a recipient once its stream is
        // decided, see `start_stream`), and a workspace's first member here reads where the
        // history stands after setting the bit: every event after that reaches this shard.
        let first = if self.delivery.is_some() {
            self.registry.join(key, &id.workspace_id, &id.user_id)
        } else {
            self.registry.add(key, &id.workspace_id, &id.user_id)
        };
        if first {
            self.interest.gained(&id.workspace_id);
            self.tell_bus(BusInterest::Add((*id.workspace_id).into(), self.index));
            if let Some(d) = &self.delivery {
                let head = d.history.head(&id.workspace_id, turn.now);
                if let Some(s) = self.registry.stream_mut(&id.workspace_id) {
                    *s = if d.from_bus && head.epoch == 0 {
                        Stream::UNKNOWN
                    } else {
                        Stream {
                            epoch: head.epoch,
                            next: head.offset + 1,
                        }
                    };
                }
            }
        }
        let expires_ms = id
            .exp
            .saturating_add(self.rules.leeway_secs)
            .saturating_mul(1000);
        let until_expiry = Duration::from_millis(expires_ms.saturating_sub(turn.now_ms));
        let expires = turn.tick + super::ticks(until_expiry, self.limits.tick);
        let live = self.registry.is_live(&id.workspace_id);
        let conn = &mut self.conns[key];
        conn.was_open = true;
        ShardStats::add(&self.stats_all[self.index].open, 1);
        if !live {
            // The cluster bus has not confirmed this workspace yet: `connected` waits for it
            // (see `on_live`), or the connection is closed 1013 at the handshake deadline.
            conn.phase = Phase::Open(Open::new(0, expires, true));
            let gen = conn.gen;
            self.enqueue(key, SharedFrame::from(out));
            if self.delivery.is_some() {
                // Its stream starts with `connected` (see `on_live`).
                let rk = crate::history::records::record_key(token, &id.workspace_id);
                self.await_stream(key, gen, rk, id.iat);
            }
            self.set_timer(key, turn.tick + self.limits.handshake_ticks);
            return Next::Continue;
        }
        conn.phase = Phase::Open(Open::new(
            turn.tick + self.limits.heartbeat_ticks,
            expires,
            false,
        ));
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                conn = key, shard = self.index, workspace = &*id.workspace_id, user = &*id.user_id, peer = self.peer(key).as_str();
                "connection open"
            );
        }
        ShardStats::add(&self.stats().subscribed, 1);
        self.arm_open_timer(key);
        // The 101 and `connected` in one buffer: one allocation, one write.
        connected_frame_into(&mut out, &id.workspace_id, &id.user_id, turn.now_ms);
        self.enqueue(key, SharedFrame::from(out));
        if self.delivery.is_some() {
            let rk = crate::history::records::record_key(token, &id.workspace_id);
            return self.start_stream(key, rk, id.iat, turn);
        }
        Next::Continue
    }

    /// The peer's address, for debug logs only.
    pub(super) fn peer(&self, key: usize) -> String {
        self.conns[key]
            .stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    }
}
