//! The connector engine, sans I/O: QUIC packets from relays, backend
//! events and `now` in; QUIC packets to relays, backend socket calls and
//! deadlines out. The [`crate::Connector`] driver owns the sockets, the
//! clock and the resolver; tests and the simulator drive it in memory.
//!
//! It holds one [`ClientSession`] per relay address (all on the driver's
//! one UDP socket), registers every configured service on each, and maps
//! each agent flow a relay opens to a [`FlowKey`] of its [`Gateway`], which
//! turns the flow's IP packets into backend traffic. When an agent's relay
//! leg ends (the agent left that relay, or the relay was lost) the flow's
//! state is parked for [`PARK_TTL`] so the agent's next flow for the same
//! service from the same address takes it over and its connections carry
//! on.
//!
//! Driving it: call [`Engine::handle_datagram`] for every packet from a
//! relay, [`Engine::handle_backend`] for every backend event, and
//! [`Engine::handle_timeout`] whenever [`Engine::next_timeout`] passed or
//! anything arrived; then send what [`Engine::poll_transmit`] gives and
//! watch the sockets [`Engine::backend_interest`] names.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{debug, info, warn};
use ztna_control::client::{ClientConfig, ClientSession, Event, SendError};
use ztna_control::{datagram, Code, Role, ServiceName};

use crate::backend::{BackendEvent, BackendId, BackendIo, Interest};
use crate::config::{ConnectorConfig, Target};
use crate::gateway::{FlowKey, Gateway};
use crate::tcp::TxOutcome;
use crate::{inc, ConnectorStats};

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
type ParkKey = (Arc<str>, usize, IpAddr);

/// An agent flow on a relay link.
#[derive(Debug, Clone)]
struct AgentFlow {
    service: usize,
    agent_id: Arc<str>,
    agent_ip: IpAddr,
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

/// Sends an answer to the agent on flow `key` at once, counted as sent or
/// as dropped.
fn send_to_agent(links: &mut [RelayLink], stats: &ConnectorStats, key: FlowKey, pkt: &[u8]) {
    match links.get_mut(key.session).map(|l| l.session.send_datagram(key.flow, pkt)) {
        Some(Ok(())) => inc(&stats.packets_to_agents),
        _ => inc(&stats.drop_send_to_agent),
    }
}

/// The connector engine.
pub struct Engine {
    cfg: ConnectorConfig,
    /// The driver's socket address (what relay sessions are bound to).
    local: SocketAddr,
    links: Vec<RelayLink>,
    seed: u64,
    /// State of agent flows whose relay leg ended, waiting to be adopted:
    /// key → (parked id, expiry).
    parked: HashMap<ParkKey, (u32, Instant)>,
    next_park: u32,
    gateway: Gateway,
    stats: Arc<ConnectorStats>,
    /// Where [`Engine::poll_transmit`] goes on (round robin over links).
    tx_next: usize,
    buf: Vec<u8>,
}

impl Engine {
    /// An engine for `cfg` (validated here) whose driver's socket is
    /// `local`; `targets` holds the resolved address of every backend
    /// target. Relays come with [`Engine::set_relays`].
    pub fn new(
        cfg: ConnectorConfig,
        targets: HashMap<Target, SocketAddr>,
        local: SocketAddr,
        seed: u64,
        now: Instant,
    ) -> Result<Engine> {
        cfg.validate()?;
        let stats = Arc::new(ConnectorStats::default());
        let gateway = Gateway::new(&cfg, targets, Arc::clone(&stats), seed, now);
        Ok(Engine {
            cfg,
            local,
            links: Vec::new(),
            seed,
            parked: HashMap::new(),
            next_park: 0,
            gateway,
            stats,
            tx_next: 0,
            buf: vec![0u8; 65_536],
        })
    }

    /// The engine's counters (shared: the metrics endpoint reads them).
    pub fn stats(&self) -> &Arc<ConnectorStats> {
        &self.stats
    }

    /// Brings the relay sessions in line with the relay addresses (as just
    /// resolved): a new address gets a session (its QUIC config from
    /// `quic`, so TLS files rotated on disk are picked up); a link whose
    /// address is gone is retired once it is disconnected, never while
    /// connected (a draining relay leaves DNS first but still serves
    /// agents through us until it closes). Addresses of the other family
    /// than the socket's are ignored; an empty list changes nothing (a DNS
    /// hiccup).
    pub fn set_relays(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
        quic: &mut dyn FnMut() -> Result<quiche::Config>,
        io: &mut dyn BackendIo,
    ) -> Result<()> {
        let v4 = self.local.is_ipv4();
        let addrs: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
        if addrs.is_empty() {
            return Ok(());
        }
        for i in 0..self.links.len() {
            let Some(l) = self.links.get_mut(i) else { continue };
            if !l.retired && !addrs.contains(&l.relay) && !l.session.is_connected() {
                info!(relay = %l.relay, "relay left DNS; closing its session");
                l.retired = true;
                l.session.close();
                l.handles.clear();
                l.flows.clear();
                self.gateway.drop_session_state(i, io);
            }
        }
        for &relay in &addrs {
            if self.links.iter().any(|l| !l.retired && l.relay == relay) {
                continue;
            }
            let link = self.new_link(relay, quic()?, now);
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
        Ok(())
    }

    fn new_link(&mut self, relay: SocketAddr, quic: quiche::Config, now: Instant) -> RelayLink {
        let local = if self.local.ip().is_unspecified() && relay.ip().is_loopback() {
            SocketAddr::new(relay.ip(), self.local.port())
        } else {
            self.local
        };
        let mut c = ClientConfig::new(relay, local, &self.cfg.server_name);
        c.registrations =
            self.cfg.services.iter().filter_map(|s| ServiceName::new(&s.name)).map(|s| (Role::Connector, s)).collect();
        c.software = format!("ztna-connector/{}", env!("CARGO_PKG_VERSION"));
        // Pinned to this relay: on Goodbye{DRAINING} keep serving the agents
        // still there until the relay closes us.
        c.leave_on_goodbye = false;
        self.seed = self.seed.wrapping_add(1);
        let session = ClientSession::new(c, quic, self.seed, now);
        RelayLink { relay, retired: false, session, handles: HashMap::new(), flows: HashMap::new() }
    }

    /// One UDP datagram from `from` (a relay; anything else is ignored).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo) {
        let Some(i) = self.links.iter().position(|l| l.relay == from && !l.retired) else { return };
        if let Some(l) = self.links.get_mut(i) {
            l.session.recv(pkt, from, now);
        }
        self.process_link(i, now, io);
    }

    /// One event of a backend socket.
    pub fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>) {
        if let Some((key, pkt)) = self.gateway.handle_backend(now, ev) {
            send_to_agent(&mut self.links, &self.stats, key, pkt);
        }
    }

    /// Runs what is due (safe to call at any time): TCP, the packets it
    /// has for agents, relay session timers, parked flows' expiry.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut dyn BackendIo) {
        self.gateway.poll(now, io);
        let (links, stats) = (&mut self.links, &self.stats);
        self.gateway.drain_tx(now, |k, pkt| {
            let Some(l) = links.get_mut(k.session) else { return TxOutcome::Dropped };
            match l.session.send_datagram(k.flow, pkt) {
                Ok(()) => {
                    inc(&stats.packets_to_agents);
                    TxOutcome::Sent
                }
                Err(SendError::QueueFull) => TxOutcome::Blocked,
                Err(_) => TxOutcome::Dropped,
            }
        });
        for i in 0..self.links.len() {
            let Some(l) = self.links.get_mut(i) else { continue };
            if l.session.next_deadline().is_some_and(|d| d <= now) {
                l.session.handle_timeout(now);
                self.process_link(i, now, io);
            }
        }
        self.expire_parked(now, io);
    }

    /// The next QUIC packet for a relay: its length in `out` and where to.
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        let n = self.links.len();
        for step in 0..n {
            let i = (self.tx_next + step) % n;
            if let Some(sent) = self.links.get_mut(i).and_then(|l| l.session.poll_transmit(out, now)) {
                self.tx_next = i;
                return Some(sent);
            }
        }
        None
    }

    /// When [`Engine::handle_timeout`] must run at the latest.
    pub fn next_timeout(&self, now: Instant) -> Option<Instant> {
        let sessions = self.links.iter().filter_map(|l| l.session.next_deadline()).min();
        match (sessions, self.gateway.next_timeout(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Appends every TCP backend socket that waits for something.
    pub fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        self.gateway.backend_interest(out);
    }

    /// Closes every relay session (then send what
    /// [`Engine::poll_transmit`] still gives).
    pub fn close(&mut self) {
        for l in &mut self.links {
            l.session.close();
        }
    }

    /// Events and received DATAGRAMs of link `i`.
    fn process_link(&mut self, i: usize, now: Instant, io: &mut dyn BackendIo) {
        while let Some(e) = self.links.get_mut(i).and_then(|l| l.session.poll_event()) {
            self.handle_event(i, e, now, io);
        }
        let mut d = std::mem::take(&mut self.buf);
        while let Some(n) = self.links.get_mut(i).and_then(|l| l.session.recv_datagram(&mut d)) {
            let Some(raw) = d.get(..n) else { continue };
            let Ok((flow, ip)) = datagram::parse(raw) else {
                inc(&self.stats.drop_malformed);
                continue;
            };
            inc(&self.stats.packets_from_agents);
            let Some(f) = self.links.get(i).and_then(|l| l.flows.get(&flow)) else {
                inc(&self.stats.drop_unknown_flow);
                continue;
            };
            let key = FlowKey { session: i, flow };
            if let Some(reply) = self.gateway.handle_ip(now, key, (f.service, &f.agent_id), ip, io) {
                send_to_agent(&mut self.links, &self.stats, key, reply);
            }
        }
        self.buf = d;
    }

    fn handle_event(&mut self, i: usize, e: Event, now: Instant, io: &mut dyn BackendIo) {
        match e {
            Event::Registered { service, flow, .. } => {
                info!(relay = i, %service, handle = flow, "registered");
                let si = self.cfg.services.iter().position(|s| s.name == service.as_str());
                if let (Some(si), Some(l)) = (si, self.links.get_mut(i)) {
                    l.handles.insert(flow, si);
                }
            }
            Event::RegisterFailed { service, code, reason, .. } => {
                warn!(relay = i, %service, %code, reason, "registration refused");
            }
            Event::FlowOpened { flow, service, agent_addr, agent_id } => {
                let Some(l) = self.links.get_mut(i) else { return };
                let Some(si) = l.handles.get(&service).copied() else { return };
                let svc = self.cfg.services.get(si);
                let allowed = svc.and_then(|s| s.allow_agents.as_ref()).is_none_or(|list| list.contains(&agent_id));
                if !allowed {
                    warn!(relay = i, flow, agent = %agent_id, service = svc.map_or("", |s| s.name.as_str()),
                          "flow refused: agent not in allow_agents");
                    inc(&self.stats.flows_refused);
                    l.session.refuse_flow(flow, Code::DENIED);
                    return;
                }
                debug!(relay = i, flow, %agent_addr, agent = %agent_id, "flow opened");
                let f = AgentFlow { service: si, agent_id: Arc::from(agent_id.as_str()), agent_ip: agent_addr.ip() };
                let park = (Arc::clone(&f.agent_id), si, f.agent_ip);
                l.flows.insert(flow, f);
                let to = FlowKey { session: i, flow };
                if let Some((pid, _)) = self.parked.remove(&park) {
                    self.adopt(FlowKey { session: PARKED, flow: pid }, to);
                    info!(relay = i, flow, agent = %agent_id, "flow adopted: its connections carry on");
                } else if let Some(from) = self.live_flow_elsewhere(&park, to) {
                    // The agent moved before this connector heard that its
                    // old relay leg ended (a relay that died, or a FlowClose
                    // still in flight): take the state over.
                    self.adopt(from, to);
                    info!(relay = i, flow, agent = %agent_id, from_relay = from.session,
                          "flow adopted from another relay: its connections carry on");
                }
            }
            Event::FlowClosed { flow, code } => {
                let f = self.links.get_mut(i).and_then(|l| l.flows.remove(&flow));
                let key = FlowKey { session: i, flow };
                match f {
                    // The agent left this relay (drain, failover, or for
                    // good): keep its state a while.
                    Some(f) if code == Code::AGENT_GONE => self.park(key, f, now, io),
                    _ => self.gateway.drop_flow_state(key, io),
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
                for (flow, f) in flows {
                    self.park(FlowKey { session: i, flow }, f, now, io);
                }
                self.gateway.drop_session_state(i, io);
            }
            Event::Connected => info!(relay = i, "connected"),
            Event::ObservedAddress(a) => info!(relay = i, observed = %a, "observed address"),
            Event::Goodbye { code, reason } => info!(relay = i, %code, reason, "relay says goodbye"),
        }
    }

    /// Moves a closed flow's TCP and UDP state aside for [`PARK_TTL`].
    fn park(&mut self, key: FlowKey, f: AgentFlow, now: Instant, io: &mut dyn BackendIo) {
        let pid = self.next_park;
        self.next_park = self.next_park.wrapping_add(1);
        if !self.gateway.move_flow_state(key, FlowKey { session: PARKED, flow: pid }) {
            return;
        }
        inc(&self.stats.flows_parked);
        // One parked flow per (agent, service, address): a newer one wins.
        if let Some((old, _)) = self.parked.insert((f.agent_id, f.service, f.agent_ip), (pid, now + PARK_TTL)) {
            self.gateway.drop_flow_state(FlowKey { session: PARKED, flow: old }, io);
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
        if self.gateway.move_flow_state(from, to) {
            inc(&self.stats.flows_adopted);
        }
    }

    fn expire_parked(&mut self, now: Instant, io: &mut dyn BackendIo) {
        let gone: Vec<(ParkKey, u32)> =
            self.parked.iter().filter(|(_, (_, until))| *until <= now).map(|(k, (pid, _))| (k.clone(), *pid)).collect();
        for (k, pid) in gone {
            self.parked.remove(&k);
            self.gateway.drop_flow_state(FlowKey { session: PARKED, flow: pid }, io);
            inc(&self.stats.flows_park_expired);
        }
    }

    /// Relays this engine currently holds a session with (not retired).
    pub fn relays(&self) -> Vec<SocketAddr> {
        self.links.iter().filter(|l| !l.retired).map(|l| l.relay).collect()
    }

    /// Relay sessions that are connected.
    pub fn relays_connected(&self) -> usize {
        self.links.iter().filter(|l| !l.retired && l.session.is_connected()).count()
    }

    /// Observed address per relay link (None until reported).
    pub fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        self.links.iter().map(|l| l.session.observed_address()).collect()
    }

    /// UDP flows (backend sockets) open.
    pub fn udp_flows(&self) -> usize {
        self.gateway.udp_flows()
    }

    /// TCP connections held (including those whose backend is connecting).
    pub fn tcp_connections(&self) -> usize {
        self.gateway.tcp_connections()
    }

    /// Whether every relay link has all its services registered.
    pub fn is_ready(&self) -> bool {
        self.links.iter().filter(|l| !l.retired).all(|l| l.handles.len() == self.cfg.services.len())
    }

    /// Whether some relay link has all its services registered (`/readyz`).
    pub fn is_serving(&self) -> bool {
        self.links.iter().any(|l| !l.retired && l.handles.len() == self.cfg.services.len())
    }

    /// Parked agent flows waiting to be adopted.
    pub fn parked_flows(&self) -> usize {
        self.parked.len()
    }
}
