//! The publish handle: a cheap, cloneable, thread-safe way to put events on the stream.
//!
//! An event is validated, then encoded once into a shared frame (`ts` stamped here), then handed
//! to each shard whose interest bits say it may hold subscribers of the event's workspace. A
//! batch travels as one message per shard, so the order of events from one publisher is the
//! order every subscriber sees. Publishing never waits on a client; it waits only when a shard's
//! inbox is full (back-pressure on the publisher, never loss).

use super::body::EventSpec;
use super::event::{check_id, check_type, encode_with, Event, EventError};
use crate::bus::interest::ShardSet;
use crate::clock;
use crate::metrics::ShardStats;
use crate::server::Shared;
use crate::shard::inbox::ShardMsg;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Why a publish was refused. Nothing of a refused publish reaches any subscriber.
#[derive(Debug)]
pub enum PublishError {
    /// The event itself is invalid.
    Invalid(EventError),
    /// One event of a batch is invalid: its index and why. Nothing of the batch was published.
    InvalidItem(usize, EventError),
    /// The server is draining or stopped.
    Draining,
    /// The cluster bus cannot take the publish (Redis, or the master of one of its slots,
    /// unreachable); nothing was published unless Redis failed mid-publish (see
    /// [`crate::bus::cluster::BusUnavailable`]).
    BusUnavailable(String),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Invalid(e) => e.fmt(f),
            PublishError::InvalidItem(i, e) => write!(f, "item {i}: {e}"),
            PublishError::Draining => f.write_str("server is draining; publish to another node"),
            PublishError::BusUnavailable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for PublishError {}

impl PublishError {
    /// Whether the refusal is an event over `--max-event-bytes` (HTTP answers 413).
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            PublishError::Invalid(EventError::TooLarge(..))
                | PublishError::InvalidItem(_, EventError::TooLarge(..))
        )
    }
}

impl From<EventError> for PublishError {
    fn from(e: EventError) -> Self {
        PublishError::Invalid(e)
    }
}

/// A handle for publishing events. Clone it freely; all clones feed the same server.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Publisher { shared }
    }

    /// Publishes to every connection of `workspace_id`.
    pub fn publish<P: Serialize + ?Sized>(
        &self,
        workspace_id: &str,
        event_type: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        if self.shared.bus.is_some() {
            return self.publish_via_bus(workspace_id, None, event_type, payload);
        }
        let event = self.build(workspace_id, None, event_type, payload)?;
        self.dispatch(vec![event])
    }

    /// Publishes to every connection of `user_id` in `workspace_id`.
    pub fn publish_user<P: Serialize + ?Sized>(
        &self,
        workspace_id: &str,
        user_id: &str,
        event_type: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        check_id(user_id, "user_id", self.shared.config.max_id_bytes)?;
        if self.shared.bus.is_some() {
            return self.publish_via_bus(workspace_id, Some(user_id), event_type, payload);
        }
        let event = self.build(workspace_id, Some(user_id), event_type, payload)?;
        self.dispatch(vec![event])
    }

    /// A library publish through the cluster bus: the same checks as a local one, then one
    /// wire message; this node delivers it when Redis hands it back, like every other node.
    fn publish_via_bus<P: Serialize + ?Sized>(
        &self,
        ws: &str,
        user: Option<&str>,
        kind: &str,
        payload: &P,
    ) -> Result<(), PublishError> {
        let cfg = &self.shared.config;
        check_id(ws, "workspace_id", cfg.max_id_bytes)?;
        check_type(kind)?;
        let body = serde_json::to_vec(payload).map_err(|e| EventError::Serialize(e.to_string()))?;
        if body.first() != Some(&b'{') {
            return Err(EventError::PayloadNotObject.into());
        }
        if crate::json::max_depth(&body) > cfg.max_json_depth {
            return Err(EventError::TooDeep(cfg.max_json_depth).into());
        }
        let ts = clock::now_ms();
        let size = encode_with(kind, body.len(), ts, |b| b.extend_from_slice(&body)).len();
        if size > cfg.max_event_bytes {
            return Err(EventError::TooLarge(size, cfg.max_event_bytes).into());
        }
        let message = super::wire::encode(kind, user, ts, &body);
        self.send_to_bus(&[(super::wire::channel(ws), message)])
    }

    fn send_to_bus(&self, messages: &[(Vec<u8>, Vec<u8>)]) -> Result<(), PublishError> {
        let stats = &self.shared.bus_stats;
        if self.shared.is_draining() {
            ShardStats::add(&stats.rejected_draining, 1);
            return Err(PublishError::Draining);
        }
        let bus = self.shared.bus.as_ref().expect("called with a bus");
        match bus.publish(messages) {
            Ok(()) => {
                ShardStats::add(&stats.published, messages.len() as u64);
                Ok(())
            }
            Err(e) => {
                ShardStats::add(&stats.rejected_bus_unavailable, 1);
                Err(PublishError::BusUnavailable(e.0))
            }
        }
    }

    fn build<P: Serialize + ?Sized>(
        &self,
        ws: &str,
        user: Option<&str>,
        kind: &str,
        payload: &P,
    ) -> Result<Event, PublishError> {
        let cfg = &self.shared.config;
        check_id(ws, "workspace_id", cfg.max_id_bytes)?;
        check_type(kind)?;
        let mut err = None;
        let frame = encode_with(kind, 64, clock::now_ms(), |buf| {
            let start = buf.len();
            if let Err(e) = serde_json::to_writer(&mut *buf, payload) {
                err = Some(EventError::Serialize(e.to_string()));
            } else if buf.get(start) != Some(&b'{') {
                err = Some(EventError::PayloadNotObject);
            } else if crate::json::max_depth(&buf[start..]) > cfg.max_json_depth {
                err = Some(EventError::TooDeep(cfg.max_json_depth));
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        if frame.len() > cfg.max_event_bytes {
            return Err(EventError::TooLarge(frame.len(), cfg.max_event_bytes).into());
        }
        Ok(Event {
            workspace_id: ws.into(),
            user_id: user.map(Into::into),
            frame,
            accepted_at: Instant::now(),
        })
    }

    /// Publishes already-validated events from a publish body, in order, all or nothing.
    pub fn publish_specs(&self, specs: &[EventSpec<'_>]) -> Result<usize, PublishError> {
        if self.shared.bus.is_some() {
            return self.publish_specs_via_bus(specs);
        }
        let ts = clock::now_ms();
        let now = Instant::now();
        let events: Vec<Event> = specs
            .iter()
            .map(|s| Event {
                workspace_id: (*s.workspace_id).into(),
                user_id: s.user_id.as_deref().map(Into::into),
                frame: encode_with(&s.kind, s.payload.len(), ts, |buf| {
                    crate::json::minify_into(buf, s.payload.as_bytes())
                }),
                accepted_at: now,
            })
            .collect();
        let max = self.shared.config.max_event_bytes;
        if let Some((i, e)) = events.iter().enumerate().find(|(_, e)| e.frame.len() > max) {
            let err = EventError::TooLarge(e.frame.len(), max);
            return Err(if events.len() == 1 {
                PublishError::Invalid(err)
            } else {
                PublishError::InvalidItem(i, err)
            });
        }
        let n = events.len();
        self.dispatch(events)?;
        Ok(n)
    }

    /// An HTTP publish through the cluster bus: every event checked and sized first, then all of
    /// them in one pipelined write.
    fn publish_specs_via_bus(&self, specs: &[EventSpec<'_>]) -> Result<usize, PublishError> {
        let ts = clock::now_ms();
        let max = self.shared.config.max_event_bytes;
        let mut messages = Vec::with_capacity(specs.len());
        let mut payload = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            payload.clear();
            crate::json::minify_into(&mut payload, s.payload.as_bytes());
            let size = encode_with(&s.kind, payload.len(), ts, |b| {
                b.extend_from_slice(&payload)
            })
            .len();
            if size > max {
                let err = EventError::TooLarge(size, max);
                return Err(if specs.len() == 1 {
                    PublishError::Invalid(err)
                } else {
                    PublishError::InvalidItem(i, err)
                });
            }
            let message = super::wire::encode(&s.kind, s.user_id.as_deref(), ts, &payload);
            messages.push((super::wire::channel(&s.workspace_id), message));
        }
        if messages.is_empty() {
            return Ok(0);
        }
        self.send_to_bus(&messages)?;
        Ok(messages.len())
    }

    fn dispatch(&self, events: Vec<Event>) -> Result<(), PublishError> {
        if self.shared.is_draining() {
            ShardStats::add(&self.shared.bus_stats.rejected_draining, 1);
            return Err(PublishError::Draining);
        }
        if events.is_empty() {
            return Ok(());
        }
        let mut targets = ShardSet::default();
        for e in &events {
            targets.union(self.shared.interest.shards_for(&e.workspace_id));
        }
        let count = events.len() as u64;
        let batch: Arc<[Event]> = events.into();
        for (i, link) in self.shared.links.iter().enumerate() {
            if !targets.contains(i) {
                continue;
            }
            match link.send(ShardMsg::Events(batch.clone())) {
                Ok(false) => {}
                Ok(true) => ShardStats::add(&self.shared.shard_stats[i].inbox_waits, 1),
                // The shard has exited: only happens once a drain has finished.
                Err(_) => return Err(PublishError::Draining),
            }
        }
        ShardStats::add(&self.shared.bus_stats.published, count);
        Ok(())
    }
}
