//! Each second's delivered frames, added up from the workers' progress reports by the second
//! each report measured, not by when the orchestrator happened to receive it.
//!
//! Workers report just after every whole second of the run (see `engine::Fleet::run`), each
//! with its cumulative count and the time it took it. A report that arrives a little late, or
//! two that arrive in one orchestrator tick, still land in the seconds they measured, so a
//! steady load draws a flat line.

use std::collections::BTreeMap;

/// Delivered frames per second of the run, from every worker.
#[derive(Debug, Default)]
pub struct Seconds {
    started_ms: u64,
    /// Each worker's cumulative count at its last report.
    last: Vec<u64>,
    delivered: BTreeMap<u64, u64>,
}

impl Seconds {
    /// For a run that started at `started_ms` (Unix milliseconds) with `workers` workers.
    pub fn new(started_ms: u64, workers: usize) -> Seconds {
        Seconds {
            started_ms,
            last: vec![0; workers],
            delivered: BTreeMap::new(),
        }
    }

    /// Worker `w` had delivered `events` in all when it measured at `t_ms`: what it delivered
    /// since its last report belongs to the second of the run that ended then (the nearest
    /// whole second: reports are taken just after one).
    pub fn add(&mut self, w: usize, t_ms: u64, events: u64) {
        let Some(last) = self.last.get_mut(w) else {
            return;
        };
        let second = (t_ms.saturating_sub(self.started_ms) + 500) / 1000;
        let delta = events.saturating_sub(*last);
        *last = (*last).max(events);
        *self.delivered.entry(second).or_default() += delta;
    }

    /// Frames delivered in the second of the run that ended at `second` (seconds since the
    /// start), if any worker reported it.
    pub fn at(&self, second: u64) -> Option<u64> {
        self.delivered.get(&second).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_and_bunched_reports_land_in_the_second_they_measured() {
        // Two workers delivering 20,000 frames a second each. Worker 1's reports reach the
        // orchestrator late, two at a time: bucketed by arrival, one second would read 0 and
        // the next 60,000. By measured second the line is flat.
        let start = 1_000_000;
        let mut s = Seconds::new(start, 2);
        for sec in 1..=10u64 {
            s.add(0, start + sec * 1000 + 3, sec * 20_000);
        }
        for pair in (1..=10u64).collect::<Vec<_>>().chunks(2) {
            for &sec in pair {
                s.add(1, start + sec * 1000 + 40, sec * 20_000);
            }
        }
        for sec in 1..=10 {
            assert_eq!(s.at(sec), Some(40_000), "second {sec}");
        }
        assert_eq!(s.at(11), None);
        // Out-of-range workers and counters that go backwards change nothing.
        s.add(5, start + 11_000, 1);
        s.add(0, start + 11_000, 5);
        assert_eq!(s.at(11), Some(0));
    }
}
