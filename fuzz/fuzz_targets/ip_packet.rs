#![no_main]
//! Tunneled IP packets: every parser and parser-driven builder of
//! `ztna_control::packet`, and the connector's path for a packet arriving
//! from an agent (`dataplane/connector/src/lib.rs` `handle_ip` and
//! `connector/tcp.rs`), mirrored with the public API because the
//! connector's TCP engine is crate-private:
//!
//! ip_version → parse_ipv4 → (over the tunnel MTU with DF:
//! build_icmp_frag_needed) → parse_transport → ICMP echo:
//! build_icmp_echo_reply; UDP: port allow-list; TCP: a SYN to an allowed
//! port opens a smoltcp listener on the exact service endpoint (any-IP
//! interface over `vdev::QueueDevice`, as the engine does once the backend
//! connected), later segments of the tuple go to smoltcp, the rest get the
//! engine's RST. Received bytes are echoed back (an echo backend). Every
//! packet the connector would send to the agent must parse again.
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
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::wire::{HardwareAddress, IpCidr, IpListenEndpoint};
use ztna_control::packet::{self, PacketError, TcpFlags, TcpHeader, Transport};
use ztna_connector::vdev::{smol_instant, QueueDevice, TUNNEL_MTU};
use ztna_fuzz::ip::fix_checksums;
use ztna_fuzz::records::records;

/// The service's allow-list (as a connector config would have it).
const TCP_PORTS: [u16; 2] = [7, 80];
const UDP_PORTS: [u16; 2] = [7, 53];
/// The engine's interface address (connector/tcp.rs IFACE_ADDR).
const IFACE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// Connections per flow in this harness.
const MAX_CONNS: usize = 4;

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

/// The engine's RST for a segment of no connection (connector/tcp.rs
/// `build_rst`, RFC 9293 §3.10.7.1).
fn rst_for(agent: SocketAddrV4, service: SocketAddrV4, h: &TcpHeader, payload_len: usize) -> Option<Vec<u8>> {
    if h.flags.contains(TcpFlags::RST) {
        return None;
    }
    let rst = if h.flags.contains(TcpFlags::ACK) {
        TcpHeader { seq: h.ack, ack: 0, flags: TcpFlags::RST, window: 0, mss: None }
    } else {
        let syn_fin = u32::from(h.flags.contains(TcpFlags::SYN)) + u32::from(h.flags.contains(TcpFlags::FIN));
        let len = u32::try_from(payload_len).unwrap_or(0);
        TcpHeader {
            seq: 0,
            ack: h.seq.wrapping_add(len).wrapping_add(syn_fin),
            flags: TcpFlags::RST | TcpFlags::ACK,
            window: 0,
            mss: None,
        }
    };
    let mut out = Vec::new();
    packet::build_ipv4_tcp(service, agent, &rst, &[], &mut out).expect("RST builds");
    Some(out)
}

/// One agent flow at the connector: the smoltcp side of the TCP engine.
struct Flow {
    epoch: Instant,
    now: Instant,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    conns: HashMap<(SocketAddrV4, SocketAddrV4), SocketHandle>,
    /// (agent, service) → the sequence number after the last segment the
    /// connector sent there.
    next_seq: HashMap<(SocketAddrV4, SocketAddrV4), u32>,
    /// Packets for the agent.
    to_agent: Vec<Vec<u8>>,
}

impl Flow {
    fn new() -> Flow {
        let epoch = Instant::now();
        let mut dev = QueueDevice::new(64, 64, false);
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = 0x5eed;
        let mut iface = Interface::new(cfg, &mut dev, smol_instant(epoch, epoch));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IFACE_ADDR.into(), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(IFACE_ADDR);
        Flow {
            epoch,
            now: epoch,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            next_seq: HashMap::new(),
            to_agent: Vec::new(),
        }
    }

    /// `connector.rs` `handle_ip` for one packet from the agent.
    fn handle_ip(&mut self, ip: &[u8]) {
        if packet::ip_version(ip) == Some(6) {
            return;
        }
        let Ok(v4) = packet::parse_ipv4(ip) else { return };
        // Both ends must be unicast hosts (connector.rs; a SYN from 0.0.0.0
        // made smoltcp assert: fuzz/regressions/ip_packet/).
        let host = |a: Ipv4Addr| !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
        if !host(v4.src) || !host(v4.dst) {
            return;
        }
        let mut out = Vec::new();
        if v4.total_len() > TUNNEL_MTU && v4.dont_fragment {
            if packet::build_icmp_frag_needed(ip, v4.dst, TUNNEL_MTU as u16, &mut out).is_ok() {
                self.to_agent.push(out);
            }
            return;
        }
        match packet::parse_transport(&v4) {
            Ok(Transport::IcmpEcho { request: true, .. }) => {
                if packet::build_icmp_echo_reply(&v4, &mut out).is_ok() {
                    self.to_agent.push(out);
                }
            }
            Ok(Transport::Udp { src_port, dst_port, payload }) => {
                if UDP_PORTS.contains(&dst_port) {
                    // An echo backend answers as the service address.
                    let (from, to) = (SocketAddrV4::new(v4.dst, dst_port), SocketAddrV4::new(v4.src, src_port));
                    if packet::build_ipv4_udp(from, to, payload, &mut out).is_ok() {
                        self.to_agent.push(out);
                    }
                }
            }
            Ok(Transport::Tcp { src_port, dst_port, header, payload }) => {
                let agent = SocketAddrV4::new(v4.src, src_port);
                let service = SocketAddrV4::new(v4.dst, dst_port);
                let whole = ip.get(..v4.total_len()).unwrap_or(ip);
                let f = header.flags;
                let syn = f.contains(TcpFlags::SYN) && !f.contains(TcpFlags::ACK) && !f.contains(TcpFlags::RST);
                let reset = if !TCP_PORTS.contains(&dst_port) {
                    syn
                } else if self.conns.contains_key(&(agent, service)) {
                    let _ = self.dev.push_rx(whole);
                    false
                } else if syn {
                    if self.conns.len() < MAX_CONNS {
                        self.open(agent, service, whole);
                    }
                    false
                } else {
                    !f.contains(TcpFlags::RST)
                };
                if reset {
                    if let Some(rst) = rst_for(agent, service, &header, payload.len()) {
                        self.to_agent.push(rst);
                    }
                }
            }
            Ok(_) | Err(_) => {}
        }
    }

    /// A SYN whose backend connected: a listener on the service endpoint
    /// gets the SYN (connector/tcp/service.rs `service_flow`).
    fn open(&mut self, agent: SocketAddrV4, service: SocketAddrV4, syn: &[u8]) {
        if !self.dev.push_rx(syn) {
            return;
        }
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0u8; 8192]), tcp::SocketBuffer::new(vec![0u8; 8192]));
        s.set_nagle_enabled(false);
        s.set_congestion_control(CongestionControl::Reno);
        if s.listen(IpListenEndpoint::from(service)).is_ok() {
            let h = self.sockets.add(s);
            self.conns.insert((agent, service), h);
        }
    }

    /// One service pass: smoltcp, the echo "backend", smoltcp again,
    /// cleanup; then everything sent to the agent is checked.
    fn service(&mut self, advance: Duration) {
        self.now += advance;
        let snow = smol_instant(self.epoch, self.now);
        self.iface.poll(snow, &mut self.dev, &mut self.sockets);
        let mut buf = [0u8; 4096];
        for h in self.conns.values() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            while s.can_recv() {
                let room = s.send_capacity() - s.send_queue();
                let n = s.recv_slice(&mut buf[..room.min(4096)]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let _ = s.send_slice(&buf[..n]);
            }
            if matches!(s.state(), State::CloseWait) {
                s.close();
            }
        }
        self.iface.poll(snow, &mut self.dev, &mut self.sockets);
        let sockets = &mut self.sockets;
        self.conns.retain(|_, h| {
            let state = sockets.get::<tcp::Socket>(*h).state();
            let done = matches!(state, State::Closed | State::TimeWait | State::Listen);
            if done {
                sockets.remove(*h);
            }
            !done
        });
        while let Some(p) = self.dev.pop_tx() {
            self.to_agent.push(p);
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
    let mut flow = Flow::new();
    for (tag, bytes) in records(data) {
        let mut p = bytes.to_vec();
        if tag & 2 == 2 {
            flow.patch_ack(&mut p);
        }
        if tag & 3 != 0 {
            fix_checksums(&mut p);
        }
        parse_everything(&p);
        flow.handle_ip(&p);
        flow.service(Duration::from_millis(u64::from(tag >> 2) * 10));
    }
});
