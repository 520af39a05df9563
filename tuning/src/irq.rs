//! How a NIC's interrupts spread over the CPUs (from /proc/interrupts),
//! whether irqbalance runs, and whether single-queue NICs have RPS.

use std::path::Path;

use crate::nic::Nic;

/// /proc/interrupts: the CPU columns and one row per interrupt line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupts {
    /// CPU numbers of the count columns (`CPU0 CPU1 ...`; offline CPUs
    /// are absent, so numbers may skip).
    pub cpus: Vec<usize>,
    pub rows: Vec<IrqRow>,
}

/// One row of /proc/interrupts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqRow {
    /// `27`, or `NMI`, `LOC`, `IPI0` for architecture rows.
    pub irq: String,
    /// One count per CPU column (fewer for rows like `ERR:`).
    pub counts: Vec<u64>,
    /// The rest of the line: chip, hardware IRQ, trigger, handler names.
    pub desc: String,
}

/// Parses /proc/interrupts.
pub fn parse_interrupts(text: &str) -> Interrupts {
    let mut lines = text.lines();
    let cpus: Vec<usize> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.strip_prefix("CPU")?.parse().ok())
        .collect();
    let rows = lines
        .filter_map(|l| {
            let (irq, rest) = l.trim_start().split_once(':')?;
            let mut rest = rest.trim_start();
            let mut counts = Vec::with_capacity(cpus.len());
            while counts.len() < cpus.len() {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let Ok(n) = rest[..end].parse::<u64>() else { break };
                counts.push(n);
                rest = rest[end..].trim_start();
            }
            Some(IrqRow { irq: irq.trim().to_owned(), counts, desc: rest.trim_end().to_owned() })
        })
        .collect();
    Interrupts { cpus, rows }
}

/// True if `hay` contains `word` with no letter or digit right before or
/// after it (`eth1` is in `eth1-rx-0` but not in `eth10`).
pub fn contains_word(hay: &str, word: &str) -> bool {
    if word.is_empty() {
        return false;
    }
    hay.match_indices(word).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

/// How the interrupts of one NIC are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// No row names the NIC, or fewer than [`MIN_INTERRUPTS`] in all.
    Unknown,
    /// A single CPU: nothing to spread.
    SingleCpu,
    /// No CPU takes more than [`CONCENTRATED_PERCENT`].
    Even { top_percent: u64 },
    /// One CPU takes more than [`CONCENTRATED_PERCENT`].
    Concentrated { cpu: usize, percent: u64 },
}

/// Fewer interrupts than this say nothing about the spread.
pub const MIN_INTERRUPTS: u64 = 1000;
/// One CPU taking more than this share of a NIC's interrupts is a hot spot.
pub const CONCENTRATED_PERCENT: u64 = 80;

/// Interrupt spread, queues and RPS of one NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqReport {
    /// CPU numbers of the host (the /proc/interrupts columns).
    pub cpus: Vec<usize>,
    /// The IRQ numbers whose row names the NIC.
    pub irqs: Vec<String>,
    /// Per-CPU sums over those rows.
    pub per_cpu: Vec<u64>,
    pub total: u64,
    pub spread: Spread,
    /// Number of /sys/class/net/<if>/queues/rx-* directories.
    pub rx_queues: usize,
    /// Some rx queue has a non-zero rps_cpus mask.
    pub rps: bool,
    pub irqbalance: bool,
}

impl IrqReport {
    /// A multi-core host, a NIC with one receive queue and RPS off: all
    /// receive processing for the NIC runs on the CPU that takes its
    /// interrupt. RPS hashes flows to other CPUs.
    pub fn needs_rps(&self) -> bool {
        self.cpus.len() > 1 && self.rx_queues == 1 && !self.rps
    }
}

/// The interrupt rows that belong to `nic`: those naming the interface
/// (`eth0`, `eth0-rx-0`, `ens5-Tx-Rx-0`) or its device (`virtio0-input.0`,
/// `mlx5_comp0@pci:0000:00:05.0`).
pub fn nic_rows<'a>(ints: &'a Interrupts, nic: &'a Nic) -> impl Iterator<Item = &'a IrqRow> + 'a {
    ints.rows.iter().filter(move |r| {
        contains_word(&r.desc, &nic.name) || nic.device.as_deref().is_some_and(|d| contains_word(&r.desc, d))
    })
}

/// Builds the [`IrqReport`] of `nic` from parsed /proc/interrupts (`None`:
/// unreadable) and the queues under `root`/sys/class/net/<if>/queues.
pub fn irq_report(root: &Path, nic: &Nic, ints: Option<&Interrupts>, irqbalance: bool) -> IrqReport {
    let (cpus, mut irqs, mut per_cpu) = (ints.map(|i| i.cpus.clone()).unwrap_or_default(), Vec::new(), Vec::new());
    per_cpu.resize(cpus.len(), 0u64);
    if let Some(ints) = ints {
        for row in nic_rows(ints, nic) {
            irqs.push(row.irq.clone());
            for (sum, n) in per_cpu.iter_mut().zip(&row.counts) {
                *sum += n;
            }
        }
    }
    let total: u64 = per_cpu.iter().sum();
    let spread = if cpus.len() == 1 {
        Spread::SingleCpu
    } else if total < MIN_INTERRUPTS {
        Spread::Unknown
    } else {
        let (i, &top) = per_cpu.iter().enumerate().max_by_key(|&(_, n)| *n).unwrap_or((0, &0));
        let percent = top * 100 / total;
        let cpu = cpus.get(i).copied().unwrap_or(i);
        // Compare exactly (top > 80 % of total), report rounded down.
        if top * 100 > total * CONCENTRATED_PERCENT {
            Spread::Concentrated { cpu, percent }
        } else {
            Spread::Even { top_percent: percent }
        }
    };
    let (rx_queues, rps) = rx_queues(root, &nic.name);
    IrqReport { cpus, irqs, per_cpu, total, spread, rx_queues, rps, irqbalance }
}

/// Number of rx-* queues of `iface` and whether any has RPS on.
fn rx_queues(root: &Path, iface: &str) -> (usize, bool) {
    let Ok(dir) = std::fs::read_dir(root.join("sys/class/net").join(iface).join("queues")) else { return (0, false) };
    let mut n = 0;
    let mut rps = false;
    for e in dir.flatten() {
        if e.file_name().to_string_lossy().starts_with("rx-") {
            n += 1;
            let mask = std::fs::read_to_string(e.path().join("rps_cpus")).unwrap_or_default();
            rps |= mask.trim().chars().any(|c| c.is_ascii_hexdigit() && c != '0');
        }
    }
    (n, rps)
}

/// True if irqbalance runs under `root`: a /proc/<pid>/comm says
/// `irqbalance`, or /run/irqbalance (its socket directory) exists.
pub fn irqbalance_running(root: &Path) -> bool {
    if root.join("run/irqbalance").exists() {
        return true;
    }
    let Ok(dir) = std::fs::read_dir(root.join("proc")) else { return false };
    dir.flatten().any(|e| {
        e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())
            && std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "irqbalance")
    })
}

/// The rps_cpus mask selecting `cpus`: hex, 32-bit groups separated by
/// commas as the kernel prints them (`f`, `ff,ffffffff`).
pub fn cpu_mask(cpus: &[usize]) -> String {
    let words = cpus.iter().max().map_or(1, |&m| m / 32 + 1);
    let mut w = vec![0u32; words];
    for &c in cpus {
        w[c / 32] |= 1 << (c % 32);
    }
    let mut s = String::new();
    for (i, word) in w.iter().rev().enumerate() {
        if i == 0 {
            s.push_str(&format!("{word:x}"));
        } else {
            s.push_str(&format!(",{word:08x}"));
        }
    }
    s
}
