#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Bad tunneled packets at the connector: each is dropped with its own
//! counter, nothing reaches a backend, and good traffic keeps flowing.

use ztna_testkit::fixtures as common;

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ztna_connector::{BackendRoute, Connector, ConnectorStats, Proto};
use ztna_control::identity::Kind;
use ztna_control::{packet, Role};
use ztna_testkit::echo::EchoServer;
use ztna_testkit::raw_tunnel::RawTunnel;
use ztna_udp::IoBackend;

#[test]
fn every_bad_packet_has_a_counter_and_good_traffic_survives() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = connector_config(
        &relay,
        0,
        "echo",
        vec![BackendRoute { protocol: Proto::Udp, port: 7, target: echo.udp_addr.into() }],
    );
    cfg.max_udp_flows_per_agent = 2;
    let reset_key = ztna_control::e2e::ResetKey::from_tls(&cfg.client_tls().unwrap()).unwrap();
    let mut connector = Connector::new(cfg, 3).unwrap();
    let end = Instant::now() + T;
    while !connector.is_ready() {
        connector.turn(Duration::from_millis(10)).unwrap();
        assert!(Instant::now() < end);
    }
    let stats = Arc::clone(&connector.stats);
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || connector.run(&stop).unwrap())
    };
    let tls = tls_for(&relay, Kind::Agent, "a9");
    let c = client_as(&relay, &tls, &[(Role::Agent, "echo")], 9);
    let mut agent = RawTunnel::connect(c, &tls, svc("echo"), T).unwrap();
    let me = SocketAddrV4::new("10.9.0.2".parse().unwrap(), 5000);
    let svc = SocketAddrV4::new("100.100.0.10".parse().unwrap(), 7);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let wait = |agent: &mut RawTunnel, what: &str, f: &dyn Fn(&ConnectorStats) -> bool| {
        let end = Instant::now() + T;
        while !f(&stats) {
            agent.pump();
            assert!(Instant::now() < end, "{what} not counted: {stats:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let send = |agent: &mut RawTunnel, pkt: &[u8]| {
        agent.send_ip(pkt).unwrap();
    };

    // IPv6 inner packet.
    let mut v6 = vec![0u8; 48];
    v6[0] = 0x60;
    send(&mut agent, &v6);
    wait(&mut agent, "ipv6", &|s| get(&s.drop_ipv6) == 1);
    // Garbage, a bad IPv4 header checksum, a truncated packet.
    send(&mut agent, &[0x45, 1, 2]);
    let mut pkt = Vec::new();
    packet::build_ipv4_udp(me, svc, b"ok", &mut pkt).unwrap();
    let mut bad_sum = pkt.clone();
    bad_sum[10] ^= 0xff;
    send(&mut agent, &bad_sum);
    send(&mut agent, &pkt[..pkt.len() - 1]);
    wait(&mut agent, "malformed", &|s| get(&s.drop_malformed) == 3);
    // UDP to a port the service does not expose: not an open proxy.
    packet::build_ipv4_udp(me, SocketAddrV4::new(*svc.ip(), 53), b"dns?", &mut pkt).unwrap();
    send(&mut agent, &pkt);
    wait(&mut agent, "not allowed", &|s| get(&s.drop_not_allowed) == 1);
    assert_eq!(get(&stats.udp_to_backend), 0, "nothing reached a backend");
    assert_eq!(echo.stats.udp_datagrams.load(Ordering::Relaxed), 0);

    // Good traffic still works.
    packet::build_ipv4_udp(me, svc, b"still fine", &mut pkt).unwrap();
    send(&mut agent, &pkt);
    let mut buf = [0u8; 2048];
    let end = Instant::now() + T;
    let reply = loop {
        if let Some(n) = agent.recv_ip(&mut buf) {
            break buf[..n].to_vec();
        }
        assert!(Instant::now() < end, "no echo");
        std::thread::sleep(Duration::from_millis(2));
    };
    let v4 = packet::parse_ipv4(&reply).unwrap();
    assert_eq!((v4.src, v4.dst), (*svc.ip(), *me.ip()), "reply comes from the service address");
    match packet::parse_transport(&v4).unwrap() {
        packet::Transport::Udp { src_port, dst_port, payload } => {
            assert_eq!((src_port, dst_port, payload), (7, 5000, &b"still fine"[..]));
        }
        other => panic!("{other:?}"),
    }
    // One agent cannot use up the UDP flow table: its third flow is refused.
    for port in [5001, 5002] {
        packet::build_ipv4_udp(SocketAddrV4::new(*me.ip(), port), svc, b"more", &mut pkt).unwrap();
        send(&mut agent, &pkt);
    }
    wait(&mut agent, "per-agent flow limit", &|s| get(&s.drop_flow_table_full) == 1);
    assert_eq!(get(&stats.udp_flows_opened), 2);

    // An inner packet for a session the connector does not hold gets a
    // stateless reset back on the same flow (shorter than the trigger, the
    // token of that CID under the connector's key); a second one within
    // RESET_EVERY gets nothing.
    let mut junk = vec![0x41u8; 60];
    junk[1..9].copy_from_slice(b"nosuchid");
    let unknown = get(&stats.drop_unknown_cid);
    agent.client.session.send_datagram(agent.flow, &junk).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + T;
    while got.is_empty() {
        agent.client.pump();
        let mut d = [0u8; 2048];
        while let Some(n) = agent.client.session.recv_datagram(&mut d) {
            let (flow, p) = ztna_control::datagram::parse(&d[..n]).unwrap();
            // The agent's own session's packets come on this flow too.
            let token = reset_key.token(b"nosuchid").to_be_bytes();
            if flow == agent.flow && p.len() >= 16 && p[p.len() - 16..] == token {
                got.push(p.to_vec());
            }
        }
        assert!(Instant::now() < end, "no reset: {stats:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let reset = &got[0];
    assert!(reset.len() < junk.len() && reset.len() >= ztna_control::reset::MIN_RESET_LEN);
    assert_eq!(reset[0] & 0xc0, 0x40, "looks like a short-header packet");
    assert_eq!(get(&stats.e2e_resets_sent), 1);
    agent.client.session.send_datagram(agent.flow, &junk).unwrap();
    wait(&mut agent, "second unknown CID", &|s| get(&s.drop_unknown_cid) == unknown + 2);
    assert_eq!(get(&stats.e2e_resets_sent), 1, "at most one reset per flow per second");
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    relay.shutdown();
}
