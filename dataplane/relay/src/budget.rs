//! The relay-wide memory budget: one limit over everything peers can make
//! the relay hold (connection state from the first Initial on, DATAGRAM send
//! queues, cross-worker queues, control backlogs).
//!
//! Workers charge and release through a [`BudgetShare`], which publishes to
//! the shared [`MemoryBudget`] only when its local balance moved by more
//! than [`PUBLISH_STEP`]: the per-datagram path touches a worker-local
//! integer, and the shared counter is written a few times per megabyte.
//! The shared figure is therefore exact up to `workers × PUBLISH_STEP`.
//!
//! What happens at the budget is the callers' business (`worker/`): new
//! connections are refused, a destination whose queue is already above a
//! small floor gets no more datagrams, and under pressure `retry = "auto"`
//! demands Retry from every new connection.

use std::sync::atomic::{AtomicI64, Ordering};

/// Balance a worker keeps locally before publishing.
pub const PUBLISH_STEP: i64 = 256 * 1024;
/// The budget when neither the config nor a cgroup limit gives one.
pub const DEFAULT_BUDGET: u64 = 1 << 30;
/// Share of a cgroup memory limit the budget takes (the rest is the
/// process baseline: code, TLS contexts, socket buffers, allocator slack).
pub const CGROUP_SHARE_PERCENT: u64 = 60;
/// Smallest budget (a relay with less cannot hold a useful session count).
pub const MIN_BUDGET: u64 = 16 << 20;

/// The shared budget.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: i64,
    used: AtomicI64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget { limit: i64::try_from(limit.max(MIN_BUDGET)).unwrap_or(i64::MAX), used: AtomicI64::new(0) }
    }

    pub fn limit(&self) -> u64 {
        self.limit.unsigned_abs()
    }

    /// Bytes charged relay-wide (as last published by the workers).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0).unsigned_abs()
    }

    /// Whether `extra` more bytes would still fit.
    pub fn fits(&self, extra: u64) -> bool {
        self.used().saturating_add(extra) <= self.limit()
    }

    /// Used share of the budget in percent (0..=100+).
    pub fn percent_used(&self) -> u64 {
        self.used().saturating_mul(100) / self.limit().max(1)
    }
}

/// One worker's view: a local balance published in steps.
#[derive(Debug, Default)]
pub struct BudgetShare {
    /// Bytes this worker holds (charged minus released).
    held: i64,
    /// Part of `held` already added to the shared counter.
    published: i64,
}

impl BudgetShare {
    /// Adds `delta` bytes (negative: releases) and publishes when the
    /// unpublished part exceeds a step.
    pub fn adjust(&mut self, budget: &MemoryBudget, delta: i64) {
        self.held = self.held.saturating_add(delta);
        let pending = self.held - self.published;
        if pending.abs() >= PUBLISH_STEP {
            budget.used.fetch_add(pending, Ordering::Relaxed);
            self.published = self.held;
        }
    }

    /// Bytes this worker holds.
    pub fn held(&self) -> u64 {
        self.held.max(0).unsigned_abs()
    }
}

/// The budget to use: the configured one, else a share of the cgroup's
/// memory limit, else [`DEFAULT_BUDGET`] ([`MemoryBudget::new`] raises it
/// to [`MIN_BUDGET`]). Returns the bytes and where they
/// came from (for the start-up log).
pub fn resolve(configured_mib: u64) -> (u64, &'static str) {
    if configured_mib > 0 {
        return (configured_mib.saturating_mul(1 << 20), "config");
    }
    match cgroup_limit() {
        Some(l) => ((l / 100).saturating_mul(CGROUP_SHARE_PERCENT), "cgroup"),
        None => (DEFAULT_BUDGET, "default"),
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1
/// `memory.limit_in_bytes`), if it has a finite one.
pub fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_limit_from(&own, |p| std::fs::read_to_string(p).ok())
}

/// [`cgroup_limit`] over a `/proc/self/cgroup` text and a file reader.
fn cgroup_limit_from(proc_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let candidates = if controllers.is_empty() {
            // cgroup v2: limits may be set on any ancestor; the nearest
            // finite one applies (the smallest, really, but the kernel
            // enforces each, so the smallest we find is the bound).
            let mut v = Vec::new();
            let mut p = path.trim_end_matches('/').to_owned();
            loop {
                v.push(format!("/sys/fs/cgroup{p}/memory.max"));
                match p.rfind('/') {
                    Some(i) => p.truncate(i),
                    None => break,
                }
            }
            v
        } else if controllers.split(',').any(|c| c == "memory") {
            vec![format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")]
        } else {
            continue;
        };
        let limit = candidates
            .iter()
            .filter_map(|f| read(f))
            .filter_map(|s| s.trim().parse::<u64>().ok())
            // v1 reports "no limit" as a huge page-rounded number.
            .filter(|&l| l < (1u64 << 60))
            .min();
        if limit.is_some() {
            return limit;
        }
    }
    None
}

/// Gives freed heap back to the operating system (glibc keeps freed
/// chunks in its per-thread arenas; after a flood that would pin the
/// flood's peak RSS for the process's lifetime).
pub fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks and trims
    // glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_publish_in_steps_and_balance_out() {
        let b = MemoryBudget::new(64 << 20);
        let mut a = BudgetShare::default();
        let mut c = BudgetShare::default();
        a.adjust(&b, 1000);
        assert_eq!(b.used(), 0, "below a step: local only");
        a.adjust(&b, PUBLISH_STEP);
        assert_eq!(b.used(), (PUBLISH_STEP + 1000) as u64);
        // Charged on one worker, released on another (cross-worker queue).
        c.adjust(&b, -PUBLISH_STEP - 1000);
        assert_eq!(b.used(), 0);
        assert!(b.fits(64 << 20) && !b.fits((64 << 20) + 1));
        assert_eq!(MemoryBudget::new(1).limit(), MIN_BUDGET, "never below the minimum");
    }

    #[test]
    fn cgroup_v2_and_v1_limits() {
        let files = |p: &str| -> Option<String> {
            match p {
                "/sys/fs/cgroup/kubepods/pod1/memory.max" => Some("536870912\n".into()),
                "/sys/fs/cgroup/kubepods/memory.max" => Some("max\n".into()),
                "/sys/fs/cgroup/memory/docker/x/memory.limit_in_bytes" => Some("9223372036854771712\n".into()),
                "/sys/fs/cgroup/memory/lim/memory.limit_in_bytes" => Some("1073741824\n".into()),
                _ => None,
            }
        };
        assert_eq!(cgroup_limit_from("0::/kubepods/pod1\n", files), Some(512 << 20));
        assert_eq!(cgroup_limit_from("0::/kubepods\n", files), None, "max = no limit");
        assert_eq!(cgroup_limit_from("4:memory:/docker/x\n", files), None, "v1 unlimited");
        assert_eq!(cgroup_limit_from("5:cpu:/a\n4:memory,foo:/lim\n", files), Some(1 << 30));
        assert_eq!(cgroup_limit_from("garbage", files), None);
        assert_eq!(resolve(32), (32 << 20, "config"));
    }
}
