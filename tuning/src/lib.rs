//! Reads the host settings that matter for a UDP/QUIC relay and compares
//! them with recommended values. Reads go through a root directory so tests
//! run against a fake `/proc`. (The deploy issue extends this with profiles
//! and `apply`.)

use std::path::Path;

/// One setting checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub key: &'static str,
    pub value: Option<u64>,
    pub recommended: u64,
    pub ok: bool,
    pub why: &'static str,
}

/// (sysctl path under /proc/sys, minimum recommended, reason)
const CHECKS: &[(&str, u64, &str)] = &[
    ("net/core/rmem_max", 8 << 20, "lets the relay's 8 MiB socket receive buffers absorb bursts"),
    ("net/core/wmem_max", 8 << 20, "lets the relay's 8 MiB socket send buffers absorb bursts"),
    ("net/core/netdev_max_backlog", 5000, "packets queued per CPU before the stack drops them"),
];

/// Checks the sysctls under `root` (normally `/`).
pub fn check(root: &Path) -> Vec<Finding> {
    let mut out: Vec<Finding> = CHECKS
        .iter()
        .map(|(key, rec, why)| {
            let value = read_u64(&root.join("proc/sys").join(key));
            Finding { key, value, recommended: *rec, ok: value.is_some_and(|v| v >= *rec), why }
        })
        .collect();
    // io_uring: 0 = enabled, 1 = unprivileged disabled, 2 = disabled.
    let uring = read_u64(&root.join("proc/sys/kernel/io_uring_disabled"));
    out.push(Finding {
        key: "kernel/io_uring_disabled",
        value: uring,
        recommended: 0,
        ok: uring.is_none_or(|v| v == 0),
        why: "0 lets the relay use its io_uring backend (otherwise it falls back to portable I/O)",
    });
    out
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fake_proc() {
        let dir = std::env::temp_dir().join(format!("ztna-tune-test-{}", std::process::id()));
        let sys = dir.join("proc/sys");
        std::fs::create_dir_all(sys.join("net/core")).unwrap();
        std::fs::create_dir_all(sys.join("kernel")).unwrap();
        std::fs::write(sys.join("net/core/rmem_max"), "212992\n").unwrap();
        std::fs::write(sys.join("net/core/wmem_max"), "16777216\n").unwrap();
        std::fs::write(sys.join("kernel/io_uring_disabled"), "2\n").unwrap();
        let f = check(&dir);
        let get = |k: &str| f.iter().find(|x| x.key == k).unwrap().clone();
        assert!(!get("net/core/rmem_max").ok);
        assert_eq!(get("net/core/rmem_max").value, Some(212_992));
        assert!(get("net/core/wmem_max").ok);
        assert_eq!(get("net/core/netdev_max_backlog").value, None);
        assert!(!get("net/core/netdev_max_backlog").ok);
        assert!(!get("kernel/io_uring_disabled").ok);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
