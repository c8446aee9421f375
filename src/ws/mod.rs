//! RFC 6455 on the server side, as pure functions over bytes.
//!
//! - [`frame`]: encoding server frames (never masked) once into shared buffers.
//! - [`decoder`]: an incremental, bounded decoder for masked client frames.
//! - [`close`]: the close codes this server sends and the error-to-code table.
//! - [`upgrade`]: the `101 Switching Protocols` response.

pub mod close;
pub mod decoder;
pub mod deflate;
pub mod extensions;
pub mod frame;
pub mod oneshot;
pub mod upgrade;

use std::sync::Arc;

/// An encoded server frame, header and payload, shared by reference among every connection that
/// sends it. Built once per event, never copied per subscriber, and not copied after it is
/// built either: the buffer it was written into becomes the shared frame as it is (a frame is
/// written after room for the longest header, and starts where its header does).
///
/// A thin pointer: one word in each queue slot, one reference count per recipient.
#[derive(Clone)]
pub struct SharedFrame(Arc<FrameBytes>);

struct FrameBytes {
    buf: Vec<u8>,
    start: usize,
}

impl SharedFrame {
    /// The bytes of `buf` from `start` on, as a frame, without copying them.
    pub fn from_vec_at(buf: Vec<u8>, start: usize) -> SharedFrame {
        debug_assert!(start <= buf.len());
        SharedFrame(Arc::new(FrameBytes { buf, start }))
    }

    /// The capacity of the buffer behind the frame (for the tests of exact sizing).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.0.buf.capacity()
    }

    /// Whether `a` and `b` are the same buffer (not merely equal bytes).
    pub fn ptr_eq(a: &SharedFrame, b: &SharedFrame) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// How many references to this buffer exist (this one included).
    pub fn strong_count(this: &SharedFrame) -> usize {
        Arc::strong_count(&this.0)
    }
}

impl std::ops::Deref for SharedFrame {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        &self.0.buf[self.0.start..]
    }
}

impl From<Vec<u8>> for SharedFrame {
    fn from(buf: Vec<u8>) -> Self {
        SharedFrame::from_vec_at(buf, 0)
    }
}

impl PartialEq for SharedFrame {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedFrame {}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedFrame({} bytes)", self.len())
    }
}
