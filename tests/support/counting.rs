//! A counting global allocator and a socket-free subscriber, shared by
//! `tests/fanout_allocations.rs` and `benches/fanout.rs` (included with `#[path]`).

use causeloop_stream::shard::fanout::Subscriber;
use causeloop_stream::shard::outbox::Outbox;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Forwards to the system allocator and counts allocations and reallocations.
pub struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

/// Allocations (and reallocations) made so far by the whole process.
pub fn allocations() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

/// A subscriber without a socket: its queue is flushed into `io::sink`.
#[derive(Default)]
pub struct Sub {
    pub out: Outbox,
    pub dirty: bool,
}

impl Subscriber for Sub {
    fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }
    fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }
}
