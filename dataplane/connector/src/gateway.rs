//! The connector's IP layer: tunneled IP packets of agent flows in, packets
//! for those flows and backend socket calls out. It knows services and
//! backends, not relays: an agent is a [`FlowKey`] (its end-to-end session) that the
//! [`crate::Engine`] maps to that session.
//!
//! It answers ICMP echo itself, keeps a UDP flow table ([`crate::udp`]) and
//! terminates TCP in smoltcp ([`crate::tcp`]). Only the configured
//! (protocol, port) → backend pairs are reachable: anything else is dropped
//! and counted (a TCP SYN is answered with an RST, as a closed port would).
//! IPv4 packets larger than the tunnel MTU with DF set are answered with
//! ICMP "fragmentation needed".

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_control::packet::{self, TcpFlags, Transport};

use crate::backend::{BackendEvent, BackendId, BackendIo, Interest};
use crate::config::{self, ConnectorConfig, Proto, ServiceConfig, Target};
use crate::tcp::{self, TcpEngine, TcpLimits, Tuple, TxOutcome, Verdict};
use crate::udp::{UdpKey, UdpLimits, UdpTable};
use crate::vdev::TUNNEL_MTU;
use crate::{add, inc, ConnectorStats};

/// An agent's end-to-end session: (session slot, generation), see
/// `peers.rs`. The gateway treats it as an opaque name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub session: usize,
    pub flow: u32,
}

/// The IP layer of a connector.
pub struct Gateway {
    services: Vec<ServiceConfig>,
    /// Backend targets as resolved by the driver.
    targets: HashMap<Target, SocketAddr>,
    udp: UdpTable,
    tcp: TcpEngine,
    stats: Arc<ConnectorStats>,
    /// The packet being built for the agent.
    pkt: Vec<u8>,
}

impl Gateway {
    /// A gateway for `cfg`'s services and limits; `targets` holds the
    /// address of every backend target the services name (a target
    /// missing from it is treated as not configured).
    pub fn new(
        cfg: &ConnectorConfig,
        targets: HashMap<Target, SocketAddr>,
        stats: Arc<ConnectorStats>,
        seed: u64,
        now: Instant,
    ) -> Gateway {
        let tcp_limits = TcpLimits {
            max_flows: cfg.max_tcp_flows,
            flows_per_identity: cfg.tcp_flows_per_identity(),
            max_per_flow: cfg.max_tcp_per_flow,
            max_conns: cfg.max_tcp_connections,
            conns_per_identity: cfg.tcp_connections_per_identity(),
            queue_per_identity: cfg.max_tcp_queued_packets_per_identity,
            buffer: cfg.tcp_buffer_bytes,
            idle: Duration::from_secs(cfg.tcp_idle_secs),
            connect_timeout: config::TCP_CONNECT_TIMEOUT,
        };
        let udp_limits = UdpLimits {
            max_flows: cfg.max_udp_flows,
            per_agent_flow: cfg.max_udp_flows_per_agent,
            per_identity: cfg.udp_flows_per_identity(),
            idle: Duration::from_secs(cfg.udp_idle_secs),
        };
        Gateway {
            services: cfg.services.clone(),
            targets,
            udp: UdpTable::new(udp_limits, Arc::clone(&stats)),
            tcp: TcpEngine::new(tcp_limits, Arc::clone(&stats), seed, now),
            stats,
            pkt: Vec::with_capacity(2048),
        }
    }

    /// One IP packet of agent flow `key`, for service `si` (index into the
    /// configured services) from agent identity `who`. Returns the packet
    /// to send back on the same flow at once, if any (an echo reply, an
    /// ICMP error, an RST); TCP's other answers come from
    /// [`Gateway::drain_tx`].
    pub fn handle_ip(
        &mut self,
        now: Instant,
        key: FlowKey,
        (si, who): (usize, &Arc<str>),
        ip: &[u8],
        io: &mut dyn BackendIo,
    ) -> Option<&[u8]> {
        if packet::ip_version(ip) == Some(6) {
            inc(&self.stats.drop_ipv6);
            return None;
        }
        let Ok(v4) = packet::parse_ipv4(ip) else {
            inc(&self.stats.drop_malformed);
            return None;
        };
        // Both ends must be unicast hosts: smoltcp asserts on answering
        // 0.0.0.0 (found by the ip_packet fuzz target), and nothing good
        // comes of tunneled broadcast or multicast.
        let host = |a: Ipv4Addr| !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
        if !host(v4.src) || !host(v4.dst) {
            inc(&self.stats.drop_malformed);
            return None;
        }
        if v4.total_len() > TUNNEL_MTU && v4.dont_fragment {
            inc(&self.stats.drop_too_big);
            // From the address the agent sent to, as the hop that cannot
            // carry the packet; the MTU is what the tunnel carries safely.
            let built = packet::build_icmp_frag_needed(ip, v4.dst, TUNNEL_MTU as u16, &mut self.pkt).is_ok();
            return built.then_some(self.pkt.as_slice());
        }
        let svc = self.services.get(si)?;
        let target = |proto: Proto, port: u16| {
            svc.backend
                .iter()
                .find(|b| b.protocol == proto && b.port == port)
                .and_then(|b| self.targets.get(&b.target).copied())
        };
        match packet::parse_transport(&v4) {
            Ok(Transport::IcmpEcho { request: true, .. }) if svc.icmp => {
                if packet::build_icmp_echo_reply(&v4, &mut self.pkt).is_ok() {
                    inc(&self.stats.icmp_echo_replies);
                    return Some(self.pkt.as_slice());
                }
                None
            }
            Ok(Transport::Udp { src_port, dst_port, payload }) => {
                let Some(target) = target(Proto::Udp, dst_port) else {
                    inc(&self.stats.drop_not_allowed);
                    return None;
                };
                let k = UdpKey {
                    session: key.session,
                    flow: key.flow,
                    agent: SocketAddrV4::new(v4.src, src_port),
                    service_addr: SocketAddrV4::new(v4.dst, dst_port),
                };
                self.udp.send(k, who, target, payload, now, io);
                None
            }
            Ok(Transport::Tcp { src_port, dst_port, header, payload }) => {
                let t =
                    Tuple { agent: SocketAddrV4::new(v4.src, src_port), service: SocketAddrV4::new(v4.dst, dst_port) };
                let verdict = match target(Proto::Tcp, dst_port) {
                    Some(target) => {
                        let whole = ip.get(..v4.total_len()).unwrap_or(ip);
                        self.tcp.input(key, who, t, &header, whole, target, now, io)
                    }
                    None => {
                        inc(&self.stats.drop_not_allowed);
                        // Refuse connection attempts as a closed port does.
                        let syn = header.flags.contains(TcpFlags::SYN) && !header.flags.contains(TcpFlags::ACK);
                        if syn {
                            Verdict::Reset
                        } else {
                            Verdict::Dropped
                        }
                    }
                };
                let rst = verdict == Verdict::Reset && tcp::build_rst(&t, &header, payload.len(), &mut self.pkt);
                rst.then_some(self.pkt.as_slice())
            }
            Ok(_) => {
                inc(&self.stats.drop_not_allowed);
                None
            }
            Err(_) => {
                inc(&self.stats.drop_malformed);
                None
            }
        }
    }

    /// Something from a backend socket. A UDP reply comes back as the
    /// packet to send on its agent flow; TCP readiness is acted on at the
    /// next [`Gateway::poll`].
    pub fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>) -> Option<(FlowKey, &[u8])> {
        match ev {
            BackendEvent::UdpData { id, payload } => {
                let k = self.udp.on_reply(id, now)?;
                // Reply as the service address the agent sent to.
                if packet::build_ipv4_udp(k.service_addr, k.agent, payload, &mut self.pkt).is_err() {
                    inc(&self.stats.drop_send_to_agent);
                    return None;
                }
                Some((FlowKey { session: k.session, flow: k.flow }, self.pkt.as_slice()))
            }
            BackendEvent::TcpReady { id } => {
                self.tcp.on_ready(id);
                None
            }
        }
    }

    /// Runs what is due: TCP (smoltcp, backend connects, the proxies) and
    /// the expiry of idle UDP flows.
    pub fn poll(&mut self, now: Instant, io: &mut dyn BackendIo) {
        self.tcp.service(now, io);
        let gone = self.udp.expire(now, io);
        add(&self.stats.udp_flows_expired, gone);
    }

    /// Hands every TCP packet waiting for the agents to `send`, until the
    /// relay session of a flow refuses more ([`TxOutcome::Blocked`]).
    pub fn drain_tx(&mut self, now: Instant, send: impl FnMut(FlowKey, &[u8]) -> TxOutcome) {
        self.tcp.drain_tx(now, send);
    }

    /// When [`Gateway::poll`] has work at the latest (UDP expiry is not
    /// urgent: it runs whenever the engine turns).
    pub fn next_timeout(&self, now: Instant) -> Option<Instant> {
        self.tcp.next_deadline(now)
    }

    /// Appends every TCP backend socket that waits for something.
    pub fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        self.tcp.interest(out);
    }

    /// Drops a flow's TCP connections (reset) and UDP flows.
    pub fn drop_flow_state(&mut self, key: FlowKey, io: &mut dyn BackendIo) {
        self.udp.remove_agent_flow(key, io);
        self.tcp.remove_flow(key, io);
    }

    /// UDP flows (backend sockets) open.
    pub fn udp_flows(&self) -> usize {
        self.udp.len()
    }

    /// TCP connections held (including those whose backend is connecting).
    pub fn tcp_connections(&self) -> usize {
        self.tcp.connections()
    }
}

#[cfg(test)]
mod tests;
