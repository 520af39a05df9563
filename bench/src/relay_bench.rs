//! `ztna-bench relay`: the load through the QUIC relay, in-process or
//! external.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use ztna_control::identity::Kind;
use ztna_control::quic::TlsOptions;
use ztna_relay::limits::{CongestionControl, Limits};
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_relay::stats::StatsSnapshot;
use ztna_udp::IoBackend;

use crate::cpu;
use crate::load::{self, LoadConfig, Sample};
use crate::quic_clients::{ClientSetup, QuicClients};
use crate::report::{Report, TargetInfo};

/// Service name the bench registers.
pub const SERVICE: &str = "bench";

/// Which relay to load.
#[derive(Debug, Clone)]
pub enum RelayTarget {
    /// Start one here (dev certificates, 127.0.0.1, ephemeral port).
    InProcess { workers: usize, io_backend: IoBackend, pin_cores: bool, congestion_control: CongestionControl },
    /// A running relay.
    External {
        addr: SocketAddr,
        server_name: String,
        /// CA file, or `None` to skip verification (--insecure).
        ca: Option<PathBuf>,
        /// Certificate and key of the agents' and the connectors' identity.
        agent_id: (PathBuf, PathBuf),
        connector_id: (PathBuf, PathBuf),
        /// Its process, for CPU accounting.
        pid: Option<u32>,
    },
}

#[derive(Debug, Clone)]
pub struct RelayBenchConfig {
    pub target: RelayTarget,
    pub load: LoadConfig,
}

/// Starts an in-process development relay on 127.0.0.1.
pub fn start_dev_relay(
    workers: usize,
    io_backend: IoBackend,
    pin_cores: bool,
    congestion_control: CongestionControl,
) -> Result<RelayHandle> {
    let limits = Limits { congestion_control, ..Limits::default() };
    let cfg = RelayConfig {
        limits,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers: Some(workers),
        dev: true,
        io_backend,
        steering: true,
        pin_cores,
        shutdown_grace_ms: 500,
        policy_toml: Some(bench_policy(SERVICE)),
        ..RelayConfig::default()
    };
    server::start(&cfg)
}

/// Identity of every benchmark agent (dev trust domain).
pub const BENCH_AGENT: &str = "bench-agent";
/// Identity of every benchmark connector.
pub const BENCH_CONNECTOR: &str = "bench-connector";

/// A policy letting [`BENCH_CONNECTOR`] serve `service` and every agent
/// reach it.
pub fn bench_policy(service: &str) -> String {
    format!("[services.{service}]\nconnectors = [\"{BENCH_CONNECTOR}\"]\nagents = [\"*\"]\n")
}

/// TLS options for benchmark agents and connectors: trust the relay's
/// development CA and present a certificate it issued.
pub fn dev_tls(h: &RelayHandle) -> Result<(TlsOptions, TlsOptions)> {
    let Some(pki) = &h.dev_pki else { bail!("relay has no development PKI") };
    Ok((pki.client_tls(Kind::Agent, BENCH_AGENT)?, pki.client_tls(Kind::Connector, BENCH_CONNECTOR)?))
}

/// Counter deltas `b - a`, split into non-zero drops and other non-zero
/// counters (gauges such as conns_active are reported as their end value).
pub fn counter_deltas(
    a: &StatsSnapshot,
    b: &StatsSnapshot,
) -> (std::collections::BTreeMap<String, u64>, std::collections::BTreeMap<String, u64>) {
    let mut drops = std::collections::BTreeMap::new();
    let mut other = std::collections::BTreeMap::new();
    for ((name, va), (_, vb)) in a.fields().into_iter().zip(b.fields()) {
        let gauge = matches!(name, "conns_active" | "udp_gso" | "udp_gro");
        let v = if gauge { vb } else { vb.saturating_sub(va) };
        if v == 0 {
            continue;
        }
        if name.starts_with("drop_") {
            drops.insert(name.to_owned(), v);
        } else {
            other.insert(name.to_owned(), v);
        }
    }
    (drops, other)
}

/// Runs the relay benchmark.
pub fn run(cfg: &RelayBenchConfig) -> Result<Report> {
    cfg.load.validate()?;
    match &cfg.target {
        RelayTarget::InProcess { workers, io_backend, pin_cores, congestion_control } => {
            let h = start_dev_relay(*workers, *io_backend, *pin_cores, *congestion_control)?;
            let r = run_in_process(&h, *workers, &cfg.load).map(|mut report| {
                report.notes.push(format!("relay congestion control: {congestion_control:?}"));
                report
            });
            h.shutdown();
            r
        }
        RelayTarget::External { addr, server_name, ca, agent_id, connector_id, pid } => {
            let tls = |(cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
                ztna_ops::tls::read_client_tls(ca.as_deref(), Some(cert), Some(key), ca.is_some())
            };
            let setup = setup(*addr, server_name, (tls(agent_id)?, tls(connector_id)?), &cfg.load);
            let mut clients = QuicClients::connect(&setup)?;
            check_size(&clients, cfg.load.size)?;
            let mut probe = || Sample {
                forwarded: None,
                cpu: pid.and_then(|p| cpu::process_cpu_time(p).ok()),
                process_cpu: cpu::process_cpu_time(std::process::id()).ok(),
            };
            let (result, samples) = load::run_load(&mut clients, &cfg.load, &mut probe)?;
            let backend = "unknown (external)".to_owned();
            let target = TargetInfo {
                kind: "relay".into(),
                address: addr.to_string(),
                in_process: false,
                io_backend: backend,
                workers: None,
            };
            let mut report = Report::new(target, &cfg.load, result, &samples);
            add_client_notes(&mut report, &clients);
            clients.close();
            if pid.is_none() {
                report.notes.push("no --relay-pid: relay CPU time unknown".into());
            }
            Ok(report)
        }
    }
}

fn setup(relay: SocketAddr, server_name: &str, tls: (TlsOptions, TlsOptions), load: &LoadConfig) -> ClientSetup {
    ClientSetup {
        relay,
        server_name: server_name.to_owned(),
        agent_tls: tls.0,
        connector_tls: tls.1,
        service: SERVICE.to_owned(),
        connectors: load.connectors,
        agents: load.agents,
        timeout: Duration::from_secs(15),
        gso: load.client_gso,
        gro: load.client_gro,
    }
}

fn check_size(clients: &QuicClients, size: usize) -> Result<()> {
    if let Some(max) = clients.max_payload() {
        if size > max {
            bail!("--size {size} does not fit a DATAGRAM frame on this path (at most {max} bytes)");
        }
    }
    Ok(())
}

fn add_client_notes(report: &mut Report, clients: &QuicClients) {
    let (send_errors, udp_errors) = clients.send_errors();
    if send_errors > 0 {
        report.notes.push(format!("{send_errors} agent datagrams refused by the session (not connected / too large)"));
    }
    if udp_errors > 0 {
        report.notes.push(format!("{udp_errors} client UDP sends failed (socket buffer full)"));
    }
    let (lost, spurious) = clients.quic_lost();
    if lost > 0 {
        report.notes.push(format!("client QUIC sessions declared {lost} packets lost ({spurious} spurious)"));
    }
    let disconnects: usize = clients.info.iter().map(|i| i.disconnects.len()).sum();
    if disconnects > 0 {
        report.notes.push(format!("{disconnects} client disconnects during the run"));
    }
}

/// Runs the load against a relay started in this process.
pub fn run_in_process(h: &RelayHandle, workers: usize, load: &LoadConfig) -> Result<Report> {
    let tls = dev_tls(h)?;
    let setup = setup(h.local_addr, "localhost", tls, load);
    let mut clients = QuicClients::connect(&setup)?;
    check_size(&clients, load.size)?;
    let before = h.totals();
    let mut probe = || Sample::in_process(h.totals().datagrams_forwarded, h.cpu_time());
    let (result, samples) = load::run_load(&mut clients, load, &mut probe)?;
    let after = h.totals();
    let target = TargetInfo {
        kind: "relay".into(),
        address: h.local_addr.to_string(),
        in_process: true,
        io_backend: format!("{:?}", h.backend).to_lowercase(),
        workers: Some(workers),
    };
    let mut report = Report::new(target, load, result, &samples);
    let (drops, counters) = counter_deltas(&before, &after);
    report.drops = drops;
    report.counters = counters;
    if !h.steering {
        report.notes.push("BPF steering unavailable: packets may be handed off between workers in software".into());
    }
    add_client_notes(&mut report, &clients);
    clients.close();
    Ok(report)
}
