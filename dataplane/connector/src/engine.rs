//! The connector engine, sans I/O: QUIC packets from relays, backend
//! events and `now` in; QUIC packets to relays, backend socket calls and
//! deadlines out. The [`crate::Connector`] driver owns the sockets, the
//! clock and the resolver; tests and the simulator drive it in memory.
//!
//! It holds one [`ClientSession`] per relay address (all on the driver's
//! one UDP socket) and registers every configured service on each. Agents'
//! packets arrive as inner QUIC packets of their end-to-end sessions
//! ([`Peers`]), carried in the relay flows' DATAGRAMs: the relay sees only
//! ciphertext. A session is admitted on the identity the agent proved in
//! it (the service's `allow_agents`), and its tunneled IP packets go to the
//! [`Gateway`], which turns them into backend traffic. Sessions outlive
//! relay flows: when an agent moves to another relay its session's packets
//! arrive on the new flow, and its TCP connections carry on (this replaced
//! the parking and adoption of flow state that the cleartext design
//! needed).
//!
//! Driving it: call [`Engine::handle_datagram`] for every packet from a
//! relay, [`Engine::handle_backend`] for every backend event, and
//! [`Engine::handle_timeout`] whenever [`Engine::next_timeout`] passed or
//! anything arrived; then send what [`Engine::poll_transmit`] gives and
//! watch the sockets [`Engine::backend_interest`] names.

mod direct;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::{self, IdentityBudget};
use anyhow::Result;
use tracing::{debug, info, warn};
use ztna_control::candidate::punch;
use ztna_control::client::{ClientConfig, ClientSession, Event, SendError};
use ztna_control::e2e::{self, E2eSession, Rejections, SendIpError, SessionEvent, Via};
use ztna_control::quic::{self, TlsOptions};
use ztna_control::{datagram, Code, Role, ServiceName};

use crate::backend::{BackendEvent, BackendId, BackendIo, Interest};
use crate::config::{ConnectorConfig, Target};
use crate::gateway::{FlowKey, Gateway};
use crate::peers::{PeerLimits, Peers, RelayFlow};
use crate::tcp::TxOutcome;
use crate::{inc, ConnectorStats};

/// An agent flow on a relay link: its service, and the agent as the relay
/// named it (only used to bound handshakes per identity).
#[derive(Debug, Clone)]
struct AgentFlow {
    service: usize,
    agent_id: Arc<str>,
    /// When a stateless reset last went back on this flow.
    last_reset: Option<Instant>,
}

/// Stateless resets for inner packets of sessions this connector does not
/// hold: at most one per relay flow per [`RESET_EVERY`] (an agent's junk
/// earns it nothing but its own, rare, resets), and within
/// [`budget::RESETS`] per agent identity and in total (CPU).
const RESET_EVERY: Duration = Duration::from_secs(1);

/// A relay session and what it learned.
struct RelayLink {
    relay: SocketAddr,
    /// Its address left DNS while it was disconnected: closed, and its
    /// slot reusable (slots are never removed: sessions name the index).
    retired: bool,
    session: ClientSession,
    /// Service handle → service.
    handles: HashMap<u32, usize>,
    /// Connector-leg flow → service and agent.
    flows: HashMap<u32, AgentFlow>,
    /// Sessions carried here were found stalled (nothing from the relay
    /// for [`e2e::RELAY_STALL`]); the next packet from it resumes them.
    stalled: bool,
}

/// Hands an IP packet for the agent of gateway key `key` to its session.
fn send_to_agent(peers: &mut Peers, stats: &ConnectorStats, key: FlowKey, pkt: &[u8]) -> TxOutcome {
    match peers.by_key(key).map(|p| p.session.send_ip(pkt)) {
        Some(Ok(())) => {
            inc(&stats.packets_to_agents);
            peers.mark(key.session);
            TxOutcome::Sent
        }
        Some(Err(SendIpError::Full)) => TxOutcome::Blocked,
        _ => {
            inc(&stats.drop_send_to_agent);
            TxOutcome::Dropped
        }
    }
}

/// The connector engine.
pub struct Engine {
    cfg: ConnectorConfig,
    /// What every relay's certificate must cover.
    server_name: String,
    /// The driver's socket address (what relay sessions are bound to).
    local: SocketAddr,
    links: Vec<RelayLink>,
    seed: u64,
    peers: Peers,
    /// The inner sessions' quiche config (server side, agents required).
    e2e_cfg: quiche::Config,
    trust_domain: String,
    rejections: Arc<Rejections>,
    gateway: Gateway,
    stats: Arc<ConnectorStats>,
    /// Where [`Engine::poll_transmit`] goes on (round robin over links).
    tx_next: usize,
    buf: Vec<u8>,
    ip: Vec<u8>,
    /// Reused for the due and send lists.
    slots_scratch: Vec<usize>,
    /// Stateless resets for unknown sessions: the key.
    reset_key: e2e::ResetKey,
    direct: direct::DirectState,
    direct_metrics: Arc<crate::direct_metrics::DirectMetrics>,
    punch_budget: IdentityBudget,
    reset_budget: IdentityBudget,
    /// The latest `now` passed in.
    last_now: Instant,
}

impl Engine {
    /// An engine for `cfg` (validated here) whose driver's socket is
    /// `local`; `targets` holds the resolved address of every backend
    /// target; `tls` is the connector's certificate, key and organisation
    /// CA, for the end-to-end sessions. Relays come with
    /// [`Engine::set_relays`].
    pub fn new(
        cfg: ConnectorConfig,
        targets: HashMap<Target, SocketAddr>,
        local: SocketAddr,
        tls: &TlsOptions,
        seed: u64,
        now: Instant,
    ) -> Result<Engine> {
        cfg.validate()?;
        let rejections = Arc::new(Rejections::default());
        let e2e_cfg = e2e::server_config(tls, Arc::clone(&rejections))
            .map_err(|e| anyhow::anyhow!("end-to-end TLS configuration: {e}"))?;
        let trust_domain = e2e::own_identity(tls).map_err(|e| anyhow::anyhow!("own identity: {e}"))?.trust_domain;
        let reset_key = e2e::ResetKey::from_tls(tls).map_err(|e| anyhow::anyhow!("stateless reset key: {e}"))?;
        let stats = Arc::new(ConnectorStats::default());
        let gateway = Gateway::new(&cfg, targets, Arc::clone(&stats), seed, now);
        let limits = PeerLimits {
            sessions: cfg.max_e2e_sessions,
            sessions_per_identity: cfg.max_e2e_sessions_per_identity,
            handshakes: cfg.max_e2e_handshakes,
            handshakes_per_identity: cfg.max_e2e_handshakes_per_identity,
        };
        let mut engine = Engine {
            server_name: cfg.relay_server_name()?,
            cfg,
            local,
            links: Vec::new(),
            seed,
            peers: Peers::new(limits),
            e2e_cfg,
            trust_domain,
            rejections,
            gateway,
            stats,
            tx_next: 0,
            buf: vec![0u8; 65_536],
            ip: vec![0u8; 2048],
            slots_scratch: Vec::new(),
            reset_key,
            direct: direct::DirectState::default(),
            direct_metrics: Arc::default(),
            punch_budget: IdentityBudget::new(budget::PUNCHES, now),
            reset_budget: IdentityBudget::new(budget::RESETS, now),
            last_now: now,
        };
        // The configured candidates, until interfaces and relays add theirs.
        engine.refresh_candidates();
        Ok(engine)
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
        quic: &mut dyn FnMut() -> Result<quic::ClientTls>,
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
                self.peers.link_lost(i, now);
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

    fn new_link(&mut self, relay: SocketAddr, quic: quic::ClientTls, now: Instant) -> RelayLink {
        let local = if self.local.ip().is_unspecified() && relay.ip().is_loopback() {
            SocketAddr::new(relay.ip(), self.local.port())
        } else {
            self.local
        };
        let mut c = ClientConfig::new(relay, local, &self.server_name);
        c.registrations =
            self.cfg.services.iter().filter_map(|s| ServiceName::new(&s.name)).map(|s| (Role::Connector, s)).collect();
        c.software = format!("ztna-connector/{}", env!("CARGO_PKG_VERSION"));
        // Pinned to this relay: on Goodbye{DRAINING} keep serving the agents
        // still there until the relay closes us.
        c.leave_on_goodbye = false;
        self.seed = self.seed.wrapping_add(1);
        let session = ClientSession::new(c, quic, self.seed, now);
        RelayLink { relay, retired: false, session, handles: HashMap::new(), flows: HashMap::new(), stalled: false }
    }

    /// One UDP datagram from `from`: a relay's, or a direct path's
    /// ([`direct`]).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo) {
        let Some(i) = self.links.iter().position(|l| l.relay == from && !l.retired) else {
            return self.handle_direct(now, from, pkt, io);
        };
        if let Some(l) = self.links.get_mut(i) {
            l.session.recv(pkt, from, now);
            if std::mem::take(&mut l.stalled) {
                // Resuming may fire an overdue timer that ends a session:
                // those are acted on (and removed) like any other.
                for slot in self.peers.link_heard(i, now) {
                    self.after_session(slot, now, io);
                }
            }
        }
        self.process_link(i, now, io);
    }

    /// One event of a backend socket.
    pub fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>) {
        if let Some((key, pkt)) = self.gateway.handle_backend(now, ev) {
            send_to_agent(&mut self.peers, &self.stats, key, pkt);
        }
    }

    /// Runs what is due (safe to call at any time): TCP, the packets it
    /// has for agents, relay session and end-to-end session timers.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut dyn BackendIo) {
        self.last_now = now;
        self.gateway.poll(now, io);
        let (peers, stats) = (&mut self.peers, &self.stats);
        self.gateway.drain_tx(now, |k, pkt| send_to_agent(peers, stats, k, pkt));
        for i in 0..self.links.len() {
            let Some(l) = self.links.get_mut(i) else { continue };
            if l.session.next_deadline().is_some_and(|d| d <= now) {
                l.session.handle_timeout(now);
                self.process_link(i, now, io);
            }
        }
        let mut due = std::mem::take(&mut self.slots_scratch);
        self.peers.due(now, &mut due);
        for &slot in &due {
            if let Some(p) = self.peers.get_mut(slot) {
                // A relay leg that went quiet holds the session's loss
                // recovery until it is heard again (or the session moves).
                let link = p.via.and_then(|(i, _)| self.links.get_mut(i));
                let stalled = link.is_some_and(|l| {
                    if l.session.silent_for(now).is_some_and(|d| d >= e2e::RELAY_STALL) {
                        // Held sessions wait for the relay to be heard: ask it.
                        l.session.ping_relay();
                        l.stalled = true;
                    }
                    l.stalled
                });
                p.session.set_stalled(stalled, now);
                p.session.handle_timeout(now);
            }
            self.after_session(slot, now, io);
        }
        self.slots_scratch = due;
        self.stats.e2e_cert_rejected.store(self.rejections.total(), Ordering::Relaxed);
        self.flush_sessions(now);
    }

    /// The next UDP datagram (for a relay, or on a direct path): its
    /// length in `out` and where to.
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        loop {
            if let Some((n, to)) = self.direct.tx.pop_into(out) {
                inc(&self.stats.direct_packets_out);
                crate::add(&self.stats.direct_bytes_out, n as u64);
                return Some((n, to));
            }
            let n = self.links.len();
            for step in 0..n {
                let i = (self.tx_next + step) % n;
                if let Some(sent) = self.links.get_mut(i).and_then(|l| l.session.poll_transmit(out, now)) {
                    self.tx_next = i;
                    return Some(sent);
                }
            }
            if !self.flush_sessions(now) {
                return None;
            }
        }
    }

    /// Moves the sessions' inner packets into their relay flows' DATAGRAM
    /// queues. Returns whether anything moved.
    fn flush_sessions(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let mut slots = std::mem::take(&mut self.slots_scratch);
        self.peers.take_send_list(&mut slots);
        let mut buf = std::mem::take(&mut self.buf);
        // The first session a full relay queue stops is the one that filled
        // it: it goes back on the list after the others, so one busy
        // session does not take the queue's room at every flush.
        let mut filled_by = None;
        for &slot in &slots {
            let Some(p) = self.peers.get_mut(slot) else { continue };
            // A full relay queue leaves the inner packets with the inner
            // session (backpressure), rather than losing them; it stays on
            // the send list.
            let mut blocked = false;
            loop {
                let room = if p.session.current_path().is_some() {
                    self.direct.tx.has_room()
                } else {
                    p.via.and_then(|(link, _)| self.links.get(link)).is_none_or(|l| l.session.datagram_room())
                };
                if !room {
                    blocked = true;
                    break;
                }
                let Some((n, via)) = p.session.poll_transmit(&mut buf, now) else { break };
                if let (Via::Direct(to), Some(pkt)) = (via, buf.get(..n)) {
                    // A punch takes budget only when there is room to send it.
                    let punch = punch::parse(pkt).is_some() && self.direct.tx.has_room();
                    if punch && !self.punch_budget.allow(&p.agent_id, now) {
                        inc(&self.stats.drop_punch_budget);
                    } else if self.direct.tx.push(pkt, to) {
                        moved = true;
                    } else {
                        inc(&self.stats.drop_direct_queue_full);
                    }
                    continue;
                }
                let Some(((link, flow), pkt)) = p.via.zip(buf.get(..n)) else { continue };
                match self.links.get_mut(link).map(|l| l.session.send_datagram(flow, pkt)) {
                    Some(Ok(())) => moved = true,
                    Some(Err(SendError::QueueFull)) => {
                        inc(&self.stats.drop_send_to_agent);
                        blocked = true;
                        break;
                    }
                    _ => {}
                }
            }
            self.peers.rearm(slot);
            if blocked {
                match filled_by {
                    None => filled_by = Some(slot),
                    Some(_) => self.peers.mark(slot),
                }
            }
        }
        if let Some(slot) = filled_by {
            self.peers.mark(slot);
        }
        self.buf = buf;
        self.slots_scratch = slots;
        moved
    }

    /// When [`Engine::handle_timeout`] must run at the latest.
    pub fn next_timeout(&self, now: Instant) -> Option<Instant> {
        let sessions = self.links.iter().filter_map(|l| l.session.next_deadline()).min();
        [sessions, self.peers.next_deadline(), self.gateway.next_timeout(now)].into_iter().flatten().min()
    }

    /// Appends every TCP backend socket that waits for something.
    pub fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        self.gateway.backend_interest(out);
    }

    /// Closes every end-to-end session and relay session (then send what
    /// [`Engine::poll_transmit`] still gives).
    pub fn close(&mut self) {
        for slot in self.peers.slots().collect::<Vec<_>>() {
            if let Some(p) = self.peers.get_mut(slot) {
                p.session.close();
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        for slot in self.peers.slots().collect::<Vec<_>>() {
            let Some(p) = self.peers.get_mut(slot) else { continue };
            // The session's last packets, toward its relay flow.
            while let Some((n, via)) = p.session.poll_transmit(&mut buf, self.last_now) {
                if let (Via::Direct(to), Some(pkt)) = (via, buf.get(..n)) {
                    self.direct.tx.push(pkt, to);
                } else if let (Some((link, flow)), Some(pkt)) = (p.via, buf.get(..n)) {
                    if let Some(l) = self.links.get_mut(link) {
                        let _ = l.session.send_datagram(flow, pkt);
                    }
                }
            }
        }
        self.buf = buf;
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
            let Some(raw) = d.get_mut(..n) else { continue };
            let Ok((flow, inner)) = datagram::parse(raw) else {
                inc(&self.stats.drop_malformed);
                continue;
            };
            inc(&self.stats.packets_from_agents);
            let start = n - inner.len();
            let Some(f) = self.links.get(i).and_then(|l| l.flows.get(&flow)).cloned() else {
                inc(&self.stats.drop_unknown_flow);
                continue;
            };
            if let Some(inner) = d.get_mut(start..n) {
                self.inner_packet(i, flow, &f, inner, now, io);
            }
        }
        self.buf = d;
    }

    /// One inner packet on relay flow (`link`, `flow`).
    fn inner_packet(
        &mut self,
        link: usize,
        flow: u32,
        f: &AgentFlow,
        pkt: &mut [u8],
        now: Instant,
        io: &mut dyn BackendIo,
    ) {
        let via: RelayFlow = (link, flow);
        let slot = if e2e::is_initial(pkt) {
            match self.peers.handshaking_on(via).or_else(|| e2e::packet_dcid(pkt).and_then(|c| self.peers.by_cid(c))) {
                Some(s) => s,
                None => match self.new_session(via, f, now) {
                    Some(s) => s,
                    None => return,
                },
            }
        } else {
            match e2e::packet_dcid(pkt).and_then(|c| self.peers.by_cid(c)) {
                Some(s) => s,
                None => {
                    inc(&self.stats.drop_unknown_cid);
                    self.reset_unknown(via, pkt, now);
                    return;
                }
            }
        };
        let Some(p) = self.peers.get_mut(slot) else { return };
        let early = p.session.early_dropped();
        let authentic = p.session.recv(pkt, now);
        crate::add(&self.stats.e2e_early_dropped, p.session.early_dropped() - early);
        if authentic {
            if p.via != Some(via) {
                debug!(slot, ?via, "end-to-end session moved to another relay flow");
                self.peers.move_to(slot, via, now);
            }
        } else {
            inc(&self.stats.e2e_packets_rejected);
        }
        self.after_session(slot, now, io);
    }

    /// A short-header inner packet on `via` for a session this connector
    /// does not hold (it restarted, or the agent came from a replica with
    /// the same identity): a stateless reset tells the agent at once, so
    /// it handshakes again instead of waiting out its silence timeout.
    fn reset_unknown(&mut self, (link, flow): RelayFlow, pkt: &[u8], now: Instant) {
        if pkt.first().is_none_or(|f| f & 0x80 != 0) {
            return;
        }
        let Some(cid) = e2e::packet_dcid(pkt) else { return };
        let Some(l) = self.links.get_mut(link) else { return };
        let Some(f) = l.flows.get_mut(&flow) else { return };
        if f.last_reset.is_some_and(|t| now.saturating_duration_since(t) < RESET_EVERY) {
            return;
        }
        if !self.reset_budget.allow(&f.agent_id, now) {
            inc(&self.stats.e2e_resets_suppressed);
            return;
        }
        let mut out = [0u8; ztna_control::reset::MAX_RESET_LEN];
        let Some(n) = self.reset_key.write_reset(cid, pkt.len(), &mut out) else { return };
        if let Some(reset) = out.get(..n) {
            if l.session.send_datagram(flow, reset).is_ok() {
                f.last_reset = Some(now);
                inc(&self.stats.e2e_resets_sent);
            }
        }
    }

    fn new_session(&mut self, via: RelayFlow, f: &AgentFlow, now: Instant) -> Option<usize> {
        if self.peers.admits_handshake(&f.agent_id).is_err() {
            inc(&self.stats.e2e_handshakes_refused);
            return None;
        }
        let mut scid = [0u8; e2e::CID_LEN];
        boring::rand::rand_bytes(&mut scid).ok()?;
        match E2eSession::accept(&mut self.e2e_cfg, scid, &self.trust_domain, &self.reset_key, now) {
            Ok(mut s) => {
                let loopback = self.links.get(via.0).is_some_and(|l| l.relay.ip().is_loopback());
                let port_prediction = self.cfg.port_prediction;
                s.set_direct_config(e2e::DirectConfig { loopback, port_prediction, ..e2e::DirectConfig::default() });
                inc(&self.stats.e2e_handshakes);
                Some(self.peers.insert(s, via, Arc::clone(&f.agent_id)))
            }
            Err(e) => {
                warn!(error = %e, "cannot accept an end-to-end session");
                None
            }
        }
    }

    /// Acts on a session's events, hands its IP packets to the gateway, and
    /// puts it on the send list with its timer re-read.
    fn after_session(&mut self, slot: usize, now: Instant, io: &mut dyn BackendIo) {
        self.session_work(slot, now, io);
        self.peers.touch(slot);
    }

    fn session_work(&mut self, slot: usize, now: Instant, io: &mut dyn BackendIo) {
        while let Some(e) = self.peers.get_mut(slot).and_then(|p| p.session.poll_event()) {
            match e {
                SessionEvent::Established { peer } => {
                    if self.peers.prove(slot, Arc::from(peer.uri())).is_err() {
                        inc(&self.stats.e2e_sessions_refused_identity);
                        warn!(agent = %peer, "end-to-end session refused: the identity holds its share");
                        if let Some(p) = self.peers.get_mut(slot) {
                            p.session.refuse(Code::LIMIT, "sessions per identity");
                        }
                    }
                }
                SessionEvent::Hello { service } => self.admit(slot, &service),
                SessionEvent::Up => inc(&self.stats.e2e_established),
                SessionEvent::NewCid(cid) => self.peers.add_cid(slot, cid),
                SessionEvent::RetiredCid(cid) => self.peers.remove_cid(slot, cid),
                SessionEvent::Closed { reason, .. } => {
                    debug!(slot, reason, "end-to-end session closed");
                }
            }
        }
        self.count_switches(slot);
        let Some(p) = self.peers.get_mut(slot) else { return };
        if p.session.is_finished() {
            if let Some(p) = self.peers.remove(slot) {
                inc(&self.stats.e2e_closed);
                self.gateway.drop_flow_state(p.key, io);
            }
            return;
        }
        let (Some(si), key, who) = (p.service, p.key, Arc::clone(&p.agent_id)) else { return };
        let mut ip = std::mem::take(&mut self.ip);
        while let Some(n) = self.peers.get_mut(slot).and_then(|p| p.session.recv_ip(&mut ip)) {
            let Some(pkt) = ip.get(..n) else { continue };
            if let Some(reply) = self.gateway.handle_ip(now, key, (si, &who), pkt, io) {
                send_to_agent(&mut self.peers, &self.stats, key, reply);
            }
        }
        self.ip = ip;
    }

    /// The agent asked for `service`: admitted if this session's relay flow
    /// is for that service and the proven identity may use it.
    fn admit(&mut self, slot: usize, service: &ServiceName) {
        let Some(p) = self.peers.get(slot) else { return };
        let flow_service = p.via.and_then(|(l, f)| self.links.get(l)?.flows.get(&f)).map(|f| f.service);
        let si = self.cfg.services.iter().position(|s| s.name == service.as_str());
        let svc = si.and_then(|i| self.cfg.services.get(i));
        let allowed =
            svc.and_then(|s| s.allow_agents.as_ref()).is_none_or(|list| list.iter().any(|a| **a == *p.agent_id));
        let verdict = match (si, p.proven) {
            (Some(i), true) if flow_service == Some(i) && allowed => Ok(i),
            (Some(i), true) if flow_service == Some(i) => Err("agent not in allow_agents"),
            _ => Err("service does not match the relay flow"),
        };
        let agent = Arc::clone(&p.agent_id);
        match verdict {
            Ok(i) => {
                info!(agent = %agent, %service, "end-to-end session admitted");
                let path = self.cfg.services.get(i).map(|s| s.path.0).unwrap_or_default();
                if let Some(p) = self.peers.get_mut(slot) {
                    p.service = Some(i);
                    p.session.set_path_policy(path);
                    p.session.set_candidates(self.direct.candidates.clone());
                    p.session.admit();
                }
            }
            Err(why) => {
                warn!(agent = %agent, %service, why, "end-to-end session refused");
                inc(&self.stats.flows_refused);
                if let Some(p) = self.peers.get_mut(slot) {
                    p.session.refuse(Code::DENIED, why);
                }
            }
        }
    }

    fn handle_event(&mut self, i: usize, e: Event, now: Instant, _io: &mut dyn BackendIo) {
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
                debug!(relay = i, flow, %agent_addr, agent = %agent_id, "flow opened");
                l.flows
                    .insert(flow, AgentFlow { service: si, agent_id: Arc::from(agent_id.as_str()), last_reset: None });
            }
            Event::FlowClosed { flow, .. } => {
                if let Some(l) = self.links.get_mut(i) {
                    l.flows.remove(&flow);
                }
                // Its sessions wait for the agent's next flow (or their
                // silence timeout).
                self.peers.flow_closed((i, flow), now);
            }
            Event::Disconnected { reason, retry_in, repeated } => {
                if repeated {
                    debug!(relay = i, reason, ?retry_in, "relay connection lost again");
                } else {
                    warn!(relay = i, reason, ?retry_in, "relay connection lost");
                }
                if let Some(l) = self.links.get_mut(i) {
                    l.handles.clear();
                    l.flows.clear();
                }
                self.peers.link_lost(i, now);
            }
            Event::Connected => info!(relay = i, "connected"),
            Event::ObservedAddress(a) => {
                info!(relay = i, observed = %a, "observed address");
                self.refresh_candidates();
            }
            Event::Goodbye { code, reason } => info!(relay = i, %code, reason, "relay says goodbye"),
            Event::FlowBound { .. } => {}
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

    /// End-to-end sessions held (handshaking, up or closing).
    pub fn e2e_sessions(&self) -> usize {
        self.peers.len()
    }

    /// End-to-end sessions up.
    pub fn e2e_sessions_up(&self) -> usize {
        self.peers.up()
    }

    /// Inner handshakes in progress.
    pub fn e2e_handshaking(&self) -> usize {
        self.peers.handshaking()
    }

    /// The agent identities whose sessions are up, with their service.
    pub fn e2e_agents(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for slot in self.peers.slots() {
            if let Some(p) = self.peers.get(slot).filter(|p| p.session.is_up()) {
                let svc = p.service.and_then(|i| self.cfg.services.get(i)).map(|s| s.name.clone()).unwrap_or_default();
                v.push((p.agent_id.to_string(), svc));
            }
        }
        v
    }
}
