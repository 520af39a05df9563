//! The relay: configuration, start-up of one worker thread per core, and a
//! handle to observe and stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::cid::Instance;
use ztna_udp::IoBackend;

use crate::event_loop::{self, Lifecycle};
use crate::limits::Limits;
use crate::mesh::Mesh;
use crate::pki::{self, DevPki};
use crate::policy::Policy;
use crate::ratelimit::PerIp;
use crate::security::{Security, Shared};
use crate::stats::{StatsSnapshot, WorkerStats};
use crate::tls::TlsMaterial;
use crate::worker::{Worker, WorkerConfig};

/// Slots of the per-source-IP table (fixed memory: 12 bytes each).
const PER_IP_SLOTS: usize = 1 << 16;

/// Relay configuration (TOML file; command-line flags override).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// UDP listen address; `[::]:4433` is dual-stack.
    pub listen: SocketAddr,
    /// Worker threads (default: available cores).
    pub workers: Option<usize>,
    /// PEM certificate chain and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Ephemeral development PKI (CA, relay certificate, trust domain
    /// `dev.ztna`) instead of cert/key/client_ca/trust_domain.
    pub dev: bool,
    /// Trust domain of client identities (`spiffe://<it>/...`).
    pub trust_domain: Option<String>,
    /// PEM bundle of the CA(s) that sign agent and connector certificates.
    pub client_ca: Option<PathBuf>,
    /// Policy file (see `policy.rs`). Without one nothing may register.
    pub policy: Option<PathBuf>,
    /// In-process users (tests, the benchmark) may give the policy text
    /// instead of a file; `policy` wins when both are set.
    #[serde(skip)]
    pub policy_toml: Option<String>,
    /// Prometheus listener (off by default).
    pub metrics: Option<SocketAddr>,
    pub io_backend: IoBackend,
    /// Attach the reuseport BPF steering program.
    pub steering: bool,
    /// Pin each worker to a core.
    pub pin_cores: bool,
    /// Node id encoded in CIDs and mixed into the stateless-reset key
    /// (`cid::Instance`). Unset (the default): random at every start, so
    /// replicas sharing a key and a config never reset each other's
    /// connections, but a restarted relay cannot reset its predecessor's.
    /// Set: stable, so a restarted relay resets its predecessor's
    /// connections; each replica sharing the key then needs its own value.
    pub node_id: Option<u16>,
    /// Bound on a drain (SIGTERM) or shutdown: how long the relay waits
    /// for clients to move away before it closes what is left and exits.
    pub shutdown_grace_ms: u64,
    pub limits: Limits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: SocketAddr::from(([0u16; 8], 4433)),
            workers: None,
            cert: None,
            key: None,
            dev: false,
            trust_domain: None,
            client_ca: None,
            policy: None,
            policy_toml: None,
            metrics: None,
            io_backend: IoBackend::Auto,
            steering: true,
            pin_cores: true,
            node_id: None,
            shutdown_grace_ms: 10_000,
            limits: Limits::default(),
        }
    }
}

impl RelayConfig {
    /// Parses a TOML config (unknown keys are errors).
    pub fn from_toml(s: &str) -> Result<Self> {
        Ok(toml::from_str(s)?)
    }

    /// Checks what can be checked without binding sockets.
    pub fn validate(&self) -> Result<()> {
        if self.workers == Some(0) || self.workers.is_some_and(|w| w > 255) {
            bail!("workers must be between 1 and 255");
        }
        if !self.dev && (self.cert.is_none() || self.key.is_none()) {
            bail!("cert and key are required unless dev mode is on");
        }
        if !self.dev && (self.client_ca.is_none() || self.trust_domain.is_none()) {
            bail!("client_ca and trust_domain are required unless dev mode is on (every client is authenticated)");
        }
        for p in [&self.cert, &self.key, &self.client_ca, &self.policy].into_iter().flatten() {
            if !self.dev && !p.exists() {
                bail!("{} does not exist", p.display());
            }
        }
        if self.limits.max_registrations == 0 || self.limits.data_queue_depth == 0 || self.limits.ctrl_queue_depth == 0
        {
            bail!("limits must be positive");
        }
        if !(100..=60_000).contains(&self.limits.handshake_timeout_ms) {
            bail!("limits.handshake_timeout_ms must be between 100 and 60000");
        }
        if self.limits.max_conns == 0 || self.limits.max_conns_per_worker == 0 {
            bail!("limits.max_conns and limits.max_conns_per_worker must be positive");
        }
        if self.limits.max_dgram_queue_bytes < 2048 {
            bail!("limits.max_dgram_queue_bytes must be at least 2048 (one datagram)");
        }
        Ok(())
    }

    /// Where the security settings come from (dev PKI when in dev mode).
    fn sources(&self, dev: Option<&DevPki>) -> Result<SecuritySources> {
        let (cert, key, client_ca, trust_domain) = match dev {
            Some(p) => (p.cert.clone(), p.key.clone(), p.ca.clone(), pki::DEV_TRUST_DOMAIN.to_owned()),
            None => (
                self.cert.clone().context("cert is required")?,
                self.key.clone().context("key is required")?,
                self.client_ca.clone().context("client_ca is required")?,
                self.trust_domain.clone().context("trust_domain is required")?,
            ),
        };
        Ok(SecuritySources {
            instance: Instance::new(self.node_id)?,
            cert,
            key,
            client_ca,
            trust_domain,
            policy: self.policy.clone(),
            policy_toml: self.policy_toml.clone(),
        })
    }

    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).clamp(1, 255)
    }

    /// Loads and checks certificate, key, client CA and policy exactly as
    /// `start` would (for `check-config`).
    pub fn check_security(&self) -> Result<()> {
        if self.dev {
            return Ok(());
        }
        self.sources(None)?.load().map(|_| ())
    }
}

/// Files a reload re-reads, and the instance the reset key is bound to
/// (fixed for the life of the process).
#[derive(Debug, Clone)]
struct SecuritySources {
    instance: Instance,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    trust_domain: String,
    policy: Option<PathBuf>,
    policy_toml: Option<String>,
}

impl SecuritySources {
    fn load(&self) -> Result<Security> {
        let tls = TlsMaterial::load(&self.cert, &self.key, &self.client_ca, &self.trust_domain)?;
        let policy = match (&self.policy, &self.policy_toml) {
            (Some(p), _) => Policy::load(p, &self.trust_domain)?,
            (None, Some(text)) => Policy::from_toml(text, &self.trust_domain)?,
            (None, None) => {
                warn!("no policy file: default deny, no registration will be accepted");
                Policy::deny_all(&self.trust_domain)
            }
        };
        Security::new(tls, policy, &self.instance)
    }
}

/// A running relay.
pub struct RelayHandle {
    pub local_addr: SocketAddr,
    pub backend: IoBackend,
    pub steering: bool,
    pub dev_pki: Option<DevPki>,
    shared: Arc<Shared>,
    sources: SecuritySources,
    stats: Vec<Arc<WorkerStats>>,
    tids: Vec<Arc<AtomicI32>>,
    mesh: Arc<Mesh>,
    life: Arc<Lifecycle>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the relay: binds the socket group, attaches steering, spawns and
/// pins the workers. Returns once every worker is running.
pub fn start(cfg: &RelayConfig) -> Result<RelayHandle> {
    cfg.validate()?;
    let n = cfg.worker_count();
    let dev_pki = if cfg.dev {
        let pki = pki::generate(&std::env::temp_dir()).context("generating development certificates")?;
        warn!(ca = %pki.ca.display(), "DEV MODE: ephemeral self-made CA and certificate; clients must trust this CA");
        Some(pki)
    } else {
        None
    };
    let sources = cfg.sources(dev_pki.as_ref())?;
    // Fail early on unreadable TLS material or a broken policy.
    let security = sources.load()?;
    info!(trust_domain = %sources.trust_domain, services = security.policy.service_count(), retry = ?cfg.limits.retry,
          "mutual TLS: every client must present a certificate of the organisation CA");
    let node_id = sources.instance.node_id();
    info!(node_id, stable = sources.instance.is_stable(), "CID node id (stateless resets answer only this node id)");
    let per_ip = PerIp::new(PER_IP_SLOTS, cfg.limits.max_conns_per_ip, cfg.limits.handshakes_per_sec_per_ip);
    let mut shared = Shared::new(security, per_ip, std::time::Instant::now());
    let (budget, source) = crate::budget::resolve(cfg.limits.memory_budget_mib);
    shared.budget = crate::budget::MemoryBudget::new(budget);
    shared.per_identity =
        crate::ratelimit::ConnCounts::new(crate::security::PER_IDENTITY_SLOTS, cfg.limits.max_conns_per_identity);
    info!(
        memory_budget_mib = shared.budget.limit() >> 20,
        source,
        max_conns_per_identity = cfg.limits.max_conns_per_identity,
        "memory budget over connections, queues and backlogs"
    );
    let shared = Arc::new(shared);

    let sockets = ztna_udp::bind_group(cfg.listen, n).with_context(|| format!("binding {}", cfg.listen))?;
    let local_addr = sockets.first().context("no socket")?.local_addr()?;
    let mut steering = false;
    if cfg.steering {
        match sockets.first().map(|s| ztna_udp::steering::attach(s, n as u32, crate::cid::WORKER_BYTE as u8)) {
            Some(Ok(())) => steering = true,
            Some(Err(e)) => warn!(error = %e, "BPF steering unavailable; misrouted packets are handed off in software"),
            None => {}
        }
    }
    let backend = ztna_udp::resolve(cfg.io_backend);
    info!(%local_addr, workers = n, backend = ?backend, steering, "relay starting");

    let mesh = Arc::new(Mesh::new(n, cfg.limits.data_queue_depth, cfg.limits.ctrl_queue_depth)?);
    let life = Arc::new(Lifecycle::new(n));
    let limits = cfg.limits.clone();
    let cores = if cfg.pin_cores { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut stats = Vec::new();
    let mut tids = Vec::new();
    let mut threads = Vec::new();
    for (index, socket) in sockets.into_iter().enumerate() {
        let st = Arc::new(WorkerStats::default());
        let tid = Arc::new(AtomicI32::new(0));
        stats.push(Arc::clone(&st));
        tids.push(Arc::clone(&tid));
        let wcfg = WorkerConfig { index, workers: n, node_id, local_addr, limits: limits.clone() };
        let mesh = Arc::clone(&mesh);
        let life = Arc::clone(&life);
        let ready = ready_tx.clone();
        let core = if cores.is_empty() { None } else { cores.get(index % cores.len()).copied() };
        let shared = Arc::clone(&shared);
        let t = std::thread::Builder::new().name(format!("relay-w{index}")).spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            // SAFETY: gettid has no preconditions.
            tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
            let setup = (|| -> Result<_, String> {
                let worker = Worker::new(wcfg, shared, Arc::clone(&mesh), st).map_err(|e| e.to_string())?;
                let efd = {
                    use std::os::fd::AsRawFd;
                    mesh.inboxes.get(index).ok_or("no inbox")?.eventfd().as_raw_fd()
                };
                let backend = ztna_udp::make_backend(backend, socket, efd).map_err(|e| e.to_string())?;
                let o = backend.offload();
                info!(worker = index, backend = backend.name(), gso = o.gso, gro = o.gro, "UDP socket ready");
                Ok((worker, backend))
            })();
            let (mut worker, mut be) = match setup {
                Ok(v) => {
                    let _ = ready.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            event_loop::run_worker(&mut worker, be.as_mut(), &life, grace);
        })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                life.shutdown.store(true, Ordering::Release);
                bail!("worker failed to start: {e}");
            }
            Err(_) => bail!("worker exited during start-up"),
        }
    }
    Ok(RelayHandle { local_addr, backend, steering, dev_pki, shared, sources, stats, tids, mesh, life, threads })
}

impl RelayHandle {
    /// Re-reads certificate, key, client CA and policy (SIGHUP). All or
    /// nothing: on any error the running settings stay and the error is
    /// returned. Established connections stay up; registrations the new
    /// policy forbids are closed with FlowClose{denied}.
    pub fn reload(&self) -> Result<()> {
        let security = self.sources.load()?;
        let services = security.policy.service_count();
        self.shared.security.replace(security);
        for inbox in &self.mesh.inboxes {
            inbox.wake();
        }
        info!(services, "reloaded certificate, key, client CA and policy");
        Ok(())
    }

    /// The node id in this relay's CIDs (configured, or drawn at start).
    pub fn node_id(&self) -> u16 {
        self.sources.instance.node_id()
    }

    /// Per-worker counters.
    pub fn worker_stats(&self) -> Vec<StatsSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Counters summed over workers.
    pub fn totals(&self) -> StatsSnapshot {
        let mut t = StatsSnapshot::default();
        for s in self.worker_stats() {
            t += s;
        }
        t
    }

    /// CPU time consumed by the worker threads so far (from
    /// /proc/self/task/TID/schedstat).
    pub fn cpu_time(&self) -> Duration {
        let mut ns = 0u64;
        for t in &self.tids {
            let tid = t.load(Ordering::Relaxed);
            if let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")) {
                ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        Duration::from_nanos(ns)
    }

    /// Asks the workers to shut down (Goodbye + CONNECTION_CLOSE to each
    /// client) without waiting.
    pub fn signal_shutdown(&self) {
        self.life.shutdown.store(true, Ordering::Release);
        self.wake_workers();
    }

    /// Starts a drain without waiting (SIGTERM): readiness turns false,
    /// every client gets Goodbye{DRAINING} and new connections are refused,
    /// while established ones stay served. Once every agent has left, or
    /// when the grace period nearly ends, the workers close the remaining
    /// connections (connectors, stragglers) and exit; [`RelayHandle::join`]
    /// waits for that.
    pub fn drain(&self) {
        self.life.drain.store(true, Ordering::Release);
        self.wake_workers();
    }

    /// True once a drain or shutdown has started (`/readyz` answers 503).
    pub fn is_draining(&self) -> bool {
        self.life.is_draining()
    }

    /// The workers' lifecycle, for health endpoints that outlive a borrow.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        Arc::clone(&self.life)
    }

    /// Authenticated agent connections, all workers.
    pub fn agents(&self) -> usize {
        self.shared.agents.load(Ordering::Relaxed)
    }

    /// The memory budget: (bytes charged relay-wide, limit).
    pub fn memory_budget(&self) -> (u64, u64) {
        (self.shared.budget.used(), self.shared.budget.limit())
    }

    fn wake_workers(&self) {
        for inbox in &self.mesh.inboxes {
            inbox.wake();
        }
    }

    /// Shuts down and waits for the workers (bounded by the grace period).
    pub fn shutdown(self) {
        self.signal_shutdown();
        self.join();
    }

    /// Waits for the workers to exit (after [`RelayHandle::drain`] or
    /// [`RelayHandle::signal_shutdown`]) and removes dev certificates.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(p) = &self.dev_pki {
            let _ = std::fs::remove_dir_all(&p.dir);
        }
    }

    /// Who is connected (what `/status` serves).
    pub fn status(&self) -> Arc<crate::status::StatusBoard> {
        Arc::clone(&self.shared.status)
    }

    /// Starts a thread that copies the counters into the `metrics`
    /// recorder once a second (the exporter must be installed first).
    pub fn spawn_metrics_publisher(&self) -> Result<()> {
        let stats = self.stats.clone();
        let life = Arc::clone(&self.life);
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new().name("relay-metrics".into()).spawn(move || {
            let mut services_seen = Vec::new();
            while !life.shutdown.load(Ordering::Acquire) {
                for (w, s) in stats.iter().enumerate() {
                    crate::metrics::publish(w, &s.snapshot());
                }
                metrics::gauge!("ztna_relay_draining").set(if life.drain.load(Ordering::Acquire) { 1.0 } else { 0.0 });
                metrics::gauge!("ztna_relay_memory_budget_bytes").set(shared.budget.limit() as f64);
                metrics::gauge!("ztna_relay_memory_budget_used_bytes").set(shared.budget.used() as f64);
                crate::metrics::publish_status(&shared.status.rows(), &mut services_seen);
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
        Ok(())
    }
}
