//! Readings of this process and the host: RSS, CPU time, UDP
//! receive-buffer errors; returning freed heap memory.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::cpu;

/// Resident set size of this process (VmRSS), KiB.
pub fn rss_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/self/status")
}

/// Host-wide UDP receive-buffer errors (/proc/net/snmp, `Udp:` RcvbufErrors).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = s.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Returns freed heap memory to the kernel (glibc only).
pub(super) fn malloc_trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

pub(super) fn process_cpu() -> Option<Duration> {
    cpu::process_cpu_time(std::process::id()).ok()
}
