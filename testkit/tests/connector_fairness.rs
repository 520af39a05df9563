//! Per-identity fairness at the connector: an agent identity that floods
//! the connector with UDP flows and TCP connections from many agent flows
//! cannot lock another identity out; when the tables are full, the
//! identity holding the most gives up its least recently used entry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use ztna_testkit::fixtures as common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use smoltcp::socket::tcp::State;
use ztna_agent::route::Cidr;
use ztna_connector::{BackendRoute, Connector, ConnectorConfig, ConnectorStats, Proto};
use ztna_control::identity::Kind;
use ztna_control::packet;
use ztna_relay::server::RelayHandle;
use ztna_testkit::agent_link::AgentLink;
use ztna_testkit::echo::EchoServer;
use ztna_testkit::tunnel_tcp::{IpLink, TcpConn, TunnelTcp};
use ztna_udp::IoBackend;

const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 1), 7);
/// Table sizes of these tests; the per-identity shares are the defaults
/// (a quarter of each table: 4 UDP flows, 2 TCP connections).
const UDP_FLOWS: usize = 16;
const TCP_CONNECTIONS: usize = 8;

struct Setup {
    relay: RelayHandle,
    stats: Arc<ConnectorStats>,
    stop: Arc<AtomicBool>,
    connector: Option<JoinHandle<()>>,
    _echo: EchoServer,
}

impl Setup {
    fn start() -> Setup {
        Setup::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut ConnectorConfig)) -> Setup {
        let relay = start_relay(2, IoBackend::Auto, true);
        let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let backends = vec![
            BackendRoute { protocol: Proto::Udp, port: SERVICE.port(), target: echo.udp_addr.into() },
            BackendRoute { protocol: Proto::Tcp, port: SERVICE.port(), target: echo.tcp_addr.into() },
        ];
        let mut cfg = connector_config(&relay, 0, "web", backends);
        cfg.max_udp_flows = UDP_FLOWS;
        cfg.max_tcp_connections = TCP_CONNECTIONS;
        tweak(&mut cfg);
        let mut connector = Connector::new(cfg, 5).unwrap();
        let end = Instant::now() + T;
        while !connector.is_ready() {
            connector.turn(Duration::from_millis(10)).unwrap();
            assert!(Instant::now() < end, "connector did not register");
        }
        let stats = Arc::clone(&connector.stats);
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let t = std::thread::spawn(move || connector.run(&st).unwrap());
        Setup { relay, stats, stop, connector: Some(t), _echo: echo }
    }

    /// An agent of identity `name` (a core and socket of its own) whose
    /// end-to-end session is up.
    fn agent_flow(&self, name: &str, seed: u64) -> AgentLink {
        let tls = tls_for(&self.relay, Kind::Agent, name);
        let routes = vec![(svc("web"), Cidr::new((*SERVICE.ip()).into(), 32).unwrap())];
        let mut link = AgentLink::new(self.relay.local_addr, tls, routes, seed).unwrap();
        link.wait_ready(1, T).unwrap();
        link
    }

    fn tcp_agent(&self, name: &str, seed: u64) -> TunnelTcp<AgentLink> {
        TunnelTcp::new(self.agent_flow(name, seed), AGENT_IP, seed)
    }

    fn stat(&self, f: impl Fn(&ConnectorStats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::Relaxed)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.connector.take() {
            let _ = t.join();
        }
    }
}

/// Sends one datagram from each of `ports` through agent `c`.
fn send_udp(c: &mut AgentLink, ports: impl IntoIterator<Item = u16>) {
    let mut pkt = Vec::new();
    for p in ports {
        packet::build_ipv4_udp(SocketAddrV4::new(AGENT_IP, p), SERVICE, &p.to_be_bytes(), &mut pkt).unwrap();
        let end = Instant::now() + T;
        while c.send_packet(&pkt).is_err() {
            assert!(Instant::now() < end, "agent cannot send");
            c.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        c.pump();
    }
}

/// Pumps `clients` for `d`, returning the source ports each one got echoes
/// for (distinct, sorted).
fn echoed_ports(clients: &mut [&mut AgentLink], d: Duration) -> Vec<Vec<u16>> {
    let mut got = vec![Vec::new(); clients.len()];
    let mut buf = [0u8; 2048];
    let end = Instant::now() + d;
    while Instant::now() < end {
        for (i, c) in clients.iter_mut().enumerate() {
            c.pump();
            while let Some(n) = c.recv_packet(&mut buf) {
                let Ok(v4) = packet::parse_ipv4(&buf[..n]) else { continue };
                if let Ok(packet::Transport::Udp { dst_port, .. }) = packet::parse_transport(&v4) {
                    if !got[i].contains(&dst_port) {
                        got[i].push(dst_port);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for g in &mut got {
        g.sort_unstable();
    }
    got
}

/// Pumps every agent until each of `conns` is established or closed (or
/// `T` passes); returns (established, refused, still connecting).
fn settle(agents: &mut [TunnelTcp<AgentLink>], conns: &[(usize, TcpConn)]) -> (usize, usize, usize) {
    let count = |agents: &[TunnelTcp<AgentLink>]| {
        let (mut up, mut refused, mut waiting) = (0, 0, 0);
        for (a, c) in conns {
            match agents[*a].state(*c) {
                State::Established => up += 1,
                State::Closed => refused += 1,
                _ => waiting += 1,
            }
        }
        (up, refused, waiting)
    };
    let end = Instant::now() + T;
    loop {
        for a in agents.iter_mut() {
            a.wait(Duration::from_millis(1));
        }
        let r = count(agents);
        if r.2 == 0 || Instant::now() >= end {
            return r;
        }
    }
}

/// Opens `n` connections on each agent.
fn connect_all(agents: &mut [TunnelTcp<AgentLink>], n: usize) -> Vec<(usize, TcpConn)> {
    let mut conns = Vec::new();
    for (i, a) in agents.iter_mut().enumerate() {
        for _ in 0..n {
            conns.push((i, a.connect(SERVICE).unwrap()));
        }
    }
    conns
}

fn echo_through(a: &mut TunnelTcp<AgentLink>, c: TcpConn, msg: &[u8]) {
    a.send_all(c, msg, T).unwrap();
    assert_eq!(a.recv_exact(c, msg.len(), T).unwrap(), msg);
}

#[test]
fn one_identity_cannot_lock_out_another() {
    let s = Setup::start();

    // The flood: one identity, four agent flows, each trying more UDP
    // flows than the whole table holds.
    let mut flood: Vec<AgentLink> = (0..4).map(|i| s.agent_flow("flood", 10 + i)).collect();
    for (i, c) in flood.iter_mut().enumerate() {
        send_udp(c, (0..UDP_FLOWS as u16).map(|p| 1000 + 100 * i as u16 + p));
    }
    let mut refs: Vec<&mut AgentLink> = flood.iter_mut().collect();
    let got = echoed_ports(&mut refs, Duration::from_millis(1500));
    let flood_flows: usize = got.iter().map(Vec::len).sum();
    println!("flooding identity got {flood_flows} UDP flows of {UDP_FLOWS}; {:?}", s.stats);
    assert!(flood_flows < UDP_FLOWS, "one identity filled the whole UDP flow table");
    assert!(s.stat(|st| &st.udp_flows_refused_identity_share) > 0, "refusals not counted: {:?}", s.stats);

    // A second identity still gets its UDP flows.
    let mut other = s.agent_flow("other", 20);
    send_udp(&mut other, 2000..2004);
    let got = echoed_ports(&mut [&mut other], Duration::from_millis(1500));
    assert_eq!(got[0], vec![2000, 2001, 2002, 2003], "second identity's UDP flows: {:?}", s.stats);

    // TCP: the flooding identity tries 4 connections on each of 4 agent
    // flows (twice the whole table). What is over its share is refused with
    // an RST, not left hanging.
    let mut flood_tcp: Vec<TunnelTcp<AgentLink>> = (0..4).map(|i| s.tcp_agent("flood", 30 + i)).collect();
    let conns = connect_all(&mut flood_tcp, 4);
    let (up, refused, waiting) = settle(&mut flood_tcp, &conns);
    println!("flooding identity: {up} TCP connections up, {refused} refused, {waiting} hanging; {:?}", s.stats);
    assert_eq!(waiting, 0, "SYNs over the limit must get an RST, not silence");
    assert!((1..TCP_CONNECTIONS).contains(&up), "flooding identity holds {up} of {TCP_CONNECTIONS} connections");
    assert_eq!(refused, conns.len() - up);
    assert!(s.stat(|st| &st.tcp_refused_identity_share) > 0, "refusals not counted: {:?}", s.stats);

    // A second identity still connects, and its connection works.
    let mut other_tcp = vec![s.tcp_agent("other", 40)];
    let mine = connect_all(&mut other_tcp, 1);
    assert_eq!(settle(&mut other_tcp, &mine), (1, 0, 0), "second identity's connection: {:?}", s.stats);
    echo_through(&mut other_tcp[0], mine[0].1, b"not locked out");
    // The flood's established connections still work too.
    let (a, c) = *conns.iter().find(|(a, c)| flood_tcp[*a].state(*c) == State::Established).unwrap();
    echo_through(&mut flood_tcp[a], c, b"still mine");
}

#[test]
fn full_tables_are_reclaimed_from_the_identity_holding_most() {
    let s = Setup::start();

    // Four identities take their share each: the tables are full.
    let names = ["f0", "f1", "f2", "f3"];
    let mut udp: Vec<AgentLink> = names.iter().zip(0..).map(|(n, i)| s.agent_flow(n, 50 + i)).collect();
    for (i, c) in udp.iter_mut().enumerate() {
        send_udp(c, (0..8).map(|p| 1000 + 100 * i as u16 + p));
    }
    let mut refs: Vec<&mut AgentLink> = udp.iter_mut().collect();
    let got = echoed_ports(&mut refs, Duration::from_millis(1500));
    let held: usize = got.iter().map(Vec::len).sum();
    assert_eq!(held, UDP_FLOWS, "the four identities should fill the UDP table: {got:?} {:?}", s.stats);
    assert!(got.iter().all(|g| g.len() == UDP_FLOWS / 4), "each identity gets its share: {got:?}");

    let mut tcp: Vec<TunnelTcp<AgentLink>> = names.iter().zip(0..).map(|(n, i)| s.tcp_agent(n, 60 + i)).collect();
    let conns = connect_all(&mut tcp, 3);
    let (up, _, waiting) = settle(&mut tcp, &conns);
    assert_eq!((up, waiting), (TCP_CONNECTIONS, 0), "the four identities should fill the TCP table: {:?}", s.stats);

    // A fifth identity gets in: the least recently used entry of an
    // identity holding the most is reclaimed.
    let mut new = s.agent_flow("newcomer", 70);
    send_udp(&mut new, [3000, 3001]);
    let got = echoed_ports(&mut [&mut new], Duration::from_millis(1500));
    assert_eq!(got[0], vec![3000, 3001], "newcomer's UDP flows: {:?}", s.stats);
    assert_eq!(s.stat(|st| &st.udp_flows_reclaimed), 2, "{:?}", s.stats);

    let mut new_tcp = vec![s.tcp_agent("newcomer", 71)];
    let mine = connect_all(&mut new_tcp, 1);
    assert_eq!(settle(&mut new_tcp, &mine), (1, 0, 0), "newcomer's connection: {:?}", s.stats);
    echo_through(&mut new_tcp[0], mine[0].1, b"room for me");
    assert_eq!(s.stat(|st| &st.tcp_connections_reclaimed), 1, "{:?}", s.stats);
    // The reclaimed connection was reset (the agent learns at once).
    let end = Instant::now() + T;
    loop {
        for a in tcp.iter_mut() {
            a.wait(Duration::from_millis(1));
        }
        let closed = conns.iter().filter(|(a, c)| tcp[*a].state(*c) == State::Closed).count();
        if closed == conns.len() - TCP_CONNECTIONS + 1 {
            break;
        }
        assert!(Instant::now() < end, "reclaimed connection not reset: {closed} closed");
    }
}

#[test]
fn full_tcp_flow_table_is_reclaimed_too() {
    // Four agent flows with TCP state in all, two per identity.
    let s = Setup::start_with(|c| {
        c.max_tcp_flows = 4;
        c.max_tcp_flows_per_identity = Some(2);
    });
    let mut held: Vec<TunnelTcp<AgentLink>> =
        ["f0", "f0", "f1", "f1"].iter().zip(0..).map(|(n, i)| s.tcp_agent(n, 80 + i)).collect();
    let conns = connect_all(&mut held, 1);
    assert_eq!(settle(&mut held, &conns), (4, 0, 0), "{:?}", s.stats);

    // A third agent flow of f0 is over its share: RST.
    let mut third = vec![s.tcp_agent("f0", 90)];
    let c = connect_all(&mut third, 1);
    assert_eq!(settle(&mut third, &c), (0, 1, 0), "{:?}", s.stats);
    assert_eq!(s.stat(|st| &st.tcp_refused_identity_share), 1);

    // A newcomer takes the least recently used flow of an identity holding
    // two: that flow's connection is reset.
    let mut new_tcp = vec![s.tcp_agent("newcomer", 91)];
    let mine = connect_all(&mut new_tcp, 1);
    assert_eq!(settle(&mut new_tcp, &mine), (1, 0, 0), "newcomer's connection: {:?}", s.stats);
    echo_through(&mut new_tcp[0], mine[0].1, b"a flow for me");
    assert_eq!(s.stat(|st| &st.tcp_connections_reclaimed), 1);
    let end = Instant::now() + T;
    while conns.iter().filter(|(a, c)| held[*a].state(*c) == State::Closed).count() != 1 {
        assert!(Instant::now() < end, "reclaimed flow's connection not reset");
        for a in held.iter_mut() {
            a.wait(Duration::from_millis(1));
        }
    }
}
