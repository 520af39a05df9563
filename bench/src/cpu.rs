//! CPU time of another process, from /proc/PID/stat.

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
