//! A counting global allocator and a socket-free subscriber, shared by
//! `tests/fanout_allocations.rs` and the benches (included with `#[path]`).
//!
//! Besides the process-wide count, it counts the allocations made on the server's shard
//! threads (those named `shard-N`), so that a test can run a real server in the same process
//! and see what the shards' own code allocates, whatever the test's threads do meanwhile.

use causeloop_stream::shard::fanout::Subscriber;
use causeloop_stream::shard::outbox::Outbox;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Forwards to the system allocator and counts allocations and reallocations.
pub struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static SHARD_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// 0: not known yet; 1: a shard thread; 2: another thread.
    static KIND: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
    /// Finding the thread's name is under way (it may allocate): do not recurse into it.
    static ASKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Allocations made by this thread.
    static MINE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Bytes this thread asked for (allocations, and the new size of reallocations).
    static MINE_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Allocations of this thread of at least [`set_large`] bytes.
    static MINE_LARGE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static LARGE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Counts, from now on, the calling thread's allocations of at least `bytes` ([`thread_large`]):
/// with `bytes` a payload's length, each is a buffer that could hold a copy of it.
#[allow(dead_code)]
pub fn set_large(bytes: usize) {
    let _ = LARGE.try_with(|l| l.set(bytes));
}

/// The calling thread's allocations (and reallocations) of at least [`set_large`] bytes so far.
#[allow(dead_code)]
pub fn thread_large() -> u64 {
    MINE_LARGE.try_with(|m| m.get()).unwrap_or(0)
}

/// Bytes the calling thread asked the allocator for so far (each reallocation counts its new
/// size): an upper bound on what it copied into fresh buffers.
#[allow(dead_code)]
pub fn thread_bytes() -> u64 {
    MINE_BYTES.try_with(|m| m.get()).unwrap_or(0)
}

/// Allocations (and reallocations) made so far by the calling thread, whatever other tests
/// running in parallel do.
#[allow(dead_code)]
pub fn thread_allocations() -> u64 {
    MINE.try_with(|m| m.get()).unwrap_or(0)
}

/// Allocations (and reallocations) made so far by the whole process.
#[allow(dead_code)]
pub fn allocations() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

/// Allocations (and reallocations) made so far on threads named `shard-N`.
#[allow(dead_code)]
pub fn shard_allocations() -> u64 {
    SHARD_ALLOCS.load(Ordering::Relaxed)
}

fn on_shard_thread() -> bool {
    KIND.try_with(|kind| match kind.get() {
        1 => true,
        2 => false,
        _ => {
            if ASKING.try_with(|a| a.replace(true)).unwrap_or(true) {
                return false;
            }
            let shard = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("shard-"));
            let _ = ASKING.try_with(|a| a.set(false));
            kind.set(if shard { 1 } else { 2 });
            shard
        }
    })
    .unwrap_or(false)
}

fn count(bytes: usize) {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|m| m.set(m.get() + 1));
    let _ = MINE_BYTES.try_with(|m| m.set(m.get() + bytes as u64));
    if LARGE.try_with(|l| bytes >= l.get()).unwrap_or(false) {
        let _ = MINE_LARGE.try_with(|m| m.set(m.get() + 1));
    }
    if on_shard_thread() {
        SHARD_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count(n);
        unsafe { System.realloc(p, l, n) }
    }
}

/// A subscriber without a socket: its queue is flushed into `io::sink`.
#[allow(dead_code)] // not every user of this module needs it
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
