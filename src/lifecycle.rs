//! The two things about the whole server that every thread reads: whether a drain has begun,
//! and how many public sockets are open across the shards (for `--max-connections`). Written
//! rarely (once per drain; once per accept and close), read on probes and per accept.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The server's lifecycle, shared by reference.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    open_sockets: AtomicUsize,
}

impl Lifecycle {
    /// Marks the drain as begun; returns whether it already was.
    pub fn begin_drain(&self) -> bool {
        self.draining.swap(true, Ordering::AcqRel)
    }

    /// Whether a drain has begun (never cleared).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// What `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
    }

    /// Counts a newly accepted public socket; returns how many were open before it.
    pub fn socket_opened(&self) -> usize {
        self.open_sockets.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a public socket closed.
    pub fn socket_closed(&self) {
        self.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Public sockets open right now.
    pub fn open_sockets(&self) -> usize {
        self.open_sockets.load(Ordering::Relaxed)
    }
}
