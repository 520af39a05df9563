//! What the connector holds, for `/status`: its relay sessions (connected,
//! the address each relay observed, services registered there, agent
//! flows) and its end-to-end sessions (the agent identity, proven or as
//! the relay named it during the handshake, the service, the relay
//! carrying it).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Serialize;
use ztna_control::e2e::PathState;

use super::Engine;

/// At most this many end-to-end sessions are listed (all are counted).
pub const MAX_LISTED: usize = 1000;

/// One relay session.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RelayStatus {
    pub relay: SocketAddr,
    pub connected: bool,
    /// The connector's address as this relay sees it (None until told).
    pub observed: Option<SocketAddr>,
    /// Services registered at this relay.
    pub services: Vec<String>,
    /// Agent flows this relay opened to the connector.
    pub agent_flows: usize,
}

/// One end-to-end session.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionStatus {
    /// The agent's SPIFFE ID.
    pub agent: String,
    /// `agent` is the identity the agent proved (false: the relay's word,
    /// while the handshake runs).
    pub proven: bool,
    pub up: bool,
    /// The admitted service (None before admission).
    pub service: Option<String>,
    /// The relay whose flow carries it now (None between flows).
    pub relay: Option<SocketAddr>,
    /// The agent's address when the session is on a direct path (None:
    /// the relay carries it).
    pub direct: Option<SocketAddr>,
    /// Where its packets go and, on the relay, why
    /// ([`ztna_control::e2e::PathState`]).
    pub path: &'static str,
}

/// The `/status` document of a connector.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectorStatus {
    pub relays: Vec<RelayStatus>,
    pub sessions_total: usize,
    pub sessions_up: usize,
    /// Sessions on a direct path.
    pub sessions_direct: usize,
    /// Sessions per path state (every state listed).
    pub sessions_by_path: BTreeMap<&'static str, usize>,
    pub sessions: Vec<SessionStatus>,
    pub sessions_omitted: usize,
    pub udp_flows: usize,
    pub tcp_connections: usize,
}

impl Engine {
    /// What `/status` reports (relays in configuration order, sessions by
    /// agent identity).
    pub fn status(&self) -> ConnectorStatus {
        let service_name = |i: usize| self.cfg.services.get(i).map(|s| s.name.clone());
        let relays = self
            .links
            .iter()
            .filter(|l| !l.retired)
            .map(|l| {
                let mut services: Vec<String> = l.handles.values().filter_map(|&i| service_name(i)).collect();
                services.sort();
                RelayStatus {
                    relay: l.relay,
                    connected: l.session.is_connected(),
                    observed: l.session.observed_address(),
                    services,
                    agent_flows: l.flows.len(),
                }
            })
            .collect();
        let mut sessions: Vec<SessionStatus> = self
            .peers
            .slots()
            .filter_map(|slot| self.peers.get(slot))
            .map(|p| SessionStatus {
                agent: p.agent_id.to_string(),
                proven: p.proven,
                up: p.session.is_up(),
                service: p.service.and_then(service_name),
                relay: p.via.and_then(|(link, _)| self.links.get(link)).map(|l| l.relay),
                direct: p.session.current_path(),
                path: p.session.path_state().as_str(),
            })
            .collect();
        sessions.sort_by(|a, b| (&a.agent, &a.service).cmp(&(&b.agent, &b.service)));
        let mut sessions_by_path: BTreeMap<&'static str, usize> = PathState::ALL.map(|s| (s.as_str(), 0)).into();
        for p in self.peers.slots().filter_map(|s| self.peers.get(s)) {
            *sessions_by_path.entry(p.session.path_state().as_str()).or_default() += 1;
        }
        let total = sessions.len();
        sessions.truncate(MAX_LISTED);
        ConnectorStatus {
            relays,
            sessions_total: total,
            sessions_up: self.peers.up(),
            sessions_direct: sessions_by_path.get(PathState::Direct.as_str()).copied().unwrap_or(0),
            sessions_by_path,
            sessions_omitted: total - sessions.len(),
            sessions,
            udp_flows: self.gateway.udp_flows(),
            tcp_connections: self.gateway.tcp_connections(),
        }
    }
}
