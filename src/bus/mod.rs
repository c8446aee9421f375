//! The event bus: from a publish call to one shared frame per event on every shard that has
//! subscribers.
//!
//! - [`event`]: validated events and their encoding, once, into a shared frame.
//! - [`body`]: validation of `POST /v1/publish` bodies.
//! - [`interest`]: the lock-free map of which shards hold subscribers of which workspaces.
//! - [`publisher`]: the cloneable [`Publisher`] handle (library `publish`/`publish_user`).
//! - [`cluster`]: the Redis bus that carries events between nodes (`--bus redis://`,
//!   `--bus redis-cluster://`).
//! - [`topology`]: which Redis server a channel goes to (hash slots on a Redis Cluster).
//! - [`redis`]: a blocking Redis command connection.
//! - [`resp`]: the Redis protocol, for the cluster bus.
//! - [`wire`]: the cluster wire format, version 1: channels and messages on Redis.

pub mod body;
pub mod cluster;
pub mod event;
pub mod interest;
pub mod publisher;
pub mod redis;
pub mod resp;
pub mod topology;
pub mod wire;

pub use publisher::{PublishError, Publisher};
