//! causeloop-stream: a sharded WebSocket fan-out server for real-time workspace events.
//!
//! The crate is laid out by concern. Pure cores take bytes and `now` as arguments and touch no
//! socket or clock: [`ws`] (frame codec, close codes, upgrade response), [`http`] (request head
//! parsing and canned responses), [`auth`] (JWT verification and key sets), [`timer`] (the hashed
//! timer wheel), [`bus`] (event validation, encoding once, and the publish handle), [`json`] and
//! [`clock`]. The I/O lives in [`shard`] (one mio loop per worker thread), [`internal`] (the
//! publish/metrics listener) and [`server`] (start-up, signals and drain).
//!
//! Embedding the server:
//! ```no_run
//! use causeloop_stream::{config::Config, server::Server};
//! let mut config = Config::default();
//! config.jwt.hs256_secrets.push(b"a-long-random-secret".to_vec().into());
//! let server = Server::start(config).expect("bind");
//! let publisher = server.publisher();
//! publisher
//!     .publish("ws_1", "issue.created", &serde_json::json!({"id": "iss_1"}))
//!     .expect("valid event");
//! server.shutdown();
//! server.wait();
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod auth;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod dev_site;
pub mod dispatch;
pub mod event;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod http;
pub mod internal;
pub mod json;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod secret;
pub mod server;
pub mod shard;
pub mod timer;
pub mod tls;
pub mod ws;
