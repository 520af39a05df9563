#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! NIC checks against fake /proc and /sys trees built from the fixtures in
//! tuning/testdata (see its README).

use std::path::{Path, PathBuf};
use std::process::Command;

use ztna_tuning::irq::{self, Spread};
use ztna_tuning::nic::{self, Level, Nic, NicReport, OffloadState};

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fake root in the temp dir, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        let dir = std::env::temp_dir().join(format!("ztna-tune-nic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sys/class/net")).unwrap();
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        Root(dir)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// An interface; with `device`, a `device` link to sys/devices/<device>
    /// as on a real host (virtual interfaces have none). One rx queue per
    /// `rps` entry, with that rps_cpus mask.
    fn iface(&self, name: &str, device: Option<&str>, rps: &[&str]) {
        let dir = self.0.join("sys/class/net").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(dev) = device {
            std::fs::create_dir_all(self.0.join("sys/devices").join(dev)).unwrap();
            std::os::unix::fs::symlink(Path::new("../../../devices").join(dev), dir.join("device")).unwrap();
        }
        for (i, mask) in rps.iter().enumerate() {
            self.write(&format!("sys/class/net/{name}/queues/rx-{i}/rps_cpus"), &format!("{mask}\n"));
            self.write(&format!("sys/class/net/{name}/queues/tx-{i}/xps_cpus"), "0\n");
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Raspberry Pi 4: eth0 (bcmgenet, one rx queue, RPS off) and wlan0, both
/// interrupt lines of eth0 on CPU0, no irqbalance; plus the virtual
/// interfaces a Pi running k3s has.
fn pi4_root(tag: &str) -> Root {
    let r = Root::new(tag);
    r.iface("eth0", Some("platform/scb/fd580000.ethernet"), &["0"]);
    r.iface("wlan0", Some("platform/emmc2bus/fe300000.mmcnr/mmc_host/mmc1/mmc1:0001:1"), &["00000000"]);
    r.iface("lo", None, &["0"]);
    r.iface("veth1a2b3c", None, &["0"]);
    r.iface("docker0", None, &[]);
    r.iface("br-5f2e", None, &[]);
    r.iface("tun0", None, &["0"]);
    // Skipped by name even with a device entry.
    r.iface("cni0", Some("virtual/cni0"), &["0"]);
    r.write("proc/interrupts", &fixture("interrupts-pi4.txt"));
    r.write("proc/1/comm", "systemd\n");
    r.write("proc/812/comm", "sshd\n");
    r.write("proc/self/comm", "irqbalance\n"); // not a pid: ignored
    r.write("sys/class/net/eth0/gro_flush_timeout", "0\n");
    r.write("sys/class/net/eth0/napi_defer_hard_irqs", "0\n");
    r
}

fn pi4_ethtool(iface: &str) -> Option<String> {
    (iface == "eth0").then(|| fixture("ethtool-k-pi4-bcmgenet.txt"))
}

fn get<'a>(reports: &'a [NicReport], name: &str) -> &'a NicReport {
    reports.iter().find(|r| r.nic.name == name).unwrap()
}

fn state(r: &NicReport, feature: &str) -> OffloadState {
    r.offloads.iter().find(|o| o.feature == feature).unwrap().state
}

fn warnings(r: &NicReport) -> Vec<String> {
    nic::report_lines(r).into_iter().filter(|(l, _)| *l == Level::Warn).map(|(_, t)| t).collect()
}

#[test]
fn physical_interfaces_skip_virtual_ones() {
    let r = pi4_root("phys");
    let nics = nic::physical_interfaces(&r.0);
    assert_eq!(
        nics,
        vec![
            Nic { name: "eth0".into(), device: Some("fd580000.ethernet".into()) },
            Nic { name: "wlan0".into(), device: Some("mmc1:0001:1".into()) },
        ]
    );
    for v in ["lo", "veth0", "docker0", "br-1", "cni0", "lxcbr0", "cilium_host", "tun0", "utun3"] {
        assert!(nic::is_virtual_name(v), "{v}");
    }
    for p in ["eth0", "wlan0", "ens5", "enp1s0", "end0", "lobby0"] {
        assert!(!nic::is_virtual_name(p), "{p}");
    }
}

#[test]
fn pi4_single_queue_nic_on_one_cpu_gets_irq_and_rps_warnings() {
    let r = pi4_root("pi4");
    let reports = nic::check_nics(&r.0, &pi4_ethtool);
    assert_eq!(reports.len(), 2);
    let eth0 = get(&reports, "eth0");

    assert_eq!(state(eth0, "generic-receive-offload"), OffloadState::On);
    assert_eq!(state(eth0, "generic-segmentation-offload"), OffloadState::On);
    assert_eq!(state(eth0, "tx-udp-segmentation"), OffloadState::Unsupported, "off [fixed]");
    assert_eq!(state(eth0, "rx-udp-gro-forwarding"), OffloadState::Off);
    assert_eq!((eth0.gro_flush_timeout, eth0.napi_defer_hard_irqs), (Some(0), Some(0)));

    let q = &eth0.irq;
    assert_eq!(q.cpus, vec![0, 1, 2, 3]);
    assert_eq!(q.irqs, vec!["27", "28"], "the two `eth0` lines, nothing else");
    assert_eq!(q.per_cpu, vec![8_412_377 + 3_127_745, 0, 0, 0]);
    assert_eq!(q.spread, Spread::Concentrated { cpu: 0, percent: 100 });
    assert!(!q.irqbalance, "/proc/self is not a process of its own");
    assert_eq!((q.rx_queues, q.rps), (1, false));
    assert!(q.needs_rps());

    let w = warnings(eth0);
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(
        w[0].starts_with("eth0 rx-udp-gro-forwarding") && w[0].contains("`ethtool -K eth0 rx-udp-gro-forwarding on`")
    );
    assert!(w[1].contains("CPU0 takes 100% of 11540122") && w[1].contains("/proc/irq/{27,28}/smp_affinity_list"));
    assert!(w[2].contains("echo f >/sys/class/net/eth0/queues/rx-0/rps_cpus"), "{}", w[2]);

    // wlan0: no interrupt line names it (the SDIO host's `mmc1` does), so the
    // spread is unknown; it still has a single rx queue without RPS.
    let wlan0 = get(&reports, "wlan0");
    assert!(wlan0.offloads.iter().all(|o| o.state == OffloadState::Unknown), "no ethtool output for wlan0");
    assert_eq!(wlan0.irq.spread, Spread::Unknown);
    assert!(wlan0.irq.irqs.is_empty());
    let lines = nic::report_lines(wlan0);
    assert!(
        lines.contains(&(Level::Info, "wlan0 offloads unknown (no `ethtool -k wlan0` output; install ethtool)".into()))
    );
    assert!(lines.contains(&(
        Level::Info,
        "wlan0 interrupts: no /proc/interrupts line names wlan0 or its device; spread unknown".into()
    )));
    assert_eq!(warnings(wlan0).len(), 1, "{lines:#?}");
}

#[test]
fn rps_or_irqbalance_silence_their_warnings() {
    let r = pi4_root("pi4-tuned");
    r.write("sys/class/net/eth0/queues/rx-0/rps_cpus", "e\n");
    std::fs::create_dir_all(r.0.join("run/irqbalance")).unwrap();
    let reports = nic::check_nics(&r.0, &pi4_ethtool);
    let q = &get(&reports, "eth0").irq;
    assert!(q.irqbalance && q.rps && !q.needs_rps());
    assert_eq!(q.spread, Spread::Concentrated { cpu: 0, percent: 100 }, "still one CPU, now informational");
    let lines = nic::report_lines(get(&reports, "eth0"));
    assert!(
        lines.contains(&(Level::Info, "eth0 interrupts: CPU0 takes 100% of 11540122; irqbalance is running".into()))
    );
    assert_eq!(warnings(get(&reports, "eth0")).len(), 1, "only rx-udp-gro-forwarding: {lines:#?}");

    // irqbalance found as a process instead of its run directory.
    let r = pi4_root("pi4-proc");
    r.write("proc/4242/comm", "irqbalance\n");
    assert!(irq::irqbalance_running(&r.0));
    assert!(!irq::irqbalance_running(&pi4_root("pi4-none").0));
}

#[test]
fn cloud_vm_multiqueue_virtio_is_spread_by_device_name() {
    let r = Root::new("cloud");
    r.iface("ens3", Some("pci0000:00/0000:00:03.0/virtio0"), &["0", "0", "0", "0"]);
    r.iface("docker0", None, &["0"]);
    r.write("proc/interrupts", &fixture("interrupts-cloud-virtio-4cpu.txt"));
    let virtio = |iface: &str| (iface == "ens3").then(|| fixture("ethtool-k-virtio-5.10.txt"));
    let reports = nic::check_nics(&r.0, &virtio);
    assert_eq!(reports.len(), 1);
    let ens3 = &reports[0];
    assert_eq!(ens3.nic.device.as_deref(), Some("virtio0"));

    assert_eq!(state(ens3, "generic-receive-offload"), OffloadState::Off, "turned off, can be turned on");
    assert_eq!(state(ens3, "generic-segmentation-offload"), OffloadState::On);
    assert_eq!(state(ens3, "tx-udp-segmentation"), OffloadState::Unsupported);
    assert_eq!(state(ens3, "rx-udp-gro-forwarding"), OffloadState::Unsupported, "5.10 has no such feature");
    assert_eq!((ens3.gro_flush_timeout, ens3.napi_defer_hard_irqs), (None, None));

    let q = &ens3.irq;
    let want: Vec<String> = (24..=32).map(|n| n.to_string()).collect();
    assert_eq!(q.irqs, want, "virtio0-* rows (named after the device), not virtio1 (the disk)");
    assert_eq!(q.per_cpu, vec![4_411_885, 4_566_366, 4_144_466, 4_156_022]);
    assert_eq!(q.spread, Spread::Even { top_percent: 26 });
    assert_eq!((q.rx_queues, q.rps, q.needs_rps()), (4, false, false), "multi-queue: RSS, no RPS needed");

    let w = warnings(ens3);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].starts_with("ens3 generic-receive-offload")
            && w[0].contains("`ethtool -K ens3 generic-receive-offload on`")
    );
}

#[test]
fn all_offloads_on_and_one_cpu_hosts_are_fine() {
    let all_on = nic::offloads(Some(&fixture("ethtool-k-mlx5.txt")));
    assert!(all_on.iter().all(|o| o.state == OffloadState::On), "{all_on:#?}");
    let unknown = nic::offloads(None);
    assert!(unknown.iter().all(|o| o.state == OffloadState::Unknown));

    // A one-vCPU VM: nothing to spread, RPS pointless.
    let r = Root::new("one-cpu");
    r.iface("eth0", Some("virtio1"), &["0"]);
    r.write("proc/interrupts", "           CPU0\n 25:   99999   PCI-MSI 49153-edge  virtio1-input.0\n");
    let reports = nic::check_nics(&r.0, &|_: &str| Some(fixture("ethtool-k-mlx5.txt")));
    let q = &reports[0].irq;
    assert_eq!((q.spread, q.total, q.needs_rps()), (Spread::SingleCpu, 99_999, false));

    // A NIC with a handful of interrupts so far: no verdict yet.
    r.write(
        "proc/interrupts",
        "   CPU0  CPU1
 25:   999   0   PCI-MSI 49153-edge  virtio1-input.0
",
    );
    let quiet = &nic::check_nics(&r.0, &|_: &str| None)[0];
    assert_eq!((quiet.irq.spread, quiet.irq.total), (Spread::Unknown, 999));
    assert!(nic::report_lines(quiet)
        .contains(&(Level::Info, "eth0 interrupts: too few to judge the spread (999 so far)".into())));
    assert!(warnings(&reports[0]).is_empty(), "{:#?}", nic::report_lines(&reports[0]));
}

#[test]
fn parsers_handle_real_world_shapes() {
    let f = nic::parse_ethtool_features(&fixture("ethtool-k-virtio-5.10.txt"));
    assert_eq!(f["rx-checksumming"], nic::Feature { on: true, fixed: true });
    assert_eq!(f["tx-tcp-segmentation"], nic::Feature { on: true, fixed: false }, "indented sub-feature");
    assert_eq!(f["rx-gro-hw"], nic::Feature { on: false, fixed: false }, "off [requested on]");
    assert!(!f.contains_key("Features for ens3"));

    // Offline CPU1 (columns CPU0 CPU2), a short ERR row, a multi-handler row.
    let ints = irq::parse_interrupts(
        "           CPU0       CPU2\n 30:   5   7   GICv2 1 Level   eth1-rx-0\n\
         31:  1  2  GICv2 2 Level   eth10-rx-0, eth1-tx-0\nERR:   3\n",
    );
    assert_eq!(ints.cpus, vec![0, 2]);
    assert_eq!(ints.rows[0].counts, vec![5, 7]);
    assert_eq!(ints.rows[0].desc, "GICv2 1 Level   eth1-rx-0");
    assert_eq!((ints.rows[2].irq.as_str(), ints.rows[2].counts.as_slice()), ("ERR", &[3u64][..]));
    let eth1 = Nic { name: "eth1".into(), device: None };
    assert_eq!(irq::nic_rows(&ints, &eth1).count(), 2);
    let eth10 = Nic { name: "eth10".into(), device: None };
    assert_eq!(irq::nic_rows(&ints, &eth10).map(|r| r.irq.as_str()).collect::<Vec<_>>(), vec!["31"]);
    assert!(irq::contains_word("mlx5_comp0@pci:0000:00:05.0", "0000:00:05.0"));
    assert!(!irq::contains_word("virtio10-input.0", "virtio1"));
    assert!(!irq::contains_word("eth0", ""));

    assert_eq!(irq::cpu_mask(&[0, 1, 2, 3]), "f");
    assert_eq!(irq::cpu_mask(&[0, 2]), "5");
    assert_eq!(irq::cpu_mask(&[33]), "2,00000000");
    assert_eq!(irq::cpu_mask(&(0..40).collect::<Vec<_>>()), "ff,ffffffff");
}

#[test]
fn ztna_tune_check_prints_nic_findings_from_a_fake_root() {
    let r = pi4_root("bin");
    let script = r.0.join("fake-ethtool");
    let fixture_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ethtool-k-pi4-bcmgenet.txt");
    std::fs::write(
        &script,
        format!("#!/bin/sh\n[ \"$1\" = -k ] && [ \"$2\" = eth0 ] && exec cat '{}'\nexit 1\n", fixture_path.display()),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();

    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ztna-tune"))
            .args(["check", "--profile", "pi", "--root"])
            .arg(&r.0)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&["--ethtool", script.to_str().unwrap()]);
    assert!(text.contains("\nWARN eth0 rx-udp-gro-forwarding "), "{text}");
    assert!(text.contains("\nok   eth0 generic-receive-offload "), "{text}");
    assert!(text.contains("\ninfo eth0 tx-udp-segmentation "), "{text}");
    assert!(text.contains("\nWARN eth0 interrupts: CPU0 takes 100%"), "{text}");
    assert!(text.contains("\ninfo wlan0 offloads unknown"), "the fake ethtool fails for wlan0: {text}");
    assert!(text.contains("\n4 NIC setting(s) below recommendation"), "3 for eth0, RPS for wlan0: {text}");
    assert!(!text.contains("veth1a2b3c") && !text.contains("docker0") && !text.contains("cni0"), "{text}");

    // Under a --root other than / ethtool is not run unless asked for.
    let text = run(&[]);
    assert!(text.contains("\ninfo eth0 offloads unknown"), "{text}");
}
