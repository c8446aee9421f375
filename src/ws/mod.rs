//! RFC 6455 on the server side, as pure functions over bytes.
//!
//! - [`frame`]: encoding server frames (never masked) once into shared buffers.
//! - [`decoder`]: an incremental, bounded decoder for masked client frames.
//! - [`close`]: the close codes this server sends and the error-to-code table.
//! - [`upgrade`]: the `101 Switching Protocols` response.

pub mod close;
pub mod decoder;
pub mod frame;
pub mod upgrade;

/// An encoded server frame, header and payload, shared by reference among every connection that
/// sends it. Built once per event, never copied per subscriber.
pub type SharedFrame = std::sync::Arc<[u8]>;
