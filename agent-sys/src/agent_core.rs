//! The sans-I/O agent core.
//!
//! The caller (the C API in a packet-tunnel extension, the Linux TUN agent,
//! tests) feeds it received UDP datagrams, outbound IP packets from the
//! tunnel device and the time; it yields UDP datagrams to send, inbound IP
//! packets for the tunnel, events and its next deadline. Connection,
//! registration, keepalive and reconnect with backoff are the shared
//! [`ClientSession`]; this layer adds routing by destination.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_control::client::{ClientConfig, ClientSession, Event, SendError};
use ztna_control::quic::{self, TlsConfigError, TlsOptions};
use ztna_control::{datagram, Code, Role, ServiceName};

use crate::route::{Cidr, RouteTable};

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
}

/// Something the embedding application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Connected,
    ObservedAddress(SocketAddr),
    Registered {
        service: ServiceName,
        flow: u32,
    },
    RegisterFailed {
        service: ServiceName,
        code: Code,
        reason: String,
    },
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// The relay is going away (drain/shutdown); a reconnect follows.
    Goodbye {
        code: Code,
    },
}

/// Why an outbound packet was not sent (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IPv4/IPv6 packet, or too short to carry a destination.
    Malformed,
    /// No route for the destination: never leaves the device.
    Unmapped,
    /// The service is mapped but not (yet) registered.
    NoFlow,
    /// Larger than the path to the relay allows.
    TooLarge,
    /// Not connected, or the send queue is full.
    Backpressure,
}

/// Why [`AgentCore::new`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The TLS material is unusable.
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsConfigError),
}

/// Counters (all monotonically increasing).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub drop_malformed: u64,
    pub drop_unmapped: u64,
    pub drop_no_flow: u64,
    pub drop_too_large: u64,
    pub drop_backpressure: u64,
    /// Inbound datagrams on a flow this agent does not hold.
    pub drop_unknown_flow: u64,
    /// Inbound packets larger than the caller's buffer.
    pub drop_truncated: u64,
    /// Inbound packets whose source address is not in the prefixes of the
    /// service their flow belongs to (a connector speaking for another
    /// service, or for the agent's own host).
    pub drop_spoofed: u64,
    pub connects: u64,
    pub disconnects: u64,
}

/// The agent core.
pub struct AgentCore {
    session: ClientSession,
    routes: RouteTable,
    /// Registered service → flow id, and the reverse.
    flows: HashMap<ServiceName, u32>,
    services_by_flow: HashMap<u32, ServiceName>,
    stats: AgentStats,
    observed: Option<SocketAddr>,
    /// Packets the agent itself answers toward the tunnel (ICMP
    /// fragmentation-needed for too-big packets); bounded.
    local_replies: VecDeque<Vec<u8>>,
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
        let qc = quic::client_config(&cfg.tls)?;
        if !cfg.tls.verify_peer {
            tracing::warn!("relay certificate verification is OFF: anyone on the path can impersonate the relay");
        }
        if cfg.tls.cert_pem.is_none() {
            tracing::warn!("no client certificate configured: the relay will refuse this agent");
        }
        Ok(AgentCore {
            session: ClientSession::new(ccfg, qc, seed, now),
            routes,
            flows: HashMap::new(),
            services_by_flow: HashMap::new(),
            stats: AgentStats::default(),
            observed: None,
            local_replies: VecDeque::new(),
        })
    }

    pub fn stats(&self) -> AgentStats {
        let c = self.session.stats();
        AgentStats {
            connects: c.connects,
            disconnects: c.disconnects,
            drop_truncated: self.stats.drop_truncated + c.datagrams_dropped_too_large,
            ..self.stats
        }
    }

    /// The driver rebound its UDP socket: the next connection attempt uses
    /// this local address.
    pub fn set_local(&mut self, local: SocketAddr) {
        self.session.set_local(local);
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

    /// A UDP datagram received from the relay.
    pub fn recv_udp(&mut self, data: &mut [u8], from: SocketAddr, now: Instant) {
        self.session.recv(data, from, now);
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
        let flow = *self.flows.get(service).ok_or(DropReason::NoFlow)?;
        match self.session.send_datagram(flow, pkt) {
            Ok(()) => Ok(()),
            Err(SendError::TooLarge) => Err(DropReason::TooLarge),
            Err(SendError::NotConnected | SendError::QueueFull) => Err(DropReason::Backpressure),
        }
    }

    /// Largest IP packet the tunnel can carry right now (for the device MTU).
    pub fn max_packet_size(&self) -> Option<usize> {
        // Flow ids stay below 2^14 for agents in practice; use the 4-byte
        // worst case so the answer holds for any flow.
        self.session.max_datagram_payload(datagram::MAX_FLOW)
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
        loop {
            let n = self.session.recv_datagram(out)?;
            let Some(d) = out.get(..n) else {
                self.stats.drop_truncated += 1;
                continue;
            };
            let Ok((flow, payload)) = datagram::parse(d) else {
                self.stats.drop_unknown_flow += 1;
                continue;
            };
            let Some(service) = self.services_by_flow.get(&flow) else {
                self.stats.drop_unknown_flow += 1;
                continue;
            };
            // A connector may only answer for its own service.
            let src = ztna_control::packet::source(payload);
            if src.and_then(|a| self.routes.lookup(a)) != Some(service) {
                self.stats.drop_spoofed += 1;
                continue;
            }
            let (len, start) = (payload.len(), n - payload.len());
            // Strip the flow header in place: one copy from quiche into
            // the caller's buffer, one memmove, no allocation.
            out.copy_within(start..n, 0);
            self.stats.packets_in += 1;
            self.stats.bytes_in += len as u64;
            return Some(len);
        }
    }

    /// Writes the next UDP datagram to send into `out`.
    pub fn poll_udp(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        self.session.poll_transmit(out, now)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.session.next_deadline()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        loop {
            let e = self.session.poll_event()?;
            let mapped = match e {
                Event::Connected => {
                    // Flow ids from an earlier connection are void.
                    self.flows.clear();
                    self.services_by_flow.clear();
                    Some(AgentEvent::Connected)
                }
                Event::ObservedAddress(a) => {
                    self.observed = Some(a);
                    Some(AgentEvent::ObservedAddress(a))
                }
                Event::Registered { service, flow, role: Role::Agent } => {
                    self.flows.insert(service.clone(), flow);
                    self.services_by_flow.insert(flow, service.clone());
                    Some(AgentEvent::Registered { service, flow })
                }
                Event::RegisterFailed { service, code, reason, .. } => {
                    Some(AgentEvent::RegisterFailed { service, code, reason })
                }
                Event::FlowClosed { flow, .. } => {
                    if let Some(s) = self.services_by_flow.remove(&flow) {
                        self.flows.remove(&s);
                    }
                    None
                }
                Event::Disconnected { reason, retry_in } => {
                    self.flows.clear();
                    self.services_by_flow.clear();
                    Some(AgentEvent::Disconnected { reason, retry_in })
                }
                Event::Goodbye { code, .. } => Some(AgentEvent::Goodbye { code }),
                Event::Registered { .. } | Event::FlowOpened { .. } => None,
            };
            if mapped.is_some() {
                return mapped;
            }
        }
    }

    /// Closes the session for good.
    pub fn close(&mut self) {
        self.session.close();
    }
}
