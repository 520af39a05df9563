//! `ztna-relay`: the public QUIC relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::{info, warn};
use ztna_relay::server::{self, RelayConfig};
use ztna_udp::IoBackend;

#[derive(Parser, Debug)]
#[command(name = "ztna-relay", version, about = "ZTNA relay: forwards service-tagged QUIC DATAGRAMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Log format on stderr: text (colour only on a terminal) or json (one
    /// object per line, for log shippers).
    #[arg(long, global = true, default_value = "text")]
    log_format: ztna_ops::logging::LogFormat,
    /// The relay's options (also after `check-config`).
    #[command(flatten)]
    server: ServerArgs,
}

/// What the relay serves with: the config file and the flags that
/// override it. `ca` subcommands take none of these.
#[derive(clap::Args, Debug, Clone, Default)]
struct ServerArgs {
    /// TOML config file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP listen address ([::]:4433 is dual-stack).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Worker threads (default: available cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Ephemeral development CA and certificate (prints the CA path).
    #[arg(long)]
    dev: bool,
    /// PEM certificate chain.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// PEM bundle of the organisation CA that signs client certificates.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Trust domain of client identities (spiffe://<trust-domain>/...).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Policy file (default deny; reloaded on SIGHUP).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Prometheus /metrics listener, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// I/O backend.
    #[arg(long, value_enum)]
    io_backend: Option<IoBackend>,
    /// Disable the reuseport BPF steering program.
    #[arg(long)]
    no_steering: bool,
    /// CID node id, stable across restarts (default: random per start; see
    /// `node_id` in SECURITY.md, "Stateless resets").
    #[arg(long)]
    node_id: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the config file and flags offline, then exit: the config,
    /// certificate and key belong together, the certificate is a relay
    /// identity, valid, signed by the client CA, and which server names it
    /// covers (what clients must use).
    CheckConfig(ServerArgs),
    /// A small certificate authority for the organisation's identities.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create ca.pem and ca.key (mode 0600) in DIR; never overwrites a key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of every identity the CA issues (spiffe://<trust-domain>/...).
        #[arg(long)]
        trust_domain: String,
        /// Validity of the CA certificate.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate whose only URI SAN is
    /// spiffe://<trust-domain>/<kind>/<name>.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's trust domain.
        #[arg(long)]
        trust_domain: String,
        /// agent, connector or relay.
        #[arg(long)]
        kind: String,
        /// The identity's name (spiffe://<trust-domain>/<kind>/<name>).
        #[arg(long)]
        name: String,
        /// DNS names (relays; repeatable): what clients may use as server_name.
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses (relays; repeatable): for clients that reach the relay by address.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Where to write <kind>-<name>.pem/.key (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn run_ca(cmd: &CaCmd) -> Result<()> {
    use ztna_control::identity::{Identity, Kind};
    use ztna_relay::pki;
    match cmd {
        CaCmd::Init { dir, trust_domain, days } => {
            Identity::parse(&format!("spiffe://{trust_domain}/relay/x"))
                .map_err(|e| anyhow::anyhow!("trust domain {trust_domain:?}: {e}"))?;
            let ca = pki::init_ca(dir, trust_domain, *days)?;
            println!("CA certificate {}", ca.cert.display());
            println!("CA key         {} (keep it offline)", ca.key.display());
        }
        CaCmd::Issue { dir, trust_domain, kind, name, dns, ip, days, out } => {
            let kind = Kind::parse(kind).context("kind must be agent, connector or relay")?;
            let id = Identity::parse(&format!("spiffe://{trust_domain}/{}/{name}", kind.as_str()))
                .map_err(|e| anyhow::anyhow!("identity: {e}"))?;
            let (cert, key) =
                pki::issue(&pki::CaFiles::in_dir(dir), &id, dns, ip, *days, out.as_deref().unwrap_or(dir))?;
            println!("{id}");
            println!("certificate {}", cert.display());
            println!("key         {}", key.display());
        }
    }
    Ok(())
}

fn load(cli: &ServerArgs) -> Result<RelayConfig> {
    let mut cfg = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            RelayConfig::from_toml(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => RelayConfig::default(),
    };
    if let Some(v) = cli.listen {
        cfg.listen = v;
    }
    if let Some(v) = cli.workers {
        cfg.workers = Some(v);
    }
    if cli.dev {
        cfg.dev = true;
    }
    if let Some(v) = &cli.cert {
        cfg.cert = Some(v.clone());
    }
    if let Some(v) = &cli.key {
        cfg.key = Some(v.clone());
    }
    if let Some(v) = &cli.client_ca {
        cfg.client_ca = Some(v.clone());
    }
    if let Some(v) = &cli.trust_domain {
        cfg.trust_domain = Some(v.clone());
    }
    if let Some(v) = &cli.policy {
        cfg.policy = Some(v.clone());
    }
    if let Some(v) = cli.metrics {
        cfg.metrics = Some(v);
    }
    if let Some(v) = cli.io_backend {
        cfg.io_backend = v;
    }
    if cli.no_steering {
        cfg.steering = false;
    }
    if cli.node_id.is_some() {
        cfg.node_id = cli.node_id;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `check-config`: everything that can be checked without serving.
fn check_config(args: &ServerArgs) -> Result<()> {
    use ztna_control::identity::Kind;
    let cfg = load(args)?;
    cfg.check_security()?;
    if let (false, Some(cert), Some(key), Some(ca)) = (cfg.dev, &cfg.cert, &cfg.key, &cfg.client_ca) {
        // A relay may carry a publicly issued certificate: a client CA that
        // does not sign it is a warning (clients then need its issuer).
        let own = ztna_ops::tls::check_own_files(ca, cert, key, Kind::Relay, false)?;
        ztna_ops::tls::print_own(&own);
        let ips: Vec<String> = own.ips.iter().map(ToString::to_string).collect();
        if own.dns.is_empty() && own.ips.is_empty() {
            eprintln!("warning: the certificate covers no DNS name and no IP address: no client can verify it");
        } else {
            eprintln!(
                "warning: clients must set server_name to a name this certificate covers: DNS {}; IP {}",
                if own.dns.is_empty() { "none".to_owned() } else { own.dns.join(", ") },
                if ips.is_empty() { "none".to_owned() } else { ips.join(", ") }
            );
        }
        let ip = cfg.listen.ip();
        if !ip.is_unspecified() && own.dns.is_empty() && !own.ips.contains(&ip) {
            eprintln!("warning: the certificate does not cover the listen address {ip} and names no DNS name");
        }
    }
    println!("config ok: listen {} workers {} backend {:?}", cfg.listen, cfg.worker_count(), cfg.io_backend);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ztna_ops::logging::init("info", cli.log_format);
    ztna_ops::logging::exit_code(run(cli))
}

fn run(cli: Cli) -> Result<()> {
    let args = match &cli.cmd {
        Some(Cmd::Ca(c)) => return run_ca(c),
        Some(Cmd::CheckConfig(a)) => return check_config(a),
        None => &cli.server,
    };
    let cfg = load(args)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))?;
    // Before the workers start: they register their histograms then.
    let prom = cfg.metrics.map(|_| ztna_ops::prometheus::install_recorder()).transpose()?;
    let handle = server::start(&cfg)?;
    if let (Some(addr), Some(prom)) = (cfg.metrics, prom) {
        let addr = ztna_relay::metrics::serve_relay(addr, prom, handle.lifecycle(), handle.status())?;
        handle.spawn_metrics_publisher()?;
        info!(%addr, "http://{addr}/metrics, /status, /healthz and /readyz");
    }
    info!(addr = %handle.local_addr, backend = ?handle.backend, steering = handle.steering, "relay running");
    // systemd Type=notify: ready now; watchdog pings while every worker loop turns.
    let life = handle.lifecycle();
    if let Err(e) = ztna_ops::sdnotify::ready_with_watchdog(Arc::new(move || life.all_alive(std::time::Instant::now())))
    {
        warn!(error = format!("{e:#}"), "sd_notify failed");
    }
    // Machine-readable lines for scripts and tests.
    println!("listening on {}", handle.local_addr);
    if let Some(p) = &handle.dev_pki {
        println!("dev CA: {}", p.ca.display());
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    while !stop.load(Ordering::Acquire) {
        if hup.swap(false, Ordering::AcqRel) {
            // All or nothing: a broken file leaves the running settings.
            if let Err(e) = handle.reload() {
                warn!(error = format!("{e:#}"), "reload refused; keeping the current certificate, key and policy");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Drain: /readyz turns 503, clients get Goodbye{DRAINING} and move to
    // another relay while their traffic still flows here; then the
    // connectors and stragglers are closed. Bounded by shutdown_grace_ms.
    let t = std::time::Instant::now();
    info!(agents = handle.agents(), grace_ms = cfg.shutdown_grace_ms, "signal received: draining");
    ztna_ops::sdnotify::stopping();
    handle.drain();
    handle.join();
    info!(elapsed_ms = t.elapsed().as_millis() as u64, "relay stopped");
    Ok(())
}
