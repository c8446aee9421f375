//! The per-subscriber step of delivery: queue a reference to one shared frame on every
//! recipient. This is the innermost loop of the server, so it is kept apart, free of I/O, and
//! generic over the connection type, so that the benchmark and the allocation test run exactly
//! the code the shard runs.
//!
//! Per recipient it does: one reference-count increment, one push onto a queue that keeps its
//! capacity between flushes, and two flag checks. No encode, no copy, and once a connection's
//! queue has grown to its working size, no allocation.

use super::outbox::Outbox;
use crate::ws::SharedFrame;
use slab::Slab;

/// What fan-out needs from a connection.
pub trait Subscriber {
    /// The connection's outbound queue.
    fn outbox(&mut self) -> &mut Outbox;
    /// Marks the connection as having queued frames; returns true if it was not marked yet.
    fn mark_dirty(&mut self) -> bool;
}

/// Queues `frame` on each of `recipients`. Connections that become dirty are pushed onto
/// `dirty` (once each); those whose unsent bytes pass `max_outbound` onto `slow`.
pub fn fan_out<C: Subscriber>(
    frame: &SharedFrame,
    recipients: &[u32],
    conns: &mut Slab<C>,
    dirty: &mut Vec<u32>,
    slow: &mut Vec<u32>,
    max_outbound: usize,
) {
    for &k in recipients {
        let conn = &mut conns[k as usize];
        let out = conn.outbox();
        out.push(frame.clone());
        let over = out.pending_bytes() > max_outbound;
        if conn.mark_dirty() {
            dirty.push(k);
        }
        if over {
            slow.push(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        out: Outbox,
        dirty: bool,
    }

    impl Subscriber for Fake {
        fn outbox(&mut self) -> &mut Outbox {
            &mut self.out
        }
        fn mark_dirty(&mut self) -> bool {
            !std::mem::replace(&mut self.dirty, true)
        }
    }

    #[test]
    fn marks_each_recipient_once_and_flags_slow_ones() {
        let mut conns: Slab<Fake> = Slab::new();
        for _ in 0..4 {
            conns.insert(Fake::default());
        }
        let (mut dirty, mut slow) = (Vec::new(), Vec::new());
        let frame = SharedFrame::from(vec![0u8; 600]);
        fan_out(&frame, &[0, 2, 3], &mut conns, &mut dirty, &mut slow, 1000);
        fan_out(&frame, &[2, 3], &mut conns, &mut dirty, &mut slow, 1000);
        assert_eq!(dirty, vec![0, 2, 3]);
        assert_eq!(slow, vec![2, 3]);
        assert_eq!(conns[1].out.pending_bytes(), 0);
        assert_eq!(conns[2].out.pending_bytes(), 1200);
        assert_eq!(std::sync::Arc::strong_count(&frame), 6);
    }
}
