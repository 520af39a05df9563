//! The connector's userspace TCP endpoint: terminates the agent's TCP
//! connections in smoltcp and proxies each one to a real TCP connection to
//! its configured backend.
//!
//! # State
//!
//! Everything is keyed by (relay session index, connector-leg flow id): many
//! agents may use the same inner addresses (every agent a 10.x source, one
//! service VIP), and a flow is one agent's traffic to one service. Each flow
//! with TCP traffic gets its own smoltcp [`Interface`] (any-IP, so it accepts
//! whatever service address the agent used) over a [`QueueDevice`], created
//! on the first SYN and dropped when its last connection is gone. Within a
//! flow a connection is keyed by its 4-tuple.
//!
//! # Connection life
//!
//! 1. A SYN to a configured (port → backend) starts a non-blocking connect
//!    to the backend and is held; retransmitted SYNs are absorbed.
//! 2. Backend connected: a smoltcp socket listens on the exact service
//!    endpoint and the held SYN is fed to it, so the agent gets its SYN-ACK
//!    only when the backend is really there. Backend refused or connect
//!    timeout: the agent gets an RST (as from a closed port).
//! 3. Proxying, with flow control both ways and no buffer of our own:
//!    agent → backend moves bytes out of the smoltcp receive buffer only as
//!    far as the backend's `write` accepts; what stays shrinks the window
//!    advertised to the agent. Backend → agent reads from the backend only
//!    as much as the smoltcp send buffer has room for, so the backend's own
//!    TCP window closes when the agent does not read.
//! 4. FIN either way is passed on as a half-close (`shutdown(Write)` on the
//!    backend, `close()` on the smoltcp socket). An RST from the agent, a
//!    backend error, or the idle timeout aborts both sides (RST to the agent
//!    through smoltcp, SO_LINGER 0 close to the backend).
//!
//! The backend sockets are the driver's: the engine names them with
//! [`BackendId`]s and reads and writes them through [`BackendIo`] calls,
//! which is what lets the proxy move only what the other side takes.
//!
//! Memory is bounded by the limits: at most `max_flows` interfaces, at most
//! `max_per_flow` connections per flow and `max_conns` in total, each with
//! two smoltcp buffers of `buffer` bytes; device queues are bounded in
//! packets. Interfaces and connections are also shared per agent identity
//! ([`super::fair`]): an identity holds at most `flows_per_identity`
//! interfaces and `conns_per_identity` connections, and a full table gives
//! a newcomer below its share the least recently used connection (or flow)
//! of the identity holding the most, reset on both sides. A SYN refused by
//! any limit is answered with an RST and counted.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpCidr};
use ztna_control::packet::{self, TcpFlags, TcpHeader};
use ztna_control::rng::SplitMix64;

mod service;

use self::service::service_flow;
use crate::backend::{BackendId, BackendIo, Interest};
use crate::fair::{Admission, Shares};
use crate::gateway::FlowKey;
use crate::vdev::{smol_instant, QueueBudget, QueueDevice};
use crate::{inc, ConnectorStats};

/// Received packets queued per flow before smoltcp runs (the connector's
/// loop runs smoltcp after every batch of datagrams, so this only needs to
/// hold one batch).
const RX_QUEUE: usize = 1024;
/// Packets smoltcp may queue per flow for the relay before it must wait.
const TX_QUEUE: usize = 256;
/// The interface's own address; with any-IP and a default route through it,
/// the interface accepts every unicast destination and can answer any source.
const IFACE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// How long to wait after the relay refused a datagram (queue full) before
/// smoltcp is run again for that flow.
const TX_BLOCKED_RETRY: Duration = Duration::from_millis(5);

/// Limits of the TCP endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpLimits {
    pub max_flows: usize,
    pub flows_per_identity: usize,
    pub max_per_flow: usize,
    pub max_conns: usize,
    pub conns_per_identity: usize,
    /// Packets queued in the smoltcp devices of one identity's flows
    /// (received and to send, over all its flows).
    pub queue_per_identity: usize,
    /// Size of each smoltcp socket buffer (receive and send).
    pub buffer: usize,
    pub idle: Duration,
    pub connect_timeout: Duration,
}

/// A connection's addresses as the agent sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    pub agent: SocketAddrV4,
    pub service: SocketAddrV4,
}

/// What the caller does with a segment it handed to [`TcpEngine::input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Taken (queued for smoltcp, held, or absorbed).
    Taken,
    /// Answer with an RST (see [`build_rst`]); already counted.
    Reset,
    /// Dropped silently; already counted where it matters.
    Dropped,
}

/// Outcome of handing one packet to the relay session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    Sent,
    /// Lost for good (too large, not connected); TCP retransmits.
    Dropped,
    /// The session's DATAGRAM queue is full: keep the packet, try later.
    Blocked,
}

enum Phase {
    /// Backend connect in progress; the agent's SYN waits.
    Connecting { syn: Vec<u8>, syn_header: TcpHeader, since: Instant },
    /// Proxying through the smoltcp socket `handle`.
    Open { handle: SocketHandle },
}

struct Conn {
    backend: BackendId,
    phase: Phase,
    /// Last segment from the agent or byte moved either way.
    last: Instant,
    /// The backend became ready since the last service pass.
    ready: bool,
    /// A backend write would block: wait for POLLOUT.
    want_write: bool,
    /// The backend sent FIN (read returned 0).
    backend_eof: bool,
    /// The agent's FIN has been seen by smoltcp.
    agent_fin: bool,
    /// The agent's FIN has been passed on (shutdown(Write) on the backend).
    backend_shut: bool,
    /// Ends at the next cleanup (after smoltcp sent the RST if aborted).
    dead: bool,
}

impl Conn {
    fn interest(&self, sockets: &SocketSet<'_>) -> Interest {
        match &self.phase {
            Phase::Connecting { .. } => Interest { read: false, write: true },
            Phase::Open { handle } => {
                if self.dead {
                    return Interest::default();
                }
                let s = sockets.get::<tcp::Socket>(*handle);
                Interest {
                    read: !self.backend_eof && s.may_send() && s.send_queue() < s.send_capacity(),
                    write: self.want_write,
                }
            }
        }
    }

    /// Closes the backend: with a FIN once both sides finished, with an
    /// RST otherwise.
    fn close_backend(&self, io: &mut dyn BackendIo) {
        io.tcp_close(self.backend, self.dead || !(self.agent_fin && self.backend_eof));
    }
}

struct Flow {
    /// The agent identity whose flow this is.
    identity: Arc<str>,
    /// Last segment from the agent.
    last: Instant,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    conns: HashMap<Tuple, Conn>,
    /// Packets were queued for smoltcp, or a backend is ready.
    dirty: bool,
    /// The relay refused a datagram of this flow (queue full).
    tx_blocked: bool,
    /// When this flow needs service at the latest.
    deadline: Option<Instant>,
}

/// All TCP state of a connector.
pub(crate) struct TcpEngine {
    flows: HashMap<FlowKey, Flow>,
    /// Flows and connections by agent identity.
    flow_shares: Shares,
    conn_shares: Shares,
    /// Queue budget per identity, shared by its flows' devices.
    queue_budgets: HashMap<Arc<str>, Arc<QueueBudget>>,
    limits: TcpLimits,
    stats: Arc<ConnectorStats>,
    epoch: Instant,
    rng: SplitMix64,
    /// Backend socket → its connection.
    by_backend: HashMap<BackendId, (FlowKey, Tuple)>,
    /// Backend ids are `next_backend << 1`: even, so they never meet the
    /// UDP table's (odd) ones.
    next_backend: u64,
    /// Packets of flows removed to make room (their RSTs), sent by the next
    /// [`TcpEngine::drain_tx`] or dropped if the relay refuses them.
    orphan_tx: Vec<(FlowKey, Vec<u8>)>,
    scratch: Vec<u8>,
}

/// Builds the RST answering `header` (a segment from `t.agent` to
/// `t.service` with `payload_len` data bytes) into `out`, per RFC 9293
/// §3.10.7.1. False (and `out` empty) when `header` is itself an RST.
pub(crate) fn build_rst(t: &Tuple, header: &TcpHeader, payload_len: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    if header.flags.contains(TcpFlags::RST) {
        return false;
    }
    let rst = if header.flags.contains(TcpFlags::ACK) {
        TcpHeader { seq: header.ack, ack: 0, flags: TcpFlags::RST, window: 0, mss: None }
    } else {
        let syn_fin = u32::from(header.flags.contains(TcpFlags::SYN)) + u32::from(header.flags.contains(TcpFlags::FIN));
        let len = u32::try_from(payload_len).unwrap_or(0);
        TcpHeader {
            seq: 0,
            ack: header.seq.wrapping_add(len).wrapping_add(syn_fin),
            flags: TcpFlags::RST | TcpFlags::ACK,
            window: 0,
            mss: None,
        }
    };
    packet::build_ipv4_tcp(t.service, t.agent, &rst, &[], out).is_ok()
}

impl TcpEngine {
    pub(crate) fn new(limits: TcpLimits, stats: Arc<ConnectorStats>, seed: u64, now: Instant) -> TcpEngine {
        TcpEngine {
            flows: HashMap::new(),
            flow_shares: Shares::new(limits.max_flows, limits.flows_per_identity),
            conn_shares: Shares::new(limits.max_conns, limits.conns_per_identity),
            queue_budgets: HashMap::new(),
            limits,
            stats,
            epoch: now,
            rng: SplitMix64::new(seed ^ 0x7463_705f_7365_6564),
            by_backend: HashMap::new(),
            next_backend: 0,
            orphan_tx: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Open connections (including those whose backend is connecting).
    pub(crate) fn connections(&self) -> usize {
        self.conn_shares.total()
    }

    fn new_flow(&mut self, identity: &Arc<str>, now: Instant) -> Flow {
        let limit = self.limits.queue_per_identity;
        let budget = self.queue_budgets.entry(Arc::clone(identity)).or_insert_with(|| QueueBudget::new(limit));
        let mut dev = QueueDevice::with_budget(RX_QUEUE, TX_QUEUE, false, Arc::clone(budget));
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = self.rng.next_u64();
        let mut iface = Interface::new(cfg, &mut dev, smol_instant(self.epoch, now));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IFACE_ADDR.into(), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(IFACE_ADDR);
        Flow {
            identity: Arc::clone(identity),
            last: now,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            dirty: false,
            tx_blocked: false,
            deadline: None,
        }
    }

    /// Takes a TCP segment from the agent on `key`, already parsed and
    /// checked: `t.service` is an allowed (address, port) whose backend is
    /// `target`. `ip` is the whole IP packet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn input(
        &mut self,
        key: FlowKey,
        identity: &Arc<str>,
        t: Tuple,
        header: &TcpHeader,
        ip: &[u8],
        target: SocketAddr,
        now: Instant,
        io: &mut dyn BackendIo,
    ) -> Verdict {
        let f = header.flags;
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.last = now;
            if let Some(c) = flow.conns.get_mut(&t) {
                match c.phase {
                    Phase::Connecting { .. } => {
                        // Retransmitted SYNs wait with the first; an RST
                        // cancels the attempt.
                        if f.contains(TcpFlags::RST) {
                            c.dead = true;
                            flow.dirty = true;
                        }
                        return Verdict::Taken;
                    }
                    Phase::Open { .. } => {
                        c.last = now;
                        if !flow.dev.push_rx(ip) {
                            inc(&self.stats.drop_tcp_queue_full);
                            return Verdict::Dropped;
                        }
                        flow.dirty = true;
                        return Verdict::Taken;
                    }
                }
            }
        }
        let syn = f.contains(TcpFlags::SYN) && !f.contains(TcpFlags::ACK) && !f.contains(TcpFlags::RST);
        if !syn {
            if f.contains(TcpFlags::RST) {
                return Verdict::Dropped;
            }
            inc(&self.stats.drop_tcp_no_connection);
            return Verdict::Reset;
        }
        let flow_conns = self.flows.get(&key).map(|f| f.conns.len());
        if !self.admit(key, identity, flow_conns, now, io) {
            return Verdict::Reset;
        }
        let backend = BackendId(self.next_backend << 1);
        self.next_backend = self.next_backend.wrapping_add(1);
        if let Err(e) = io.tcp_connect(backend, target) {
            tracing::debug!(%target, error = %e, "backend connect failed");
            inc(&self.stats.tcp_backend_connect_failed);
            return Verdict::Reset;
        }
        if flow_conns.is_none() {
            let flow = self.new_flow(identity, now);
            self.flows.insert(key, flow);
            self.flow_shares.add(identity);
        }
        let Some(flow) = self.flows.get_mut(&key) else {
            io.tcp_close(backend, true);
            return Verdict::Dropped;
        };
        self.conn_shares.add(identity);
        self.by_backend.insert(backend, (key, t));
        flow.conns.insert(
            t,
            Conn {
                backend,
                phase: Phase::Connecting { syn: ip.to_vec(), syn_header: *header, since: now },
                last: now,
                ready: false,
                want_write: false,
                backend_eof: false,
                agent_fin: false,
                backend_shut: false,
                dead: false,
            },
        );
        flow.deadline = Some(now);
        Verdict::Taken
    }

    /// Whether a new connection of `identity` on `key` (holding
    /// `flow_conns` connections, None: no flow yet) fits: per agent flow,
    /// per identity and in total, reclaiming the least recently used
    /// connection or flow of the identity holding the most when a table is
    /// full. A refusal is counted; the caller answers with an RST.
    fn admit(
        &mut self,
        key: FlowKey,
        identity: &Arc<str>,
        flow_conns: Option<usize>,
        now: Instant,
        io: &mut dyn BackendIo,
    ) -> bool {
        if flow_conns.is_some_and(|n| n >= self.limits.max_per_flow) {
            inc(&self.stats.drop_tcp_limit);
            return false;
        }
        if flow_conns.is_none() {
            match self.flow_shares.admit(identity) {
                Admission::Admit => {}
                Admission::OverShare => {
                    inc(&self.stats.tcp_refused_identity_share);
                    return false;
                }
                Admission::Reclaim(top) => {
                    let victim = self
                        .flows
                        .iter()
                        .filter(|(_, f)| f.identity == top)
                        .min_by_key(|(_, f)| f.last)
                        .map(|(k, _)| *k);
                    if let Some(v) = victim {
                        self.reclaim_flow(v, now, io);
                    }
                }
                Admission::Full => {
                    inc(&self.stats.drop_tcp_limit);
                    return false;
                }
            }
        }
        match self.conn_shares.admit(identity) {
            Admission::Admit => true,
            Admission::OverShare => {
                inc(&self.stats.tcp_refused_identity_share);
                false
            }
            Admission::Reclaim(top) => {
                let victim = self
                    .flows
                    .iter()
                    .filter(|(k, f)| f.identity == top && **k != key)
                    .flat_map(|(k, f)| f.conns.iter().map(move |(t, c)| (*k, *t, c.last)))
                    .min_by_key(|(_, _, last)| *last);
                if let Some((k, t, _)) = victim {
                    self.reclaim_conn(k, t, now, io);
                }
                true
            }
            Admission::Full => {
                inc(&self.stats.drop_tcp_limit);
                false
            }
        }
    }

    /// Resets connection `t` of flow `key` on both sides and forgets it at
    /// once (its RST to the agent is queued on the flow).
    fn reclaim_conn(&mut self, key: FlowKey, t: Tuple, now: Instant, io: &mut dyn BackendIo) {
        let Some(flow) = self.flows.get_mut(&key) else { return };
        let Some(c) = flow.conns.remove(&t) else { return };
        self.by_backend.remove(&c.backend);
        match &c.phase {
            Phase::Connecting { syn_header, .. } => {
                if build_rst(&t, syn_header, 0, &mut self.scratch) {
                    flow.dev.push_tx(self.scratch.clone());
                }
            }
            Phase::Open { handle } => {
                flow.sockets.get_mut::<tcp::Socket>(*handle).abort();
                flow.iface.poll(smol_instant(self.epoch, now), &mut flow.dev, &mut flow.sockets);
                flow.sockets.remove(*handle);
            }
        }
        io.tcp_close(c.backend, true);
        self.conn_shares.remove(&flow.identity);
        inc(&self.stats.tcp_connections_reclaimed);
        inc(&self.stats.tcp_connections_closed);
    }

    /// Resets every connection of flow `key` and removes the flow; what it
    /// still had to send (the RSTs among it) moves to [`TcpEngine::orphan_tx`].
    fn reclaim_flow(&mut self, key: FlowKey, now: Instant, io: &mut dyn BackendIo) {
        let tuples: Vec<Tuple> = self.flows.get(&key).map(|f| f.conns.keys().copied().collect()).unwrap_or_default();
        for t in tuples {
            self.reclaim_conn(key, t, now, io);
        }
        if let Some(mut f) = self.flows.remove(&key) {
            self.flow_shares.remove(&f.identity);
            while let Some(p) = f.dev.pop_tx() {
                self.orphan_tx.push((key, p));
            }
            drop(f);
            self.forget_unused_budgets();
        }
    }

    /// Appends every backend socket that waits for something, with what
    /// it waits for.
    pub(crate) fn interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        for flow in self.flows.values() {
            for c in flow.conns.values() {
                let i = c.interest(&flow.sockets);
                if i != Interest::default() {
                    out.push((c.backend, i));
                }
            }
        }
    }

    /// Backend socket `id` is ready: its flow gets a service pass.
    pub(crate) fn on_ready(&mut self, id: BackendId) {
        let Some((k, t)) = self.by_backend.get(&id) else { return };
        if let Some(flow) = self.flows.get_mut(k) {
            if let Some(c) = flow.conns.get_mut(t) {
                c.ready = true;
                flow.dirty = true;
            }
        }
    }

    /// When the engine needs [`TcpEngine::service`] at the latest.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.flows.values().filter_map(|f| if f.dirty { Some(now) } else { f.deadline }).min()
    }

    /// Runs smoltcp and the proxies of every flow that has input, ready
    /// backends or due timers.
    pub(crate) fn service(&mut self, now: Instant, io: &mut dyn BackendIo) {
        let limits = self.limits;
        let epoch = self.epoch;
        let mut closed = Vec::new();
        for flow in self.flows.values_mut() {
            let due = flow.dirty || flow.deadline.is_some_and(|d| d <= now);
            if due {
                closed.clear();
                service_flow(flow, now, epoch, &limits, &self.stats, &mut self.scratch, io, &mut closed);
                for id in &closed {
                    self.by_backend.remove(id);
                    self.conn_shares.remove(&flow.identity);
                }
            }
        }
        let flow_shares = &mut self.flow_shares;
        let before = self.flows.len();
        self.flows.retain(|_, f| {
            let keep = !f.conns.is_empty() || f.dev.tx_len() > 0;
            if !keep {
                flow_shares.remove(&f.identity);
            }
            keep
        });
        if self.flows.len() < before {
            self.forget_unused_budgets();
        }
    }

    /// Hands every packet smoltcp (or the engine) wants to send to `send`,
    /// until the relay session of a flow refuses more.
    pub(crate) fn drain_tx(&mut self, now: Instant, mut send: impl FnMut(FlowKey, &[u8]) -> TxOutcome) {
        let mut blocked: Vec<usize> = Vec::new();
        for (k, p) in std::mem::take(&mut self.orphan_tx) {
            if send(k, &p) != TxOutcome::Sent {
                inc(&self.stats.drop_send_to_agent);
            }
        }
        for (k, flow) in self.flows.iter_mut() {
            if blocked.contains(&k.session) {
                flow.tx_blocked = flow.dev.tx_len() > 0;
                continue;
            }
            flow.tx_blocked = false;
            while let Some(p) = flow.dev.pop_tx() {
                match send(*k, &p) {
                    TxOutcome::Sent => {}
                    TxOutcome::Dropped => inc(&self.stats.drop_send_to_agent),
                    TxOutcome::Blocked => {
                        flow.dev.unpop_tx(p);
                        flow.tx_blocked = true;
                        blocked.push(k.session);
                        break;
                    }
                }
            }
            if flow.tx_blocked {
                let retry = now + TX_BLOCKED_RETRY;
                flow.deadline = Some(flow.deadline.map_or(retry, |d| d.max(retry)));
            }
        }
    }

    /// Budgets no flow holds any more (only the map's reference is left).
    fn forget_unused_budgets(&mut self) {
        self.queue_budgets.retain(|_, b| Arc::strong_count(b) > 1);
    }

    /// Drops a flow's connections (the relay closed the flow).
    pub(crate) fn remove_flow(&mut self, key: FlowKey, io: &mut dyn BackendIo) {
        if let Some(f) = self.flows.remove(&key) {
            self.flow_shares.remove(&f.identity);
            for c in f.conns.values() {
                self.conn_shares.remove(&f.identity);
                self.by_backend.remove(&c.backend);
                io.tcp_close(c.backend, true);
                inc(&self.stats.tcp_connections_closed);
            }
            self.forget_unused_budgets();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;
    use ztna_control::packet::{parse_ipv4, parse_transport, Transport};

    fn tuple() -> Tuple {
        Tuple { agent: "10.0.0.2:40000".parse().unwrap(), service: "100.64.0.1:80".parse().unwrap() }
    }

    fn rst_of(out: &[u8]) -> (TcpHeader, u16, u16) {
        let ip = parse_ipv4(out).unwrap();
        assert_eq!(ip.src, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(ip.dst, Ipv4Addr::new(10, 0, 0, 2));
        match parse_transport(&ip).unwrap() {
            Transport::Tcp { src_port, dst_port, header, payload } => {
                assert!(payload.is_empty());
                (header, src_port, dst_port)
            }
            other => panic!("not TCP: {other:?}"),
        }
    }

    #[test]
    fn rst_for_syn_acks_it() {
        let syn = TcpHeader { seq: 1000, ack: 0, flags: TcpFlags::SYN, window: 65535, mss: Some(1240) };
        let mut out = Vec::new();
        assert!(build_rst(&tuple(), &syn, 0, &mut out));
        let (h, sp, dp) = rst_of(&out);
        assert_eq!((sp, dp), (80, 40000));
        assert_eq!(h.flags, TcpFlags::RST | TcpFlags::ACK);
        assert_eq!(h.ack, 1001);
        assert_eq!(h.seq, 0);
    }

    #[test]
    fn rst_for_ack_uses_its_ack_number() {
        let seg = TcpHeader { seq: 5, ack: 77, flags: TcpFlags::ACK | TcpFlags::PSH, window: 100, mss: None };
        let mut out = Vec::new();
        assert!(build_rst(&tuple(), &seg, 10, &mut out));
        let (h, _, _) = rst_of(&out);
        assert_eq!(h.flags, TcpFlags::RST);
        assert_eq!(h.seq, 77);
    }

    #[test]
    fn no_rst_for_rst() {
        let seg = TcpHeader { seq: 5, ack: 0, flags: TcpFlags::RST, window: 0, mss: None };
        let mut out = Vec::new();
        assert!(!build_rst(&tuple(), &seg, 0, &mut out));
        assert!(out.is_empty());
    }
}
