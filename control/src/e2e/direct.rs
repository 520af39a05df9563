//! The direct-path side of an [`E2eSession`]: it carries out what its
//! [`PathManager`] decides with quiche's path API (probing, migration,
//! connection IDs for new paths) and feeds it what quiche reports
//! (docs/protocol/direct.md).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quiche::PathEvent;

use crate::candidate::{punch, Candidate, PathPolicy};
use crate::wire::Message;

use super::paths::{PathAction, PathCounters};
use super::session::{E2eSession, SessionEvent};
use super::{CID_LEN, DIRECT_PATH_LOCAL, RELAY_PATH_LOCAL, RELAY_PATH_PEER};

/// Which way an inner packet travels: through the relay flow, or over a
/// direct path to (or from) an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Relay,
    Direct(SocketAddr),
}

impl Via {
    /// quiche's (local, peer) addresses for this way.
    pub(super) fn quic_addrs(self) -> (SocketAddr, SocketAddr) {
        match self {
            Via::Relay => (RELAY_PATH_LOCAL, RELAY_PATH_PEER),
            Via::Direct(a) => (DIRECT_PATH_LOCAL, a),
        }
    }

    pub(super) fn of_peer(peer: SocketAddr) -> Via {
        if peer == RELAY_PATH_PEER {
            Via::Relay
        } else {
            Via::Direct(peer)
        }
    }

    pub fn direct(self) -> Option<SocketAddr> {
        match self {
            Via::Relay => None,
            Via::Direct(a) => Some(a),
        }
    }
}

/// The destination CID of a datagram that may belong to a direct path:
/// short-header (1-RTT) packets only (a session starts only on a relay
/// flow, and punch packets are not QUIC). The engine then takes it only if
/// a session issued the CID for direct paths (never the relay path's,
/// which the relay sees). docs/protocol/direct.md §11.6.
pub fn direct_dcid(pkt: &[u8]) -> Option<[u8; CID_LEN]> {
    if pkt.first().is_none_or(|f| f & 0x80 != 0) {
        return None;
    }
    super::packet_dcid(pkt).and_then(|c| c.try_into().ok())
}

/// Packets sessions sent over direct paths, waiting for the engine's one
/// socket: bounded (the sessions' own queues hold the rest; an engine
/// stops taking a session's packets while it is full).
#[derive(Debug)]
pub struct DirectQueue {
    q: VecDeque<(Vec<u8>, SocketAddr)>,
    cap: usize,
}

impl DirectQueue {
    pub fn new(cap: usize) -> DirectQueue {
        DirectQueue { q: VecDeque::new(), cap }
    }

    pub fn has_room(&self) -> bool {
        self.q.len() < self.cap
    }

    /// Queues `pkt` for `to`; false (nothing queued) when full.
    pub fn push(&mut self, pkt: &[u8], to: SocketAddr) -> bool {
        let room = self.has_room();
        if room {
            self.q.push_back((pkt.to_vec(), to));
        }
        room
    }

    /// Copies the next packet into `out`: its length and destination (a
    /// packet larger than `out`, which the sessions never make, is dropped).
    pub fn pop_into(&mut self, out: &mut [u8]) -> Option<(usize, SocketAddr)> {
        while let Some((pkt, to)) = self.q.pop_front() {
            if let Some(dst) = out.get_mut(..pkt.len()) {
                dst.copy_from_slice(&pkt);
                return Some((pkt.len(), to));
            }
        }
        None
    }
}

impl E2eSession {
    /// This end's direct-path candidates (replacing the previous ones).
    pub fn set_candidates(&mut self, list: Vec<Candidate>) {
        self.paths.set_candidates(list);
    }

    /// This end's path policy; set it before the session is up.
    pub fn set_path_policy(&mut self, policy: PathPolicy) {
        self.paths.set_policy(policy);
    }

    /// The policy both ends' wishes leave.
    pub fn path_policy(&self) -> PathPolicy {
        self.paths.policy()
    }

    /// The path tunneled packets take now: `None` is the relay.
    pub fn current_path(&self) -> Option<SocketAddr> {
        self.paths.current()
    }

    pub fn path_counters(&self) -> &PathCounters {
        self.paths.counters()
    }

    /// Where tunneled packets go and, on the relay, why.
    pub fn path_state(&self) -> super::PathState {
        self.paths.state()
    }

    /// Agent: a punch packet from `from`. Returns whether it belongs to
    /// this session's current round.
    pub fn on_punch(&mut self, from: SocketAddr, pkt: &[u8]) -> bool {
        punch::parse(pkt).is_some_and(|(round, nonce)| self.paths.on_punch(from, round, nonce))
    }

    /// quiche's path events, into the path manager.
    pub(super) fn path_events(&mut self, now: Instant) {
        while let Some(e) = self.conn.path_event_next() {
            match e {
                PathEvent::Validated(_, peer) if peer != RELAY_PATH_PEER => {
                    let (rtt, ptos) = self.path_stat(peer);
                    self.paths.on_validated(peer, rtt, ptos, now);
                }
                PathEvent::FailedValidation(_, peer) if peer != RELAY_PATH_PEER => {
                    self.paths.on_failed(peer);
                    // Its CID goes back to the peer (which issues another):
                    // a session has few paths, a failed one must not keep
                    // one for good.
                    if let Some(i) = self.probe_dcids.iter().position(|(a, _)| *a == peer) {
                        let (_, seq) = self.probe_dcids.swap_remove(i);
                        let _ = self.conn.retire_dcid(seq);
                    }
                }
                PathEvent::PeerMigrated(_, peer) => self.paths.on_peer_migrated(Via::of_peer(peer).direct(), now),
                _ => {}
            }
        }
    }

    /// Connector: the path quiche sends on. quiche reports a move to an
    /// already validated path at once, but a move to a path it must
    /// validate again (one it gave up) only if that validation completes
    /// a fresh one; asking it is exact either way.
    fn follow_active_path(&mut self, via: Via, now: Instant) {
        if via.direct() == self.paths.current() {
            return;
        }
        if let Some(active) = self.conn.path_stats().find(|p| p.active) {
            self.paths.on_peer_migrated(Via::of_peer(active.peer_addr).direct(), now);
        }
    }

    /// An authenticated packet came `via`.
    pub(super) fn path_rx(&mut self, via: Via, now: Instant) {
        if self.server {
            self.follow_active_path(via, now);
        }
        if let Via::Direct(a) = via {
            if !self.server && !self.paths.is_validated(a) {
                // quiche reports a path's validation once; a path it still
                // holds as validated answers a new round's probe silently.
                if self.conn.is_path_validated(DIRECT_PATH_LOCAL, a).unwrap_or(false) {
                    let (rtt, ptos) = self.path_stat(a);
                    self.paths.on_revalidated(a, rtt, ptos, now);
                }
            }
        }
        self.paths.on_rx(via.direct(), now);
    }

    /// quiche's RTT estimate and probe-timeout count of the path to `peer`.
    fn path_stat(&self, peer: SocketAddr) -> (Duration, u64) {
        self.conn
            .path_stats()
            .find(|p| p.peer_addr == peer)
            .map_or((Duration::from_millis(100), 0), |p| (p.rtt, p.total_pto_count as u64))
    }

    /// Fresh RTT estimates and probe-timeout counts of the direct paths
    /// (agent: path selection and failover).
    pub(super) fn path_rtts(&mut self) {
        if self.server {
            return;
        }
        let stats: Vec<(SocketAddr, Duration, u64)> = self
            .conn
            .path_stats()
            .filter(|p| p.peer_addr != RELAY_PATH_PEER)
            .map(|p| (p.peer_addr, p.rtt, p.total_pto_count as u64))
            .collect();
        for (peer, rtt, ptos) in stats {
            self.paths.on_path_stats(peer, rtt, ptos);
        }
    }

    /// Keeps the peer supplied with spare connection IDs (a new path needs
    /// one of each end's), and reports the ones issued and retired: the
    /// engine routes direct packets by them.
    pub(super) fn top_up_cids(&mut self) {
        if !self.conn.is_established() || self.is_closed() {
            return;
        }
        while self.conn.scids_left() > 0 {
            let mut cid = [0u8; CID_LEN];
            let mut token = [0u8; 16];
            if boring::rand::rand_bytes(&mut cid).is_err() || boring::rand::rand_bytes(&mut token).is_err() {
                return;
            }
            // The connector's tokens derive from its reset key (every
            // replica can reset); the agent sends no resets.
            let token = self.reset_key.as_ref().map_or(u128::from_be_bytes(token), |k| k.token(&cid));
            match self.conn.new_scid(&quiche::ConnectionId::from_ref(&cid), token, false) {
                Ok(_) => self.events.push_back(SessionEvent::NewCid(cid)),
                Err(_) => return,
            }
        }
        while let Some(c) = self.conn.retired_scid_next() {
            if let Ok(cid) = <[u8; CID_LEN]>::try_from(c.as_ref()) {
                self.events.push_back(SessionEvent::RetiredCid(cid));
            }
        }
    }

    /// Carries out the path manager's actions. A punch packet is written
    /// into `out` and returned (the caller sends it); the other actions
    /// become control messages, probes and migrations in quiche.
    pub(super) fn path_actions(&mut self, out: &mut [u8]) -> Option<(usize, Via)> {
        while let Some(a) = self.paths.poll_action() {
            match a {
                PathAction::SendCandidates { generation, policy, list } => {
                    Message::Candidates { generation, policy, list }.encode(&mut self.tx);
                }
                PathAction::SendPunchNow { round, nonce } => Message::PunchNow { round, nonce }.encode(&mut self.tx),
                PathAction::Probe(addr) => match self.conn.probe_path(DIRECT_PATH_LOCAL, addr) {
                    Ok(seq) => {
                        if !self.probe_dcids.iter().any(|(a, _)| *a == addr) {
                            self.probe_dcids.push((addr, seq));
                        }
                    }
                    // No spare connection ID: this probe is skipped.
                    Err(_) => self.paths.counters.probes_skipped += 1,
                },
                PathAction::Punch { to, round, nonce } => {
                    if let Some(n) = punch::write(round, nonce, out) {
                        return Some((n, Via::Direct(to)));
                    }
                }
                PathAction::Migrate(to) => {
                    let (local, peer) = to.map_or(Via::Relay, Via::Direct).quic_addrs();
                    if self.conn.migrate(local, peer).is_ok() {
                        // A non-probing packet on the new path moves the
                        // connector's side too.
                        let _ = self.conn.send_ack_eliciting();
                        self.must_send = true;
                    } else if let Some(a) = to {
                        // quiche refused (no connection ID): back to where
                        // it still is.
                        self.paths.on_failed(a);
                    }
                }
                PathAction::Keepalive => {
                    let _ = self.conn.send_ack_eliciting();
                    self.must_send = true;
                }
            }
        }
        None
    }
}
