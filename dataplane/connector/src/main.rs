//! `ztna-connector`: serves private services through one or more relays.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ztna_connector::{Connector, ConnectorConfig};

#[derive(Parser, Debug)]
#[command(name = "ztna-connector", version, about = "ZTNA connector: tunneled IP packets to real backends")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Log format on stderr: text (colour only on a terminal) or json (one
    /// object per line, for log shippers).
    #[arg(long, global = true, default_value = "text")]
    log_format: ztna_ops::logging::LogFormat,
    /// TOML config file (required; clap cannot make a global flag required).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Relay as host:port (repeatable; replaces the file's list). A DNS
    /// name means every address it resolves to (a headless Service).
    #[arg(long, global = true)]
    relay: Vec<String>,
    /// HTTP /healthz, /readyz and /metrics, e.g. 0.0.0.0:9091.
    #[arg(long, global = true)]
    health: Option<SocketAddr>,
    /// Local UDP address (default 0.0.0.0:4434).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// CA file that signs the relays' certificates.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// This connector's certificate (spiffe://<trust-domain>/connector/<name>).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Do not verify relay certificates (local experiments only).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the configuration offline and exit: the config, and that
    /// certificate and key belong together, the certificate is a connector
    /// identity, valid now and signed by the CA.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ztna_ops::logging::init("info", cli.log_format);
    ztna_ops::logging::exit_code(run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let Some(path) = &cli.config else { anyhow::bail!("--config FILE is required") };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cfg: ConnectorConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if !cli.relay.is_empty() {
        cfg.relays = cli.relay.clone();
    }
    if let Some(h) = cli.health {
        cfg.health = Some(h);
    }
    if let Some(l) = cli.listen {
        cfg.listen = l;
    }
    if let Some(v) = &cli.cert {
        cfg.cert = Some(v.clone());
    }
    if let Some(v) = &cli.key {
        cfg.key = Some(v.clone());
    }
    if let Some(ca) = &cli.ca {
        cfg.ca = Some(ca.clone());
    }
    if cli.insecure {
        cfg.insecure = true;
    }
    cfg.validate()?;
    if let Some(Cmd::CheckConfig) = cli.cmd {
        if let (Some(ca), Some(cert), Some(key)) = (&cfg.ca, &cfg.cert, &cfg.key) {
            let own = ztna_ops::tls::check_own_files(ca, cert, key, ztna_control::identity::Kind::Connector, true)?;
            ztna_ops::tls::print_own(&own);
        }
        println!(
            "config ok: {} relay(s) (server name {}), {} service(s)",
            cfg.relays.len(),
            cfg.relay_server_name()?,
            cfg.services.len()
        );
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    let mut seed = [0u8; 8];
    boring::rand::rand_bytes(&mut seed)?;
    let health = cfg.health;
    let mut c = Connector::new(cfg, u64::from_le_bytes(seed))?;
    if let Some(addr) = health {
        let addr = ztna_connector::serve_health(addr, c.health(), Arc::clone(&c.stats))?;
        tracing::info!(%addr, "http://{addr}/healthz, /readyz and /metrics");
    }
    println!("listening on {}", c.local_addr()?);
    // systemd Type=notify: ready now; watchdog pings while the loop turns.
    let health = c.health();
    if let Err(e) = ztna_ops::sdnotify::ready_with_watchdog(Arc::new(move || health.alive(std::time::Instant::now()))) {
        tracing::warn!(error = format!("{e:#}"), "sd_notify failed");
    }
    let r = c.run(&stop);
    ztna_ops::sdnotify::stopping();
    r
}
