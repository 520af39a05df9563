//! Per-NIC checks: which interfaces are physical, their GRO/GSO offloads
//! (from `ethtool -k` output; the command is injectable so tests feed
//! fixtures), the NAPI knobs under /sys/class/net/<if>/, and how their
//! interrupts spread over the CPUs (see [`crate::irq`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::irq::{self, IrqReport, Spread};

/// A physical network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    /// Last component of the `device` link's target (`virtio0`,
    /// `0000:00:05.0`, `fd580000.ethernet`); some drivers name their
    /// interrupts after it instead of the interface.
    pub device: Option<String>,
}

/// Name prefixes of virtual interfaces, skipped even if a `device` entry
/// exists (it does not for these on a real host).
const VIRTUAL_PREFIXES: &[&str] = &["veth", "docker", "br-", "cni", "lxc", "cilium", "tun", "utun"];

/// True for interface names that are virtual by convention.
pub fn is_virtual_name(name: &str) -> bool {
    name == "lo" || VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Physical interfaces under `root`: entries of /sys/class/net that have a
/// `device` link (virtual devices have none) and no virtual name; sorted.
pub fn physical_interfaces(root: &Path) -> Vec<Nic> {
    let Ok(dir) = std::fs::read_dir(root.join("sys/class/net")) else { return Vec::new() };
    let mut out: Vec<Nic> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let device = e.path().join("device");
            // symlink_metadata: present even if the link points outside `root`.
            if is_virtual_name(&name) || std::fs::symlink_metadata(&device).is_err() {
                return None;
            }
            let device =
                std::fs::read_link(&device).ok().and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
            Some(Nic { name, device })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One line of `ethtool -k` output: `name: on|off [fixed]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub on: bool,
    /// `[fixed]`: the driver does not let it change.
    pub fixed: bool,
}

/// Parses `ethtool -k IFACE` output into feature name -> state. Lines that
/// are not `name: on|off ...` (the `Features for eth0:` header) are
/// skipped; `off [requested on]` counts as off and changeable.
pub fn parse_ethtool_features(text: &str) -> BTreeMap<String, Feature> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(':')?;
            let on = match rest.split_whitespace().next()? {
                "on" => true,
                "off" => false,
                _ => return None,
            };
            Some((name.to_owned(), Feature { on, fixed: rest.contains("[fixed]") }))
        })
        .collect()
}

/// State of one recommended offload on one NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadState {
    On,
    /// Off, and `ethtool -K IFACE FEATURE on` may turn it on.
    Off,
    /// Off `[fixed]`, or not listed (older kernel or ethtool): the NIC or
    /// kernel cannot do it; nothing to change.
    Unsupported,
    /// No `ethtool -k` output (ethtool missing, failed, or not run under a
    /// `--root` other than `/`).
    Unknown,
}

/// A recommended offload and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offload {
    pub feature: &'static str,
    pub state: OffloadState,
    pub why: &'static str,
}

/// The offloads recommended on, and why.
pub const OFFLOADS: &[(&str, &str)] = &[
    ("generic-receive-offload", "GRO: a flow's received packets take one trip through the stack; needed for UDP GRO"),
    ("generic-segmentation-offload", "GSO: large sends are segmented once, late in the stack"),
    ("tx-udp-segmentation", "the NIC splits UDP GSO (UDP_SEGMENT) batches; otherwise the kernel does, in software"),
    ("rx-udp-gro-forwarding", "UDP GRO for forwarded traffic (to pods over veth and bridges); off by default"),
];

/// Classifies the [`OFFLOADS`] given `ethtool -k` output (`None`: not
/// available).
pub fn offloads(ethtool_k: Option<&str>) -> Vec<Offload> {
    let features = ethtool_k.map(parse_ethtool_features);
    OFFLOADS
        .iter()
        .map(|&(feature, why)| {
            let state = match &features {
                None => OffloadState::Unknown,
                Some(f) => match f.get(feature) {
                    Some(Feature { on: true, .. }) => OffloadState::On,
                    Some(Feature { on: false, fixed: false }) => OffloadState::Off,
                    Some(Feature { on: false, fixed: true }) | None => OffloadState::Unsupported,
                },
            };
            Offload { feature, state, why }
        })
        .collect()
}

/// Runs `<ethtool> -k IFACE`; `None` if the command is missing or fails
/// (unknown interface, no permission).
pub fn run_ethtool_k(ethtool: &str, iface: &str) -> Option<String> {
    let out = Command::new(ethtool).arg("-k").arg(iface).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything checked for one NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicReport {
    pub nic: Nic,
    pub offloads: Vec<Offload>,
    /// /sys/class/net/<if>/gro_flush_timeout (ns; informational).
    pub gro_flush_timeout: Option<u64>,
    /// /sys/class/net/<if>/napi_defer_hard_irqs (informational).
    pub napi_defer_hard_irqs: Option<u64>,
    pub irq: IrqReport,
}

/// Checks every physical NIC under `root`. `ethtool_k(iface)` returns the
/// output of `ethtool -k iface`, or `None` when it is not available.
pub fn check_nics(root: &Path, ethtool_k: &dyn Fn(&str) -> Option<String>) -> Vec<NicReport> {
    let interrupts = std::fs::read_to_string(root.join("proc/interrupts")).ok().map(|t| irq::parse_interrupts(&t));
    let irqbalance = irq::irqbalance_running(root);
    physical_interfaces(root)
        .into_iter()
        .map(|nic| {
            let sys = root.join("sys/class/net").join(&nic.name);
            let irq = irq::irq_report(root, &nic, interrupts.as_ref(), irqbalance);
            NicReport {
                offloads: offloads(ethtool_k(&nic.name).as_deref()),
                gro_flush_timeout: crate::read_u64(&sys.join("gro_flush_timeout")),
                napi_defer_hard_irqs: crate::read_u64(&sys.join("napi_defer_hard_irqs")),
                irq,
                nic,
            }
        })
        .collect()
}

/// How a report line counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Below recommendation; the text says what to do.
    Warn,
    /// Worth knowing; nothing to fix.
    Info,
}

/// The report lines for one NIC, in the order `ztna-tune check` prints them.
pub fn report_lines(r: &NicReport) -> Vec<(Level, String)> {
    let name = &r.nic.name;
    let mut out = Vec::new();
    if r.offloads.iter().all(|o| o.state == OffloadState::Unknown) {
        out.push((Level::Info, format!("{name} offloads unknown (no `ethtool -k {name}` output; install ethtool)")));
    } else {
        for o in &r.offloads {
            let (level, state) = match o.state {
                OffloadState::On => (Level::Ok, "on".to_owned()),
                OffloadState::Off => (Level::Warn, format!("off; `ethtool -K {name} {} on`", o.feature)),
                OffloadState::Unsupported => (Level::Info, "not supported by this NIC or kernel".to_owned()),
                OffloadState::Unknown => (Level::Info, "unknown".to_owned()),
            };
            out.push((level, format!("{name} {:<30} {state}  ({})", o.feature, o.why)));
        }
    }
    let show = |v: Option<u64>| v.map_or("unset".to_owned(), |v| v.to_string());
    out.push((
        Level::Info,
        format!(
            "{name} gro_flush_timeout {} ns, napi_defer_hard_irqs {}  (non-zero trades latency for fewer interrupts)",
            show(r.gro_flush_timeout),
            show(r.napi_defer_hard_irqs)
        ),
    ));
    let q = &r.irq;
    match q.spread {
        Spread::Unknown if q.irqs.is_empty() => out.push((
            Level::Info,
            format!("{name} interrupts: no /proc/interrupts line names {name} or its device; spread unknown"),
        )),
        Spread::Unknown => {
            out.push((Level::Info, format!("{name} interrupts: too few to judge the spread ({} so far)", q.total)))
        }
        Spread::SingleCpu => out.push((Level::Info, format!("{name} interrupts: one CPU, nothing to spread"))),
        Spread::Even { top_percent } => out.push((
            Level::Ok,
            format!("{name} interrupts spread over CPUs (busiest takes {top_percent}% of {})", q.total),
        )),
        Spread::Concentrated { cpu, percent } => {
            let (level, advice) = if q.irqbalance {
                (Level::Info, "irqbalance is running".to_owned())
            } else {
                (
                    Level::Warn,
                    format!(
                        "irqbalance not running; start it or set /proc/irq/{{{}}}/smp_affinity_list",
                        q.irqs.join(",")
                    ),
                )
            };
            out.push((level, format!("{name} interrupts: CPU{cpu} takes {percent}% of {}; {advice}", q.total)));
        }
    }
    if q.needs_rps() {
        out.push((
            Level::Warn,
            format!(
                "{name} one rx queue, RPS off; spread rx work: echo {} >/sys/class/net/{name}/queues/rx-0/rps_cpus",
                irq::cpu_mask(&q.cpus)
            ),
        ));
    }
    out
}
