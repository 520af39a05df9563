//! The connector's direct paths (docs/protocol/direct.md): inner packets
//! that arrive from agents' addresses instead of relays, the candidates the
//! connector advertises, and the packets its sessions send over direct
//! paths. The one UDP socket carries all of it.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ztna_control::candidate::{host_candidates, Candidate, CandidateKind};
use ztna_control::e2e::{self, DirectQueue, Via};

use std::sync::Arc;

use super::Engine;
use crate::backend::BackendIo;
use crate::direct_metrics::DirectMetrics;
use crate::inc;

/// Inner packets waiting for the socket on direct paths.
const MAX_DIRECT_TX: usize = 1024;

/// The engine's direct-path state.
#[derive(Debug)]
pub(super) struct DirectState {
    /// Interface addresses the driver reported.
    pub host_ips: Vec<IpAddr>,
    /// The candidates sessions were last told.
    pub candidates: Vec<Candidate>,
    pub tx: DirectQueue,
}

impl Default for DirectState {
    fn default() -> DirectState {
        DirectState { host_ips: Vec::new(), candidates: Vec::new(), tx: DirectQueue::new(MAX_DIRECT_TX) }
    }
}

impl Engine {
    /// The time-to-direct histogram (for `/metrics`).
    pub fn direct_metrics(&self) -> &Arc<DirectMetrics> {
        &self.direct_metrics
    }

    /// Counts the path switches and round outcomes of the session in
    /// `slot` since the last look, and its time to direct at its first.
    pub(super) fn count_switches(&mut self, slot: usize) {
        let Some(p) = self.peers.get_mut(slot) else { return };
        let (c, seen) = (p.session.path_counters(), &p.paths_seen);
        if c == seen {
            return;
        }
        if seen.time_to_direct.is_none() {
            if let Some(t) = c.time_to_direct {
                self.direct_metrics.observe(t);
            }
        }
        let s = &self.stats;
        crate::add(&s.path_to_direct, c.to_direct.saturating_sub(seen.to_direct));
        crate::add(&s.path_to_relay, c.to_relay.saturating_sub(seen.to_relay));
        crate::add(&s.punch_rounds, c.rounds.saturating_sub(seen.rounds));
        crate::add(&s.punch_predicted, c.predicted.saturating_sub(seen.predicted));
        crate::add(&s.punch_rounds_direct, c.rounds_direct.saturating_sub(seen.rounds_direct));
        crate::add(&s.punch_rounds_failed, c.rounds_failed.saturating_sub(seen.rounds_failed));
        p.paths_seen = c.clone();
    }

    /// The addresses of the host's interfaces (the driver enumerates them);
    /// host candidates pair them with the socket's port.
    pub fn set_host_addresses(&mut self, ips: Vec<IpAddr>) {
        self.direct.host_ips = ips;
        self.refresh_candidates();
    }

    /// Host addresses, the operator's `advertise` list and what the relays
    /// observe, told to every session when they change.
    pub(super) fn refresh_candidates(&mut self) {
        let mut list = host_candidates(&self.direct.host_ips, self.local);
        list.extend(self.cfg.advertise.iter().map(|a| Candidate { kind: CandidateKind::Configured, addr: *a }));
        list.extend(
            self.links
                .iter()
                .filter_map(|l| l.session.observed_address())
                .map(|addr| Candidate { kind: CandidateKind::ServerReflexive, addr }),
        );
        list.sort();
        list.dedup();
        if list == self.direct.candidates {
            return;
        }
        self.direct.candidates = list;
        for slot in self.peers.slots().collect::<Vec<_>>() {
            if let Some(p) = self.peers.get_mut(slot) {
                p.session.set_candidates(self.direct.candidates.clone());
            }
            self.peers.touch(slot);
        }
    }

    /// A datagram from an address that is not a relay: an inner packet of
    /// a session on a direct path, found by its connection ID. Initials
    /// (sessions start only on relay flows), punch packets (only agents
    /// receive them) and unknown CIDs are dropped and counted.
    pub(super) fn handle_direct(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo) {
        // Never by the session's first CID, which the relay knows (it could
        // replay a packet from an address of its choosing and have quiche
        // validate a path there): `by_direct_cid`.
        let Some(slot) = e2e::direct_dcid(pkt).and_then(|c| self.peers.by_direct_cid(&c)) else {
            inc(&self.stats.drop_direct);
            return;
        };
        let len = pkt.len() as u64;
        let Some(p) = self.peers.get_mut(slot) else { return };
        if p.session.recv_via(pkt, Via::Direct(from), now) {
            inc(&self.stats.direct_packets_in);
            crate::add(&self.stats.direct_bytes_in, len);
        } else {
            inc(&self.stats.e2e_packets_rejected);
        }
        self.after_session(slot, now, io);
    }
}
