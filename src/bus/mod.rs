//! The event bus: from a publish call to the shards, in process or through Redis.
//!
//! - [`body`]: validation of `POST /v1/publish` bodies.
//! - [`publisher`]: the cloneable [`Publisher`] handle (library `publish`/`publish_user`, and
//!   the internal listener's non-blocking path).
//! - [`cluster`]: the Redis bus that carries events between nodes (`--bus redis://`,
//!   `--bus redis-cluster://`): its thread, connections, publish client and subscription
//!   protocol.
//! - [`topology`]: which Redis server a channel goes to (hash slots on a Redis Cluster).
//! - [`resp`]: the Redis protocol, for the cluster bus.
//! - [`wire`]: the cluster wire format, version 1: channels and messages on Redis.
//!
//! Events themselves (validation, encoding once) are [`crate::event`]; how they reach the
//! shards is [`crate::dispatch`].

pub mod body;
pub mod cluster;
pub mod publisher;
pub mod resp;
pub mod topology;
pub mod wire;

pub use publisher::{PublishError, Publisher};
