//! The cleartext baseline connector engine: **bench only**, the product has
//! no cleartext mode.
//!
//! It is the connector as it was before end-to-end sessions: tunneled IP
//! packets come as `[flow id][IP packet]` DATAGRAMs of the relay session
//! and go straight to the same [`Gateway`] the product uses; the replies
//! go back the same way. It runs on the product's driver
//! ([`ztna_connector::Connector::with_engine`]), so sockets, batching and
//! backend I/O are the product's: what `ztna-bench e2e-system` measures
//! between this and [`ztna_connector::Engine`] is the end-to-end session
//! alone. One relay, no policy of its own (the relay's applies), nothing
//! a production connector needs beyond the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ztna_connector::{
    BackendEvent, BackendId, BackendIo, ConnectorConfig, ConnectorStats, ConnectorStatus, DrivenEngine, EngineInputs,
    FlowKey, Gateway, Interest, RelayStatus, TxOutcome,
};
use ztna_control::client::{ClientConfig, ClientSession, Event, SendError};
use ztna_control::{datagram, quic, Role, ServiceName};

struct Link {
    relay: SocketAddr,
    session: ClientSession,
    /// Service handle → service index.
    handles: HashMap<u32, usize>,
    /// Connector-leg flow → service index and agent identity.
    flows: HashMap<u32, (usize, Arc<str>)>,
}

pub struct ClearEngine {
    cfg: ConnectorConfig,
    server_name: String,
    local: SocketAddr,
    seed: u64,
    link: Option<Link>,
    gateway: Gateway,
    stats: Arc<ConnectorStats>,
    buf: Vec<u8>,
}

/// The gateway key of connector-leg flow `flow` (one agent flow each).
fn key(flow: u32) -> FlowKey {
    FlowKey { session: flow as usize, flow: 0 }
}

fn send(link: &mut Option<Link>, stats: &ConnectorStats, k: FlowKey, pkt: &[u8]) -> TxOutcome {
    let Some(l) = link.as_mut() else { return TxOutcome::Dropped };
    let Ok(flow) = u32::try_from(k.session) else { return TxOutcome::Dropped };
    match l.session.send_datagram(flow, pkt) {
        Ok(()) => {
            stats.packets_to_agents.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            TxOutcome::Sent
        }
        Err(SendError::QueueFull) => TxOutcome::Blocked,
        Err(_) => TxOutcome::Dropped,
    }
}

impl ClearEngine {
    pub fn new(i: EngineInputs) -> Result<ClearEngine> {
        let stats = Arc::new(ConnectorStats::default());
        let gateway = Gateway::new(&i.cfg, i.targets, Arc::clone(&stats), i.seed, i.now);
        Ok(ClearEngine {
            server_name: i.cfg.relay_server_name()?,
            cfg: i.cfg,
            local: i.local,
            seed: i.seed,
            link: None,
            gateway,
            stats,
            buf: vec![0u8; 65_536],
        })
    }

    /// The link's events, then its DATAGRAMs into the gateway.
    fn process(&mut self, now: Instant, io: &mut dyn BackendIo) {
        let Some(l) = self.link.as_mut() else { return };
        while let Some(e) = l.session.poll_event() {
            match e {
                Event::Registered { service, flow, .. } => {
                    if let Some(si) = self.cfg.services.iter().position(|s| s.name == service.as_str()) {
                        l.handles.insert(flow, si);
                    }
                }
                Event::FlowOpened { flow, service, agent_id, .. } => {
                    if let Some(&si) = l.handles.get(&service) {
                        l.flows.insert(flow, (si, Arc::from(agent_id.as_str())));
                    }
                }
                Event::FlowClosed { flow, .. } => {
                    l.flows.remove(&flow);
                    self.gateway.drop_flow_state(key(flow), io);
                }
                Event::Disconnected { .. } => {
                    l.handles.clear();
                    l.flows.clear();
                }
                _ => {}
            }
        }
        while let Some(n) = self.link.as_mut().and_then(|l| l.session.recv_datagram(&mut self.buf)) {
            let Some(Ok((flow, ip))) = self.buf.get(..n).map(datagram::parse) else { continue };
            let Some((si, who)) = self.link.as_ref().and_then(|l| l.flows.get(&flow)).cloned() else { continue };
            self.stats.packets_from_agents.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(reply) = self.gateway.handle_ip(now, key(flow), (si, &who), ip, io) {
                send(&mut self.link, &self.stats, key(flow), reply);
            }
        }
    }
}

impl DrivenEngine for ClearEngine {
    fn stats(&self) -> &Arc<ConnectorStats> {
        &self.stats
    }

    fn set_relays(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
        quic: &mut dyn FnMut() -> Result<quic::ClientTls>,
    ) -> Result<()> {
        let (Some(&relay), None) = (addrs.first(), self.link.as_ref()) else { return Ok(()) };
        let mut c = ClientConfig::new(relay, self.local, &self.server_name);
        c.registrations =
            self.cfg.services.iter().filter_map(|s| ServiceName::new(&s.name)).map(|s| (Role::Connector, s)).collect();
        self.seed = self.seed.wrapping_add(1);
        let session = ClientSession::new(c, quic()?, self.seed, now);
        self.link = Some(Link { relay, session, handles: HashMap::new(), flows: HashMap::new() });
        Ok(())
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo) {
        match self.link.as_mut() {
            Some(l) if l.relay == from => l.session.recv(pkt, from, now),
            _ => return,
        }
        self.process(now, io);
    }

    fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>) {
        if let Some((k, pkt)) = self.gateway.handle_backend(now, ev) {
            send(&mut self.link, &self.stats, k, pkt);
        }
    }

    fn handle_timeout(&mut self, now: Instant, io: &mut dyn BackendIo) {
        self.gateway.poll(now, io);
        let (link, stats) = (&mut self.link, &self.stats);
        self.gateway.drain_tx(now, |k, pkt| send(link, stats, k, pkt));
        if let Some(l) = self.link.as_mut().filter(|l| l.session.next_deadline().is_some_and(|d| d <= now)) {
            l.session.handle_timeout(now);
        }
        self.process(now, io);
    }

    fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        self.link.as_mut()?.session.poll_transmit(out, now)
    }

    fn next_timeout(&self, now: Instant) -> Option<Instant> {
        let session = self.link.as_ref().and_then(|l| l.session.next_deadline());
        [session, self.gateway.next_timeout(now)].into_iter().flatten().min()
    }

    fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        self.gateway.backend_interest(out);
    }

    fn close(&mut self) {
        if let Some(l) = self.link.as_mut() {
            l.session.close();
        }
    }

    fn relays(&self) -> Vec<SocketAddr> {
        self.link.iter().map(|l| l.relay).collect()
    }

    fn relays_connected(&self) -> usize {
        self.link.iter().filter(|l| l.session.is_connected()).count()
    }

    fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        self.link.iter().map(|l| l.session.observed_address()).collect()
    }

    fn udp_flows(&self) -> usize {
        self.gateway.udp_flows()
    }

    fn tcp_connections(&self) -> usize {
        self.gateway.tcp_connections()
    }

    fn is_ready(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.handles.len() == self.cfg.services.len())
    }

    fn is_serving(&self) -> bool {
        self.is_ready()
    }

    fn status(&self) -> ConnectorStatus {
        let relays = self
            .link
            .iter()
            .map(|l| RelayStatus {
                relay: l.relay,
                connected: l.session.is_connected(),
                observed: l.session.observed_address(),
                services: Vec::new(),
                agent_flows: l.flows.len(),
            })
            .collect();
        ConnectorStatus {
            relays,
            sessions_total: 0,
            sessions_up: 0,
            sessions_direct: 0,
            sessions_by_path: Default::default(),
            sessions: Vec::new(),
            sessions_omitted: 0,
            udp_flows: self.gateway.udp_flows(),
            tcp_connections: self.gateway.tcp_connections(),
        }
    }
}
