//! The connector's driver: the one UDP socket to the relays, the backend
//! sockets ([`sockets::SocketBackends`]), the clock, the background
//! resolver and the health state, around an [`Engine`] that holds all the
//! protocol logic.

mod driven;
mod sockets;

pub use self::driven::{DrivenEngine, EngineInputs};

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};
use ztna_control::quic;

use ztna_udp::batch::Batch;

use self::sockets::{poll_fds, SocketBackends};
use crate::backend::{BackendEvent, BackendId, Interest};
use crate::config::ConnectorConfig;
use crate::engine::Engine;
use crate::health::ConnectorHealth;
use crate::ConnectorStats;

/// How often relay names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Resolves every `host:port` entry to all its addresses (deduplicated, in
/// order). Entries that fail to resolve are logged and skipped.
pub fn resolve_relays(entries: &[String]) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut out: Vec<SocketAddr> = Vec::new();
    for e in entries {
        match e.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
            Err(err) => warn!(relay = %e, error = %err, "cannot resolve relay"),
        }
    }
    out
}

/// Resolves `entries` every [`RESOLVE_EVERY`] on a thread of its own; the
/// thread ends when the receiver is dropped.
fn spawn_resolver(entries: &[String]) -> mpsc::Receiver<Vec<SocketAddr>> {
    let (tx, rx) = mpsc::channel();
    let entries = entries.to_vec();
    let spawned = std::thread::Builder::new().name("connector-dns".into()).spawn(move || loop {
        std::thread::sleep(RESOLVE_EVERY);
        if tx.send(resolve_relays(&entries)).is_err() {
            return;
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the relay resolver; relay addresses stay as first resolved");
    }
    rx
}

/// The running connector: the product's [`Engine`] unless the benchmark
/// runs another (see [`DrivenEngine`]).
pub struct Connector<E: DrivenEngine = Engine> {
    engine: E,
    socket: UdpSocket,
    backends: SocketBackends,
    /// The configuration's TLS files, read again for each new relay.
    tls_files: ConnectorConfig,
    /// Fresh resolutions of the relay names (None: IP literals only).
    resolver: Option<mpsc::Receiver<Vec<SocketAddr>>>,
    health: Arc<ConnectorHealth>,
    pub stats: Arc<ConnectorStats>,
    buf: Vec<u8>,
    /// Relay packets received and to send (recvmmsg / sendmmsg).
    rx: Batch,
    tx: Batch,
    interest: Vec<(BackendId, Interest)>,
    readable: Vec<BackendId>,
    /// When `/status` was last refreshed.
    status_at: Option<Instant>,
    /// When the host's interface addresses are read next.
    hosts_at: Option<Instant>,
}

/// How often the loop refreshes what `/status` serves.
const STATUS_EVERY: Duration = Duration::from_secs(1);

impl Connector {
    pub fn new(cfg: ConnectorConfig, seed: u64) -> Result<Connector> {
        Connector::with_engine(cfg, seed, |i| Engine::new(i.cfg, i.targets, i.local, &i.tls, i.seed, i.now))
    }
}

impl<E: DrivenEngine> Connector<E> {
    /// A connector whose engine `build` makes from what the driver set up.
    pub fn with_engine(cfg: ConnectorConfig, seed: u64, build: impl FnOnce(EngineInputs) -> Result<E>) -> Result<Self> {
        cfg.validate()?;
        let socket = ztna_udp::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let local = socket.local_addr()?;
        if cfg.insecure {
            warn!("relay certificate verification is OFF (--insecure): anyone can impersonate the relay");
        }
        let tls_files = cfg.clone();
        let addrs = resolve_relays(&cfg.relays);
        // IP literals need no resolver; names are resolved again in the
        // background (getaddrinfo blocks), so new replicas are picked up.
        let resolver = cfg.relays.iter().any(|r| r.parse::<SocketAddr>().is_err()).then(|| spawn_resolver(&cfg.relays));
        info!(%local, relays = ?addrs, services = cfg.services.len(), "connector starting");
        let mut targets = HashMap::new();
        for b in cfg.services.iter().flat_map(|s| &s.backend) {
            if !targets.contains_key(&b.target) {
                let addr = b.target.resolve()?;
                info!(target = b.target.as_str(), %addr, "backend");
                targets.insert(b.target.clone(), addr);
            }
        }
        let backends = SocketBackends::new().context("creating the UDP backend sockets' epoll")?;
        let tls = tls_files.client_tls()?;
        let engine = build(EngineInputs { cfg, targets, local, tls, seed, now: Instant::now() })?;
        let (rx, tx) = Batch::offloaded_pair(&socket, ztna_udp::BATCH);
        let direct_metrics = engine.direct_metrics();
        let o = rx.offload_stats().snapshot();
        info!(gso = o.gso, gro = o.gro, "UDP socket ready");
        let mut c = Connector {
            stats: Arc::clone(engine.stats()),
            engine,
            socket,
            backends,
            tls_files,
            resolver,
            health: Arc::new(ConnectorHealth::new(rx.offload_stats(), direct_metrics)),
            buf: vec![0u8; 65_536],
            rx,
            tx,
            interest: Vec::new(),
            readable: Vec::new(),
            status_at: None,
            hosts_at: None,
        };
        c.set_relays(&addrs)?;
        Ok(c)
    }

    fn set_relays(&mut self, addrs: &[SocketAddr]) -> Result<()> {
        let files = &self.tls_files;
        let mut quic = || quic::client_tls(&files.client_tls()?).map_err(|e| anyhow::anyhow!("TLS configuration: {e}"));
        let r = self.engine.set_relays(addrs, Instant::now(), &mut quic);
        self.health.relays.store(self.engine.relays().len() as u64, Ordering::Relaxed);
        r
    }

    /// Liveness and readiness, for [`crate::serve_health`].
    pub fn health(&self) -> Arc<ConnectorHealth> {
        Arc::clone(&self.health)
    }

    /// The engine (read-only: its state, for tests and tools).
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Relays this connector currently holds a session with (not retired).
    pub fn relays(&self) -> Vec<SocketAddr> {
        self.engine.relays()
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::Acquire) {
            self.turn(Duration::from_millis(50))?;
        }
        self.engine.close();
        for _ in 0..10 {
            self.transmit();
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// One loop turn: wait up to `max_wait`, then process everything.
    pub fn turn(&mut self, max_wait: Duration) -> Result<()> {
        let now = Instant::now();
        self.update_health(now);
        if self.hosts_at.is_none_or(|t| now >= t) {
            // Interfaces come and go (DHCP, a new route): read them again
            // now and then; the engine re-announces candidates on change.
            self.engine.set_host_addresses(ztna_udp::ifaddrs::host_addresses(&[]));
            self.hosts_at = Some(now + RESOLVE_EVERY);
        }
        if let Some(addrs) = self.resolver.as_ref().and_then(|r| r.try_iter().last()) {
            // A link that cannot be set up now (unreadable TLS files during a
            // rotation) is retried at the next resolution.
            if let Err(e) = self.set_relays(&addrs) {
                warn!(error = format!("{e:#}"), "cannot add a relay; retrying at the next resolution");
            }
        }
        let wait = self.engine.next_timeout(now).map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        let pollin = |fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // One descriptor for every UDP backend socket (epoll).
        let mut fds = vec![pollin(self.socket.as_raw_fd()), pollin(self.backends.udp_poll_fd())];
        self.interest.clear();
        self.engine.backend_interest(&mut self.interest);
        self.interest.retain(|(id, _)| self.backends.tcp_fd(*id).is_some());
        for (id, i) in &self.interest {
            let Some(fd) = self.backends.tcp_fd(*id) else { continue };
            let events = if i.read { libc::POLLIN } else { 0 } | if i.write { libc::POLLOUT } else { 0 };
            fds.push(libc::pollfd { fd, events, revents: 0 });
        }
        poll_fds(&mut fds, wait);

        // From relays, in recvmmsg batches.
        while let Ok(n) = self.rx.recv(&self.socket) {
            let now = Instant::now();
            for i in 0..n {
                if let Some((datagrams, Some(from))) = self.rx.received(i) {
                    for b in datagrams {
                        self.engine.handle_datagram(now, from, b, &mut self.backends);
                    }
                }
            }
            if n < self.rx.capacity() {
                break;
            }
        }
        let now = Instant::now();
        self.backend_replies(now);
        for (p, (id, _)) in fds.iter().skip(2).zip(&self.interest) {
            if p.revents != 0 {
                self.engine.handle_backend(now, BackendEvent::TcpReady { id: *id });
            }
        }
        self.engine.handle_timeout(now, &mut self.backends);
        self.transmit();
        Ok(())
    }

    /// Replies of the UDP backends whose sockets are readable.
    fn backend_replies(&mut self, now: Instant) {
        self.readable.clear();
        self.backends.udp_readable(&mut self.readable);
        for &id in &self.readable {
            loop {
                crate::inc(&self.stats.udp_backend_reads);
                let Ok(n) = self.backends.udp_recv(id, &mut self.buf) else { break };
                let payload = self.buf.get(..n).unwrap_or_default();
                self.engine.handle_backend(now, BackendEvent::UdpData { id, payload });
            }
        }
    }

    /// What the engine has for the relays, in sendmmsg batches. A full
    /// socket buffer drops the rest, as a failed send_to did (QUIC
    /// recovers).
    fn transmit(&mut self) {
        let now = Instant::now();
        loop {
            while let Some(slot) = self.tx.slot() {
                match self.engine.poll_transmit(slot, now) {
                    Some((n, to)) => self.tx.commit(n, Some(to)),
                    None => break,
                }
            }
            if !self.tx.pending() {
                return;
            }
            let full = self.tx.is_full();
            let _ = self.tx.flush_or_drop(&self.socket);
            if !full {
                return;
            }
        }
    }

    /// Observed address per relay (None until reported).
    pub fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        self.engine.observed_addresses()
    }

    /// UDP flows (backend sockets) open.
    pub fn udp_flows(&self) -> usize {
        self.engine.udp_flows()
    }

    /// TCP connections held (including those whose backend is connecting).
    pub fn tcp_connections(&self) -> usize {
        self.engine.tcp_connections()
    }

    /// Whether every relay link has all its services registered.
    pub fn is_ready(&self) -> bool {
        self.engine.is_ready()
    }

    /// Whether some relay link has all its services registered (`/readyz`).
    pub fn is_serving(&self) -> bool {
        self.engine.is_serving()
    }

    fn update_health(&mut self, now: Instant) {
        let h = &self.health;
        h.heartbeat.beat(now);
        h.serving.store(self.is_serving(), Ordering::Relaxed);
        h.relays_connected.store(self.engine.relays_connected() as u64, Ordering::Relaxed);
        if self.status_at.is_none_or(|t| now.saturating_duration_since(t) >= STATUS_EVERY) {
            self.status_at = Some(now);
            h.set_status(self.engine.status());
        }
    }
}
