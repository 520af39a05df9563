//! The connector: registers services at one or more relays from a single
//! UDP socket with a fixed port, and turns tunneled IP packets into real
//! traffic to the configured backends.
//!
//! It handles UDP (a bounded flow table of backend sockets with idle
//! expiry, see [`udp`]), ICMP echo (answered by the connector) and TCP (a userspace TCP
//! endpoint in smoltcp per agent flow, proxied to real TCP connections with
//! flow control both ways; see [`tcp`]). Only the configured (protocol,
//! port) → backend pairs are reachable: anything else is dropped and counted
//! (a TCP SYN is also answered with an RST, as a closed port would), so the
//! connector is not an open proxy.
//!
//! Every table an agent can grow (UDP flows, TCP connections, TCP agent
//! flows) is bounded in total, per agent flow and per agent identity, and
//! shared fairly between identities when full ([`fair`]).
//!
//! IPv4 packets larger than the tunnel MTU (1280) with DF set are dropped
//! and answered with ICMP "fragmentation needed" (next-hop MTU 1280), so the
//! agent's path MTU discovery settles on what the tunnel carries.

mod config;
mod fair;
mod health;
mod tcp;
mod udp;
pub mod vdev;

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{debug, info, warn};
use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::packet::{self, TcpFlags, Transport};
use ztna_control::quic::{self, TlsOptions};
use ztna_control::{datagram, Role, ServiceName};

pub use self::config::{Backend, ConnectorConfig, Proto, ServiceConfig, Target, DEFAULT_IDENTITY_SHARE_DIVISOR};
pub use self::health::{serve_health, ConnectorHealth};
use self::tcp::{FlowKey, TcpEngine, TcpLimits, Tuple, TxOutcome, Verdict};
use self::udp::{UdpKey, UdpLimits, UdpTable};
use crate::vdev::TUNNEL_MTU;

ztna_ops::counters! {
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
    /// New UDP flows refused because their agent identity holds its share
    /// (max_udp_flows_per_identity).
    udp_flows_refused_identity_share,
    /// UDP flows closed to make room for an identity below its share (the
    /// least recently used flow of the identity holding the most).
    udp_flows_reclaimed,
    /// recv calls on UDP backend sockets (only sockets epoll reported
    /// readable are read).
    udp_backend_reads,
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
    /// SYNs refused with an RST at max_tcp_flows, max_tcp_per_flow or
    /// max_tcp_connections (nothing to reclaim).
    drop_tcp_limit,
    /// SYNs refused with an RST because their agent identity holds its
    /// share (max_tcp_connections_per_identity, max_tcp_flows_per_identity).
    tcp_refused_identity_share,
    /// TCP connections reset (both sides) to make room for an identity
    /// below its share (the least recently used connection of the identity
    /// holding the most).
    tcp_connections_reclaimed,
    /// Segments (not SYN) for no known connection; answered with an RST.
    drop_tcp_no_connection,
    /// Segments dropped because a flow's smoltcp input queue, or its
    /// identity's queue budget (max_tcp_queued_packets_per_identity), was
    /// full.
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
    udp: UdpTable,
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
            flows_per_identity: cfg.tcp_flows_per_identity(),
            max_per_flow: cfg.max_tcp_per_flow,
            max_conns: cfg.max_tcp_connections,
            conns_per_identity: cfg.tcp_connections_per_identity(),
            queue_per_identity: cfg.max_tcp_queued_packets_per_identity,
            buffer: cfg.tcp_buffer_bytes,
            idle: Duration::from_secs(cfg.tcp_idle_secs),
            connect_timeout: config::TCP_CONNECT_TIMEOUT,
        };
        let mut targets = HashMap::new();
        for b in cfg.services.iter().flat_map(|s| &s.backend) {
            if !targets.contains_key(&b.target) {
                let addr = b.target.resolve()?;
                info!(target = b.target.as_str(), %addr, "backend");
                targets.insert(b.target.clone(), addr);
            }
        }
        let udp_limits = UdpLimits {
            max_flows: cfg.max_udp_flows,
            per_agent_flow: cfg.max_udp_flows_per_agent,
            per_identity: cfg.udp_flows_per_identity(),
            idle: Duration::from_secs(cfg.udp_idle_secs),
        };
        let udp = UdpTable::new(udp_limits, Arc::clone(&stats)).context("creating the UDP flow table's epoll")?;
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
            udp,
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
        // One descriptor for every UDP backend socket (epoll).
        let mut fds = vec![pollin(self.socket.as_raw_fd()), pollin(self.udp.poll_fd())];
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
            let Some((si, who)) =
                self.links.get(i).and_then(|l| l.flows.get(&flow)).map(|f| (f.service, Arc::clone(&f.agent_id)))
            else {
                ConnectorStats::inc(&self.stats.drop_unknown_flow);
                continue;
            };
            self.handle_ip(i, flow, (si, &who), ip, now);
        }
        self.buf = d;
    }

    /// One IP packet of agent flow `flow` on link `i`, for service `si`
    /// from agent identity `who`.
    fn handle_ip(&mut self, i: usize, flow: u32, (si, who): (usize, &Arc<str>), ip: &[u8], now: Instant) {
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
                self.udp.send(key, who, target, payload, now);
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
                        self.tcp.input(FlowKey { session: i, flow }, who, t, &header, whole, target, now)
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

    /// Replies of the UDP backends whose sockets are readable.
    fn backend_replies(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.buf);
        let (links, pkt, stats) = (&mut self.links, &mut self.pkt, &self.stats);
        self.udp.read_ready(now, &mut buf, |k: UdpKey, payload| {
            // Reply as the service address the agent sent to.
            if packet::build_ipv4_udp(k.service_addr, k.agent, payload, pkt).is_err() {
                ConnectorStats::inc(&stats.drop_send_to_agent);
                return;
            }
            let sent = links.get_mut(k.session).map(|l| l.session.send_datagram(k.flow, pkt));
            match sent {
                Some(Ok(())) => ConnectorStats::inc(&stats.packets_to_agents),
                _ => ConnectorStats::inc(&stats.drop_send_to_agent),
            }
        });
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
        let udp = self.udp.rekey_agent_flow(from, to);
        tcp || udp
    }

    fn drop_flow_state(&mut self, key: FlowKey) {
        self.udp.remove_agent_flow(key);
        self.tcp.remove_flow(key);
    }

    /// Drops every flow's state of relay link `i` (its session is gone).
    fn drop_session_state(&mut self, i: usize) {
        self.udp.remove_session(i);
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
        let gone = self.udp.expire(now);
        self.stats.udp_flows_expired.fetch_add(gone, Ordering::Relaxed);
    }

    /// Observed address per relay (None until reported).
    pub fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        self.links.iter().map(|l| l.session.observed_address()).collect()
    }

    /// UDP flows (backend sockets) open.
    pub fn udp_flows(&self) -> usize {
        self.udp.len()
    }

    /// TCP connections held (including those whose backend is connecting).
    pub fn tcp_connections(&self) -> usize {
        self.tcp.connections()
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
