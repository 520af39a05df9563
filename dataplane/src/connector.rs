//! The connector: registers services at one or more relays from a single
//! UDP socket with a fixed port, and turns tunneled IP packets into real
//! traffic to the configured backends.
//!
//! It handles UDP (a bounded flow table of backend sockets with idle
//! expiry), ICMP echo (answered by the connector) and TCP (a userspace TCP
//! endpoint in smoltcp per agent flow, proxied to real TCP connections with
//! flow control both ways; see [`tcp`]). Only the configured (protocol,
//! port) → backend pairs are reachable: anything else is dropped and counted
//! (a TCP SYN is also answered with an RST, as a closed port would), so the
//! connector is not an open proxy.
//!
//! IPv4 packets larger than the tunnel MTU (1280) with DF set are dropped
//! and answered with ICMP "fragmentation needed" (next-hop MTU 1280), so the
//! agent's path MTU discovery settles on what the tunnel carries.

mod tcp;

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::packet::{self, TcpFlags, Transport};
use ztna_control::quic::{self, TlsOptions};
use ztna_control::{datagram, Role, ServiceName};

use self::tcp::{FlowKey, TcpEngine, TcpLimits, Tuple, TxOutcome, Verdict};
use crate::io::Heartbeat;
use crate::vdev::TUNNEL_MTU;

/// Transport protocol of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Udp,
    Tcp,
}

/// One reachable backend: packets to the service on `port` go to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub protocol: Proto,
    pub port: u16,
    pub target: Target,
}

/// A backend address: `ip:port`, or `host:port` resolved (first address)
/// when the connector starts, e.g. a Kubernetes Service name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Target(String);

impl Target {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address, resolving a name (blocking).
    pub fn resolve(&self) -> Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        self.0
            .to_socket_addrs()
            .with_context(|| format!("resolving backend {}", self.0))?
            .next()
            .with_context(|| format!("backend {} resolves to no address", self.0))
    }
}

impl TryFrom<String> for Target {
    type Error = String;
    fn try_from(s: String) -> Result<Target, String> {
        if is_host_port(&s) {
            Ok(Target(s))
        } else {
            Err(format!("backend target {s:?} is not host:port"))
        }
    }
}

/// `host:port` with a non-empty host and a port from 1 to 65535 (the form
/// of relay entries and backend targets; names are resolved later).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.0
    }
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Target {
        Target(a.to_string())
    }
}

/// One service this connector serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Answer ICMP echo requests to the service (default on).
    #[serde(default = "yes")]
    pub icmp: bool,
    #[serde(default)]
    pub backend: Vec<Backend>,
    /// Defence in depth: when set, only these agent identities (full
    /// SPIFFE IDs) may use the service, whatever the relay's policy says.
    /// Flows of other agents are refused with FlowClose{denied}.
    #[serde(default)]
    pub allow_agents: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

/// Connector configuration (TOML, unknown keys rejected).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Relays to register at, each `host:port` (all of them, from the same
    /// socket). A DNS name stands for every address it resolves to and is
    /// re-resolved every [`RESOLVE_EVERY`], so a Kubernetes headless Service
    /// connects the connector to every relay replica.
    pub relays: Vec<String>,
    /// HTTP `/healthz`, `/readyz` (every service registered at one relay
    /// or more) and `/metrics`, e.g. `0.0.0.0:9091`.
    #[serde(default)]
    pub health: Option<SocketAddr>,
    /// Local UDP address; the fixed port is what P2P peers will punch to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA that signs the relays' certificates.
    pub ca: Option<PathBuf>,
    /// This connector's certificate (one URI SAN:
    /// `spiffe://<trust-domain>/connector/<name>`) and key. Required: the
    /// relay authenticates every client.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Skip relay certificate verification (local experiments only; logged).
    #[serde(default)]
    pub insecure: bool,
    #[serde(default = "default_max_udp_flows")]
    pub max_udp_flows: usize,
    /// UDP flows one agent flow may hold, so one agent cannot use up the
    /// table for everyone.
    #[serde(default = "default_max_udp_flows_per_agent")]
    pub max_udp_flows_per_agent: usize,
    #[serde(default = "default_udp_idle_secs")]
    pub udp_idle_secs: u64,
    /// Agent flows with TCP state (one smoltcp interface each).
    #[serde(default = "default_max_tcp_flows")]
    pub max_tcp_flows: usize,
    /// TCP connections per agent flow.
    #[serde(default = "default_max_tcp_per_flow")]
    pub max_tcp_per_flow: usize,
    /// TCP connections in total. Worst-case buffer memory is
    /// `max_tcp_connections × 2 × tcp_buffer_bytes`.
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: usize,
    /// Size of each of the two smoltcp buffers of a TCP connection; it is
    /// also the largest window advertised to the agent.
    #[serde(default = "default_tcp_buffer_bytes")]
    pub tcp_buffer_bytes: usize,
    /// A TCP connection that moves no byte and gets no segment for this
    /// long is reset on both sides.
    #[serde(default = "default_tcp_idle_secs")]
    pub tcp_idle_secs: u64,
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4434))
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_max_udp_flows() -> usize {
    4096
}
fn default_max_udp_flows_per_agent() -> usize {
    256
}
fn default_udp_idle_secs() -> u64 {
    60
}
fn default_max_tcp_flows() -> usize {
    1024
}
fn default_max_tcp_per_flow() -> usize {
    64
}
fn default_max_tcp_connections() -> usize {
    2048
}
fn default_tcp_buffer_bytes() -> usize {
    256 * 1024
}
fn default_tcp_idle_secs() -> u64 {
    600
}

/// How long a backend TCP connect may take before the agent gets an RST.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ConnectorConfig {
    /// A configuration with every optional setting at its default.
    pub fn new(relays: Vec<SocketAddr>, services: Vec<ServiceConfig>) -> ConnectorConfig {
        ConnectorConfig {
            relays: relays.iter().map(SocketAddr::to_string).collect(),
            health: None,
            listen: default_listen(),
            server_name: default_server_name(),
            ca: None,
            cert: None,
            key: None,
            insecure: false,
            max_udp_flows: default_max_udp_flows(),
            max_udp_flows_per_agent: default_max_udp_flows_per_agent(),
            udp_idle_secs: default_udp_idle_secs(),
            max_tcp_flows: default_max_tcp_flows(),
            max_tcp_per_flow: default_max_tcp_per_flow(),
            max_tcp_connections: default_max_tcp_connections(),
            tcp_buffer_bytes: default_tcp_buffer_bytes(),
            tcp_idle_secs: default_tcp_idle_secs(),
            services,
        }
    }

    pub fn from_toml(s: &str) -> Result<Self> {
        let c: ConnectorConfig = toml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.relays.is_empty() {
            bail!("at least one relay is required");
        }
        if let Some(r) = self.relays.iter().find(|r| !is_host_port(r)) {
            bail!("relay {r:?} is not host:port");
        }
        if self.services.is_empty() {
            bail!("at least one service is required");
        }
        if self.cert.is_none() || self.key.is_none() {
            bail!("cert and key are required: the relay authenticates every connector");
        }
        for s in &self.services {
            if ServiceName::new(&s.name).is_none() {
                bail!("invalid service name {:?} (1-64 of [a-z0-9._-])", s.name);
            }
            for a in s.allow_agents.iter().flatten() {
                match ztna_control::identity::Identity::parse(a) {
                    Ok(id) if id.kind == ztna_control::identity::Kind::Agent => {}
                    _ => bail!("service {}: allow_agents entry {a:?} is not an agent SPIFFE ID", s.name),
                }
            }
        }
        if !(4096..=16 << 20).contains(&self.tcp_buffer_bytes) {
            bail!("tcp_buffer_bytes must be between 4096 and 16 MiB");
        }
        // Bounded so that `last + idle` can never overflow an Instant.
        const WEEK: u64 = 7 * 24 * 3600;
        if !(1..=WEEK).contains(&self.tcp_idle_secs) || !(1..=WEEK).contains(&self.udp_idle_secs) {
            bail!("tcp_idle_secs and udp_idle_secs must be between 1 s and one week");
        }
        if self.max_udp_flows_per_agent == 0 {
            bail!("max_udp_flows_per_agent must be positive");
        }
        Ok(())
    }
}

crate::stats::counters! {
    /// Counters of a connector.
    ConnectorStats, ConnectorStatsSnapshot {
    packets_from_agents,
    /// Flows refused by a service's `allow_agents` (FlowClose{denied}).
    flows_refused,
    packets_to_agents,
    udp_to_backend,
    udp_from_backend,
    icmp_echo_replies,
    udp_flows_opened,
    udp_flows_expired,
    /// Not IPv4, malformed, fragments, bad checksums, non-unicast source or
    /// destination.
    drop_malformed,
    drop_ipv6,
    /// Destination (protocol, port) not configured for the service (a TCP
    /// SYN among them is answered with an RST).
    drop_not_allowed,
    /// IPv4 packets over 1280 bytes with DF set (answered with ICMP
    /// fragmentation needed).
    drop_too_big,
    /// TCP connections whose backend connect succeeded (the agent's SYN was
    /// then accepted).
    tcp_connections_opened,
    /// TCP connections removed (closed, reset, timed out, failed).
    tcp_connections_closed,
    tcp_bytes_to_backend,
    tcp_bytes_from_backend,
    /// Backend connect refused, failed or timed out (the agent got an RST).
    tcp_backend_connect_failed,
    /// Backend read or write errors on an open connection (agent got an RST).
    tcp_backend_errors,
    tcp_idle_timeouts,
    /// SYNs dropped at max_tcp_flows, max_tcp_per_flow or max_tcp_connections.
    drop_tcp_limit,
    /// Segments (not SYN) for no known connection; answered with an RST.
    drop_tcp_no_connection,
    /// Segments dropped because a flow's smoltcp input queue was full.
    drop_tcp_queue_full,
    drop_flow_table_full,
    drop_unknown_flow,
    drop_send_to_agent,
    /// Agent flows whose state was kept after their relay leg ended, and
    /// how many of them a new flow of the same agent took over (TCP
    /// connections survive a relay drain or failover) or expired.
    flows_parked,
    flows_adopted,
    flows_park_expired,
    }
}

impl ConnectorStats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Key of a UDP flow: which relay session and agent flow, and the inner
/// 5-tuple's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct UdpKey {
    session: usize,
    flow: u32,
    agent: SocketAddrV4,
    service_addr: SocketAddrV4,
}

struct UdpFlow {
    socket: UdpSocket,
    last: Instant,
}

/// How long the state of an agent's flow (its TCP connections to backends,
/// its UDP flows) is kept after the flow closed because the agent left its
/// relay or the relay was lost: if the same agent opens a flow for the same
/// service from the same address within this time (through another relay,
/// after a drain or a failover), the state is adopted and its connections
/// carry on. Longer than the QUIC idle timeout, so a hard relay failure that
/// both sides notice at the idle timeout is covered too.
pub const PARK_TTL: Duration = Duration::from_secs(60);

/// `FlowKey::session` of parked flows (no relay link has this index).
const PARKED: usize = usize::MAX;

/// Who a parked flow belongs to: agent identity, service, agent IP.
type ParkKey = (Arc<str>, usize, std::net::IpAddr);

/// An agent flow on a relay link.
#[derive(Debug, Clone)]
struct AgentFlow {
    service: usize,
    agent_id: Arc<str>,
    agent_ip: std::net::IpAddr,
}

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

/// Liveness and readiness of a running connector, shared with its HTTP
/// endpoint.
#[derive(Debug)]
pub struct ConnectorHealth {
    /// The connector loop's.
    heartbeat: Heartbeat,
    /// Every service registered at one relay or more.
    serving: AtomicBool,
    relays: AtomicU64,
    relays_connected: AtomicU64,
}

impl ConnectorHealth {
    fn new() -> ConnectorHealth {
        ConnectorHealth {
            heartbeat: Heartbeat::new(),
            serving: AtomicBool::new(false),
            relays: AtomicU64::new(0),
            relays_connected: AtomicU64::new(0),
        }
    }

    /// The loop turned within [`crate::io::HEARTBEAT_STALE`].
    pub fn alive(&self, now: Instant) -> bool {
        self.heartbeat.fresh(now)
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` of a connector on `addr`.
pub fn serve_health(addr: SocketAddr, health: Arc<ConnectorHealth>, stats: Arc<ConnectorStats>) -> Result<SocketAddr> {
    let http_stats = Arc::new(crate::http::HttpStats::default());
    let counted = Arc::clone(&http_stats);
    let handler: Arc<crate::http::Handler> = Arc::new(move |path: &str| {
        if path == "/metrics" {
            let mut body = render_metrics(&health, &stats);
            body.push_str(&counted.render_prometheus("ztna_connector_http_events_total"));
            return Some(crate::http::Response { status: 200, content_type: "text/plain; version=0.0.4", body });
        }
        crate::http::probe(path, health.alive(Instant::now()), health.serving())
    });
    crate::http::serve_counted(addr, "connector", handler, http_stats)
}

fn render_metrics(h: &ConnectorHealth, s: &ConnectorStats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let gauges = [
        ("ztna_connector_relays", h.relays.load(Ordering::Relaxed)),
        ("ztna_connector_relays_connected", h.relays_connected.load(Ordering::Relaxed)),
        ("ztna_connector_ready", u64::from(h.serving())),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
    }
    for (field, v) in s.snapshot().fields() {
        let _ = writeln!(out, "# TYPE ztna_connector_{field}_total counter\nztna_connector_{field}_total {v}");
    }
    out
}

/// A relay session and what it learned.
struct RelayLink {
    relay: SocketAddr,
    /// Its address left DNS while it was disconnected: closed, and its
    /// slot reusable (slots are never removed: flow keys hold the index).
    retired: bool,
    session: ClientSession,
    /// Service handle → service.
    handles: HashMap<u32, usize>,
    /// Connector-leg flow → service and agent.
    flows: HashMap<u32, AgentFlow>,
}

/// The running connector.
pub struct Connector {
    cfg: ConnectorConfig,
    socket: UdpSocket,
    links: Vec<RelayLink>,
    tls: TlsOptions,
    seed: u64,
    /// Fresh resolutions of the relay names (None: IP literals only).
    resolver: Option<mpsc::Receiver<Vec<SocketAddr>>>,
    health: Arc<ConnectorHealth>,
    /// Backend targets as resolved at start.
    targets: HashMap<Target, SocketAddr>,
    /// State of agent flows whose relay leg ended, waiting to be adopted:
    /// key → (parked id, expiry).
    parked: HashMap<ParkKey, (u32, Instant)>,
    next_park: u32,
    udp: HashMap<UdpKey, UdpFlow>,
    tcp: TcpEngine,
    pub stats: Arc<ConnectorStats>,
    buf: Vec<u8>,
    out: Vec<u8>,
    pkt: Vec<u8>,
}

impl Connector {
    pub fn new(cfg: ConnectorConfig, seed: u64) -> Result<Connector> {
        cfg.validate()?;
        let socket = UdpSocket::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        if cfg.insecure {
            warn!("relay certificate verification is OFF (--insecure): anyone can impersonate the relay");
        }
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let tls = TlsOptions {
            ca_file: path(&cfg.ca),
            cert_file: path(&cfg.cert),
            key_file: path(&cfg.key),
            verify_peer: !cfg.insecure,
        };
        let addrs = resolve_relays(&cfg.relays);
        // IP literals need no resolver; names are resolved again in the
        // background (getaddrinfo blocks), so new replicas are picked up.
        let resolver = cfg.relays.iter().any(|r| r.parse::<SocketAddr>().is_err()).then(|| spawn_resolver(&cfg.relays));
        info!(%local, relays = ?addrs, services = cfg.services.len(), "connector starting");
        let stats = Arc::new(ConnectorStats::default());
        let limits = TcpLimits {
            max_flows: cfg.max_tcp_flows,
            max_per_flow: cfg.max_tcp_per_flow,
            max_conns: cfg.max_tcp_connections,
            buffer: cfg.tcp_buffer_bytes,
            idle: Duration::from_secs(cfg.tcp_idle_secs),
            connect_timeout: TCP_CONNECT_TIMEOUT,
        };
        let mut targets = HashMap::new();
        for b in cfg.services.iter().flat_map(|s| &s.backend) {
            if !targets.contains_key(&b.target) {
                let addr = b.target.resolve()?;
                info!(target = b.target.as_str(), %addr, "backend");
                targets.insert(b.target.clone(), addr);
            }
        }
        let mut c = Connector {
            targets,
            parked: HashMap::new(),
            next_park: 0,
            cfg,
            socket,
            links: Vec::new(),
            tls,
            seed,
            resolver,
            health: Arc::new(ConnectorHealth::new()),
            udp: HashMap::new(),
            tcp: TcpEngine::new(limits, Arc::clone(&stats), seed),
            stats,
            buf: vec![0u8; 65_536],
            out: vec![0u8; 2048],
            pkt: Vec::with_capacity(2048),
        };
        c.reconcile(&addrs)?;
        Ok(c)
    }

    /// Liveness and readiness, for [`serve_health`].
    pub fn health(&self) -> Arc<ConnectorHealth> {
        Arc::clone(&self.health)
    }

    /// Relays this connector currently holds a session with (not retired).
    pub fn relays(&self) -> Vec<SocketAddr> {
        self.links.iter().filter(|l| !l.retired).map(|l| l.relay).collect()
    }

    /// Brings the links in line with the resolved relay addresses: a new
    /// address gets a session; a link whose address is gone is retired once
    /// it is disconnected, never while connected (a draining relay leaves
    /// DNS first but still serves agents through us until it closes).
    fn reconcile(&mut self, addrs: &[SocketAddr]) -> Result<()> {
        // One socket serves every relay: only addresses of its family.
        let v4 = self.socket.local_addr()?.is_ipv4();
        let addrs: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
        if addrs.is_empty() {
            return Ok(()); // a DNS hiccup: keep what we have
        }
        for i in 0..self.links.len() {
            let Some(l) = self.links.get_mut(i) else { continue };
            if !l.retired && !addrs.contains(&l.relay) && !l.session.is_connected() {
                info!(relay = %l.relay, "relay left DNS; closing its session");
                l.retired = true;
                l.session.close();
                l.handles.clear();
                l.flows.clear();
                self.drop_session_state(i);
            }
        }
        for &relay in &addrs {
            if self.links.iter().any(|l| !l.retired && l.relay == relay) {
                continue;
            }
            let link = self.new_link(relay)?;
            info!(%relay, "new relay");
            match self.links.iter().position(|l| l.retired && l.session.is_stopped()) {
                Some(i) => {
                    if let Some(slot) = self.links.get_mut(i) {
                        *slot = link;
                    }
                }
                None => self.links.push(link),
            }
        }
        self.health.relays.store(self.relays().len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn new_link(&mut self, relay: SocketAddr) -> Result<RelayLink> {
        let local = self.socket.local_addr()?;
        let local = if local.ip().is_unspecified() && relay.ip().is_loopback() {
            SocketAddr::new(relay.ip(), local.port())
        } else {
            local
        };
        let mut c = ClientConfig::new(relay, local, &self.cfg.server_name);
        c.registrations =
            self.cfg.services.iter().filter_map(|s| ServiceName::new(&s.name)).map(|s| (Role::Connector, s)).collect();
        c.software = format!("ztna-connector/{}", env!("CARGO_PKG_VERSION"));
        // Pinned to this relay: on Goodbye{DRAINING} keep serving the agents
        // still there until the relay closes us.
        c.leave_on_goodbye = false;
        let qc = quic::client_config(&self.tls).map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?;
        self.seed = self.seed.wrapping_add(1);
        let session = ClientSession::new(c, qc, self.seed, Instant::now());
        Ok(RelayLink { relay, retired: false, session, handles: HashMap::new(), flows: HashMap::new() })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Runs until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::Acquire) {
            self.turn(Duration::from_millis(50))?;
        }
        for l in &mut self.links {
            l.session.close();
        }
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
        if let Some(addrs) = self.resolver.as_ref().and_then(|r| r.try_iter().last()) {
            // A link that cannot be set up now (unreadable TLS files during a
            // rotation) is retried at the next resolution.
            if let Err(e) = self.reconcile(&addrs) {
                warn!(error = format!("{e:#}"), "cannot add a relay; retrying at the next resolution");
            }
        }
        let deadline = self.links.iter().filter_map(|l| l.session.next_deadline()).min();
        let deadline = match (deadline, self.tcp.next_deadline(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wait = deadline.map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        let pollin = |fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let mut fds = vec![pollin(self.socket.as_raw_fd())];
        fds.extend(self.udp.values().map(|f| pollin(f.socket.as_raw_fd())));
        let tcp_from = fds.len();
        self.tcp.pollfds(&mut fds);
        tcp::poll_fds(&mut fds, wait);
        self.tcp.set_revents(fds.get(tcp_from..).unwrap_or_default());

        // From relays.
        while let Ok((n, from)) = self.socket.recv_from(&mut self.buf) {
            let now = Instant::now();
            let link = self.links.iter_mut().find(|l| l.relay == from && !l.retired);
            if let (Some(l), Some(b)) = (link, self.buf.get_mut(..n)) {
                l.session.recv(b, from, now);
            }
        }
        let now = Instant::now();
        for i in 0..self.links.len() {
            self.handle_events(i);
            self.handle_datagrams(i, now);
        }
        self.backend_replies(now);
        self.tcp.service(now);
        let (links, stats) = (&mut self.links, &self.stats);
        self.tcp.drain_tx(|k, pkt| {
            let Some(l) = links.get_mut(k.session) else { return TxOutcome::Dropped };
            match l.session.send_datagram(k.flow, pkt) {
                Ok(()) => {
                    ConnectorStats::inc(&stats.packets_to_agents);
                    TxOutcome::Sent
                }
                Err(ztna_control::client::SendError::QueueFull) => TxOutcome::Blocked,
                Err(_) => TxOutcome::Dropped,
            }
        });
        for l in &mut self.links {
            if l.session.next_deadline().is_some_and(|d| d <= now) {
                l.session.handle_timeout(now);
            }
        }
        self.expire(now);
        self.transmit();
        Ok(())
    }

    fn transmit(&mut self) {
        let now = Instant::now();
        for l in &mut self.links {
            while let Some((n, to)) = l.session.poll_transmit(&mut self.out, now) {
                if let Some(b) = self.out.get(..n) {
                    let _ = self.socket.send_to(b, to);
                }
            }
        }
    }

    fn service_index(&self, name: &ServiceName) -> Option<usize> {
        self.cfg.services.iter().position(|s| s.name == name.as_str())
    }

    fn handle_events(&mut self, i: usize) {
        while let Some(e) = self.links.get_mut(i).and_then(|l| l.session.poll_event()) {
            match e {
                Event::Registered { service, flow, .. } => {
                    info!(relay = i, %service, handle = flow, "registered");
                    if let Some(si) = self.service_index(&service) {
                        if let Some(l) = self.links.get_mut(i) {
                            l.handles.insert(flow, si);
                        }
                    }
                }
                Event::RegisterFailed { service, code, reason, .. } => {
                    warn!(relay = i, %service, %code, reason, "registration refused");
                }
                Event::FlowOpened { flow, service, agent_addr, agent_id } => {
                    let Some(l) = self.links.get_mut(i) else { continue };
                    let Some(si) = l.handles.get(&service).copied() else { continue };
                    let svc = self.cfg.services.get(si);
                    let allowed = svc.and_then(|s| s.allow_agents.as_ref()).is_none_or(|list| list.contains(&agent_id));
                    if allowed {
                        debug!(relay = i, flow, %agent_addr, agent = %agent_id, "flow opened");
                        let f = AgentFlow {
                            service: si,
                            agent_id: Arc::from(agent_id.as_str()),
                            agent_ip: agent_addr.ip(),
                        };
                        let park = (Arc::clone(&f.agent_id), si, f.agent_ip);
                        l.flows.insert(flow, f);
                        let to = FlowKey { session: i, flow };
                        if let Some((pid, _)) = self.parked.remove(&park) {
                            self.adopt(FlowKey { session: PARKED, flow: pid }, to);
                            info!(relay = i, flow, agent = %agent_id, "flow adopted: its connections carry on");
                        } else if let Some(from) = self.live_flow_elsewhere(&park, to) {
                            // The agent moved before this connector heard that
                            // its old relay leg ended (a relay that died, or a
                            // FlowClose still in flight): take the state over.
                            self.adopt(from, to);
                            info!(relay = i, flow, agent = %agent_id, from_relay = from.session,
                                  "flow adopted from another relay: its connections carry on");
                        }
                    } else {
                        warn!(relay = i, flow, agent = %agent_id, service = svc.map_or("", |s| s.name.as_str()),
                              "flow refused: agent not in allow_agents");
                        self.stats.flows_refused.fetch_add(1, Ordering::Relaxed);
                        l.session.refuse_flow(flow, ztna_control::Code::DENIED);
                    }
                }
                Event::FlowClosed { flow, code } => {
                    let f = self.links.get_mut(i).and_then(|l| l.flows.remove(&flow));
                    let key = FlowKey { session: i, flow };
                    match f {
                        // The agent left this relay (drain, failover, or
                        // for good): keep its state a while.
                        Some(f) if code == ztna_control::Code::AGENT_GONE => self.park(key, f, Instant::now()),
                        _ => self.drop_flow_state(key),
                    }
                }
                Event::Disconnected { reason, retry_in } => {
                    warn!(relay = i, reason, ?retry_in, "relay connection lost");
                    let flows: Vec<(u32, AgentFlow)> = match self.links.get_mut(i) {
                        Some(l) => {
                            l.handles.clear();
                            l.flows.drain().collect()
                        }
                        None => Vec::new(),
                    };
                    let now = Instant::now();
                    for (flow, f) in flows {
                        self.park(FlowKey { session: i, flow }, f, now);
                    }
                    self.drop_session_state(i);
                }
                Event::Connected => info!(relay = i, "connected"),
                Event::ObservedAddress(a) => info!(relay = i, observed = %a, "observed address"),
                Event::Goodbye { code, reason } => info!(relay = i, %code, reason, "relay says goodbye"),
            }
        }
    }

    fn handle_datagrams(&mut self, i: usize, now: Instant) {
        let mut d = std::mem::take(&mut self.buf);
        while let Some(n) = self.links.get_mut(i).and_then(|l| l.session.recv_datagram(&mut d)) {
            let Some(raw) = d.get(..n) else { continue };
            let Ok((flow, ip)) = datagram::parse(raw) else {
                ConnectorStats::inc(&self.stats.drop_malformed);
                continue;
            };
            ConnectorStats::inc(&self.stats.packets_from_agents);
            let Some(si) = self.links.get(i).and_then(|l| l.flows.get(&flow)).map(|f| f.service) else {
                ConnectorStats::inc(&self.stats.drop_unknown_flow);
                continue;
            };
            self.handle_ip(i, flow, si, ip, now);
        }
        self.buf = d;
    }

    fn handle_ip(&mut self, i: usize, flow: u32, si: usize, ip: &[u8], now: Instant) {
        if packet::ip_version(ip) == Some(6) {
            ConnectorStats::inc(&self.stats.drop_ipv6);
            return;
        }
        let Ok(v4) = packet::parse_ipv4(ip) else {
            ConnectorStats::inc(&self.stats.drop_malformed);
            return;
        };
        // Both ends must be unicast hosts: smoltcp asserts on answering
        // 0.0.0.0 (found by the ip_packet fuzz target), and nothing good
        // comes of tunneled broadcast or multicast.
        let host = |a: std::net::Ipv4Addr| !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
        if !host(v4.src) || !host(v4.dst) {
            ConnectorStats::inc(&self.stats.drop_malformed);
            return;
        }
        if v4.total_len() > TUNNEL_MTU && v4.dont_fragment {
            ConnectorStats::inc(&self.stats.drop_too_big);
            // From the address the agent sent to, as the hop that cannot
            // carry the packet; the MTU is what the tunnel carries safely.
            if packet::build_icmp_frag_needed(ip, v4.dst, TUNNEL_MTU as u16, &mut self.pkt).is_ok() {
                self.send_to_agent(i, flow);
            }
            return;
        }
        let Some(svc) = self.cfg.services.get(si) else { return };
        match packet::parse_transport(&v4) {
            Ok(Transport::IcmpEcho { request: true, .. }) if svc.icmp => {
                if packet::build_icmp_echo_reply(&v4, &mut self.pkt).is_ok() {
                    ConnectorStats::inc(&self.stats.icmp_echo_replies);
                    self.send_to_agent(i, flow);
                }
            }
            Ok(Transport::Udp { src_port, dst_port, payload }) => {
                let Some(target) = svc
                    .backend
                    .iter()
                    .find(|b| b.protocol == Proto::Udp && b.port == dst_port)
                    .and_then(|b| self.targets.get(&b.target).copied())
                else {
                    ConnectorStats::inc(&self.stats.drop_not_allowed);
                    return;
                };
                let key = UdpKey {
                    session: i,
                    flow,
                    agent: SocketAddrV4::new(v4.src, src_port),
                    service_addr: SocketAddrV4::new(v4.dst, dst_port),
                };
                if !self.udp.contains_key(&key) {
                    let mine = self.udp.keys().filter(|k| k.session == i && k.flow == flow).count();
                    if self.udp.len() >= self.cfg.max_udp_flows || mine >= self.cfg.max_udp_flows_per_agent {
                        ConnectorStats::inc(&self.stats.drop_flow_table_full);
                        return;
                    }
                    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                    let Ok(s) = UdpSocket::bind(bind).and_then(|s| s.connect(target).map(|()| s)) else {
                        ConnectorStats::inc(&self.stats.drop_flow_table_full);
                        return;
                    };
                    let _ = s.set_nonblocking(true);
                    ConnectorStats::inc(&self.stats.udp_flows_opened);
                    self.udp.insert(key, UdpFlow { socket: s, last: now });
                }
                if let Some(f) = self.udp.get_mut(&key) {
                    f.last = now;
                    if f.socket.send(payload).is_ok() {
                        ConnectorStats::inc(&self.stats.udp_to_backend);
                    }
                }
            }
            Ok(Transport::Tcp { src_port, dst_port, header, payload }) => {
                let t =
                    Tuple { agent: SocketAddrV4::new(v4.src, src_port), service: SocketAddrV4::new(v4.dst, dst_port) };
                let backend = svc
                    .backend
                    .iter()
                    .find(|b| b.protocol == Proto::Tcp && b.port == dst_port)
                    .and_then(|b| self.targets.get(&b.target).copied());
                let verdict = match backend {
                    Some(target) => {
                        let whole = ip.get(..v4.total_len()).unwrap_or(ip);
                        self.tcp.input(FlowKey { session: i, flow }, t, &header, whole, target, now)
                    }
                    None => {
                        ConnectorStats::inc(&self.stats.drop_not_allowed);
                        // Refuse connection attempts as a closed port does.
                        let syn = header.flags.contains(TcpFlags::SYN) && !header.flags.contains(TcpFlags::ACK);
                        if syn {
                            Verdict::Reset
                        } else {
                            Verdict::Dropped
                        }
                    }
                };
                if verdict == Verdict::Reset && tcp::build_rst(&t, &header, payload.len(), &mut self.pkt) {
                    self.send_to_agent(i, flow);
                }
            }
            Ok(_) => ConnectorStats::inc(&self.stats.drop_not_allowed),
            Err(_) => ConnectorStats::inc(&self.stats.drop_malformed),
        }
    }

    fn send_to_agent(&mut self, i: usize, flow: u32) {
        let Some(l) = self.links.get_mut(i) else { return };
        match l.session.send_datagram(flow, &self.pkt) {
            Ok(()) => ConnectorStats::inc(&self.stats.packets_to_agents),
            Err(_) => ConnectorStats::inc(&self.stats.drop_send_to_agent),
        }
    }

    fn backend_replies(&mut self, now: Instant) {
        let keys: Vec<UdpKey> = self.udp.keys().copied().collect();
        let mut buf = std::mem::take(&mut self.buf);
        for k in keys {
            while let Some(f) = self.udp.get_mut(&k) {
                let Ok(n) = f.socket.recv(&mut buf) else { break };
                f.last = now;
                ConnectorStats::inc(&self.stats.udp_from_backend);
                let payload = buf.get(..n).unwrap_or_default();
                // Reply as the service address the agent sent to.
                if packet::build_ipv4_udp(k.service_addr, k.agent, payload, &mut self.pkt).is_ok() {
                    self.send_to_agent(k.session, k.flow);
                } else {
                    ConnectorStats::inc(&self.stats.drop_send_to_agent);
                }
            }
        }
        self.buf = buf;
    }

    /// Moves a closed flow's TCP and UDP state aside for [`PARK_TTL`].
    fn park(&mut self, key: FlowKey, f: AgentFlow, now: Instant) {
        let pid = self.next_park;
        self.next_park = self.next_park.wrapping_add(1);
        if !self.move_flow_state(key, FlowKey { session: PARKED, flow: pid }) {
            return;
        }
        ConnectorStats::inc(&self.stats.flows_parked);
        // One parked flow per (agent, service, address): a newer one wins.
        if let Some((old, _)) = self.parked.insert((f.agent_id, f.service, f.agent_ip), (pid, now + PARK_TTL)) {
            self.drop_flow_state(FlowKey { session: PARKED, flow: old });
        }
    }

    /// Another open flow (on any relay link, this one included) of the same
    /// agent, service and address: the agent reconnected before its old leg
    /// was closed (a relay that died, a FlowClose still in flight, or a
    /// reconnect to the same relay after a silence). The old leg keeps its
    /// mapping, so a second device under the same identity is not cut off;
    /// only the connection state moves.
    fn live_flow_elsewhere(&self, park: &ParkKey, new: FlowKey) -> Option<FlowKey> {
        self.links.iter().enumerate().find_map(|(j, l)| {
            l.flows
                .iter()
                .find(|(flow, f)| {
                    (j, **flow) != (new.session, new.flow)
                        && f.agent_id == park.0
                        && f.service == park.1
                        && f.agent_ip == park.2
                })
                .map(|(flow, _)| FlowKey { session: j, flow: *flow })
        })
    }

    /// A new flow takes over the state under `from` (parked or live).
    fn adopt(&mut self, from: FlowKey, to: FlowKey) {
        if self.move_flow_state(from, to) {
            ConnectorStats::inc(&self.stats.flows_adopted);
        }
    }

    /// Moves a flow's TCP connections and UDP sockets to another key (used
    /// to park and to adopt); false if there was nothing to move.
    fn move_flow_state(&mut self, from: FlowKey, to: FlowKey) -> bool {
        let tcp = self.tcp.rekey(from, to);
        let udp: Vec<UdpKey> =
            self.udp.keys().filter(|k| k.session == from.session && k.flow == from.flow).copied().collect();
        for k in &udp {
            if let Some(v) = self.udp.remove(k) {
                self.udp.insert(UdpKey { session: to.session, flow: to.flow, ..*k }, v);
            }
        }
        tcp || !udp.is_empty()
    }

    fn drop_flow_state(&mut self, key: FlowKey) {
        self.udp.retain(|k, _| !(k.session == key.session && k.flow == key.flow));
        self.tcp.remove_flow(key);
    }

    /// Drops every flow's state of relay link `i` (its session is gone).
    fn drop_session_state(&mut self, i: usize) {
        self.udp.retain(|k, _| k.session != i);
        self.tcp.remove_session(i);
    }

    fn expire(&mut self, now: Instant) {
        let gone: Vec<(ParkKey, u32)> =
            self.parked.iter().filter(|(_, (_, until))| *until <= now).map(|(k, (pid, _))| (k.clone(), *pid)).collect();
        for (k, pid) in gone {
            self.parked.remove(&k);
            self.drop_flow_state(FlowKey { session: PARKED, flow: pid });
            ConnectorStats::inc(&self.stats.flows_park_expired);
        }
        let idle = Duration::from_secs(self.cfg.udp_idle_secs);
        let before = self.udp.len();
        self.udp.retain(|_, f| now.saturating_duration_since(f.last) < idle);
        let gone = (before - self.udp.len()) as u64;
        self.stats.udp_flows_expired.fetch_add(gone, Ordering::Relaxed);
    }

    /// Observed address per relay (None until reported).
    pub fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        self.links.iter().map(|l| l.session.observed_address()).collect()
    }

    /// Whether every relay link has all its services registered.
    pub fn is_ready(&self) -> bool {
        self.links.iter().filter(|l| !l.retired).all(|l| l.handles.len() == self.cfg.services.len())
    }

    /// Whether some relay link has all its services registered (`/readyz`).
    pub fn is_serving(&self) -> bool {
        self.links.iter().any(|l| !l.retired && l.handles.len() == self.cfg.services.len())
    }

    fn update_health(&self, now: Instant) {
        let h = &self.health;
        h.heartbeat.beat(now);
        h.serving.store(self.is_serving(), Ordering::Relaxed);
        let connected = self.links.iter().filter(|l| !l.retired && l.session.is_connected()).count();
        h.relays_connected.store(connected as u64, Ordering::Relaxed);
    }
}
