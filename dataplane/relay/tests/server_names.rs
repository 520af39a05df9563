#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! A relay reached by IP address is verified against its certificate's IP
//! SANs (IPv4 and IPv6), and a name the certificate does not cover fails
//! with a reason that says what was expected and what the certificate
//! holds. Real sockets, one dual-stack relay with the dev certificate
//! (DNS `localhost`, IP `127.0.0.1` and `::1`).

use ztna_testkit::fixtures as common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::identity::Kind;
use ztna_control::Role;
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_testkit::client_io::UdpClient;
use ztna_udp::IoBackend;

fn relay() -> RelayHandle {
    relay_on(IoBackend::Auto)
}

fn relay_on(io_backend: IoBackend) -> RelayHandle {
    server::start(&RelayConfig {
        listen: "[::]:0".parse().unwrap(),
        workers: Some(1),
        dev: true,
        io_backend,
        pin_cores: false,
        policy_toml: Some(test_policy()),
        ..RelayConfig::default()
    })
    .unwrap()
}

fn client(relay: &RelayHandle, to: &str, server_name: &str, seed: u64) -> UdpClient {
    let to: SocketAddr = to.replace("PORT", &relay.local_addr.port().to_string()).parse().unwrap();
    let local: SocketAddr = if to.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }.parse().unwrap();
    let mut cfg = ClientConfig::new(to, local, server_name);
    cfg.registrations = vec![(Role::Agent, svc("echo"))];
    cfg.handshake_timeout = Duration::from_secs(3);
    UdpClient::new(cfg, &tls_for(relay, Kind::Agent, &format!("a{seed}")), local, seed).unwrap()
}

/// The first event that is a connection or a disconnection.
fn outcome(c: &mut UdpClient) -> Event {
    c.wait_for(T, |e| matches!(e, Event::Connected | Event::Disconnected { .. }), |_| {}).expect("an outcome")
}

/// The dual-stack relay on `[::]` answers from the address the client sent
/// to (PKTINFO): 127.0.0.2 here, where the route would pick 127.0.0.1 and
/// the client would drop every answer.
#[test]
fn a_wildcard_relay_answers_from_the_address_the_client_used() {
    for backend in [IoBackend::Uring, IoBackend::Portable] {
        let relay = relay_on(backend);
        let mut c = client(&relay, "127.0.0.2:PORT", "localhost", 3);
        assert!(matches!(outcome(&mut c), Event::Connected), "{backend:?}");
        let seen = c.wait_for(T, |e| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. }), |_| {});
        assert!(seen.is_some(), "{backend:?}: the control stream works both ways");
        relay.shutdown();
    }
}

#[test]
fn a_relay_addressed_by_ip_is_verified_by_its_ip_sans_in_both_families() {
    let relay = relay();
    for (to, name) in [("127.0.0.1:PORT", "127.0.0.1"), ("[::1]:PORT", "::1")] {
        let mut c = client(&relay, to, name, 1);
        assert!(matches!(outcome(&mut c), Event::Connected), "server_name {name}");
        let seen = c.wait_for(T, |e| matches!(e, Event::ObservedAddress(_)), |_| {});
        assert!(matches!(seen, Some(Event::ObservedAddress(a)) if a.is_ipv4() == to.starts_with("127")), "{seen:?}");
    }
    relay.shutdown();
}

#[test]
fn a_name_the_certificate_does_not_cover_fails_and_says_why() {
    let relay = relay();
    // An IP address the certificate does not list.
    let mut c = client(&relay, "127.0.0.1:PORT", "127.0.0.2", 2);
    let Event::Disconnected { reason, .. } = outcome(&mut c) else { panic!("connected to a relay it must refuse") };
    for part in [
        "TLS alert bad_certificate",
        "does not cover the server name 127.0.0.2",
        "IP SANs: 127.0.0.1, ::1",
        "DNS SANs: localhost",
        "URI SANs: spiffe://",
    ] {
        assert!(reason.contains(part), "{part:?} missing from {reason:?}");
    }
    assert!(!c.session.is_connected());
    // The relay counts the client's refusal (and logs it once a minute).
    // The relay reaps the connection after its (short) draining period.
    let end = std::time::Instant::now() + T;
    while relay.totals().handshakes_refused_by_client == 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(relay.totals().handshakes_refused_by_client >= 1, "the relay did not count the refusal");
    // A DNS name the certificate does not list: BoringSSL's check, the
    // same report.
    let mut c = client(&relay, "[::1]:PORT", "relay.example.com", 3);
    let Event::Disconnected { reason, .. } = outcome(&mut c) else { panic!("connected to a relay it must refuse") };
    for part in ["does not cover the server name \"relay.example.com\"", "DNS SANs: localhost", "valid "] {
        assert!(reason.contains(part), "{part:?} missing from {reason:?}");
    }
    relay.shutdown();
}
