//! CPU time: of another process (from /proc/PID/stat), and of the
//! calling thread.

use std::time::Duration;

use anyhow::{Context, Result};

/// Clock ticks per second for /proc times (USER_HZ, 100 on Linux).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// Parses utime + stime (fields 14 and 15) of a /proc/PID/stat line, in
/// clock ticks. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted after its last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// User + system CPU time of process `pid` so far (all its threads).
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_ticks(&s).with_context(|| format!("parsing {path}"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_sec()))
}

/// CPU time thread `tid` of this process has run so far (from
/// /proc/self/task/TID/schedstat; zero if it cannot be read).
pub fn task_cpu_time(tid: i32) -> Duration {
    let ns = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// The calling thread's id (for [`task_cpu_time`] from another thread).
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_14_and_15() {
        let line = "1234 (ztna relay) S 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_ticks(line), Some(280));
        assert_eq!(parse_stat_ticks("1 (a) S"), None);
    }

    #[test]
    fn own_process() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time(std::process::id()).is_ok());
    }
}
