//! `ztna-agent`: the Linux agent. Creates a TUN device, routes the
//! configured service prefixes through it and tunnels what arrives there
//! to the relay, driving the sans-I/O `AgentCore` from a poll(2) loop.
//!
//! stdout carries one line per event for scripts and tests (`connected`,
//! `observed address ADDR`, `registered SERVICE flow N`, `disconnected
//! retry_in_ms=N`, `stats k=v …` and `status {JSON}` on SIGUSR1 and at
//! exit); logs go to stderr (`RUST_LOG`, default info; `--log-format
//! json`). With `status = "127.0.0.1:9092"` the same JSON is served at
//! `GET /status`, and the counters at `GET /metrics` (Prometheus,
//! `ztna_agent_*`). Direct paths print `path service=S via=direct addr=A
//! time_to_direct_ms=T` and `path service=S via=relay state=W` (W says
//! why: docs/protocol/direct.md §11.8).
//!
//! ```toml
//! relay = "203.0.113.7:4433"
//! server_name = "relay.example.com"   # required: a name (or the IP) the relay certificate covers
//! ca = "/etc/ztna/ca.pem"
//! cert = "/etc/ztna/agent.pem"         # spiffe://<trust-domain>/agent/<name>
//! key = "/etc/ztna/agent.key"
//! # insecure = false                  # skip certificate verification
//! # listen = "0.0.0.0:0"              # local UDP address
//! # status = "127.0.0.1:9092"         # GET /status (JSON)
//!
//! [tun]                               # all optional
//! name = "ztna0"
//! address = "100.64.0.1/32"
//! mtu = 1280
//!
//! [[service]]
//! name = "echo"
//! cidrs = ["100.100.0.10/32"]
//! # path = "auto"                     # or "direct-only", "relay-only"
//!
//! [direct]                            # all optional (docs/protocol/direct.md §11.4, §11.9)
//! # probe_first_ms = 50, probe_max_ms = 1000, round_ms = 8000,
//! # min_round_gap_ms = 5000, second_round_ms = 31000,
//! # upgrade_every_ms = 60000, keepalive_ms = 1000, direct_timeout_ms = 3000
//! # port_prediction = 0               # hard NATs, opt-in: punches per round (at most 1024)
//! ```
//!
//! Flags (`--relay`, `--server-name`, `--ca`, `--cert`, `--key`, `--insecure`, `--listen`,
//! `--status`, `--tun-name`, `--tun-address`, `--mtu`) override the file;
//! `ztna-agent check-config --config FILE` validates without touching the
//! system. Needs CAP_NET_ADMIN (TUN device, routes) and iproute2.

#[cfg(target_os = "linux")]
mod agent;
mod config;
#[cfg(target_os = "linux")]
mod status;
#[cfg(target_os = "linux")]
mod tun;
#[cfg(target_os = "linux")]
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

#[derive(Parser, Debug)]
#[command(name = "ztna-agent", version, about = "ZTNA agent: a TUN device whose service prefixes go through the relay")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Log format on stderr: text (colour only on a terminal) or json (one
    /// object per line, for log shippers).
    #[arg(long, global = true, default_value = "text")]
    log_format: ztna_ops::logging::LogFormat,
    /// TOML config file (required; flags override it).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Relay address (IP:PORT).
    #[arg(long, global = true)]
    relay: Option<SocketAddr>,
    /// TLS server name the relay's certificate must cover.
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// CA file that signs the relay's certificate.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// This agent's certificate (its SPIFFE identity).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Do not verify the relay's certificate (local experiments only).
    #[arg(long, global = true)]
    insecure: bool,
    /// Local UDP address (default: any, ephemeral port).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Serve `GET /status` (JSON) on this address (e.g. 127.0.0.1:9092).
    #[arg(long, global = true)]
    status: Option<SocketAddr>,
    /// TUN device name.
    #[arg(long, global = true)]
    tun_name: Option<String>,
    /// TUN device address, e.g. 100.64.0.1/32.
    #[arg(long, global = true)]
    tun_address: Option<String>,
    /// TUN device MTU.
    #[arg(long, global = true)]
    mtu: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the config file and flags offline, then exit: the config, and
    /// that certificate and key belong together, the certificate is an
    /// agent identity, valid now and signed by the CA.
    CheckConfig,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    ztna_ops::logging::init("info", cli.log_format);
    ztna_ops::logging::exit_code(run_cli(cli))
}

fn run_cli(cli: Cli) -> Result<()> {
    let o = Overrides {
        relay: cli.relay,
        server_name: cli.server_name.clone(),
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        insecure: cli.insecure,
        listen: cli.listen,
        status: cli.status,
        tun_name: cli.tun_name.clone(),
        tun_address: cli.tun_address.clone(),
        mtu: cli.mtu,
    };
    // Global flags cannot be `required` in clap; check by hand.
    let Some(path) = &cli.config else { anyhow::bail!("--config FILE is required") };
    let cfg = Config::load(path, &o)?;
    if cfg.insecure {
        tracing::warn!(
            "relay certificate verification is OFF (insecure): anyone on the path can impersonate the relay"
        );
    }
    if let Some(Cmd::CheckConfig) = cli.cmd {
        if let Some(ca) = &cfg.ca {
            let own =
                ztna_ops::tls::check_own_files(ca, &cfg.cert, &cfg.key, ztna_control::identity::Kind::Agent, true)?;
            ztna_ops::tls::print_own(&own);
        }
        println!(
            "config ok: relay {} ({}), tun {} {} mtu {}, {} service(s), {} route(s)",
            cfg.relay,
            cfg.server_name,
            cfg.tun_name,
            cfg.tun_address,
            cfg.mtu,
            cfg.routes.iter().map(|(s, _)| s).collect::<std::collections::BTreeSet<_>>().len(),
            cfg.routes.len()
        );
        return Ok(());
    }
    run(&cfg)
}

#[cfg(target_os = "linux")]
fn run(cfg: &Config) -> Result<()> {
    use anyhow::Context;
    use std::time::Instant;
    use tracing::{info, warn};
    use ztna_agent::agent_core::AgentCore;

    if cfg.insecure {
        warn!("relay certificate verification is OFF (--insecure): anyone can impersonate the relay");
    }
    // Signals first, so a SIGTERM during set-up still tears down cleanly.
    let signals = agent::Signals::install().context("installing signal handlers")?;
    let dev = tun::create(cfg)?;
    for (service, cidr) in &cfg.routes {
        tun::add_route(&cfg.tun_name, cidr)?;
        info!(%service, %cidr, dev = %cfg.tun_name, "route");
    }
    info!(dev = %cfg.tun_name, address = %cfg.tun_address, mtu = cfg.mtu, "TUN device up");
    println!("tun {} address {} mtu {}", cfg.tun_name, cfg.tun_address, cfg.mtu);
    // One socket, not connected: relays and direct paths share it.
    let sock = ztna_udp::bind(cfg.listen).with_context(|| format!("UDP socket on {}", cfg.listen))?;
    let local = sock.local_addr()?;
    info!(%local, relay = %cfg.relay, server_name = %cfg.server_name, "connecting");
    let core = AgentCore::new(cfg.agent_config(local)?, seed()?, Instant::now())?;
    let mut a = agent::Agent::new(core, dev, sock, cfg.relay, cfg.listen, cfg.mtu);
    a.advertise_host_addresses(&cfg.tun_name);
    if let Some(addr) = cfg.status {
        let addr = agent::serve_status(addr, a.status_board())?;
        info!(%addr, "http://{addr}/status");
    }
    a.run(&signals)?;
    // Dropping the device (end of `a`) deletes it and its routes.
    info!("stopped");
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn run(_cfg: &Config) -> Result<()> {
    anyhow::bail!("ztna-agent runs on Linux only (other platforms embed the agent through the C API)")
}

/// Random seed for the session (connection IDs, backoff jitter).
#[cfg(target_os = "linux")]
fn seed() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b))?;
    Ok(u64::from_le_bytes(b))
}
