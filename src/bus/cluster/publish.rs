//! The publish client's bookkeeping, without I/O: the publishes in flight, each message's
//! progress, the slots whose messages are held back, and the deadlines. The bus thread sends
//! what this says is due over its command connections and tells it what Redis answered.
//!
//! Order: a publish's messages, and successive publishes, are sent in the order they came, one
//! command connection per server, so one workspace's messages reach Redis in publish order.
//! When a Redis Cluster answers `MOVED` the message is held with every later message of that
//! slot until [`MOVED_SLOT_HOLD`] has passed, then sent to the new master in the same order. The
//! hold exists because every node learns of the move at the same moment (Redis ends their
//! subscriptions in the slot) and needs a few milliseconds to subscribe at the new master; a
//! message published there sooner would miss them. It is a timer on the bus thread: nothing
//! sleeps, and publishes to other slots go on meanwhile.

use super::{BusJob, BusUnavailable, Done, Submitted, PUBLISH_DEADLINE};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long messages to a hash slot that has just changed masters are held back (see the
/// module's text). Covers a layout read that waits for the minimum interval between reads.
pub const MOVED_SLOT_HOLD: Duration = Duration::from_millis(250);

/// Redirects one message may follow before its publish fails
/// ([`BusUnavailable::Redirecting`]).
pub const PUBLISH_REDIRECTS: u8 = 3;

/// One message of one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    job: u64,
    index: u32,
    redirects: u8,
}

struct Job {
    job: BusJob,
    done: Option<Done>,
    /// Messages Redis has not accepted yet.
    left: usize,
}

/// Every publish the bus thread holds.
#[derive(Default)]
pub struct Publishing {
    jobs: HashMap<u64, Job>,
    next_id: u64,
    /// Deadlines in submission order (they all have the same length).
    deadlines: VecDeque<(Instant, u64)>,
    /// Held messages, in publish order.
    held: VecDeque<Msg>,
    /// Slots on hold, until when.
    holds: HashMap<u16, Instant>,
}

impl Publishing {
    /// Takes a publish whose every slot `check` accepts, giving its messages in order; one it
    /// refuses is answered with the refusal at once and gives none.
    pub fn admit(
        &mut self,
        s: Submitted,
        mut check: impl FnMut(u16) -> Result<(), BusUnavailable>,
    ) -> Vec<Msg> {
        let refused = (0..s.job.len()).find_map(|i| check(s.job.slot(i)).err());
        if let Some(why) = refused {
            (s.done)(Err(why));
            return Vec::new();
        }
        if s.job.is_empty() {
            (s.done)(Ok(()));
            return Vec::new();
        }
        let id = self.next_id;
        self.next_id += 1;
        let n = s.job.len();
        self.deadlines.push_back((s.at + PUBLISH_DEADLINE, id));
        self.jobs.insert(
            id,
            Job {
                job: s.job,
                done: Some(s.done),
                left: n,
            },
        );
        (0..n as u32)
            .map(|index| Msg {
                job: id,
                index,
                redirects: 0,
            })
            .collect()
    }

    /// Whether `msg`'s publish is still waiting for answers (it has not failed or timed out).
    pub fn is_open(&self, msg: Msg) -> bool {
        self.jobs.contains_key(&msg.job)
    }

    /// `msg`'s hash slot.
    pub fn slot(&self, msg: Msg) -> Option<u16> {
        self.jobs
            .get(&msg.job)
            .map(|j| j.job.slot(msg.index as usize))
    }

    /// `msg`'s encoded command.
    pub fn command(&self, msg: Msg) -> Option<&[u8]> {
        self.jobs
            .get(&msg.job)
            .map(|j| j.job.command(msg.index as usize))
    }

    /// Whether `msg` must wait: its slot is on hold, or an earlier message of it is held.
    pub fn must_hold(&mut self, msg: Msg, now: Instant) -> bool {
        let Some(slot) = self.slot(msg) else {
            return false;
        };
        let held = match self.holds.get(&slot) {
            Some(until) if now < *until => true,
            Some(_) => {
                self.holds.remove(&slot);
                false
            }
            None => false,
        };
        if held || self.held.iter().any(|m| self.slot(*m) == Some(slot)) {
            self.held.push_back(msg);
            return true;
        }
        false
    }

    /// Puts `slot` on hold from `now` (it changed masters).
    pub fn hold_slot(&mut self, slot: u16, now: Instant) {
        self.holds.insert(slot, now + MOVED_SLOT_HOLD);
    }

    /// Redis accepted `msg`. Its publish is answered once every message is accepted.
    pub fn accepted(&mut self, msg: Msg) {
        let Some(job) = self.jobs.get_mut(&msg.job) else {
            return;
        };
        job.left -= 1;
        if job.left == 0 {
            let mut job = self.jobs.remove(&msg.job).expect("present above");
            if let Some(done) = job.done.take() {
                done(Ok(()));
            }
        }
    }

    /// Redis answered `MOVED` for `msg`, whose slot moved at `now`: held, to go to the new
    /// master, unless it has been redirected too often.
    pub fn redirected(&mut self, mut msg: Msg, now: Instant) {
        if !self.is_open(msg) {
            return;
        }
        msg.redirects += 1;
        if msg.redirects > PUBLISH_REDIRECTS {
            return self.fail(msg, BusUnavailable::Redirecting);
        }
        if let Some(slot) = self.slot(msg) {
            self.hold_slot(slot, now);
        }
        self.held.push_back(msg);
    }

    /// `msg`'s publish fails with `why` (answered once; its other messages are then moot).
    pub fn fail(&mut self, msg: Msg, why: BusUnavailable) {
        if let Some(mut job) = self.jobs.remove(&msg.job) {
            if let Some(done) = job.done.take() {
                done(Err(why));
            }
        }
    }

    /// The held messages whose slot is off hold by `now`, in order; the rest stay held.
    pub fn release(&mut self, now: Instant) -> Vec<Msg> {
        if self.held.is_empty() {
            return Vec::new();
        }
        self.holds.retain(|_, until| now < *until);
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        for msg in std::mem::take(&mut self.held) {
            match self.slot(msg) {
                None => {} // its publish already failed
                Some(slot) if self.holds.contains_key(&slot) => keep.push_back(msg),
                Some(_) => out.push(msg),
            }
        }
        self.held = keep;
        out
    }

    /// Fails every publish past its deadline by `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if now < deadline {
                break;
            }
            self.deadlines.pop_front();
            if let Some(mut job) = self.jobs.remove(&id) {
                if let Some(done) = job.done.take() {
                    done(Err(BusUnavailable::TimedOut));
                }
            }
        }
    }

    /// Fails every publish in flight (the node is stopping).
    pub fn fail_all(&mut self, why: BusUnavailable) {
        for (_, mut job) in self.jobs.drain() {
            if let Some(done) = job.done.take() {
                done(Err(why.clone()));
            }
        }
        self.held.clear();
        self.deadlines.clear();
    }

    /// When something here next falls due (a hold ends, a deadline passes).
    pub fn next_due(&self) -> Option<Instant> {
        let hold = (!self.held.is_empty())
            .then(|| self.holds.values().min().copied())
            .flatten();
        let deadline = self.deadlines.front().map(|(t, _)| *t);
        hold.into_iter().chain(deadline).min()
    }

    /// Publishes in flight.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Answers = Arc<Mutex<Vec<(u32, Result<(), BusUnavailable>)>>>;

    fn job(tag: u32, workspaces: &[&str], answers: &Answers, at: Instant) -> Submitted {
        let mut job = BusJob::default();
        for ws in workspaces {
            let p = crate::bus::wire::Publish {
                command: b"PUBLISH",
                v2: None,
                workspace_id: ws,
                kind: "t",
                user_id: None,
                ts_ms: 1,
                payload_len: 2,
            };
            job.push(&p, |b| b.extend_from_slice(b"{}"));
        }
        let answers = answers.clone();
        Submitted {
            job,
            done: Box::new(move |r| answers.lock().unwrap().push((tag, r))),
            at,
        }
    }

    #[test]
    fn a_publish_is_answered_once_when_every_message_is_accepted() {
        let answers = Answers::default();
        let mut p = Publishing::default();
        let now = Instant::now();
        let msgs = p.admit(job(1, &["a", "b"], &answers, now), |_| Ok(()));
        assert_eq!(msgs.len(), 2);
        p.accepted(msgs[0]);
        assert!(answers.lock().unwrap().is_empty());
        p.accepted(msgs[1]);
        assert_eq!(*answers.lock().unwrap(), vec![(1, Ok(()))]);
        assert!(p.is_empty());
        p.expire(now + PUBLISH_DEADLINE * 2);
        assert_eq!(answers.lock().unwrap().len(), 1, "answered once");
    }

    #[test]
    fn a_refused_slot_fails_the_whole_publish_before_anything_is_sent() {
        let answers = Answers::default();
        let mut p = Publishing::default();
        let msgs = p.admit(job(1, &["a", "b"], &answers, Instant::now()), |_| {
            Err(BusUnavailable::NoMaster(7))
        });
        assert!(msgs.is_empty());
        assert_eq!(
            *answers.lock().unwrap(),
            vec![(1, Err(BusUnavailable::NoMaster(7)))]
        );
    }

    #[test]
    fn a_redirected_message_and_every_later_one_of_its_slot_wait_out_the_hold_in_order() {
        let answers = Answers::default();
        let mut p = Publishing::default();
        let t0 = Instant::now();
        let first = p.admit(job(1, &["a"], &answers, t0), |_| Ok(()));
        let other = p.admit(job(2, &["zz-other"], &answers, t0), |_| Ok(()));
        p.redirected(first[0], t0);
        let second = p.admit(job(3, &["a"], &answers, t0), |_| Ok(()));
        assert!(p.must_hold(second[0], t0), "same slot as a held message");
        assert!(
            p.slot(other[0]) == p.slot(first[0]) || !p.must_hold(other[0], t0),
            "another slot is not held"
        );
        assert!(p.release(t0 + MOVED_SLOT_HOLD / 2).is_empty());
        assert_eq!(
            p.release(t0 + MOVED_SLOT_HOLD),
            vec![
                Msg {
                    redirects: 1,
                    ..first[0]
                },
                second[0]
            ]
        );
        assert_eq!(p.next_due(), Some(t0 + PUBLISH_DEADLINE));
    }

    #[test]
    fn too_many_redirects_and_the_deadline_each_fail_the_publish() {
        let answers = Answers::default();
        let mut p = Publishing::default();
        let t0 = Instant::now();
        let mut m = p.admit(job(1, &["a"], &answers, t0), |_| Ok(()))[0];
        for _ in 0..PUBLISH_REDIRECTS {
            p.redirected(m, t0);
            m = p.release(t0 + MOVED_SLOT_HOLD)[0];
        }
        p.redirected(m, t0);
        p.admit(job(2, &["b"], &answers, t0), |_| Ok(()));
        p.expire(t0 + PUBLISH_DEADLINE);
        assert_eq!(
            *answers.lock().unwrap(),
            vec![
                (1, Err(BusUnavailable::Redirecting)),
                (2, Err(BusUnavailable::TimedOut))
            ]
        );
        assert!(p.is_empty() && p.release(t0 + PUBLISH_DEADLINE).is_empty());
    }
}
