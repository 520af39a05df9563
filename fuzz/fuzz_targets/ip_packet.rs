#![no_main]
//! Tunneled IP packets: every parser and parser-driven builder of
//! `ztna_control::packet`, and the real connector engine's path for a
//! packet arriving from an agent: `ztna_connector::Gateway` (ICMP echo, the
//! port allow-list, UDP flows, the smoltcp TCP proxy) over
//! `MemoryBackends` (echo backends in memory; one TCP target refuses
//! connects), on a virtual clock. Every packet the connector sends to the
//! agent must parse again.
//!
//! The agent side is covered too: `source`/`destination` (routing and the
//! spoofing check) and `build_icmp_frag_needed` with the destination as the
//! router (its answer to a packet too big for the tunnel).
//!
//! Input: records `[tag][len: u16 BE][packet]` (see `ztna_fuzz::records`):
//! tag bit 0 = fix the checksums first (see `ztna_fuzz::ip`), bit 1 = set
//! a TCP packet's acknowledgment number to what the connector sent last on
//! its connection (so the fuzzer gets past the handshake; implies bit 0),
//! tag >> 2 = milliseconds × 10 that pass after the packet. The whole
//! input is also parsed as one raw packet.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ztna_connector::memory_backends::MemoryBackends;
use ztna_connector::{
    BackendId, BackendRoute, ConnectorConfig, ConnectorStats, FlowKey, Gateway, Interest, Proto, ServiceConfig, Target,
    TxOutcome,
};
use ztna_control::packet::{self, PacketError, TcpFlags, Transport};
use ztna_fuzz::ip::fix_checksums;
use ztna_fuzz::records::records;

/// The service's allow-list (as a connector config would have it): TCP 7
/// and 80, UDP 7 and 53; TCP 7's backend refuses connects.
const TCP_PORTS: [u16; 2] = [7, 80];
const UDP_PORTS: [u16; 2] = [7, 53];
const KEY: FlowKey = FlowKey { session: 0, flow: 4 };

fn backend(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

/// Checks what the connector sends to the agent: a well-formed IPv4 packet.
fn check_outbound(p: &[u8]) {
    let ip = packet::parse_ipv4(p).unwrap_or_else(|e| panic!("connector built an unparsable packet ({e}): {p:02x?}"));
    assert_eq!(ip.total_len(), p.len());
    if let Err(e) = packet::parse_transport(&ip) {
        panic!("connector built a packet with a bad transport ({e}): {p:02x?}");
    }
}

/// Every parser on raw bytes; nothing may panic, and what parses must be
/// consistent with the bytes.
fn parse_everything(p: &[u8]) {
    let v = packet::ip_version(p);
    let (src, dst) = (packet::source(p), packet::destination(p));
    assert_eq!(src.is_some(), dst.is_some());
    if src.is_some() {
        assert!(matches!(v, Some(4 | 6)));
    }
    let mut out = Vec::new();
    // The agent's answer to a packet too big for the tunnel.
    if let Some(IpAddr::V4(router)) = dst {
        match packet::build_icmp_frag_needed(p, router, 1280, &mut out) {
            Ok(()) => {
                let ip = packet::parse_ipv4(&out).expect("frag-needed parses");
                assert_eq!(packet::parse_transport(&ip), Ok(Transport::IcmpOther { ty: 3, code: 4 }));
                assert_eq!(Some(IpAddr::V4(ip.dst)), src);
            }
            Err(_) => assert!(out.is_empty()),
        }
    }
    let Ok(ip) = packet::parse_ipv4(p) else { return };
    assert_eq!(v, Some(4));
    assert!((20..=60).contains(&ip.header_len()));
    assert!(ip.total_len() <= p.len());
    assert_eq!(ip.header, &p[..ip.header_len()]);
    assert_eq!(ip.payload, &p[ip.header_len()..ip.total_len()]);
    assert_eq!((Some(IpAddr::V4(ip.src)), Some(IpAddr::V4(ip.dst))), (src, dst));
    let t = packet::parse_transport(&ip);
    match packet::build_icmp_echo_reply(&ip, &mut out) {
        Ok(()) => {
            let Ok(Transport::IcmpEcho { request: true, id, seq, payload }) = t else {
                panic!("echo reply built for {t:?}")
            };
            let r = packet::parse_ipv4(&out).expect("echo reply parses");
            assert_eq!((r.src, r.dst), (ip.dst, ip.src));
            assert_eq!(packet::parse_transport(&r), Ok(Transport::IcmpEcho { request: false, id, seq, payload }));
        }
        Err(PacketError::NotEchoRequest) => {
            assert!(t.is_ok() && !matches!(t, Ok(Transport::IcmpEcho { request: true, .. })))
        }
        Err(e) => assert_eq!(Err(e), t),
    }
    if let Ok(Transport::Tcp { payload, .. } | Transport::Udp { payload, .. } | Transport::IcmpEcho { payload, .. }) = t
    {
        assert!(payload.len() <= ip.payload.len());
    }
}

/// One connector gateway with one agent flow, its memory backends and a
/// virtual clock.
struct Harness {
    now: Instant,
    gw: Gateway,
    io: MemoryBackends,
    who: Arc<str>,
    /// (agent, service) → the sequence number after the last segment the
    /// connector sent there.
    next_seq: HashMap<(SocketAddrV4, SocketAddrV4), u32>,
    /// Packets for the agent.
    to_agent: Vec<Vec<u8>>,
}

impl Harness {
    fn new() -> Harness {
        let mut routes = Vec::new();
        let mut targets = HashMap::new();
        for (protocol, ports) in [(Proto::Tcp, TCP_PORTS), (Proto::Udp, UDP_PORTS)] {
            for port in ports {
                let target = Target::from(backend(port));
                targets.insert(target.clone(), backend(port));
                routes.push(BackendRoute { protocol, port, target });
            }
        }
        let svc = ServiceConfig { name: "fuzz".into(), icmp: true, backend: routes, allow_agents: None, path: Default::default() };
        let mut cfg = ConnectorConfig::new(Vec::new(), vec![svc]);
        // Small tables, so the fuzzer reaches their limits.
        cfg.max_tcp_per_flow = 4;
        cfg.max_udp_flows_per_agent = 4;
        cfg.tcp_buffer_bytes = 8192;
        let now = Instant::now();
        let mut io = MemoryBackends::default();
        io.tcp_window = 4096;
        io.refused.insert(backend(7));
        Harness {
            now,
            gw: Gateway::new(&cfg, targets, Arc::new(ConnectorStats::default()), 0x5eed, now),
            io,
            who: Arc::from("spiffe://fuzz/agent"),
            next_seq: HashMap::new(),
            to_agent: Vec::new(),
        }
    }

    /// One packet from the agent.
    fn handle_ip(&mut self, ip: &[u8]) {
        if let Some(reply) = self.gw.handle_ip(self.now, KEY, (0, &self.who), ip, &mut self.io) {
            self.to_agent.push(reply.to_vec());
        }
    }

    /// Lets `advance` pass, then runs backends and gateway until they are
    /// quiet (bounded); everything sent to the agent is checked.
    fn service(&mut self, advance: Duration) {
        self.now += advance;
        for _ in 0..8 {
            let mut interest: Vec<(BackendId, Interest)> = Vec::new();
            self.gw.backend_interest(&mut interest);
            let events = self.io.events(&interest);
            for ev in &events {
                if let Some((key, p)) = self.gw.handle_backend(self.now, ev.as_event()) {
                    assert_eq!(key, KEY, "a reply for a flow that does not exist");
                    self.to_agent.push(p.to_vec());
                }
            }
            self.gw.poll(self.now, &mut self.io);
            let out = &mut self.to_agent;
            self.gw.drain_tx(self.now, |key, p| {
                assert_eq!(key, KEY, "a packet for a flow that does not exist");
                out.push(p.to_vec());
                TxOutcome::Sent
            });
            if events.is_empty() {
                break;
            }
        }
        for p in self.to_agent.drain(..) {
            check_outbound(&p);
            let Ok(ip) = packet::parse_ipv4(&p) else { continue };
            if let Ok(Transport::Tcp { src_port, dst_port, header, payload }) = packet::parse_transport(&ip) {
                let f = header.flags;
                let len =
                    payload.len() as u32 + u32::from(f.contains(TcpFlags::SYN)) + u32::from(f.contains(TcpFlags::FIN));
                let key = (SocketAddrV4::new(ip.dst, dst_port), SocketAddrV4::new(ip.src, src_port));
                self.next_seq.insert(key, header.seq.wrapping_add(len));
            }
        }
        assert!(self.gw.tcp_connections() <= 4, "the per-flow TCP limit held");
        assert!(self.gw.udp_flows() <= 4, "the per-flow UDP limit held");
    }

    /// Sets the acknowledgment number of a TCP packet to what the
    /// connector sent last on that connection, if anything.
    fn patch_ack(&self, p: &mut [u8]) {
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != packet::PROTO_TCP {
            return;
        }
        let hl = usize::from(p[0] & 0x0f) * 4;
        let Some(tcp) = p.get(hl..hl + 12) else { return };
        let port = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
        let agent = SocketAddrV4::new(Ipv4Addr::new(p[12], p[13], p[14], p[15]), port(0));
        let service = SocketAddrV4::new(Ipv4Addr::new(p[16], p[17], p[18], p[19]), port(2));
        if let Some(ack) = self.next_seq.get(&(agent, service)) {
            p[hl + 8..hl + 12].copy_from_slice(&ack.to_be_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    parse_everything(data);
    let mut h = Harness::new();
    for (tag, bytes) in records(data) {
        let mut p = bytes.to_vec();
        if tag & 2 == 2 {
            h.patch_ack(&mut p);
        }
        if tag & 3 != 0 {
            fix_checksums(&mut p);
        }
        parse_everything(&p);
        h.handle_ip(&p);
        h.service(Duration::from_millis(u64::from(tag >> 2) * 10));
    }
});
