//! A connector loop turn costs what arrived, not what the tables hold: with
//! 4096 idle UDP flows a turn reads no backend socket, and a reply on one
//! flow is read from that flow's socket alone. (Counts, not timings; the
//! timing comparison is `ztna-bench connector-turns`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use ztna_testkit::fixtures as common;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use common::*;
use ztna_agent::route::Cidr;
use ztna_connector::{BackendRoute, Connector, Proto};
use ztna_control::identity::Kind;
use ztna_control::packet;
use ztna_testkit::agent_link::AgentLink;
use ztna_testkit::echo::EchoServer;
use ztna_testkit::tunnel_tcp::IpLink;
use ztna_udp::IoBackend;

const FLOWS: usize = 4096;

/// Pumps the agent (discarding what it receives) and turns the connector
/// until `done`.
fn until(c: &mut Connector, agent: &mut AgentLink, what: &str, done: impl Fn(&Connector) -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 2048];
    while !done(c) {
        agent.pump();
        while agent.recv_packet(&mut buf).is_some() {}
        c.turn(Duration::from_millis(1)).unwrap();
        assert!(Instant::now() < end, "timed out waiting for {what}: {:?}", c.stats);
    }
}

#[test]
fn idle_flows_cost_no_reads() {
    let relay = start_relay(1, IoBackend::Auto, false);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = connector_config(
        &relay,
        0,
        "echo",
        vec![BackendRoute { protocol: Proto::Udp, port: 7, target: echo.udp_addr.into() }],
    );
    // One agent flow may use the whole table here.
    cfg.max_udp_flows = FLOWS;
    cfg.max_udp_flows_per_agent = FLOWS;
    cfg.max_udp_flows_per_identity = Some(FLOWS);
    cfg.udp_idle_secs = 3600;
    let mut c = Connector::new(cfg, 7).unwrap();
    let end = Instant::now() + T;
    while !c.is_ready() {
        c.turn(Duration::from_millis(10)).unwrap();
        assert!(Instant::now() < end, "connector did not register");
    }
    let tls = tls_for(&relay, Kind::Agent, "idle");
    let routes = vec![(svc("echo"), Cidr::new([100, 100, 0, 0].into(), 16).unwrap())];
    let mut agent = AgentLink::new(relay.local_addr, tls, routes, 3).unwrap();
    let end = Instant::now() + T;
    while agent.core.sessions_up() == 0 {
        assert!(Instant::now() < end, "no end-to-end session: {:?}", c.stats);
        agent.pump();
        c.turn(Duration::from_millis(1)).unwrap();
    }

    // 4096 flows, each answered once by the echo service.
    let svc = SocketAddrV4::new([100, 100, 0, 10].into(), 7);
    let mut pkt = Vec::new();
    let mut buf = [0u8; 2048];
    // In batches, each sent again until all of it arrived (datagrams are
    // unreliable; a repeat on an open flow opens nothing).
    for batch in 0..FLOWS / 64 {
        let target = 64 * (batch as u64 + 1);
        let end = Instant::now() + Duration::from_secs(30);
        while c.stats.snapshot().udp_flows_opened < target {
            assert!(Instant::now() < end, "batch {batch} did not arrive: {:?}", c.stats);
            for i in batch * 64..(batch + 1) * 64 {
                let me = SocketAddrV4::new([10, 9, (i >> 8) as u8, i as u8].into(), 4000);
                packet::build_ipv4_udp(me, svc, b"x", &mut pkt).unwrap();
                let _ = agent.send_packet(&pkt);
            }
            let wait = Instant::now() + Duration::from_millis(200);
            while Instant::now() < wait && c.stats.snapshot().udp_flows_opened < target {
                agent.pump();
                while agent.recv_packet(&mut buf).is_some() {}
                c.turn(Duration::from_millis(1)).unwrap();
            }
        }
    }
    let want = FLOWS as u64;
    until(&mut c, &mut agent, "every echo", |c| {
        c.stats.snapshot().udp_from_backend >= c.stats.snapshot().udp_to_backend
    });
    assert_eq!(c.udp_flows(), FLOWS);
    assert_eq!(c.stats.snapshot().udp_flows_opened, want);
    let want = c.stats.snapshot().udp_from_backend;

    // Idle: no backend socket is read.
    let reads = c.stats.snapshot().udp_backend_reads;
    for _ in 0..100 {
        c.turn(Duration::ZERO).unwrap();
    }
    assert_eq!(c.stats.snapshot().udp_backend_reads, reads, "idle turns read backend sockets");

    // One reply: its socket alone is read (the datagram, then WouldBlock).
    let me = SocketAddrV4::new([10, 9, 0, 5].into(), 4000);
    packet::build_ipv4_udp(me, svc, b"again", &mut pkt).unwrap();
    let end = Instant::now() + T;
    while c.stats.snapshot().udp_from_backend == want {
        assert!(Instant::now() < end, "no reply: {:?}", c.stats);
        let _ = agent.send_packet(&pkt);
        let wait = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait && c.stats.snapshot().udp_from_backend == want {
            agent.pump();
            while agent.recv_packet(&mut buf).is_some() {}
            c.turn(Duration::from_millis(1)).unwrap();
        }
    }
    for _ in 0..10 {
        c.turn(Duration::ZERO).unwrap();
    }
    let s = c.stats.snapshot();
    let replies = s.udp_from_backend - want;
    assert_eq!(s.udp_flows_opened, FLOWS as u64, "the reply used the existing flow");
    // Per readable socket: its datagrams, then one WouldBlock.
    let read = s.udp_backend_reads - reads;
    assert!(read > replies && read <= 2 * replies, "{read} reads for {replies} replies");
    relay.shutdown();
}
