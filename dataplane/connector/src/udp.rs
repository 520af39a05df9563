//! The connector's UDP flows: one connected backend socket per (agent flow,
//! inner 5-tuple), bounded in total, per agent flow and per agent identity,
//! expired when idle.
//!
//! The sockets are the driver's ([`BackendIo`]): a flow holds the
//! [`BackendId`] it opened, and replies come back as events naming it.
//!
//! Every operation costs what arrived, not what the table holds: flows are
//! found by a hash of their key, an agent flow's UDP flows through an index,
//! a reply by its socket's id (the driver reads only the sockets epoll
//! reports readable), and expiry pops due entries off a heap. The one scan is on the reclaim path:
//! with the table full, finding the least recently used flow of the
//! identity holding the most looks at every flow (only when a new flow of
//! an identity below its share meets a full table).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendId, BackendIo};
use crate::fair::{Admission, Shares};
use crate::gateway::FlowKey;
use crate::{inc, ConnectorStats};

/// Key of a UDP flow: which relay session and agent flow, and the inner
/// 5-tuple's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct UdpKey {
    pub session: usize,
    pub flow: u32,
    pub agent: SocketAddrV4,
    pub service_addr: SocketAddrV4,
}

impl UdpKey {
    fn agent_flow(&self) -> FlowKey {
        FlowKey { session: self.session, flow: self.flow }
    }
}

struct UdpFlow {
    key: UdpKey,
    last: Instant,
    identity: Arc<str>,
}

/// Limits of the UDP table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpLimits {
    pub max_flows: usize,
    pub per_agent_flow: usize,
    pub per_identity: usize,
    pub idle: Duration,
}

pub(crate) struct UdpTable {
    /// Backend socket → flow.
    flows: HashMap<u64, UdpFlow>,
    index: HashMap<UdpKey, u64>,
    by_agent_flow: HashMap<FlowKey, HashSet<u64>>,
    shares: Shares,
    limits: UdpLimits,
    /// (earliest expiry, token); one entry per flow, re-queued when the
    /// flow was used since.
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Backend ids are `(next_token << 1) | 1`: odd, so they never meet
    /// the TCP endpoint's (even) ones.
    next_token: u64,
    stats: Arc<ConnectorStats>,
}

impl UdpTable {
    pub(crate) fn new(limits: UdpLimits, stats: Arc<ConnectorStats>) -> UdpTable {
        UdpTable {
            flows: HashMap::new(),
            index: HashMap::new(),
            by_agent_flow: HashMap::new(),
            shares: Shares::new(limits.max_flows, limits.per_identity),
            limits,
            expiry: BinaryHeap::new(),
            next_token: 0,
            stats,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Sends `payload` on the flow `key` of `identity`, opening the flow (a
    /// socket connected to `target`) if it is new and admitted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        key: UdpKey,
        identity: &Arc<str>,
        target: SocketAddr,
        payload: &[u8],
        now: Instant,
        io: &mut dyn BackendIo,
    ) {
        let token = match self.index.get(&key) {
            Some(t) => *t,
            None => match self.open(key, identity, target, now, io) {
                Some(t) => t,
                None => return,
            },
        };
        if let Some(f) = self.flows.get_mut(&token) {
            f.last = now;
            if io.udp_send(BackendId(token), payload).is_ok() {
                inc(&self.stats.udp_to_backend);
            }
        }
    }

    fn open(
        &mut self,
        key: UdpKey,
        identity: &Arc<str>,
        target: SocketAddr,
        now: Instant,
        io: &mut dyn BackendIo,
    ) -> Option<u64> {
        let mine = self.by_agent_flow.get(&key.agent_flow()).map_or(0, HashSet::len);
        if mine >= self.limits.per_agent_flow {
            inc(&self.stats.drop_flow_table_full);
            return None;
        }
        match self.shares.admit(identity) {
            Admission::Admit => {}
            Admission::OverShare => {
                inc(&self.stats.udp_flows_refused_identity_share);
                return None;
            }
            Admission::Reclaim(top) => {
                let victim = self.flows.iter().filter(|(_, f)| f.identity == top).min_by_key(|(_, f)| f.last);
                if let Some(t) = victim.map(|(t, _)| *t) {
                    self.remove(t, io);
                    inc(&self.stats.udp_flows_reclaimed);
                }
            }
            Admission::Full => {
                inc(&self.stats.drop_flow_table_full);
                return None;
            }
        }
        let token = (self.next_token << 1) | 1;
        self.next_token = self.next_token.wrapping_add(1);
        if io.udp_open(BackendId(token), target).is_err() {
            inc(&self.stats.drop_flow_table_full);
            return None;
        }
        inc(&self.stats.udp_flows_opened);
        self.shares.add(identity);
        self.index.insert(key, token);
        self.by_agent_flow.entry(key.agent_flow()).or_default().insert(token);
        self.expiry.push(Reverse((now + self.limits.idle, token)));
        self.flows.insert(token, UdpFlow { key, last: now, identity: Arc::clone(identity) });
        Some(token)
    }

    /// The flow a datagram from backend socket `id` belongs to (None: a
    /// socket closed since), marked as used.
    pub(crate) fn on_reply(&mut self, id: BackendId, now: Instant) -> Option<UdpKey> {
        let f = self.flows.get_mut(&id.0)?;
        f.last = now;
        inc(&self.stats.udp_from_backend);
        Some(f.key)
    }

    /// Drops an agent flow's UDP flows.
    pub(crate) fn remove_agent_flow(&mut self, key: FlowKey, io: &mut dyn BackendIo) {
        for t in self.by_agent_flow.remove(&key).unwrap_or_default() {
            self.remove(t, io);
        }
    }

    fn remove(&mut self, token: u64, io: &mut dyn BackendIo) {
        let Some(f) = self.flows.remove(&token) else { return };
        self.index.remove(&f.key);
        let ak = f.key.agent_flow();
        if let Some(set) = self.by_agent_flow.get_mut(&ak) {
            set.remove(&token);
            if set.is_empty() {
                self.by_agent_flow.remove(&ak);
            }
        }
        self.shares.remove(&f.identity);
        io.udp_close(BackendId(token));
    }

    /// Expires flows idle for the idle timeout; returns how many.
    pub(crate) fn expire(&mut self, now: Instant, io: &mut dyn BackendIo) -> u64 {
        let mut gone = 0;
        while let Some(Reverse((due, token))) = self.expiry.peek().copied() {
            if due > now {
                break;
            }
            self.expiry.pop();
            let Some(f) = self.flows.get(&token) else { continue };
            let until = f.last + self.limits.idle;
            if until <= now {
                self.remove(token, io);
                gone += 1;
            } else {
                self.expiry.push(Reverse((until, token)));
            }
        }
        // Entries of flows removed otherwise stay until due: bound them.
        if self.expiry.len() > 2 * self.flows.len() + 64 {
            let live: Vec<(Instant, u64)> = self.flows.iter().map(|(t, f)| (f.last + self.limits.idle, *t)).collect();
            self.expiry = live.into_iter().map(Reverse).collect();
        }
        gone
    }
}
