#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! One dual-stack listener serves IPv4 and IPv6 clients, and reports
//! each one's address in its own family.

use ztna_testkit::fixtures as common;

use std::net::SocketAddr;

use common::*;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::Role;
use ztna_relay::server::{self, RelayConfig};
use ztna_testkit::client_io::UdpClient;
use ztna_udp::IoBackend;

#[test]
fn dual_stack_listener_serves_v4_and_v6() {
    let relay = server::start(&RelayConfig {
        listen: "[::]:0".parse().unwrap(),
        workers: Some(2),
        dev: true,
        io_backend: IoBackend::Auto,
        pin_cores: false,
        policy_toml: Some(test_policy()),
        ..RelayConfig::default()
    })
    .unwrap();
    let port = relay.local_addr.port();
    let mk = |relay_addr: SocketAddr, local: SocketAddr, regs: Vec<(Role, ztna_control::ServiceName)>, seed| {
        let tls = if regs.iter().any(|(r, _)| *r == Role::Connector) {
            tls_for(&relay, ztna_control::identity::Kind::Connector, "c1")
        } else {
            tls_for(&relay, ztna_control::identity::Kind::Agent, "a2")
        };
        let mut cfg = ClientConfig::new(relay_addr, local, "localhost");
        cfg.registrations = regs;
        UdpClient::new(cfg, &tls, local, seed).unwrap()
    };
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let mut conn = mk(v6, "[::1]:0".parse().unwrap(), vec![(Role::Connector, svc("echo"))], 1);
    let mut agent = mk(v4, "127.0.0.1:0".parse().unwrap(), vec![(Role::Agent, svc("echo"))], 2);
    for (c, local) in [(&mut conn, "::1"), (&mut agent, "127.0.0.1")] {
        match c.wait_for(T, |e| matches!(e, Event::ObservedAddress(_)), |_| {}) {
            Some(Event::ObservedAddress(a)) => {
                assert_eq!(a.ip().to_string(), local, "observed in the client's own family");
                assert_eq!(a.port(), c.local_addr().unwrap().port());
            }
            other => panic!("{other:?}"),
        }
    }
    until_registered(&mut conn, 1);
    let flow = until_registered(&mut agent, 1)[0];
    let mut cs = vec![conn];
    assert!(round_trip(&mut agent, &mut cs, flow, b"v4 to v6").is_some());
    relay.shutdown();
}
