//! Process CPU time and memory from `/proc`.
//!
//! CPU times in `/proc/PID/stat` are in clock ticks of `USER_HZ`, which Linux fixes at 100 for
//! user space on every architecture the load tester targets; the resolution is 10 ms, so runs
//! should last seconds, not milliseconds.

use serde::{Deserialize, Serialize};

const NS_PER_TICK: u64 = 10_000_000;

/// One sample of a process.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Open file descriptors.
    pub open_files: u64,
}

/// User plus system CPU of process `pid` (`"self"` for this process), nanoseconds. Cheap: one
/// small read, so it can be sampled every second.
pub fn cpu_ns(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 overall, so utime (14) and stime (15) are at 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * NS_PER_TICK)
}

/// Samples process `pid` (`"self"` for this process): CPU, RSS and open files. Counting open
/// files walks `/proc/PID/fd`, which costs milliseconds at tens of thousands of sockets: sample
/// this at phase boundaries, not in a loop.
pub fn sample(pid: &str) -> Option<Sample> {
    let cpu_ns = cpu_ns(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(Sample {
        cpu_ns,
        rss_bytes: rss_kb * 1024,
        open_files,
    })
}

/// CPU of this process's waited-for children (user + system), nanoseconds.
pub fn children_cpu_ns() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get(13) + get(14)) * NS_PER_TICK
}

/// A one-line description of this machine for reports.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} x {cpu}, {} GiB, Linux {}",
        mem_kb / (1024 * 1024),
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        // Burn a little CPU so the counter moves past one tick.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let s = super::sample("self").unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.open_files >= 3);
        assert!(s.cpu_ns > 0);
    }
}
