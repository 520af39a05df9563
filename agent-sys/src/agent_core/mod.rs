//! The sans-I/O agent core.
//!
//! The caller (the C API in a packet-tunnel extension, the Linux TUN agent,
//! tests) feeds it received UDP datagrams, outbound IP packets from the
//! tunnel device and the time; it yields UDP datagrams to send, inbound IP
//! packets for the tunnel, events and its next deadline. Connection,
//! registration, keepalive and reconnect with backoff are the shared
//! [`ClientSession`]; this layer adds routing by destination and, per
//! service, the end-to-end session with the connector ([`Tunnel`]): every
//! tunneled packet travels inside it, the relay carries ciphertext only.
//!
//! One UDP socket: datagrams from the relay go to the relay session, the
//! inner packets they carry to the tunnel of their flow. Datagrams from any
//! other address belong to direct paths ([`crate::direct`]): punch packets
//! and inner packets, found by their connection ID; the rest is dropped and
//! counted (`drop_direct`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ztna_control::client::{ClientConfig, ClientSession, Event, SendError};
use ztna_control::e2e::{self, E2eSession, Rejections, SessionEvent, Via};
use ztna_control::quic::{self, TlsOptions};
use ztna_control::rng::SplitMix64;
use ztna_control::{datagram, Role, ServiceName};

use crate::direct::{DirectState, PathSettings};
use crate::route::{Cidr, RouteTable};
use crate::tunnel::Tunnel;

/// What the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub relay: SocketAddr,
    /// Other relay replicas: after a Goodbye or a lost connection the agent
    /// moves to the next one, round robin (empty: always `relay`).
    pub fallback_relays: Vec<SocketAddr>,
    pub server_name: String,
    /// Local address of the caller's UDP socket.
    pub local: SocketAddr,
    pub tls: TlsOptions,
    /// Service → destination prefixes reached through it.
    pub routes: Vec<(ServiceName, Cidr)>,
    /// Service → a connector identity (SPIFFE ID) accepted for it. A
    /// service with pins accepts only those; without, any connector the
    /// relay binds (its certificate must still match the relay's word).
    pub pinned_connectors: Vec<(ServiceName, String)>,
    /// Direct paths: policies and timings.
    pub paths: PathSettings,
}

pub use types::*;
mod types;

/// The agent core.
pub struct AgentCore {
    session: ClientSession,
    routes: RouteTable,
    /// Per service: flow, bound connector, end-to-end session.
    tunnels: HashMap<ServiceName, Tunnel>,
    /// Registered flow id → service.
    services_by_flow: HashMap<u32, ServiceName>,
    /// FlowBound before its RegisterOk: flow → connector identity.
    bound_early: HashMap<u32, String>,
    e2e_cfg: quiche::Config,
    trust_domain: String,
    rejections: Arc<Rejections>,
    rng: SplitMix64,
    events: VecDeque<AgentEvent>,
    /// Scratch for one inner packet (outbound) and one outer datagram (inbound).
    inner_buf: Vec<u8>,
    outer_buf: Vec<u8>,
    /// The latest `now` the caller passed.
    now: Instant,
    stats: AgentStats,
    observed: Option<SocketAddr>,
    /// Packets the agent itself answers toward the tunnel (ICMP
    /// fragmentation-needed for too-big packets); bounded.
    local_replies: VecDeque<Vec<u8>>,
    /// The reason of the last disconnect (empty before the first).
    last_failure: String,
    /// The UDP socket's local address.
    local: SocketAddr,
    pub(crate) direct: DirectState,
}

/// Bound on locally generated replies waiting for the tunnel.
const MAX_LOCAL_REPLIES: usize = 64;

impl AgentCore {
    pub fn new(cfg: AgentConfig, seed: u64, now: Instant) -> Result<AgentCore, AgentError> {
        let routes = RouteTable::new(cfg.routes.iter().map(|(s, c)| (*c, s.clone())).collect());
        let mut ccfg = ClientConfig::new(cfg.relay, cfg.local, &cfg.server_name);
        ccfg.fallbacks = cfg.fallback_relays.clone();
        ccfg.registrations = routes.services().into_iter().map(|s| (Role::Agent, s)).collect();
        ccfg.software = format!("ztna-agent/{}", env!("CARGO_PKG_VERSION"));
        let qc = quic::client_tls(&cfg.tls)?;
        if !cfg.tls.verify_peer {
            tracing::warn!("relay certificate verification is OFF: anyone on the path can impersonate the relay");
        }
        let rejections = Arc::new(Rejections::default());
        let e2e_cfg = e2e::client_config(&cfg.tls, Arc::clone(&rejections))?;
        let trust_domain = e2e::own_identity(&cfg.tls)?.trust_domain;
        let tunnels = routes
            .services()
            .into_iter()
            .map(|s| {
                let pins = cfg.pinned_connectors.iter().filter(|(p, _)| *p == s).map(|(_, c)| c.clone()).collect();
                (s, Tunnel::new(pins))
            })
            .collect();
        Ok(AgentCore {
            session: ClientSession::new(ccfg, qc, seed, now),
            routes,
            tunnels,
            services_by_flow: HashMap::new(),
            bound_early: HashMap::new(),
            e2e_cfg,
            trust_domain,
            rejections,
            rng: SplitMix64::new(seed ^ 0xe2e),
            events: VecDeque::new(),
            inner_buf: vec![0u8; 1500],
            outer_buf: vec![0u8; 1500],
            now,
            stats: AgentStats::default(),
            observed: None,
            local_replies: VecDeque::new(),
            last_failure: String::new(),
            local: cfg.local,
            direct: DirectState::new(cfg.paths),
        })
    }

    pub fn stats(&self) -> AgentStats {
        let c = self.session.stats();
        let live: u64 = self.tunnels.values().filter_map(|t| t.session.as_ref()).map(E2eSession::rejected).sum();
        let mut st = AgentStats {
            connects: c.connects,
            disconnects: c.disconnects,
            drop_truncated: self.stats.drop_truncated + c.datagrams_dropped_too_large,
            e2e_cert_rejected: self.rejections.total(),
            e2e_packets_rejected: self.stats.e2e_packets_rejected + live,
            ..self.stats
        };
        // Ended sessions' path counters are in `self.stats`; live ones add theirs.
        for s in self.tunnels.values().filter_map(|t| t.session.as_ref()) {
            st.add_paths(s.path_counters());
        }
        st
    }

    /// The driver rebound its UDP socket: the next connection attempt uses
    /// this local address.
    pub fn set_local(&mut self, local: SocketAddr) {
        self.session.set_local(local);
        self.local = local;
        self.refresh_candidates();
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub(crate) fn tunnels_mut(&mut self) -> impl Iterator<Item = &mut Tunnel> {
        self.tunnels.values_mut()
    }

    pub(crate) fn tunnel_mut(&mut self, service: &ServiceName) -> Option<&mut Tunnel> {
        self.tunnels.get_mut(service)
    }

    pub(crate) fn push_event(&mut self, e: AgentEvent) {
        self.events.push_back(e);
    }

    pub(crate) fn stats_mut(&mut self) -> &mut AgentStats {
        &mut self.stats
    }

    /// The relay of the current (or next) connection attempt: changes on
    /// failover to a fallback relay.
    pub fn relay(&self) -> SocketAddr {
        self.session.relay()
    }

    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.observed
    }

    pub fn is_connected(&self) -> bool {
        self.session.is_connected()
    }

    /// The prefixes the tunnel device should route to the agent.
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// A UDP datagram received on the agent's socket.
    pub fn recv_udp(&mut self, data: &mut [u8], from: SocketAddr, now: Instant) {
        if from != self.session.relay() {
            return self.recv_direct(data, from, now);
        }
        self.session.recv(data, from, now);
        // The relay was heard: sessions it carries resume loss recovery.
        for s in self.tunnels.values_mut().filter_map(|t| t.session.as_mut()) {
            s.set_stalled(false, now);
        }
        self.drain_outer(now);
    }

    /// Hands the DATAGRAMs the relay session received to their tunnels.
    fn drain_outer(&mut self, now: Instant) {
        self.pump_events(now);
        let mut buf = std::mem::take(&mut self.outer_buf);
        while let Some(n) = self.session.recv_datagram(&mut buf) {
            let Some(d) = buf.get_mut(..n) else {
                self.stats.drop_truncated += 1;
                continue;
            };
            let Ok((flow, payload)) = datagram::parse(d) else {
                self.stats.drop_unknown_flow += 1;
                continue;
            };
            let start = n - payload.len();
            let t = self.services_by_flow.get(&flow).and_then(|s| self.tunnels.get_mut(s));
            match (t.and_then(|t| t.session.as_mut()), buf.get_mut(start..n)) {
                (Some(s), Some(inner)) => {
                    s.recv(inner, now);
                }
                _ => self.stats.drop_unknown_flow += 1,
            }
        }
        self.outer_buf = buf;
        self.pump_sessions(now);
    }

    /// An IP packet read from the tunnel device.
    pub fn send_ip_packet(&mut self, pkt: &[u8]) -> Result<(), DropReason> {
        let r = self.route(pkt);
        match r {
            Ok(()) => {
                self.stats.packets_out += 1;
                self.stats.bytes_out += pkt.len() as u64;
            }
            Err(DropReason::Malformed) => self.stats.drop_malformed += 1,
            Err(DropReason::Unmapped) => self.stats.drop_unmapped += 1,
            Err(DropReason::NoFlow) => self.stats.drop_no_flow += 1,
            Err(DropReason::NotPinned) => self.stats.drop_not_pinned += 1,
            Err(DropReason::TooLarge) => {
                self.stats.drop_too_large += 1;
                self.answer_too_big(pkt);
            }
            Err(DropReason::Backpressure) => self.stats.drop_backpressure += 1,
        }
        r
    }

    /// Tells the sender's TCP to use smaller segments: ICMP
    /// fragmentation-needed (IPv4) with the MTU the tunnel carries.
    fn answer_too_big(&mut self, pkt: &[u8]) {
        let Some(mtu) = self.max_packet_size() else { return };
        let Some(std::net::IpAddr::V4(router)) = ztna_control::packet::destination(pkt) else { return };
        if self.local_replies.len() >= MAX_LOCAL_REPLIES {
            return;
        }
        let mut reply = Vec::new();
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        if ztna_control::packet::build_icmp_frag_needed(pkt, router, mtu, &mut reply).is_ok() {
            self.local_replies.push_back(reply);
        }
    }

    fn route(&mut self, pkt: &[u8]) -> Result<(), DropReason> {
        let dst = ztna_control::packet::destination(pkt).ok_or(DropReason::Malformed)?;
        let service = self.routes.lookup(dst).ok_or(DropReason::Unmapped)?;
        let t = self.tunnels.get_mut(service).ok_or(DropReason::NoFlow)?;
        if t.connector.as_deref().is_some_and(|c| !t.accepts(c)) {
            return Err(DropReason::NotPinned);
        }
        if pkt.len() > e2e::TUNNEL_MTU {
            return Err(DropReason::TooLarge);
        }
        // Between relay legs the session lives on, but nothing can leave.
        if t.flow.is_none() {
            return Err(DropReason::NoFlow);
        }
        let s = t.session.as_mut().ok_or(DropReason::NoFlow)?;
        let up = s.is_up();
        match s.send_ip(pkt) {
            Ok(()) => Ok(()),
            Err(e2e::SendIpError::TooLarge) => Err(DropReason::TooLarge),
            // direct-only and no direct path (docs/protocol/direct.md §11.5).
            Err(e2e::SendIpError::NoPath) => Err(DropReason::NoFlow),
            Err(_) if !up => {
                self.stats.e2e_pending_dropped += 1;
                Err(DropReason::NoFlow)
            }
            Err(_) => Err(DropReason::Backpressure),
        }
    }

    /// Largest IP packet the tunnel carries (for the device MTU): 1280,
    /// IPv4 and IPv6, once connected.
    pub fn max_packet_size(&self) -> Option<usize> {
        self.session.is_connected().then_some(e2e::TUNNEL_MTU)
    }

    /// Copies the next inbound IP packet into `out`; returns its length.
    /// Packets larger than `out` are dropped and counted.
    pub fn poll_ip_packet(&mut self, out: &mut [u8]) -> Option<usize> {
        if let Some(r) = self.local_replies.pop_front() {
            match out.get_mut(..r.len()) {
                Some(dst) => {
                    dst.copy_from_slice(&r);
                    return Some(r.len());
                }
                None => self.stats.drop_truncated += 1,
            }
        }
        let (tunnels, routes, stats) = (&mut self.tunnels, &self.routes, &mut self.stats);
        for (service, t) in tunnels.iter_mut() {
            let Some(s) = t.session.as_mut() else { continue };
            loop {
                let truncated = s.truncated();
                let got = s.recv_ip(out);
                stats.drop_truncated += s.truncated() - truncated;
                let Some(n) = got else { break };
                let Some(pkt) = out.get(..n) else {
                    stats.drop_truncated += 1;
                    continue;
                };
                // A connector may only answer for its own service.
                let src = ztna_control::packet::source(pkt);
                if src.and_then(|a| routes.lookup(a)) != Some(service) {
                    stats.drop_spoofed += 1;
                    continue;
                }
                stats.packets_in += 1;
                stats.bytes_in += n as u64;
                return Some(n);
            }
        }
        None
    }

    /// Why the relay connection last ended, in words (empty before the
    /// first disconnect). Kept until the next one.
    pub fn last_failure(&self) -> &str {
        &self.last_failure
    }

    /// Writes the next UDP datagram to send into `out`.
    pub fn poll_udp(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        loop {
            if let Some(sent) = self.direct.tx.pop_into(out) {
                self.stats.direct_packets_out += 1;
                self.stats.direct_bytes_out += sent.0 as u64;
                return Some(sent);
            }
            if let Some(sent) = self.session.poll_transmit(out, now) {
                return Some(sent);
            }
            // What sending produced (a Disconnected once a close went out)
            // reaches the application now, not at the next timer: it may
            // have to act before the next attempt (a new socket).
            self.pump_events(now);
            if !self.pump_sessions(now) {
                return None;
            }
        }
    }

    /// Moves inner packets into the relay session's DATAGRAM queue or the
    /// direct-path queue (and session events out). Returns whether anything
    /// moved.
    pub(crate) fn pump_sessions_now(&mut self, now: Instant) -> bool {
        self.pump_sessions(now)
    }

    fn pump_sessions(&mut self, now: Instant) -> bool {
        self.now = now;
        let mut moved = false;
        let mut buf = std::mem::take(&mut self.inner_buf);
        let mut names: Vec<ServiceName> = Vec::new();
        for (service, t) in self.tunnels.iter_mut() {
            let Some(s) = t.session.as_mut() else { continue };
            // Without a flow the inner packets are dropped: QUIC
            // retransmits what matters once the next flow is bound.
            // A full relay queue leaves the inner packets with the inner
            // session (backpressure), rather than losing them.
            // Direct-path packets go to their own bounded queue; a full one
            // holds the session back like a full relay queue.
            let direct = s.current_path().is_some();
            while t.flow.is_none() || if direct { self.direct.tx.has_room() } else { self.session.datagram_room() } {
                let Some((n, via)) = s.poll_transmit(&mut buf, now) else { break };
                if let (Via::Direct(to), Some(pkt)) = (via, buf.get(..n)) {
                    if self.direct.tx.push(pkt, to) {
                        moved = true;
                    } else {
                        self.stats.drop_backpressure += 1;
                    }
                    continue;
                }
                let (Some(flow), Some(pkt)) = (t.flow, buf.get(..n)) else { continue };
                match self.session.send_datagram(flow, pkt) {
                    Ok(()) => moved = true,
                    Err(SendError::QueueFull) => {
                        self.stats.drop_backpressure += 1;
                        break;
                    }
                    Err(_) => {}
                }
            }
            names.push(service.clone());
        }
        self.inner_buf = buf;
        for service in names {
            self.session_events(&service, now);
        }
        moved
    }

    /// Acts on what the session of `service` reported.
    fn session_events(&mut self, service: &ServiceName, now: Instant) {
        let Some(t) = self.tunnels.get_mut(service) else { return };
        let Some(s) = t.session.as_mut() else { return };
        let connector = s.peer().map(|p| p.uri()).unwrap_or_default();
        let events: Vec<SessionEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        let finished = s.is_finished().then(|| s.rejected());
        let pending_lost = s.pending_lost();
        for e in events {
            match e {
                SessionEvent::Established { .. } | SessionEvent::Hello { .. } => {}
                SessionEvent::NewCid(cid) => {
                    self.direct.by_cid.insert(cid, service.clone());
                }
                SessionEvent::RetiredCid(cid) => {
                    self.direct.by_cid.remove(&cid);
                }
                SessionEvent::Up => {
                    self.stats.e2e_established += 1;
                    // Queued packets the inner DATAGRAM queue had no room for.
                    self.stats.e2e_pending_dropped += pending_lost;
                    t.succeeded();
                    tracing::info!(%service, %connector, "end-to-end session up");
                    self.events
                        .push_back(AgentEvent::SessionUp { service: service.clone(), connector: connector.clone() });
                }
                SessionEvent::Closed { reason, identity_mismatch, code } => {
                    if identity_mismatch {
                        self.stats.e2e_identity_mismatch += 1;
                    }
                    tracing::info!(%service, reason, "end-to-end session closed");
                    self.events.push_back(AgentEvent::SessionClosed { service: service.clone(), reason });
                    if code == Some(u64::from(ztna_control::Code::DENIED.0)) {
                        t.refused(now);
                    } else {
                        t.failed(now, &mut self.rng);
                    }
                }
            }
        }
        if let Some(rejected) = finished {
            self.stats.e2e_packets_rejected += rejected;
            if let Some(c) = t.session.as_ref().map(E2eSession::path_counters) {
                self.stats.add_paths(c);
            }
            t.session = None;
            self.direct.by_cid.retain(|_, s| s != service);
        }
        self.note_path(service);
    }

    /// Starts the session of `service` with the connector its flow is
    /// bound to, if the pins accept it and no live session exists.
    fn start_session(&mut self, service: &ServiceName, now: Instant, restart: bool) {
        let Some(t) = self.tunnels.get_mut(service) else { return };
        let Some(connector) = t.connector.clone() else { return };
        if !t.accepts(&connector) {
            tracing::warn!(%service, %connector, "relay bound the service to a connector the pins do not accept");
            return;
        }
        if let Some(s) = t.session.as_mut() {
            let same = s.peer().is_none_or(|p| p.uri() == connector);
            if !s.is_closed() && same && !restart {
                s.set_carried(true, now);
                return;
            }
            if !s.is_closed() {
                s.close();
            }
            self.stats.e2e_packets_rejected += s.rejected();
            self.stats.add_paths(s.path_counters());
        }
        let mut scid = [0u8; e2e::CID_LEN];
        self.rng.fill(&mut scid);
        match E2eSession::connect(&mut self.e2e_cfg, scid, &self.trust_domain, &connector, service.clone(), now) {
            Ok(mut s) => {
                let paths = &self.direct.settings;
                let loopback = self.session.relay().ip().is_loopback();
                s.set_direct_config(e2e::DirectConfig { loopback, ..paths.timing.clone() });
                s.set_path_policy(paths.policy(service));
                s.set_candidates(self.direct.candidates(self.local, self.observed));
                // Direct paths use the CIDs the session issues later
                // (NewCid), never this one: the relay sees it.
                self.direct.by_cid.retain(|_, s| s != service);
                self.stats.e2e_handshakes += 1;
                t.session = Some(s);
                t.direct_counted = false;
                t.retry_at = None;
            }
            Err(e) => {
                tracing::warn!(%service, error = %e, "cannot start an end-to-end session");
                t.failed(now, &mut self.rng);
            }
        }
    }

    /// The relay bound `flow` of `service` to `connector`.
    fn bound(&mut self, service: &ServiceName, flow: u32, connector: String, now: Instant) {
        let Some(t) = self.tunnels.get_mut(service) else { return };
        // A rebind on the same flow means the connector changed (the old
        // one left): a new session. A new flow (another relay) bound to the
        // same identity keeps the session.
        let restart = t.flow == Some(flow);
        t.flow = Some(flow);
        t.connector = Some(connector);
        self.start_session(service, now, restart);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let sessions = self.tunnels.values().filter_map(|t| {
            let s = t.session.as_ref().and_then(E2eSession::next_deadline);
            let retry = t.retry_at.filter(|_| t.session.is_none() && t.flow.is_some());
            [s, retry].into_iter().flatten().min()
        });
        self.session.next_deadline().into_iter().chain(sessions).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        let stalled = self.session.silent_for(now).is_some_and(|d| d >= e2e::RELAY_STALL);
        let mut retry = Vec::new();
        let mut held = false;
        for (service, t) in self.tunnels.iter_mut() {
            if let Some(s) = t.session.as_mut() {
                s.set_stalled(stalled, now);
                held = stalled;
                if s.next_deadline().is_some_and(|d| d <= now) {
                    s.handle_timeout(now);
                }
            } else if t.flow.is_some() && t.retry_at.is_some_and(|r| r <= now) {
                retry.push(service.clone());
            }
        }
        if held {
            // Held sessions wait for the relay to be heard: ask it.
            self.session.ping_relay();
        }
        for service in retry {
            self.start_session(&service, now, true);
        }
        self.pump_events(now);
        self.pump_sessions(now);
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// Reads the relay session's events into ours.
    fn pump_events(&mut self, now: Instant) {
        while let Some(e) = self.session.poll_event() {
            let mapped = match e {
                Event::Connected => {
                    // Flow ids from an earlier connection are void; the
                    // sessions are not.
                    self.forget_flows();
                    Some(AgentEvent::Connected)
                }
                Event::ObservedAddress(a) => {
                    self.observed = Some(a);
                    self.refresh_candidates();
                    Some(AgentEvent::ObservedAddress(a))
                }
                Event::FlowBound { flow, connector_id } => {
                    match self.services_by_flow.get(&flow).cloned() {
                        Some(service) => self.bound(&service, flow, connector_id, now),
                        None => {
                            // Before RegisterOk (the usual order); bounded
                            // by the registrations this agent holds.
                            if self.bound_early.len() < self.tunnels.len().max(1) * 4 {
                                self.bound_early.insert(flow, connector_id);
                            }
                        }
                    }
                    None
                }
                Event::Registered { service, flow, role: Role::Agent } => {
                    self.services_by_flow.insert(flow, service.clone());
                    match self.bound_early.remove(&flow) {
                        Some(c) => self.bound(&service, flow, c, now),
                        None => {
                            if let Some(t) = self.tunnels.get_mut(&service) {
                                t.flow = Some(flow);
                            }
                        }
                    }
                    Some(AgentEvent::Registered { service, flow })
                }
                Event::RegisterFailed { service, code, reason, .. } => {
                    Some(AgentEvent::RegisterFailed { service, code, reason })
                }
                Event::FlowClosed { flow, .. } => {
                    if let Some(s) = self.services_by_flow.remove(&flow) {
                        if let Some(t) = self.tunnels.get_mut(&s) {
                            t.flow = None;
                            if let Some(s) = t.session.as_mut() {
                                s.set_carried(false, now);
                            }
                        }
                    }
                    None
                }
                Event::Disconnected { reason, retry_in, repeated } => {
                    self.forget_flows();
                    self.last_failure.clone_from(&reason);
                    Some(AgentEvent::Disconnected { reason, retry_in, repeated })
                }
                Event::Goodbye { code, .. } => Some(AgentEvent::Goodbye { code }),
                Event::Registered { .. } | Event::FlowOpened { .. } => None,
            };
            if let Some(m) = mapped {
                self.events.push_back(m);
            }
        }
    }

    fn forget_flows(&mut self) {
        self.services_by_flow.clear();
        self.bound_early.clear();
        for t in self.tunnels.values_mut() {
            t.flow = None;
            if let Some(s) = t.session.as_mut() {
                s.set_carried(false, self.now);
            }
        }
    }

    /// The connector identity the session of `service` proved, once up.
    pub fn session_peer(&self, service: &ServiceName) -> Option<String> {
        let s = self.tunnels.get(service)?.session.as_ref()?;
        s.is_up().then(|| s.peer().map(|p| p.uri())).flatten()
    }

    /// Per service (by name): its relay flow, the connector the relay
    /// bound it to, and its end-to-end session's state.
    pub fn tunnel_status(&self) -> Vec<TunnelStatus> {
        let mut v: Vec<TunnelStatus> = self
            .tunnels
            .iter()
            .map(|(service, t)| TunnelStatus {
                service: service.to_string(),
                flow: t.flow,
                connector: t.connector.clone(),
                session: match t.session.as_ref() {
                    None => SessionState::None,
                    Some(s) if s.is_up() => SessionState::Up,
                    Some(s) if s.is_closed() => SessionState::Closed,
                    Some(_) => SessionState::Handshaking,
                },
                proven: self.session_peer(service),
                path: t.session.as_ref().and_then(E2eSession::path_stats),
                stalled: t.session.as_ref().is_some_and(E2eSession::is_stalled),
                direct: t.session.as_ref().and_then(E2eSession::current_path),
                paths: t.session.as_ref().map(|s| s.path_counters().clone()),
                path_state: t.session.as_ref().map(E2eSession::path_state),
            })
            .collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }

    /// End-to-end sessions on a direct path now.
    pub fn sessions_direct(&self) -> usize {
        self.tunnels.values().filter_map(|t| t.session.as_ref()).filter(|s| s.current_path().is_some()).count()
    }

    /// End-to-end sessions that are up.
    pub fn sessions_up(&self) -> usize {
        self.tunnels.values().filter(|t| t.is_up()).count()
    }

    /// Closes the session for good (inner sessions first).
    pub fn close(&mut self) {
        for t in self.tunnels.values_mut() {
            if let Some(s) = t.session.as_mut() {
                s.close();
            }
        }
        self.pump_sessions(self.now);
        self.session.close();
    }
}
