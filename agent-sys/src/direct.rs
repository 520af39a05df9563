//! The agent's direct paths (docs/protocol/direct.md): datagrams from
//! addresses other than the relay, the candidates the agent advertises,
//! and the packets its sessions send over direct paths. The one UDP socket
//! carries all of it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ztna_control::candidate::{host_candidates, punch, Candidate, CandidateKind, PathPolicy};
use ztna_control::e2e::{self, DirectConfig, DirectQueue, PathState, TimeToDirect, Via};
use ztna_control::ServiceName;

use crate::agent_core::{AgentCore, AgentEvent};

/// Direct-path settings of an agent.
#[derive(Debug, Clone, Default)]
pub struct PathSettings {
    /// The policy of services not listed in `policies`.
    pub default_policy: PathPolicy,
    /// Per service.
    pub policies: Vec<(ServiceName, PathPolicy)>,
    pub timing: DirectConfig,
}

impl PathSettings {
    pub fn policy(&self, service: &ServiceName) -> PathPolicy {
        self.policies.iter().find(|(s, _)| s == service).map_or(self.default_policy, |(_, p)| *p)
    }
}

/// Inner packets waiting for the socket on direct paths.
const MAX_DIRECT_TX: usize = 256;

/// The agent core's direct-path state.
#[derive(Debug)]
pub(crate) struct DirectState {
    pub settings: PathSettings,
    /// Connection IDs the agent's sessions issued → their service.
    pub by_cid: HashMap<[u8; e2e::CID_LEN], ServiceName>,
    /// Interface addresses the driver reported.
    pub host_ips: Vec<IpAddr>,
    pub tx: DirectQueue,
    /// Sessions' time from their first tunneled packet to their first
    /// direct path.
    pub time_to_direct: TimeToDirect,
}

impl DirectState {
    pub fn new(settings: PathSettings) -> DirectState {
        DirectState {
            settings,
            by_cid: HashMap::new(),
            host_ips: Vec::new(),
            tx: DirectQueue::new(MAX_DIRECT_TX),
            time_to_direct: TimeToDirect::default(),
        }
    }

    /// The candidates for a socket at `local` that a relay sees at
    /// `observed`.
    pub fn candidates(&self, local: SocketAddr, observed: Option<SocketAddr>) -> Vec<Candidate> {
        let mut list = host_candidates(&self.host_ips, local);
        if let Some(o) = observed {
            list.push(Candidate { kind: CandidateKind::ServerReflexive, addr: o });
        }
        list
    }
}

impl AgentCore {
    /// The addresses of the host's interfaces (the driver enumerates them;
    /// loopback, link-local and tunnel addresses are left out by the
    /// driver or here). Host candidates pair them with the socket's port.
    pub fn set_host_addresses(&mut self, ips: Vec<IpAddr>) {
        self.direct.host_ips = ips;
        self.refresh_candidates();
    }

    /// Sessions' time to direct so far (`ztna_agent_time_to_direct_seconds`).
    pub fn time_to_direct(&self) -> &TimeToDirect {
        &self.direct.time_to_direct
    }

    /// Where each session's packets go and why (one entry per service
    /// with a session).
    pub fn path_states(&self) -> Vec<PathState> {
        self.tunnel_status().into_iter().filter_map(|t| t.path_state).collect()
    }

    /// Reports a move of the session of `service` between the relay and a
    /// direct path (PathChanged), and counts its time to direct once.
    pub(crate) fn note_path(&mut self, service: &ServiceName) {
        let Some(t) = self.tunnel_mut(service) else { return };
        let s = t.session.as_ref();
        let (direct, state) = s.map_or((None, PathState::Pending), |s| (s.current_path(), s.path_state()));
        let ttd = s.and_then(|s| s.path_counters().time_to_direct).filter(|_| !t.direct_counted);
        t.direct_counted |= ttd.is_some();
        let moved = direct != t.reported_path;
        t.reported_path = direct;
        if let Some(d) = ttd {
            self.direct.time_to_direct.observe(d);
        }
        if moved {
            self.push_event(AgentEvent::PathChanged { service: service.clone(), direct, state });
        }
    }

    /// Tells every session the agent's current candidates.
    pub(crate) fn refresh_candidates(&mut self) {
        let list = self.direct.candidates(self.local_addr(), self.observed_address());
        for t in self.tunnels_mut() {
            if let Some(s) = t.session.as_mut() {
                s.set_candidates(list.clone());
            }
        }
    }

    /// A datagram from an address that is not the relay: a punch packet
    /// of a session's round, or an inner packet of a session on a direct
    /// path (by its destination CID). Anything else is dropped and counted.
    pub(crate) fn recv_direct(&mut self, data: &mut [u8], from: SocketAddr, now: Instant) {
        if punch::parse(data).is_some() {
            let mine = self.tunnels_mut().filter_map(|t| t.session.as_mut()).any(|s| s.on_punch(from, data));
            let stats = self.stats_mut();
            if mine {
                stats.direct_punches_in += 1;
            } else {
                stats.drop_direct += 1;
            }
            self.pump_sessions_now(now);
            return;
        }
        // `by_cid` holds only the CIDs sessions issued for direct paths.
        let service = e2e::direct_dcid(data).and_then(|c| self.direct.by_cid.get(&c).cloned());
        let Some(service) = service else {
            self.stats_mut().drop_direct += 1;
            return;
        };
        let authentic = self
            .tunnel_mut(&service)
            .and_then(|t| t.session.as_mut())
            .is_some_and(|s| s.recv_via(data, Via::Direct(from), now));
        if authentic {
            let stats = self.stats_mut();
            stats.direct_packets_in += 1;
            stats.direct_bytes_in += data.len() as u64;
        }
        self.pump_sessions_now(now);
    }
}
