//! The per-subscriber step of delivery: queue a reference to one shared frame on every
//! recipient. This is the innermost loop of the server, so it is kept apart, free of I/O, and
//! generic over the connection type, so that the benchmark and the allocation test run exactly
//! the code the shard runs.
//!
//! Per recipient it does: one reference-count increment, one push onto a queue that keeps its
//! capacity between flushes, two flag checks, and one store of how far it got. No encode, no
//! copy, and once a connection's queue has grown to its working size, no allocation.

use super::outbox::Outbox;
use crate::ws::SharedFrame;
use slab::Slab;

/// What fan-out needs from a connection.
pub trait Subscriber {
    /// The connection's outbound queue.
    fn outbox(&mut self) -> &mut Outbox;
    /// Marks the connection as having queued frames; returns true if it was not marked yet.
    fn mark_dirty(&mut self) -> bool;
    /// The connection negotiated `permessage-deflate`.
    fn deflate(&self) -> bool {
        false
    }
}

/// Where fan-out leaves its results: connections that became dirty (once each), and those
/// whose unsent bytes passed `max_outbound`.
pub struct Queues<'a> {
    /// Connections with frames to flush.
    pub dirty: &'a mut Vec<u32>,
    /// Connections over `max_outbound`.
    pub slow: &'a mut Vec<u32>,
    /// `--max-outbound-bytes`.
    pub max_outbound: usize,
}

/// Queues `frame` on each of `recipients`, in order. `done` counts the recipients finished, so
/// that a caller that catches a panic knows which connection it came from and can carry on
/// with the next; `before(key)` runs before each (the shard's fault-injection point; a no-op
/// that compiles away otherwise).
pub fn fan_out<C: Subscriber>(
    frame: &SharedFrame,
    recipients: &[u32],
    conns: &mut Slab<C>,
    q: &mut Queues<'_>,
    done: &mut usize,
    before: impl FnMut(u32),
) {
    fan_out_with(frame, &|| None, recipients, conns, q, done, before)
}

/// [`fan_out`], queueing `deflated()` instead of `frame` on the recipients that negotiated
/// `permessage-deflate` when it gives a frame (it is asked only when one of them is met, so an
/// event no such recipient receives is never compressed).
pub fn fan_out_with<'f, C: Subscriber>(
    frame: &'f SharedFrame,
    deflated: &dyn Fn() -> Option<&'f SharedFrame>,
    recipients: &[u32],
    conns: &mut Slab<C>,
    q: &mut Queues<'_>,
    done: &mut usize,
    mut before: impl FnMut(u32),
) {
    for &k in recipients {
        before(k);
        let conn = &mut conns[k as usize];
        let f = if conn.deflate() {
            deflated().unwrap_or(frame)
        } else {
            frame
        };
        let out = conn.outbox();
        out.push(f.clone());
        let over = out.pending_bytes() > q.max_outbound;
        if conn.mark_dirty() {
            q.dirty.push(k);
        }
        if over {
            q.slow.push(k);
        }
        *done += 1;
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
        let mut q = Queues {
            dirty: &mut dirty,
            slow: &mut slow,
            max_outbound: 1000,
        };
        let frame = SharedFrame::from(vec![0u8; 600]);
        let mut done = 0;
        fan_out(&frame, &[0, 2, 3], &mut conns, &mut q, &mut done, |_| {});
        fan_out(&frame, &[2, 3], &mut conns, &mut q, &mut done, |_| {});
        assert_eq!(done, 5);
        assert_eq!(dirty, vec![0, 2, 3]);
        assert_eq!(slow, vec![2, 3]);
        assert_eq!(conns[1].out.pending_bytes(), 0);
        assert_eq!(conns[2].out.pending_bytes(), 1200);
        assert_eq!(SharedFrame::strong_count(&frame), 6);
    }

    #[test]
    fn a_panic_mid_way_leaves_the_count_at_the_connection_that_raised_it() {
        let mut conns: Slab<Fake> = Slab::new();
        for _ in 0..4 {
            conns.insert(Fake::default());
        }
        let (mut dirty, mut slow) = (Vec::new(), Vec::new());
        let frame = SharedFrame::from(vec![0u8; 10]);
        let mut done = 0;
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut q = Queues {
                dirty: &mut dirty,
                slow: &mut slow,
                max_outbound: 1000,
            };
            fan_out(&frame, &[0, 1, 2, 3], &mut conns, &mut q, &mut done, |k| {
                assert_ne!(k, 2, "planted");
            })
        }));
        assert!(caught.is_err());
        assert_eq!(done, 2, "recipients 0 and 1 were served; 2 raised it");
        assert_eq!(conns[2].out.pending_bytes(), 0);
    }
}
