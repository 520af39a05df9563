//! Reads the host settings that matter for a UDP/QUIC relay and compares
//! them with the values recommended for a deployment profile (`pi`: a
//! Raspberry Pi class node; `cloud`: a cloud VM), and writes a sysctl.d
//! file with those values. Reads and writes go through a root directory so
//! tests run against a fake `/proc`, `/sys` and `/etc`. Per-NIC checks
//! (offloads, interrupt spread, RPS) are in [`nic`] and [`irq`].

use std::path::{Path, PathBuf};

pub mod irq;
pub mod nic;

/// Where the relay runs; sets the recommended values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Raspberry Pi class: 4 cores, 1 Gbit/s, little memory to spare.
    Pi,
    /// Cloud VM: more cores, 10+ Gbit/s, memory to spare.
    Cloud,
}

impl Profile {
    pub fn parse(s: &str) -> Option<Profile> {
        match s {
            "pi" => Some(Profile::Pi),
            "cloud" => Some(Profile::Cloud),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Pi => "pi",
            Profile::Cloud => "cloud",
        }
    }
}

/// One setting checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub key: &'static str,
    pub value: Option<u64>,
    pub recommended: u64,
    pub ok: bool,
    pub why: &'static str,
}

/// A sysctl (path under /proc/sys), its minimum per profile (pi, cloud),
/// and why it matters.
struct Sysctl {
    key: &'static str,
    pi: u64,
    cloud: u64,
    why: &'static str,
}

const SYSCTLS: &[Sysctl] = &[
    Sysctl {
        key: "net/core/rmem_max",
        pi: 8 << 20,
        cloud: 32 << 20,
        why: "lets the relay's socket receive buffers absorb bursts",
    },
    Sysctl {
        key: "net/core/wmem_max",
        pi: 8 << 20,
        cloud: 32 << 20,
        why: "lets the relay's socket send buffers absorb bursts",
    },
    Sysctl {
        key: "net/core/netdev_max_backlog",
        pi: 5000,
        cloud: 30_000,
        why: "packets queued per CPU before the stack drops them",
    },
    Sysctl {
        key: "net/core/netdev_budget",
        pi: 600,
        cloud: 1200,
        why: "packets one softirq round may process (fewer drops under load)",
    },
];

impl Sysctl {
    fn recommended(&self, p: Profile) -> u64 {
        match p {
            Profile::Pi => self.pi,
            Profile::Cloud => self.cloud,
        }
    }
}

/// Checks the sysctls and io_uring under `root` (normally `/`) against
/// `profile`.
pub fn check(root: &Path, profile: Profile) -> Vec<Finding> {
    let mut out: Vec<Finding> = SYSCTLS
        .iter()
        .map(|s| {
            let value = read_u64(&root.join("proc/sys").join(s.key));
            let rec = s.recommended(profile);
            Finding { key: s.key, value, recommended: rec, ok: value.is_some_and(|v| v >= rec), why: s.why }
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

/// CPUs whose frequency governor is not `performance` (name, governor).
/// Power-saving governors add wake-up latency to every packet burst.
pub fn slow_governors(root: &Path) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(root.join("sys/devices/system/cpu")) else { return Vec::new() };
    let mut out: Vec<(String, String)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_cpu =
                name.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !is_cpu {
                return None;
            }
            let g = std::fs::read_to_string(e.path().join("cpufreq/scaling_governor")).ok()?;
            let g = g.trim().to_owned();
            (g != "performance").then_some((name, g))
        })
        .collect();
    out.sort();
    out
}

/// The sysctl.d file `apply` writes, relative to the root.
pub const SYSCTL_FILE: &str = "etc/sysctl.d/90-ztna-relay.conf";

/// Writes [`SYSCTL_FILE`] under `root` for `profile`; returns its path.
/// Values already above the recommendation are kept as they are (never
/// lowered).
pub fn apply(root: &Path, profile: Profile) -> std::io::Result<PathBuf> {
    let mut s = format!("# Written by `ztna-tune apply --profile {}`; load with `sysctl --system`.\n", profile.name());
    for c in SYSCTLS {
        let current = read_u64(&root.join("proc/sys").join(c.key));
        let value = current.map_or(c.recommended(profile), |v| v.max(c.recommended(profile)));
        s.push_str(&format!("# {}\n{} = {}\n", c.why, c.key.replace('/', "."), value));
    }
    let path = root.join(SYSCTL_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, s)?;
    Ok(path)
}

pub(crate) fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    fn fake_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztna-tune-test-{tag}-{}", std::process::id()));
        let sys = dir.join("proc/sys");
        std::fs::create_dir_all(sys.join("net/core")).unwrap();
        std::fs::create_dir_all(sys.join("kernel")).unwrap();
        std::fs::write(sys.join("net/core/rmem_max"), "212992\n").unwrap();
        std::fs::write(sys.join("net/core/wmem_max"), "16777216\n").unwrap();
        std::fs::write(sys.join("kernel/io_uring_disabled"), "2\n").unwrap();
        for (cpu, gov) in [("cpu0", "performance"), ("cpu1", "powersave"), ("cpufreq", "x")] {
            let d = dir.join("sys/devices/system/cpu").join(cpu).join("cpufreq");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("scaling_governor"), format!("{gov}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn checks_a_fake_proc_per_profile() {
        let dir = fake_root("check");
        let get = |f: &[Finding], k: &str| f.iter().find(|x| x.key == k).unwrap().clone();
        let pi = check(&dir, Profile::Pi);
        assert!(!get(&pi, "net/core/rmem_max").ok);
        assert_eq!(get(&pi, "net/core/rmem_max").value, Some(212_992));
        assert!(get(&pi, "net/core/wmem_max").ok, "16 MiB is enough for a Pi");
        let cloud = check(&dir, Profile::Cloud);
        assert!(!get(&cloud, "net/core/wmem_max").ok, "but not for a cloud VM");
        assert_eq!(get(&cloud, "net/core/wmem_max").recommended, 32 << 20);
        assert_eq!(get(&pi, "net/core/netdev_max_backlog").value, None);
        assert!(!get(&pi, "net/core/netdev_max_backlog").ok);
        assert!(!get(&pi, "kernel/io_uring_disabled").ok);
        assert_eq!(slow_governors(&dir), vec![("cpu1".to_owned(), "powersave".to_owned())]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apply_writes_a_sysctl_file_that_never_lowers() {
        let dir = fake_root("apply");
        let path = apply(&dir, Profile::Pi).unwrap();
        assert_eq!(path, dir.join(SYSCTL_FILE));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("net.core.rmem_max = 8388608\n"), "{text}");
        assert!(text.contains("net.core.wmem_max = 16777216\n"), "kept, not lowered to 8 MiB: {text}");
        assert!(text.contains("net.core.netdev_max_backlog = 5000\n"));
        // Re-applying for the cloud profile raises what the Pi left.
        apply(&dir, Profile::Cloud).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("net.core.wmem_max = 33554432\n"), "{text}");
        assert!(text.contains("net.core.netdev_budget = 1200\n"));
        assert_eq!(Profile::parse("pi"), Some(Profile::Pi));
        assert_eq!(Profile::parse("laptop"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
