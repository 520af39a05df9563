//! The gateway in memory: tunneled IP packets in, [`MemoryBackends`] as the
//! backends, a virtual clock. No sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_control::packet::{self, TcpFlags, TcpHeader, Transport};

use super::{FlowKey, Gateway};
use crate::backend::Interest;
use crate::config::{BackendRoute, ConnectorConfig, Proto, ServiceConfig, Target};
use crate::memory_backends::MemoryBackends;
use crate::tcp::TxOutcome;
use crate::ConnectorStats;

const AGENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const DNS_PORT: u16 = 53;
const WEB_PORT: u16 = 80;
const KEY: FlowKey = FlowKey { session: 0, flow: 4 };

fn udp_backend() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 10], 5353))
}

fn tcp_backend() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 11], 8080))
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A TCP segment parsed out of a packet for the agent.
#[derive(Debug)]
struct Segment {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    header: TcpHeader,
    payload: Vec<u8>,
}

fn parse_tcp(ip: &[u8]) -> Option<Segment> {
    let v4 = packet::parse_ipv4(ip).ok()?;
    match packet::parse_transport(&v4).ok()? {
        Transport::Tcp { src_port, dst_port, header, payload } => Some(Segment {
            src: SocketAddrV4::new(v4.src, src_port),
            dst: SocketAddrV4::new(v4.dst, dst_port),
            header,
            payload: payload.to_vec(),
        }),
        _ => None,
    }
}

/// A gateway with one service ("web": UDP 53 and TCP 80 to the two
/// backends), its memory backends, a clock, and what it sent the agents.
struct Bench {
    gw: Gateway,
    io: MemoryBackends,
    stats: Arc<ConnectorStats>,
    now: Instant,
    who: Arc<str>,
    /// Packets for the agents: (flow, IP packet), in order.
    out: Vec<(FlowKey, Vec<u8>)>,
}

impl Bench {
    fn new(tune: impl FnOnce(&mut ConnectorConfig)) -> Bench {
        let svc = ServiceConfig {
            name: "web".into(),
            icmp: true,
            backend: vec![
                BackendRoute { protocol: Proto::Udp, port: DNS_PORT, target: Target::from(udp_backend()) },
                BackendRoute { protocol: Proto::Tcp, port: WEB_PORT, target: Target::from(tcp_backend()) },
            ],
            allow_agents: None,
            path: Default::default(),
        };
        let mut cfg = ConnectorConfig::new(Vec::new(), vec![svc]);
        tune(&mut cfg);
        let targets: HashMap<Target, SocketAddr> =
            [(Target::from(udp_backend()), udp_backend()), (Target::from(tcp_backend()), tcp_backend())].into();
        let stats = Arc::new(ConnectorStats::default());
        let now = Instant::now();
        Bench {
            gw: Gateway::new(&cfg, targets, Arc::clone(&stats), 7, now),
            io: MemoryBackends::default(),
            stats,
            now,
            who: Arc::from("spiffe://test/agent/a"),
            out: Vec::new(),
        }
    }

    /// One packet from the agent on `key`; an immediate answer goes to `out`.
    fn send(&mut self, key: FlowKey, ip: &[u8]) {
        if let Some(reply) = self.gw.handle_ip(self.now, key, (0, &self.who), ip, &mut self.io) {
            self.out.push((key, reply.to_vec()));
        }
    }

    /// Runs backends and gateway until neither has anything left (bounded),
    /// advancing the clock a millisecond per round.
    fn settle(&mut self) {
        for _ in 0..64 {
            let mut interest: Vec<(crate::backend::BackendId, Interest)> = Vec::new();
            self.gw.backend_interest(&mut interest);
            let events = self.io.events(&interest);
            for ev in &events {
                if let Some((k, p)) = self.gw.handle_backend(self.now, ev.as_event()) {
                    self.out.push((k, p.to_vec()));
                }
            }
            self.gw.poll(self.now, &mut self.io);
            let before = self.out.len();
            let out = &mut self.out;
            self.gw.drain_tx(self.now, |k, p| {
                out.push((k, p.to_vec()));
                TxOutcome::Sent
            });
            let due = self.gw.next_timeout(self.now).is_some_and(|d| d <= self.now);
            if events.is_empty() && self.out.len() == before && !due {
                return;
            }
            self.now += Duration::from_millis(1);
        }
    }

    fn take_tcp(&mut self, key: FlowKey) -> Vec<Segment> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.out).into_iter().partition(|(k, _)| *k == key);
        self.out = rest;
        mine.iter().filter_map(|(_, p)| parse_tcp(p)).collect()
    }
}

fn udp_packet(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    packet::build_ipv4_udp(SocketAddrV4::new(AGENT, src_port), SocketAddrV4::new(SERVICE, dst_port), payload, &mut p)
        .expect("test packet fits");
    p
}

fn tcp_packet(src_port: u16, dst_port: u16, header: TcpHeader, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    packet::build_ipv4_tcp(
        SocketAddrV4::new(AGENT, src_port),
        SocketAddrV4::new(SERVICE, dst_port),
        &header,
        payload,
        &mut p,
    )
    .expect("test packet fits");
    p
}

fn syn(seq: u32) -> TcpHeader {
    TcpHeader { seq, ack: 0, flags: TcpFlags::SYN, window: 65_535, mss: Some(1200) }
}

/// The agent's side of one TCP connection, just enough to talk to smoltcp.
struct Client {
    port: u16,
    /// Next sequence number to send.
    seq: u32,
    /// Next sequence number expected from the connector.
    ack: u32,
}

impl Client {
    /// SYN → SYN-ACK → ACK on `key`; panics with what came back otherwise.
    fn connect(b: &mut Bench, key: FlowKey, port: u16) -> Client {
        let isn = 1_000;
        b.send(key, &tcp_packet(port, WEB_PORT, syn(isn), &[]));
        b.settle();
        let segs = b.take_tcp(key);
        let synack = segs
            .iter()
            .find(|s| s.header.flags.contains(TcpFlags::SYN) && s.header.flags.contains(TcpFlags::ACK))
            .unwrap_or_else(|| panic!("no SYN-ACK, got {segs:?}"));
        assert_eq!(synack.header.ack, isn + 1);
        assert_eq!(synack.src, SocketAddrV4::new(SERVICE, WEB_PORT), "answers as the service address");
        assert_eq!(synack.dst, SocketAddrV4::new(AGENT, port));
        let c = Client { port, seq: isn + 1, ack: synack.header.seq.wrapping_add(1) };
        b.send(key, &tcp_packet(port, WEB_PORT, c.header(TcpFlags::ACK), &[]));
        c
    }

    fn header(&self, flags: TcpFlags) -> TcpHeader {
        TcpHeader { seq: self.seq, ack: self.ack, flags, window: 65_535, mss: None }
    }

    /// Sends `data` and collects what comes back on `key` until `want`
    /// bytes arrived (acking them), returning them.
    fn exchange(&mut self, b: &mut Bench, key: FlowKey, data: &[u8], want: usize) -> Vec<u8> {
        // Segments within the tunnel MTU (larger ones get ICMP "fragmentation
        // needed", as the MSS the connector advertised says).
        for chunk in data.chunks(1000) {
            b.send(key, &tcp_packet(self.port, WEB_PORT, self.header(TcpFlags::ACK | TcpFlags::PSH), chunk));
            self.seq = self.seq.wrapping_add(chunk.len() as u32);
        }
        let mut got = Vec::new();
        for _ in 0..16 {
            b.settle();
            for s in b.take_tcp(key) {
                assert!(!s.header.flags.contains(TcpFlags::RST), "connection reset: {s:?}");
                if s.header.seq == self.ack && !s.payload.is_empty() {
                    got.extend_from_slice(&s.payload);
                    self.ack = self.ack.wrapping_add(s.payload.len() as u32);
                }
            }
            b.send(key, &tcp_packet(self.port, WEB_PORT, self.header(TcpFlags::ACK), &[]));
            if got.len() >= want {
                break;
            }
        }
        got
    }
}

#[test]
fn udp_flow_to_backend_and_back() {
    let mut b = Bench::new(|_| {});
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"query one"));
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"query two"));
    assert_eq!(b.io.udp_received, vec![(udp_backend(), b"query one".to_vec()), (udp_backend(), b"query two".to_vec())]);
    assert_eq!(b.io.udp_opened, 1, "one backend socket per 5-tuple");
    assert_eq!(b.gw.udp_flows(), 1);

    b.settle();
    let replies: Vec<_> = std::mem::take(&mut b.out);
    assert_eq!(replies.len(), 2);
    for ((key, ip), want) in replies.iter().zip([&b"query one"[..], b"query two"]) {
        assert_eq!(*key, KEY, "the reply goes back on the agent's flow");
        let v4 = packet::parse_ipv4(ip).expect("reply is IPv4");
        match packet::parse_transport(&v4) {
            Ok(Transport::Udp { src_port, dst_port, payload }) => {
                assert_eq!((v4.src, src_port), (SERVICE, DNS_PORT), "from the service address the agent used");
                assert_eq!((v4.dst, dst_port), (AGENT, 40_000));
                assert_eq!(payload, want);
            }
            other => panic!("not a UDP reply: {other:?}"),
        }
    }
    assert_eq!(count(&b.stats.udp_to_backend), 2);
    assert_eq!(count(&b.stats.udp_from_backend), 2);

    // Idle flows expire and close their socket.
    b.now += Duration::from_secs(3600);
    b.gw.poll(b.now, &mut b.io);
    assert_eq!(b.gw.udp_flows(), 0);
    assert_eq!(b.io.udp_closed, 1);
    assert_eq!(count(&b.stats.udp_flows_expired), 1);
}

#[test]
fn tcp_handshake_and_transfer_through_smoltcp() {
    let mut b = Bench::new(|_| {});
    let mut c = Client::connect(&mut b, KEY, 41_000);
    assert_eq!(b.io.tcp_open(), 1, "the backend was connected before the SYN-ACK");
    assert_eq!(b.gw.tcp_connections(), 1);

    let msg: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let echoed = c.exchange(&mut b, KEY, &msg[..1000], 1000);
    assert_eq!(echoed, msg[..1000], "the echo backend's answer comes back in order");
    let echoed = c.exchange(&mut b, KEY, &msg[1000..], 2000);
    assert!(echoed == msg[1000..], "{} bytes echoed, want the 2000 sent", echoed.len());
    assert_eq!(b.io.tcp_received(), vec![3000]);
    assert_eq!(count(&b.stats.tcp_bytes_to_backend), 3000);
    assert_eq!(count(&b.stats.tcp_bytes_from_backend), 3000);

    // The agent resets: the backend is closed with an RST too.
    b.send(KEY, &tcp_packet(c.port, WEB_PORT, c.header(TcpFlags::RST), &[]));
    b.settle();
    assert_eq!(b.io.tcp_open(), 0);
    assert_eq!(b.io.tcp_closed.len(), 1);
    assert!(b.io.tcp_closed.iter().all(|c| c.aborted && c.received == 3000));
    assert_eq!(b.gw.tcp_connections(), 0);
}

#[test]
fn refused_backend_resets_the_agent() {
    let mut b = Bench::new(|_| {});
    b.io.refused.insert(tcp_backend());
    b.send(KEY, &tcp_packet(41_001, WEB_PORT, syn(77), &[]));
    b.settle();
    let segs = b.take_tcp(KEY);
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert!(segs.iter().all(|s| s.header.flags.contains(TcpFlags::RST) && s.header.ack == 78));
    assert_eq!(count(&b.stats.tcp_backend_connect_failed), 1);
    assert_eq!(b.gw.tcp_connections(), 0);
}

#[test]
fn unconfigured_ports_are_dropped() {
    let mut b = Bench::new(|_| {});
    // UDP to a port with no backend: nothing opened, nothing answered.
    b.send(KEY, &udp_packet(40_000, DNS_PORT + 1, b"x"));
    // TCP: a SYN gets an RST, as from a closed port; other segments nothing.
    b.send(KEY, &tcp_packet(41_000, WEB_PORT + 1, syn(500), &[]));
    let ack = TcpHeader { seq: 1, ack: 1, flags: TcpFlags::ACK, window: 100, mss: None };
    b.send(KEY, &tcp_packet(41_000, WEB_PORT + 1, ack, b"data"));
    // UDP 80 is configured for TCP only.
    b.send(KEY, &udp_packet(40_000, WEB_PORT, b"x"));
    b.settle();
    assert_eq!(b.io.udp_opened + b.io.tcp_open(), 0, "no backend was touched");
    assert!(b.io.udp_received.is_empty());
    let segs = b.take_tcp(KEY);
    assert_eq!(segs.len(), 1, "only the SYN is answered: {segs:?}");
    assert!(segs.iter().all(|s| s.header.flags.contains(TcpFlags::RST) && s.header.ack == 501));
    assert!(b.out.is_empty());
    assert_eq!(count(&b.stats.drop_not_allowed), 4);

    // A service that does not exist (index out of range) drops quietly.
    let who = Arc::clone(&b.who);
    assert!(b.gw.handle_ip(b.now, KEY, (9, &who), &udp_packet(1, DNS_PORT, b"x"), &mut b.io).is_none());
    // Garbage is counted as malformed.
    b.send(KEY, &[0x45, 0, 0]);
    assert_eq!(count(&b.stats.drop_malformed), 1);
}

#[test]
fn udp_flows_per_agent_flow_are_limited() {
    let mut b = Bench::new(|c| c.max_udp_flows_per_agent = 2);
    for port in [40_000, 40_001, 40_002] {
        b.send(KEY, &udp_packet(port, DNS_PORT, b"q"));
    }
    assert_eq!(b.gw.udp_flows(), 2);
    assert_eq!(b.io.udp_received.len(), 2, "the third flow's packet never reached the backend");
    assert_eq!(count(&b.stats.drop_flow_table_full), 1);
    // Existing flows keep working; another agent flow has its own quota.
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"q"));
    b.send(FlowKey { session: 0, flow: 8 }, &udp_packet(40_002, DNS_PORT, b"q"));
    assert_eq!(b.io.udp_received.len(), 4);
    assert_eq!(b.gw.udp_flows(), 3);
}

#[test]
fn a_backend_socket_that_cannot_open_drops_the_packet_and_nothing_else() {
    let mut b = Bench::new(|_| {});
    b.io.fail_udp_open = true;
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"lost"));
    assert_eq!((b.gw.udp_flows(), b.io.udp_opened), (0, 0));
    assert!(b.io.udp_received.is_empty());
    assert_eq!(count(&b.stats.drop_flow_table_full), 1);
    // The next packet of the same 5-tuple tries again.
    b.io.fail_udp_open = false;
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"found"));
    assert_eq!(b.io.udp_received, vec![(udp_backend(), b"found".to_vec())]);
    assert_eq!(b.gw.udp_flows(), 1);
}

#[test]
fn tcp_connections_per_flow_are_limited() {
    let mut b = Bench::new(|c| c.max_tcp_per_flow = 1);
    let mut first = Client::connect(&mut b, KEY, 41_000);
    b.send(KEY, &tcp_packet(41_001, WEB_PORT, syn(9), &[]));
    b.settle();
    let segs = b.take_tcp(KEY);
    assert!(
        segs.iter().any(|s| s.dst.port() == 41_001 && s.header.flags.contains(TcpFlags::RST)),
        "the connection over the limit is reset: {segs:?}"
    );
    assert_eq!(count(&b.stats.drop_tcp_limit), 1);
    assert_eq!(b.io.tcp_open(), 1);
    // The first connection is untouched.
    assert_eq!(first.exchange(&mut b, KEY, b"still here", 10), b"still here");
}

#[test]
fn dropped_flow_state_resets_backends_and_leaves_other_flows_alone() {
    let mut b = Bench::new(|_| {});
    let other = FlowKey { session: 1, flow: 12 };
    let mut c = Client::connect(&mut b, KEY, 41_000);
    let mut o = Client::connect(&mut b, other, 41_001);
    assert_eq!(c.exchange(&mut b, KEY, b"before", 6), b"before");
    b.send(KEY, &udp_packet(40_000, DNS_PORT, b"u1"));
    b.settle();
    assert_eq!((b.io.tcp_open(), b.io.udp_open()), (2, 1));

    // The session ended: its backends are reset and its sockets closed.
    b.gw.drop_flow_state(KEY, &mut b.io);
    b.settle();
    assert_eq!((b.io.tcp_open(), b.io.udp_open()), (1, 0));
    assert!(b.io.tcp_closed.iter().all(|c| c.aborted));
    assert_eq!((b.gw.tcp_connections(), b.gw.udp_flows()), (1, 0));
    // A late segment of the dropped flow finds no connection (RST) ...
    b.send(KEY, &tcp_packet(c.port, WEB_PORT, c.header(TcpFlags::ACK | TcpFlags::PSH), b"lost"));
    assert_eq!(count(&b.stats.drop_tcp_no_connection), 1);
    // ... and the other session's connection carries on.
    assert_eq!(o.exchange(&mut b, other, b"still here", 10), b"still here");
}

#[test]
fn icmp_echo_is_answered_and_oversized_packets_get_frag_needed() {
    let mut b = Bench::new(|_| {});
    let mut req = Vec::new();
    packet::build_icmp_echo(AGENT, SERVICE, true, 7, 1, b"ping", &mut req).expect("echo request fits");
    b.send(KEY, &req);
    assert_eq!(b.out.len(), 1);
    let v4 = packet::parse_ipv4(&b.out[0].1).expect("reply is IPv4");
    assert!(matches!(
        packet::parse_transport(&v4),
        Ok(Transport::IcmpEcho { request: false, id: 7, seq: 1, payload: b"ping" })
    ));
    assert_eq!(count(&b.stats.icmp_echo_replies), 1);

    // DF and larger than the tunnel carries: ICMP fragmentation needed.
    let big = udp_packet(40_000, DNS_PORT, &vec![0u8; crate::vdev::TUNNEL_MTU]);
    b.out.clear();
    b.send(KEY, &big);
    assert_eq!(b.out.len(), 1);
    assert_eq!(count(&b.stats.drop_too_big), 1);
    assert!(b.io.udp_received.is_empty());
}
