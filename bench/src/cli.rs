//! Command line of `ztna-bench`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ztna_relay::limits::CongestionControl;
use ztna_udp::IoBackend;

use crate::handshakes::{FloodSource, HandshakeConfig, RetryModeName};
use crate::load::{LoadConfig, DEFAULT_WINDOW};
use crate::relay_bench::{RelayBenchConfig, RelayTarget};
use crate::report::{self, Report};
use crate::{compare, demo, probe, relay_bench, udp_bench};

#[derive(Parser, Debug)]
#[command(name = "ztna-bench", version, about = "Load generator and demo for the ZTNA relay")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Echo load through the QUIC relay (in-process unless --relay).
    Relay(RelayArgs),
    /// The same load through a plain UDP forwarder (no QUIC): the I/O floor.
    UdpForwarder(ForwarderArgs),
    /// In one run with the same load: the naive stock-quiche echo (E) and
    /// relay (N), then per backend the relay (R) and the UDP forwarder (U);
    /// prints CPU per datagram and R/E, N/R, R/U.
    Compare(CompareArgs),
    /// A relay, one echo connector, three agents: a short tour.
    Demo(DemoArgs),
    /// UDP echo rate and TCP goodput through agent core → relay →
    /// connector → echo (in-process, loopback).
    Tunnel(TunnelArgs),
    /// UDP and TCP echo servers until SIGTERM/SIGINT (a service for
    /// end-to-end tests).
    Echo(EchoArgs),
    /// Datagrams to a UDP echo service; prints how many came back.
    UdpProbe(UdpProbeArgs),
    /// A byte stream through a TCP echo service, verified byte for byte.
    TcpProbe(TcpProbeArgs),
    /// Handshake rate of an in-process relay with Retry on and off, and
    /// (--flood) its memory under a flood of Initials.
    Handshakes(HandshakesArgs),
    /// CPU of a connector loop turn with many idle UDP flows against one
    /// flow (in-process relay, connector driven from this thread).
    ConnectorTurns(ConnectorTurnsArgs),
    /// CPU per packet (agent + connector) of the end-to-end session against
    /// the relay-terminated baseline, in memory.
    E2eCost(E2eCostArgs),
    /// The whole system on loopback, end to end against a bench-only
    /// cleartext baseline in the same run: RTT, CPU per packet of agent,
    /// connector and relay, TCP goodput, and the ratios.
    E2eSystem(E2eSystemArgs),
}

#[derive(Args, Debug, Clone)]
pub struct E2eSystemArgs {
    /// I/O backend of the in-process relay.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    /// Relay worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// UDP payload bytes of the echo datagrams.
    #[arg(long, default_value_t = 1200)]
    pub size: usize,
    /// Echoes one at a time (RTT) per variant and round.
    #[arg(long, default_value_t = 2000)]
    pub rtt_echoes: u64,
    /// Echoes of the flood (CPU) per variant and round, and how many in flight.
    #[arg(long, default_value_t = 30_000)]
    pub echoes: u64,
    #[arg(long, default_value_t = 32)]
    pub window: u64,
    /// Bytes of the TCP echo per variant and round.
    #[arg(long, default_value_t = 16 << 20)]
    pub tcp_bytes: usize,
    /// Rounds; the variants alternate.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Run only this variant (to profile it).
    #[arg(long, value_parser = ["cleartext", "end_to_end", "direct"])]
    pub only: Option<String>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct E2eCostArgs {
    /// IP packet size in bytes.
    #[arg(long, default_value_t = 1200)]
    pub size: usize,
    /// Packets per variant.
    #[arg(long, default_value_t = 60_000)]
    pub packets: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Agent clients.
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    /// Echoing connector clients.
    #[arg(long, default_value_t = 1)]
    pub connectors: usize,
    /// Datagram payload bytes.
    #[arg(long, default_value_t = 1200)]
    pub size: usize,
    /// Datagrams per second over all agents; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of sending (then up to 1 s for stragglers).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Flat out: datagrams in flight per agent.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: u64,
    /// QUIC clients send one datagram per syscall entry instead of with
    /// UDP GSO (the default, as modern QUIC clients send).
    #[arg(long)]
    pub no_client_gso: bool,
    /// Clients receive one datagram per call instead of with UDP GRO (the
    /// default, as modern QUIC clients receive); then a target that sends
    /// with GSO pays the kernel's software segmentation on loopback.
    #[arg(long)]
    pub no_client_gro: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl LoadArgs {
    pub fn to_config(&self) -> Result<LoadConfig> {
        if !(self.duration.is_finite() && self.duration > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        let cfg = LoadConfig {
            agents: self.agents,
            connectors: self.connectors,
            size: self.size,
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            window: self.window,
            client_gso: !self.no_client_gso,
            client_gro: !self.no_client_gro,
            progress: !self.quiet,
            ..LoadConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// A running relay (HOST:PORT); without it one is started in-process.
    #[arg(long)]
    pub relay: Option<String>,
    /// CA file that signs the external relay's certificate.
    #[arg(long, conflicts_with = "insecure")]
    pub ca: Option<PathBuf>,
    /// Do not verify the external relay's certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Directory with the clients' certificates, as `ztna-relay ca issue`
    /// names them: agent-bench-agent.pem/.key and
    /// connector-bench-connector.pem/.key (external relay only).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// TLS server name: a DNS name or an IP address the relay's
    /// certificate covers (default: the host of --relay when it is a DNS
    /// name; required when --relay is an IP address).
    #[arg(long)]
    pub server_name: Option<String>,
    /// The external relay's process id, for CPU accounting.
    #[arg(long)]
    pub relay_pid: Option<u32>,
    /// Worker threads of the in-process relay.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// I/O backend of the in-process relay.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    /// Do not pin the in-process relay's workers to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Congestion controller of the in-process relay (`[limits]
    /// congestion_control`; quiche paces only with bbr2).
    #[arg(long, value_enum, default_value_t = CongestionControl::Cubic)]
    pub congestion_control: CongestionControl,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ForwarderArgs {
    /// I/O backend of the forwarder.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// I/O backends of the relay and the forwarder (each is run; one that
    /// this kernel lacks is skipped).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [IoBackend::Uring, IoBackend::Portable])]
    pub io_backend: Vec<IoBackend>,
    /// Worker threads of the relay.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Draw CPU per datagram (bars) and the RTT distributions (CDF) into
    /// this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// I/O backend of the relay.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    /// Print a JSON summary on stdout instead of the human one (or write it
    /// to FILE).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct TunnelArgs {
    /// I/O backend of the in-process relay.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    /// Relay worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// UDP datagrams to echo through the tunnel.
    #[arg(long, default_value_t = 100_000)]
    pub udp: u64,
    /// UDP datagrams in flight.
    #[arg(long, default_value_t = 64)]
    pub window: u64,
    /// TCP bytes to echo through the tunnel.
    #[arg(long, default_value_t = 100 << 20)]
    pub tcp_bytes: usize,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// UDP echo address.
    #[arg(long, default_value = "0.0.0.0:7")]
    pub udp: SocketAddr,
    /// TCP echo address.
    #[arg(long, default_value = "0.0.0.0:7")]
    pub tcp: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct UdpProbeArgs {
    /// Echo service address.
    #[arg(long)]
    pub to: SocketAddr,
    /// Datagrams to send.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Payload bytes (at least 8).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Milliseconds between datagrams.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Milliseconds to wait for echoes after the last datagram.
    #[arg(long, default_value_t = 2000)]
    pub wait_ms: u64,
    /// Echoes needed for success (default: all).
    #[arg(long)]
    pub min: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct TcpProbeArgs {
    /// Echo service address.
    #[arg(long)]
    pub to: SocketAddr,
    /// Bytes to send (and get back).
    #[arg(long, default_value_t = 1_000_000)]
    pub bytes: u64,
    /// Pace the sender to this many kilobytes per second (default: as fast
    /// as TCP goes).
    #[arg(long)]
    pub rate_kbps: Option<u64>,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectorTurnsArgs {
    /// End-to-end sessions (one agent identity each) of the large case.
    #[arg(long, default_value_t = 512)]
    pub sessions: usize,
    /// Idle UDP flows of the large table.
    #[arg(long, default_value_t = 4096)]
    pub flows: usize,
    /// Idle turns per measurement.
    #[arg(long, default_value_t = 2000)]
    pub turns: usize,
    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct HandshakesArgs {
    /// Retry mode of the relay (default: run `always`, then `off`).
    #[arg(long, value_enum)]
    pub retry: Option<RetryModeName>,
    /// Seconds of each phase (handshakes; flood).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Client handshakes in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Relay worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// I/O backend of the relay.
    #[arg(long, value_enum, default_value_t = IoBackend::Auto)]
    pub io_backend: IoBackend,
    /// Also flood the relay with Initials that never complete.
    #[arg(long)]
    pub flood: bool,
    /// Flood packets: a pool generated up front and replayed, or a new
    /// connection per packet.
    #[arg(long, value_enum, default_value_t = FloodSource::Pool)]
    pub flood_source: FloodSource,
    /// Distinct Initials in the flood pool.
    #[arg(long, default_value_t = 20_000)]
    pub flood_initials: usize,
    /// UDP sockets (source ports) of the flood.
    #[arg(long, default_value_t = 64)]
    pub flood_sockets: usize,
    /// Longest wait after the flood for the relay to drop half-open
    /// connections, seconds (default: idle timeout + 5 s).
    #[arg(long)]
    pub flood_wait: Option<f64>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl HandshakesArgs {
    pub fn to_config(&self) -> Result<HandshakeConfig> {
        let secs = |v: f64, flag: &str| -> Result<Duration> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a non-negative number of seconds");
            }
            Ok(Duration::from_secs_f64(v))
        };
        let d = HandshakeConfig::default();
        let cfg = HandshakeConfig {
            modes: self.retry.map_or(d.modes.clone(), |m| vec![m]),
            duration: secs(self.duration, "--duration")?,
            concurrency: self.concurrency,
            workers: self.workers,
            io_backend: self.io_backend,
            flood: self.flood,
            flood_source: self.flood_source,
            flood_initials: self.flood_initials,
            flood_sockets: self.flood_sockets,
            flood_wait: match self.flood_wait {
                Some(w) => secs(w, "--flood-wait")?,
                None => d.flood_wait,
            },
            progress: !self.quiet,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Resolves HOST:PORT (or [V6]:PORT).
fn resolve(relay: &str) -> Result<SocketAddr> {
    relay
        .to_socket_addrs()
        .with_context(|| format!("resolving {relay}"))?
        .next()
        .with_context(|| format!("{relay} resolves to nothing"))
}

/// `--server-name`, else the host of `--relay` when it is a DNS name (the
/// clients' rule: an IP address needs the name said).
fn server_name(a: &RelayArgs, relay: &str) -> Result<String> {
    match (&a.server_name, a.insecure) {
        (Some(n), _) => ztna_control::quic::check_server_name(n).map(|()| n.clone()),
        (None, true) => Ok("localhost".to_owned()),
        (None, false) => ztna_control::quic::default_server_name([relay]),
    }
    .map_err(|e| anyhow::anyhow!("{e} (--server-name)"))
}

fn relay_config(a: &RelayArgs) -> Result<RelayBenchConfig> {
    let load = a.load.to_config()?;
    let target = match &a.relay {
        None => {
            if a.ca.is_some() || a.insecure || a.relay_pid.is_some() || a.certs.is_some() {
                bail!("--ca, --insecure, --certs and --relay-pid apply to an external relay (--relay)");
            }
            RelayTarget::InProcess {
                workers: a.workers,
                io_backend: a.io_backend,
                pin_cores: !a.no_pin,
                congestion_control: a.congestion_control,
            }
        }
        Some(r) => {
            if a.ca.is_none() && !a.insecure {
                bail!("an external relay needs --ca PEM or --insecure");
            }
            let Some(dir) = &a.certs else {
                bail!("an external relay needs --certs DIR (client certificates: the relay authenticates every client)")
            };
            let pair = |stem: &str| (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
            RelayTarget::External {
                addr: resolve(r)?,
                server_name: server_name(a, r)?,
                ca: a.ca.clone(),
                agent_id: pair(&format!("agent-{}", crate::relay_bench::BENCH_AGENT)),
                connector_id: pair(&format!("connector-{}", crate::relay_bench::BENCH_CONNECTOR)),
                pid: a.relay_pid,
            }
        }
    };
    Ok(RelayBenchConfig { target, load })
}

fn finish(report: &Report, json: &Option<PathBuf>) -> Result<()> {
    report.print();
    if let Some(p) = json {
        report.write_json(p)?;
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main_with(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Relay(a) => {
            let report = relay_bench::run(&relay_config(&a)?)?;
            finish(&report, &a.load.json)?;
        }
        Cmd::UdpForwarder(a) => {
            let report = udp_bench::run(a.io_backend, &a.load.to_config()?)?;
            finish(&report, &a.load.json)?;
        }
        Cmd::Compare(a) => {
            let c = compare::run(&a.io_backend, a.workers, &a.load.to_config()?)?;
            if let Some(p) = &a.plot {
                compare::plot(&c, p)?;
                println!("plot: {}", p.display());
            }
            if let Some(p) = &a.load.json {
                report::write_json(p, &c)?;
            }
        }
        Cmd::Demo(a) => {
            let r = demo::run(a.io_backend)?;
            match a.json.as_deref() {
                Some(p) if p == std::path::Path::new("-") => println!("{}", serde_json::to_string_pretty(&r)?),
                Some(p) => {
                    r.print();
                    report::write_json(p, &r)?;
                }
                None => r.print(),
            }
            if !r.success {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Tunnel(a) => {
            let r = crate::tunnel::run(a.workers, a.io_backend, a.udp, a.window, a.tcp_bytes)?;
            crate::tunnel::print_summary(&r);
            if let Some(p) = &a.json {
                report::write_json(p, &r)?;
            }
        }
        Cmd::Echo(a) => {
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
            probe::echo(a.udp, a.tcp, &stop)?;
        }
        Cmd::UdpProbe(a) => {
            let r = probe::udp_probe(
                a.to,
                a.count,
                a.size,
                Duration::from_millis(a.interval_ms),
                Duration::from_millis(a.wait_ms),
            )?;
            println!("{}", r.line());
            if probe::check_udp(&r, a.min.unwrap_or(u64::from(a.count))).is_err() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::TcpProbe(a) => {
            if !(a.timeout.is_finite() && a.timeout > 0.0) {
                bail!("--timeout must be a positive number of seconds");
            }
            let r = probe::tcp_probe(a.to, a.bytes, a.rate_kbps.map(|k| k * 1000), Duration::from_secs_f64(a.timeout))?;
            println!("{}", r.line());
            if !r.verified {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::ConnectorTurns(a) => {
            let r = crate::connector_turns::run(a.sessions, a.flows, a.turns)?;
            r.print();
            if let Some(p) = &a.json {
                report::write_json(p, &r)?;
            }
        }
        Cmd::E2eCost(a) => {
            let r = crate::e2e_cost::run(a.size, a.packets)?;
            r.print();
            if let Some(p) = &a.json {
                report::write_json(p, &r)?;
            }
        }
        Cmd::E2eSystem(a) => {
            let plan = crate::e2e_system::SystemPlan {
                payload: a.size,
                rtt_echoes: a.rtt_echoes,
                flood_echoes: a.echoes,
                window: a.window,
                tcp_bytes: a.tcp_bytes,
                rounds: a.rounds,
                relay_workers: a.workers,
                only: match a.only.as_deref() {
                    Some("cleartext") => Some("cleartext"),
                    Some("direct") => Some("direct"),
                    Some(_) => Some("end_to_end"),
                    None => None,
                },
            };
            let r = crate::e2e_system::run(plan, a.io_backend)?;
            r.print();
            if let Some(p) = &a.json {
                report::write_json(p, &r)?;
            }
        }
        Cmd::Handshakes(a) => {
            let r = crate::handshakes::run(&a.to_config()?)?;
            r.print();
            if let Some(p) = &a.json {
                report::write_json(p, &r)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
