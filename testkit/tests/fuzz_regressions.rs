#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Inputs the fuzz targets (fuzz/, scripts/fuzz.sh) found, replayed against
//! the real code. Each names its file under fuzz/regressions/.

use ztna_testkit::fixtures as common;

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ztna_connector::{BackendRoute, Connector, ConnectorConfig, Proto, ServiceConfig};
use ztna_control::{packet, Role};
use ztna_testkit::echo::EchoServer;
use ztna_testkit::raw_tunnel::RawTunnel;
use ztna_udp::IoBackend;

/// The IPv4 packet of fuzz/regressions/ip_packet/syn-from-unspecified-source
/// (checksums fixed up as the target does): a TCP SYN from 0.0.0.0:40001 to
/// 0.0.0.10:80, where the service has a TCP backend.
const SYN_FROM_UNSPECIFIED: [u8; 44] = [
    0x45, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0x3a, 0xc3, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x0a, 0x9c, 0x41, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0x60, 0x02, 0xfa, 0xf0, 0xa4, 0x68,
    0x00, 0x00, 0x00, 0x00, 0x60, 0x02,
];

/// An agent's SYN from the unspecified address reaches smoltcp once the
/// backend connect succeeds; smoltcp's answer to 0.0.0.0 trips its
/// `assert!(!dst_addr().is_unspecified())` in `dispatch_ip` and the
/// connector thread panics: any agent allowed to reach a TCP service can
/// take the connector down for everyone. Expected: the segment is dropped
/// (a source that is not a unicast host address is malformed) and the
/// connector keeps serving.
#[test]
fn tcp_syn_from_unspecified_source_does_not_kill_the_connector() {
    let ip = packet::parse_ipv4(&SYN_FROM_UNSPECIFIED).unwrap();
    assert!(matches!(packet::parse_transport(&ip), Ok(packet::Transport::Tcp { dst_port: 80, .. })));

    let relay = start_relay(1, IoBackend::Auto, true);
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = ConnectorConfig::new(
        vec![relay.local_addr],
        vec![ServiceConfig {
            name: "echo".into(),
            icmp: true,
            backend: vec![
                BackendRoute { protocol: Proto::Tcp, port: 80, target: echo.tcp_addr.into() },
                BackendRoute { protocol: Proto::Udp, port: 7, target: echo.udp_addr.into() },
            ],
            allow_agents: None,
            path: Default::default(),
        }],
    );
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    connector_tls(&relay, &mut cfg, 0);
    let mut connector = Connector::new(cfg, 3).unwrap();
    let end = Instant::now() + T;
    while !connector.is_ready() {
        connector.turn(Duration::from_millis(10)).unwrap();
        assert!(Instant::now() < end);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || connector.run(&stop))
    };
    let tls = tls_for(&relay, ztna_control::identity::Kind::Agent, "a9");
    let c = client_as(&relay, &tls, &[(Role::Agent, "echo")], 9);
    let mut agent = RawTunnel::connect(c, &tls, svc("echo"), T).unwrap();

    agent.send_ip(&SYN_FROM_UNSPECIFIED).unwrap();
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        agent.pump();
        std::thread::sleep(Duration::from_millis(2));
    }

    // The connector still answers.
    let me = SocketAddrV4::new("10.9.0.2".parse().unwrap(), 5000);
    let svc = SocketAddrV4::new("100.100.0.10".parse().unwrap(), 7);
    let mut pkt = Vec::new();
    packet::build_ipv4_udp(me, svc, b"still alive", &mut pkt).unwrap();
    agent.send_ip(&pkt).unwrap();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + T;
    loop {
        if agent.recv_ip(&mut buf).is_some() {
            break;
        }
        assert!(!t.is_finished(), "the connector thread ended (panicked)");
        assert!(Instant::now() < end, "no answer from the connector");
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Release);
    t.join().expect("connector thread panicked").unwrap();
    relay.shutdown();
}
