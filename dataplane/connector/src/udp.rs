//! The connector's UDP flows: one connected backend socket per (agent flow,
//! inner 5-tuple), bounded in total, per agent flow and per agent identity,
//! expired when idle.
//!
//! Every operation costs what arrived, not what the table holds: flows are
//! found by a hash of their key, an agent flow's UDP flows through an index,
//! backend sockets are read only when epoll reports them readable (one
//! epoll descriptor stands for all of them in the connector's poll), and
//! expiry pops due entries off a heap. The one scan is on the reclaim path:
//! with the table full, finding the least recently used flow of the
//! identity holding the most looks at every flow (only when a new flow of
//! an identity below its share meets a full table).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fair::{Admission, Shares};
use super::tcp::FlowKey;
use super::ConnectorStats;

/// Key of a UDP flow: which relay session and agent flow, and the inner
/// 5-tuple's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct UdpKey {
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
    socket: UdpSocket,
    last: Instant,
    identity: Arc<str>,
}

/// Limits of the UDP table.
#[derive(Debug, Clone, Copy)]
pub(super) struct UdpLimits {
    pub max_flows: usize,
    pub per_agent_flow: usize,
    pub per_identity: usize,
    pub idle: Duration,
}

/// epoll events fetched per `epoll_wait` call.
const EVENTS: usize = 256;

pub(super) struct UdpTable {
    /// Token (also the epoll data) → flow.
    flows: HashMap<u64, UdpFlow>,
    index: HashMap<UdpKey, u64>,
    by_agent_flow: HashMap<FlowKey, HashSet<u64>>,
    shares: Shares,
    limits: UdpLimits,
    /// (earliest expiry, token); one entry per flow, re-queued when the
    /// flow was used since.
    expiry: BinaryHeap<Reverse<(Instant, u64)>>,
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
    next_token: u64,
    stats: Arc<ConnectorStats>,
}

fn inc(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl UdpTable {
    pub(super) fn new(limits: UdpLimits, stats: Arc<ConnectorStats>) -> io::Result<UdpTable> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is
        // checked before it is wrapped.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(UdpTable {
            flows: HashMap::new(),
            index: HashMap::new(),
            by_agent_flow: HashMap::new(),
            shares: Shares::new(limits.max_flows, limits.per_identity),
            limits,
            expiry: BinaryHeap::new(),
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
            next_token: 0,
            stats,
        })
    }

    /// The descriptor to poll for "some backend socket is readable".
    pub(super) fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub(super) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Sends `payload` on the flow `key` of `identity`, opening the flow (a
    /// socket connected to `target`) if it is new and admitted.
    pub(super) fn send(&mut self, key: UdpKey, identity: &Arc<str>, target: SocketAddr, payload: &[u8], now: Instant) {
        let token = match self.index.get(&key) {
            Some(t) => *t,
            None => match self.open(key, identity, target, now) {
                Some(t) => t,
                None => return,
            },
        };
        if let Some(f) = self.flows.get_mut(&token) {
            f.last = now;
            if f.socket.send(payload).is_ok() {
                inc(&self.stats.udp_to_backend);
            }
        }
    }

    fn open(&mut self, key: UdpKey, identity: &Arc<str>, target: SocketAddr, now: Instant) -> Option<u64> {
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
                    self.remove(t);
                    inc(&self.stats.udp_flows_reclaimed);
                }
            }
            Admission::Full => {
                inc(&self.stats.drop_flow_table_full);
                return None;
            }
        }
        let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let Ok(socket) = UdpSocket::bind(bind).and_then(|s| s.connect(target).map(|()| s)) else {
            inc(&self.stats.drop_flow_table_full);
            return None;
        };
        let _ = socket.set_nonblocking(true);
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event
        // that the kernel only reads.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket.as_raw_fd(), &mut ev) };
        if rc != 0 {
            inc(&self.stats.drop_flow_table_full);
            return None;
        }
        inc(&self.stats.udp_flows_opened);
        self.shares.add(identity);
        self.index.insert(key, token);
        self.by_agent_flow.entry(key.agent_flow()).or_default().insert(token);
        self.expiry.push(Reverse((now + self.limits.idle, token)));
        self.flows.insert(token, UdpFlow { key, socket, last: now, identity: Arc::clone(identity) });
        Some(token)
    }

    /// Reads every backend socket that epoll reports readable and hands
    /// each datagram to `reply` with its flow's key.
    pub(super) fn read_ready(&mut self, now: Instant, buf: &mut [u8], mut reply: impl FnMut(UdpKey, &[u8])) {
        loop {
            let cap = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
            // SAFETY: `events` is a live buffer of `cap` epoll_event entries
            // that the kernel fills; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), cap, 0) };
            let n = usize::try_from(n).unwrap_or(0);
            for i in 0..n {
                let Some(token) = self.events.get(i).map(|e| e.u64) else { continue };
                let Some(f) = self.flows.get_mut(&token) else { continue };
                loop {
                    inc(&self.stats.udp_backend_reads);
                    let Ok(len) = f.socket.recv(buf) else { break };
                    f.last = now;
                    inc(&self.stats.udp_from_backend);
                    reply(f.key, buf.get(..len).unwrap_or_default());
                }
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    /// Moves an agent flow's UDP flows to another agent flow key (parking
    /// and adopting); false if there were none.
    pub(super) fn rekey_agent_flow(&mut self, from: FlowKey, to: FlowKey) -> bool {
        let Some(tokens) = self.by_agent_flow.remove(&from) else { return false };
        for t in &tokens {
            let Some(f) = self.flows.get_mut(t) else { continue };
            self.index.remove(&f.key);
            f.key = UdpKey { session: to.session, flow: to.flow, ..f.key };
            self.index.insert(f.key, *t);
        }
        let moved = !tokens.is_empty();
        self.by_agent_flow.entry(to).or_default().extend(tokens);
        moved
    }

    /// Drops an agent flow's UDP flows.
    pub(super) fn remove_agent_flow(&mut self, key: FlowKey) {
        for t in self.by_agent_flow.remove(&key).unwrap_or_default() {
            self.remove(t);
        }
    }

    /// Drops every UDP flow of relay session `session`.
    pub(super) fn remove_session(&mut self, session: usize) {
        let keys: Vec<FlowKey> = self.by_agent_flow.keys().filter(|k| k.session == session).copied().collect();
        for k in keys {
            self.remove_agent_flow(k);
        }
    }

    fn remove(&mut self, token: u64) {
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
        // Closing the socket takes it out of the epoll set.
    }

    /// Expires flows idle for the idle timeout; returns how many.
    pub(super) fn expire(&mut self, now: Instant) -> u64 {
        let mut gone = 0;
        while let Some(Reverse((due, token))) = self.expiry.peek().copied() {
            if due > now {
                break;
            }
            self.expiry.pop();
            let Some(f) = self.flows.get(&token) else { continue };
            let until = f.last + self.limits.idle;
            if until <= now {
                self.remove(token);
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
