//! Accepting sockets, reading the request head, answering HTTP, and the upgrade: 101, then the
//! token and workspace checks, then the subscription and the `connected` frame.

use super::conn::{Conn, Phase};
use super::Shard;
use crate::auth::{jwt, AuthError, Identity};
use crate::bus::event::connected_frame;
use crate::clock;
use crate::http::request::{parse_head, route_public, PublicRoute};
use crate::http::{response, Status};
use crate::metrics::ShardStats;
use crate::ws::close::CloseReason;
use crate::ws::upgrade;
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Connections accepted per wake-up before other work gets a turn.
const ACCEPT_BUDGET: usize = 256;
/// Pause before accepting again after running out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Shard {
    pub(super) fn accept(&mut self, now: Instant) {
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
                    self.add_conn(stream, now)
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
                    self.accept_pending = false;
                    self.accept_retry = Some(now + ACCEPT_BACKOFF);
                    return;
                }
                Err(e) => log::debug!("shard {}: accept: {e}", self.index),
            }
        }
        self.accept_pending = true;
    }

    fn add_conn(&mut self, mut stream: TcpStream, now: Instant) {
        // TCP_NODELAY and SO_SNDBUF come from the listening socket (see server::bind).
        let over_limit =
            self.shared.open_sockets.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            log::warn!("shard {}: register: {e}", self.index);
            self.shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let opened_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        entry.insert(Conn::new(stream, self.next_gen, over_limit, opened_ms));
        ShardStats::add(&self.stats().accepted, 1);
        let due = self.tick_of(now) + self.limits.handshake_ticks;
        self.set_timer(key, due);
    }

    pub(super) fn on_head_bytes(&mut self, key: usize, data: &[u8], now: Instant) {
        let max = self.limits.max_head;
        let max_headers = self.limits.max_headers;
        let conn = &mut self.conns[key];
        let (route, rest) = if conn.inbuf.is_empty() {
            // The common case: the whole head arrived in one read. Parse it where it lies.
            match parse_head(data, max, max_headers) {
                Ok(None) => {
                    conn.inbuf
                        .extend_from_slice(&data[..data.len().min(max + 1)]);
                    return;
                }
                Err(e) => (PublicRoute::Reject(e.status()), Vec::new()),
                Ok(Some(head)) => (route_public(&head), data[head.len..].to_vec()),
            }
        } else {
            let buf = &mut conn.inbuf;
            let room = (max + 1).saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
            let (route, head_len) = match parse_head(buf, max, max_headers) {
                Ok(None) => return,
                Err(e) => (PublicRoute::Reject(e.status()), buf.len()),
                Ok(Some(head)) => (route_public(&head), head.len),
            };
            // The head is done with; whatever followed it is the start of the client's frames.
            buf.drain(..head_len);
            (route, std::mem::take(buf))
        };
        match route {
            PublicRoute::Reject(status) => self.respond_http(key, response::plain(status, true)),
            PublicRoute::Health { head } => {
                let resp = response::build(Status::Ok, "text/plain", b"ok\n", true, "");
                self.respond_http(
                    key,
                    if head {
                        response::head_only(resp)
                    } else {
                        resp
                    },
                )
            }
            PublicRoute::Ready { head } => {
                let resp = if self.shared.is_ready() {
                    response::build(Status::Ok, "text/plain", b"ready\n", true, "")
                } else {
                    response::build(Status::Unavailable, "text/plain", b"draining\n", true, "")
                };
                self.respond_http(
                    key,
                    if head {
                        response::head_only(resp)
                    } else {
                        resp
                    },
                )
            }
            PublicRoute::Stream { key: ws_key, query } => {
                self.upgrade(
                    key,
                    &ws_key,
                    query.token.as_deref(),
                    query.workspace.as_deref(),
                    now,
                );
                if !rest.is_empty() {
                    self.on_frame_bytes(key, &rest);
                }
            }
        }
    }

    fn respond_http(&mut self, key: usize, bytes: Vec<u8>) {
        ShardStats::add(&self.stats().http_responses, 1);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Http;
        conn.close_when_flushed = true;
        self.enqueue(key, bytes.into());
    }

    fn upgrade(
        &mut self,
        key: usize,
        ws_key: &[u8],
        token: Option<&[u8]>,
        workspace: Option<&str>,
        now: Instant,
    ) {
        self.enqueue(key, upgrade::response(ws_key).into());
        self.cancel_timer(key);
        self.conns[key].phase = Phase::Closing; // until subscribed below
        if self.drain_deadline.is_some() {
            return self.close_ws(key, CloseReason::GoingAway);
        }
        if self.conns[key].over_limit {
            return self.close_ws(key, CloseReason::TryAgainLater);
        }
        let now_ms = clock::now_ms();
        let verified = match token {
            None => Err(AuthError::Missing),
            Some(t) => jwt::verify(t, &self.keys, &self.rules, now_ms / 1000),
        };
        let identity = match verified {
            Ok(id) if workspace == Some(&*id.workspace_id) => Ok(id),
            Ok(_) => Err(AuthError::WorkspaceMismatch),
            Err(e) => Err(e),
        };
        match identity {
            Ok(id) => self.subscribe(key, id, now_ms, now),
            Err(e) => {
                if log::log_enabled!(log::Level::Debug) {
                    let peer = self.conns[key]
                        .stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    log::debug!(conn = key, shard = self.index, peer = peer.as_str(), reason = e.label(); "connection refused");
                }
                self.stats().auth_failure(e);
                self.close_ws(key, e.close_reason());
            }
        }
    }

    fn subscribe(&mut self, key: usize, id: Identity, now_ms: u64, now: Instant) {
        // The registry sets this shard's interest bit before `connected` is queued, so a client
        // that has seen `connected` is reachable by every publish that starts after it.
        self.registry.add(key, &id.workspace_id, &id.user_id);
        let tick = self.tick_of(now);
        let expires_ms = id
            .exp
            .saturating_add(self.rules.leeway_secs)
            .saturating_mul(1000);
        let until_expiry = Duration::from_millis(expires_ms.saturating_sub(now_ms));
        if !self.registry.is_live(&id.workspace_id) {
            // The cluster bus has not confirmed this workspace yet: `connected` waits for it (see
            // `on_live`), or the connection is closed 1013 at the handshake deadline.
            let conn = &mut self.conns[key];
            conn.phase = Phase::Open;
            conn.was_open = true;
            conn.awaiting_live = true;
            conn.expires = tick + super::ticks(until_expiry, self.limits.tick);
            ShardStats::add(&self.stats().open, 1);
            let due = tick + self.limits.handshake_ticks;
            self.set_timer(key, due);
            return;
        }
        let frame = connected_frame(&id.workspace_id, &id.user_id, now_ms);
        if log::log_enabled!(log::Level::Debug) {
            let peer = self.conns[key]
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            log::debug!(
                conn = key, shard = self.index, workspace = &*id.workspace_id, user = &*id.user_id, peer = peer.as_str();
                "connection open"
            );
        }
        let conn = &mut self.conns[key];
        conn.phase = Phase::Open;
        conn.was_open = true;
        conn.next_heartbeat = tick + self.limits.heartbeat_ticks;
        conn.expires = tick + super::ticks(until_expiry, self.limits.tick);
        ShardStats::add(&self.stats().subscribed, 1);
        ShardStats::add(&self.stats().open, 1);
        self.arm_open_timer(key);
        self.enqueue(key, frame);
    }

    /// The cluster bus confirmed `workspace`: its waiting connections get `connected` now, and
    /// their heartbeats start from here.
    pub(super) fn on_live(&mut self, workspace: &str, now: Instant) {
        let now_ms = clock::now_ms();
        let tick = self.tick_of(now);
        for key in self.registry.set_live(workspace) {
            let key = key as usize;
            let Some((ws, user)) = self.registry.names(key) else {
                continue;
            };
            let frame = connected_frame(ws, user, now_ms);
            let conn = &mut self.conns[key];
            if !std::mem::take(&mut conn.awaiting_live) || conn.phase != Phase::Open {
                continue;
            }
            conn.next_heartbeat = tick + self.limits.heartbeat_ticks;
            ShardStats::add(&self.stats().subscribed, 1);
            self.arm_open_timer(key);
            self.enqueue(key, frame);
        }
    }
}
