//! A connection's queue of frames to send: references to shared frames, written with vectored
//! writes, several frames per system call.
//!
//! The first queued frame lives inline; a `VecDeque` takes the rest. An idle connection, or one
//! that receives one frame at a time and keeps up, never allocates for its queue; one that gets
//! bursts allocates the deque once and keeps it for its life (so fan-out stays allocation-free).
//!
//! Invariants: `head` is `None` only when the deque is empty; `offset < head.len()` whenever
//! `head` is set (a fully written frame is dropped at once); `bytes` is the sum of the lengths of
//! the queued frames, `offset` included.

use crate::ws::SharedFrame;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// Most frames handed to one `writev`.
const MAX_IOV: usize = 64;

/// What a flush achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Bytes the kernel took.
    pub bytes: usize,
    /// Frames completely written.
    pub frames: usize,
    /// TLS records sealed (0 on a plain connection).
    pub records: usize,
}

/// Frames waiting to be written to one socket.
#[derive(Debug, Default)]
pub struct Outbox {
    head: Option<SharedFrame>,
    rest: VecDeque<SharedFrame>,
    offset: u32,
    bytes: u32,
}

impl Outbox {
    /// Queues a frame (a reference to it; no copy).
    pub fn push(&mut self, frame: SharedFrame) {
        self.bytes = self
            .bytes
            .saturating_add(frame.len().min(u32::MAX as usize) as u32);
        if self.head.is_none() {
            self.head = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> usize {
        (self.bytes - self.offset) as usize
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// The most recently queued frame.
    pub fn last(&self) -> Option<&SharedFrame> {
        self.rest.back().or(self.head.as_ref())
    }

    /// The frames [`Outbox::discard_unstarted`] would drop, in queue order.
    pub fn unstarted(&self) -> impl Iterator<Item = &SharedFrame> {
        let head = self.head.as_ref().filter(|_| self.offset == 0);
        head.into_iter().chain(self.rest.iter())
    }

    /// Drops every queued frame except a partially written one, which must be finished before
    /// anything else (say, a close frame) can follow it on the wire.
    pub fn discard_unstarted(&mut self) {
        self.rest.clear();
        if self.offset == 0 {
            self.head = None;
        }
        self.bytes = self.head.as_ref().map_or(0, |f| f.len() as u32);
    }

    fn pop_head(&mut self) {
        if let Some(f) = self.head.take() {
            self.bytes -= f.len() as u32;
        }
        self.offset = 0;
        self.head = self.rest.pop_front();
    }

    /// Writes as much as the socket takes, until it would block or the queue is empty.
    /// `WouldBlock` is not an error: it ends the flush with what was written.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<Flushed> {
        self.write_to_n::<W, MAX_IOV>(w)
    }

    /// [`Outbox::write_to`], handing at most `N` frames to each vectored write. A TLS session
    /// takes more than a socket: what one call hands it is cut into full records and one short
    /// one, so the more frames per call, the fewer short records.
    pub fn write_to_n<W: Write, const N: usize>(&mut self, w: &mut W) -> io::Result<Flushed> {
        let mut done = Flushed::default();
        while let Some(head) = &self.head {
            let result = if self.rest.is_empty() {
                // One frame: a plain send() skips the vectored path's per-call setup.
                w.write(&head[self.offset as usize..])
            } else {
                let mut iov = [IoSlice::new(&[]); N];
                iov[0] = IoSlice::new(&head[self.offset as usize..]);
                let mut count = 1;
                for (slot, f) in iov[1..].iter_mut().zip(self.rest.iter()) {
                    *slot = IoSlice::new(f);
                    count += 1;
                }
                w.write_vectored(&iov[..count])
            };
            let n = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            done.bytes += n;
            let mut left = n;
            while left > 0 {
                let Some(head) = &self.head else { break };
                let head_left = head.len() - self.offset as usize;
                if left >= head_left {
                    left -= head_left;
                    self.pop_head();
                    done.frames += 1;
                } else {
                    self.offset += left as u32;
                    left = 0;
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call and `budget` bytes in all.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                for &x in b.iter() {
                    if n == self.cap || self.budget == 0 {
                        return Ok(n);
                    }
                    self.got.push(x);
                    n += 1;
                    self.budget -= 1;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn frames() -> Vec<SharedFrame> {
        (0..5u8)
            .map(|i| SharedFrame::from(vec![i; 10 + i as usize * 7]))
            .collect()
    }

    #[test]
    fn partial_writes_resume_exactly() {
        for cap in [1, 3, 10, 17, 1000] {
            let mut o = Outbox::default();
            let all: Vec<u8> = frames().iter().flat_map(|f| f.to_vec()).collect();
            for f in frames() {
                o.push(f);
            }
            let mut w = Trickle {
                got: Vec::new(),
                cap,
                budget: 23,
            };
            let first = o.write_to(&mut w).unwrap();
            assert_eq!(first.bytes, 23.min(all.len()));
            assert_eq!(o.pending_bytes(), all.len() - first.bytes);
            w.budget = usize::MAX;
            let second = o.write_to(&mut w).unwrap();
            assert_eq!(first.frames + second.frames, 5);
            assert_eq!(w.got, all, "cap {cap}");
            assert!(o.is_empty());
            assert_eq!(o.pending_bytes(), 0);
        }
    }

    #[test]
    fn more_frames_than_one_writev_takes() {
        let mut o = Outbox::default();
        let mut all = Vec::new();
        for i in 0..200u32 {
            let f = SharedFrame::from(i.to_be_bytes().to_vec());
            all.extend_from_slice(&f);
            o.push(f);
        }
        let mut w = Trickle {
            got: Vec::new(),
            cap: usize::MAX,
            budget: usize::MAX,
        };
        let done = o.write_to(&mut w).unwrap();
        assert_eq!(done.frames, 200);
        assert_eq!(w.got, all);
    }

    #[test]
    fn discard_keeps_a_started_frame() {
        let mut o = Outbox::default();
        for f in frames() {
            o.push(f);
        }
        let mut w = Trickle {
            got: Vec::new(),
            cap: 100,
            budget: 4,
        };
        o.write_to(&mut w).unwrap();
        o.discard_unstarted();
        assert_eq!(o.pending_bytes(), 10 - 4);
        let mut o2 = Outbox::default();
        for f in frames() {
            o2.push(f);
        }
        o2.discard_unstarted();
        assert!(o2.is_empty());
        assert_eq!(o2.pending_bytes(), 0);
    }

    #[test]
    fn pushing_shares_instead_of_copying() {
        let f = SharedFrame::from(vec![1u8; 100]);
        let mut boxes: Vec<Outbox> = (0..10).map(|_| Outbox::default()).collect();
        for o in &mut boxes {
            o.push(f.clone());
            o.push(f.clone());
        }
        assert_eq!(SharedFrame::strong_count(&f), 21);
        assert_eq!(
            boxes[3].last().map(|l| SharedFrame::ptr_eq(l, &f)),
            Some(true)
        );
    }
}
