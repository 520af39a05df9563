#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Zero trust, negative cases: every client certificate the relay must
//! refuse, every registration the policy must deny, flows that must not
//! cross connections, policy reloads that revoke, and the connector's own
//! allow-list. Each case asserts its documented outcome and counter.

use ztna_agent::agent_core::AgentEvent;
use ztna_testkit::agent_link::AgentLink;
use ztna_testkit::fixtures as common;
use ztna_testkit::tunnel_tcp::IpLink;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use ztna_connector::{BackendRoute, Connector, ConnectorConfig, Proto, ServiceConfig};
use ztna_control::client::Event;
use ztna_control::identity::{Identity, Kind};
use ztna_control::quic::TlsOptions;
use ztna_control::{Code, Role};
use ztna_relay::pki::{self, DEV_TRUST_DOMAIN};
use ztna_relay::server::{self, RelayHandle};
use ztna_relay::stats::StatsSnapshot;
use ztna_testkit::client_io::UdpClient;
use ztna_testkit::echo::EchoServer;
use ztna_udp::IoBackend;

const POLICY: &str = r#"
[groups]
db-users = ["bob"]

[services.echo]
connectors = ["echo-conn"]
agents = ["alice"]

[services.db]
connectors = ["db-conn"]
groups = ["db-users"]
"#;

fn tmpdir(tag: &str) -> PathBuf {
    let mut r = [0u8; 8];
    boring::rand::rand_bytes(&mut r).unwrap();
    let d = std::env::temp_dir().join(format!("ztna-zt-{tag}-{:016x}", u64::from_le_bytes(r)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 2-worker dev relay whose policy is the file `policy` (for reloads).
fn start(policy: &str) -> (RelayHandle, PathBuf) {
    let dir = tmpdir("policy");
    let path = dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let mut cfg = relay_config(2, IoBackend::Auto, true);
    cfg.policy_toml = None;
    cfg.policy = Some(path.clone());
    (server::start(&cfg).unwrap(), path)
}

fn id_tls(relay: &RelayHandle, kind: Kind, name: &str) -> TlsOptions {
    tls_for(relay, kind, name)
}

/// Pumps a client with `tls` for a while; asserts it never got past the
/// handshake (no HelloAck, so no Connected) and returns its events.
fn assert_refused(relay: &RelayHandle, tls: &TlsOptions, what: &str) -> Vec<Event> {
    let mut c = client_as(relay, tls, &[(Role::Agent, "echo")], 77);
    let events = events_for(&mut c, Duration::from_millis(1500));
    assert!(!events.iter().any(|e| matches!(e, Event::Connected)), "{what}: the relay accepted it: {events:?}");
    events
}

/// Waits until `f(totals)` holds (counters are published as they happen;
/// reaping a failed handshake waits for QUIC's closing period).
fn wait_counter(relay: &RelayHandle, what: &str, f: impl Fn(&StatsSnapshot) -> bool) {
    let end = Instant::now() + T;
    while !f(&relay.totals()) {
        assert!(Instant::now() < end, "{what}: counter never moved: {:?}", relay.totals());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn bad_client_certificates_are_refused_in_the_handshake() {
    let (relay, _) = start(POLICY);
    let pki = relay.dev_pki.clone().unwrap();
    let dir = tmpdir("certs");
    let ca = pki.ca.clone();
    let raw = |name: &str, uris: &[&str], valid: (i64, i64)| {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        pki::issue_raw(&pki.ca_files, uris, valid, &cert, &key).unwrap();
        mutual_tls(&ca, cert, key)
    };
    let now = unix_now();
    let day = 86_400;

    // A control: the good certificate is accepted.
    let mut ok = client_as(&relay, &id_tls(&relay, Kind::Agent, "alice"), &[(Role::Agent, "echo")], 1);
    assert!(ok.wait_for(T, |e| matches!(e, Event::Connected), |_| {}).is_some());

    // No client certificate at all.
    let none = UdpClient::tls_with_ca(&ca);
    assert_refused(&relay, &none, "no certificate");
    wait_counter(&relay, "no certificate", |t| t.handshakes_failed >= 1);

    // Signed by another CA (same trust domain, same name).
    let other = pki::init_ca(&dir.join("other-ca"), DEV_TRUST_DOMAIN, 1).unwrap();
    let alice = Identity { trust_domain: DEV_TRUST_DOMAIN.into(), kind: Kind::Agent, name: "alice".into() };
    let (c, k) = pki::issue(&other, &alice, &[], &[], 1, &dir.join("other-out")).unwrap();
    assert_refused(&relay, &mutual_tls(&ca, c, k), "another CA");
    wait_counter(&relay, "another CA", |t| t.auth_rejected_unknown_ca >= 1);

    // Expired, and not yet valid.
    assert_refused(&relay, &raw("expired", &["spiffe://dev.ztna/agent/alice"], (now - 2 * day, now - day)), "expired");
    wait_counter(&relay, "expired", |t| t.auth_rejected_validity >= 1);
    assert_refused(&relay, &raw("future", &["spiffe://dev.ztna/agent/alice"], (now + day, now + 2 * day)), "future");
    wait_counter(&relay, "not yet valid", |t| t.auth_rejected_validity >= 2);

    // Two URI SANs; no URI SAN; wrong trust domain; a relay identity.
    let valid = (now - 60, now + day);
    let two = raw("two", &["spiffe://dev.ztna/agent/alice", "spiffe://dev.ztna/connector/echo-conn"], valid);
    assert_refused(&relay, &two, "two URI SANs");
    assert_refused(&relay, &raw("nouri", &[], valid), "no URI SAN");
    assert_refused(&relay, &raw("evil", &["spiffe://evil.example/agent/alice"], valid), "wrong trust domain");
    assert_refused(&relay, &raw("relay", &["spiffe://dev.ztna/relay/r"], valid), "relay identity as a client");
    assert_refused(&relay, &raw("http", &["https://dev.ztna/agent/alice"], valid), "not a SPIFFE ID");
    wait_counter(&relay, "identity", |t| t.auth_rejected_identity >= 5);
    // Two URI SANs, the second not ASCII: it still counts, so this is not
    // "exactly one" and alice's URI is not taken as the identity.
    let (c, k) = (dir.join("bytes.pem"), dir.join("bytes.key"));
    let uris: [&[u8]; 2] = [b"spiffe://dev.ztna/agent/alice", b"spiffe://dev.ztna/agent/\xff\xfe"];
    pki::issue_raw_bytes(&pki.ca_files, &uris, valid, &c, &k).unwrap();
    assert_refused(&relay, &mutual_tls(&ca, c, k), "a second URI SAN that is not ASCII");
    wait_counter(&relay, "unreadable URI SAN", |t| t.auth_rejected_identity >= 6);

    // None of this created a usable connection, and the good client is fine.
    let t = relay.totals();
    assert_eq!(t.registrations_ok, 0, "nothing registered: {t:?}");
    assert!(ok.session.is_connected());
    relay.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_policy_denies_by_default_and_by_identity() {
    let (relay, _) = start(POLICY);
    let mut echo_conn = client_as(&relay, &id_tls(&relay, Kind::Connector, "echo-conn"), &[], 1);
    echo_conn.session.register(Role::Connector, svc("echo"));
    until_registered(&mut echo_conn, 1);
    let deny = |tls: TlsOptions, role: Role, service: &str, what: &str| {
        let mut c = client_as(&relay, &tls, &[(role, service)], 9);
        match c.wait_for(T, |e| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. }), |_| {}) {
            Some(Event::RegisterFailed { code, .. }) => assert_eq!(code, Code::DENIED, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(c.session.is_connected(), "{what}: a denial does not close the connection");
    };
    // A connector registering for a service it may not serve.
    deny(id_tls(&relay, Kind::Connector, "db-conn"), Role::Connector, "echo", "db-conn serving echo");
    // A connector for a service the policy does not name (default deny).
    deny(id_tls(&relay, Kind::Connector, "echo-conn"), Role::Connector, "wiki", "unnamed service");
    // An agent reaching a service it may not reach.
    deny(id_tls(&relay, Kind::Agent, "bob"), Role::Agent, "echo", "bob reaching echo");
    // An agent trying to register as a connector (even for its own service).
    deny(id_tls(&relay, Kind::Agent, "alice"), Role::Connector, "echo", "alice as connector");
    // A connector trying to act as an agent.
    deny(id_tls(&relay, Kind::Connector, "echo-conn"), Role::Agent, "echo", "connector as agent");
    assert_eq!(relay.totals().registrations_denied, 5);

    // The allowed ones work, by name and by group.
    let mut alice = client_as(&relay, &id_tls(&relay, Kind::Agent, "alice"), &[(Role::Agent, "echo")], 2);
    let flow = until_registered(&mut alice, 1)[0];
    assert_eq!(round_trip(&mut alice, std::slice::from_mut(&mut echo_conn), flow, b"hi").as_deref(), Some(&b"hi"[..]));
    let mut db_conn = client_as(&relay, &id_tls(&relay, Kind::Connector, "db-conn"), &[(Role::Connector, "db")], 3);
    until_registered(&mut db_conn, 1);
    let mut bob = client_as(&relay, &id_tls(&relay, Kind::Agent, "bob"), &[(Role::Agent, "db")], 4);
    until_registered(&mut bob, 1);
    relay.shutdown();
}

#[test]
fn the_connector_learns_the_agent_identity_in_flow_open() {
    let (relay, _) = start(POLICY);
    let mut conn = client_as(&relay, &id_tls(&relay, Kind::Connector, "echo-conn"), &[(Role::Connector, "echo")], 1);
    until_registered(&mut conn, 1);
    let mut alice = client_as(&relay, &id_tls(&relay, Kind::Agent, "alice"), &[(Role::Agent, "echo")], 2);
    until_registered(&mut alice, 1);
    match conn.wait_for(T, |e| matches!(e, Event::FlowOpened { .. }), |_| {}) {
        Some(Event::FlowOpened { agent_id, .. }) => assert_eq!(agent_id, "spiffe://dev.ztna/agent/alice"),
        other => panic!("{other:?}"),
    }
    relay.shutdown();
}

#[test]
fn flow_ids_do_not_cross_connections() {
    let (relay, _) = start(POLICY);
    let mut echo_conn =
        client_as(&relay, &id_tls(&relay, Kind::Connector, "echo-conn"), &[(Role::Connector, "echo")], 1);
    let mut db_conn = client_as(&relay, &id_tls(&relay, Kind::Connector, "db-conn"), &[(Role::Connector, "db")], 2);
    until_registered(&mut echo_conn, 1);
    until_registered(&mut db_conn, 1);
    let mut alice = client_as(&relay, &id_tls(&relay, Kind::Agent, "alice"), &[(Role::Agent, "echo")], 3);
    let mut bob = client_as(&relay, &id_tls(&relay, Kind::Agent, "bob"), &[(Role::Agent, "db")], 4);
    let alice_flow = until_registered(&mut alice, 1)[0];
    let bob_flow = until_registered(&mut bob, 1)[0];
    // Learn the connector-side flow id of alice's leg.
    let echo_leg = match echo_conn.wait_for(T, |e| matches!(e, Event::FlowOpened { .. }), |_| {}) {
        Some(Event::FlowOpened { flow, .. }) => flow,
        other => panic!("{other:?}"),
    };
    let before = relay.totals().drop_unknown_flow;
    // Bob guesses every small flow id, alice's included (and alice's exact
    // id), on his own connection; db-conn replays echo-conn's leg id.
    for f in (0..64).chain([alice_flow, echo_leg]) {
        if f != bob_flow {
            let _ = bob.session.send_datagram(f, b"bob-was-here");
        }
        let _ = db_conn.session.send_datagram(f, b"db-conn-was-here");
        bob.pump();
        db_conn.pump();
    }
    let mut stolen = Vec::new();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + Duration::from_millis(700);
    while Instant::now() < end {
        for c in [&mut echo_conn, &mut alice] {
            c.pump();
            while let Some(n) = c.session.recv_datagram(&mut buf) {
                stolen.push(buf[..n].to_vec());
            }
        }
        bob.pump();
        db_conn.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(stolen.is_empty(), "cross-connection delivery: {stolen:?}");
    let dropped = relay.totals().drop_unknown_flow - before;
    assert!(dropped >= 120, "guesses counted as unknown flows: {dropped}");
    // Alice's own flow still works.
    assert!(round_trip(&mut alice, std::slice::from_mut(&mut echo_conn), alice_flow, b"mine").is_some());
    relay.shutdown();
}

#[test]
fn a_policy_reload_revokes_and_a_broken_one_is_refused() {
    let (relay, path) = start(POLICY);
    let mut echo_conn =
        client_as(&relay, &id_tls(&relay, Kind::Connector, "echo-conn"), &[(Role::Connector, "echo")], 1);
    let mut db_conn = client_as(&relay, &id_tls(&relay, Kind::Connector, "db-conn"), &[(Role::Connector, "db")], 2);
    until_registered(&mut echo_conn, 1);
    until_registered(&mut db_conn, 1);
    let mut alice = client_as(&relay, &id_tls(&relay, Kind::Agent, "alice"), &[(Role::Agent, "echo")], 3);
    let mut bob = client_as(&relay, &id_tls(&relay, Kind::Agent, "bob"), &[(Role::Agent, "db")], 4);
    let alice_flow = until_registered(&mut alice, 1)[0];
    let bob_flow = until_registered(&mut bob, 1)[0];
    assert!(round_trip(&mut alice, std::slice::from_mut(&mut echo_conn), alice_flow, b"before").is_some());

    // A broken file is refused; everything keeps working.
    std::fs::write(&path, "[services.echo]\nconnectors = [\"*\"]\n").unwrap();
    assert!(relay.reload().is_err());
    assert!(round_trip(&mut alice, std::slice::from_mut(&mut echo_conn), alice_flow, b"still").is_some());

    // Alice loses echo; db-conn loses db (bob with it); echo-conn keeps echo.
    std::fs::write(&path, "[services.echo]\nconnectors = [\"echo-conn\"]\n[services.db]\nagents = [\"bob\"]\n")
        .unwrap();
    relay.reload().unwrap();
    match alice.wait_for(T, |e| matches!(e, Event::FlowClosed { .. }), |_| {}) {
        Some(Event::FlowClosed { flow, code }) => assert_eq!((flow, code), (alice_flow, Code::DENIED)),
        other => panic!("alice: {other:?}"),
    }
    match db_conn.wait_for(T, |e| matches!(e, Event::FlowClosed { .. }), |_| {}) {
        Some(Event::FlowClosed { code, .. }) => assert_eq!(code, Code::DENIED),
        other => panic!("db-conn: {other:?}"),
    }
    wait_counter(&relay, "revocations", |t| t.revoked >= 2 && t.reloads >= 2);
    // Connections stay up; alice's datagrams no longer reach the connector.
    assert!(alice.session.is_connected() && db_conn.session.is_connected() && bob.session.is_connected());
    let _ = alice.session.send_datagram(alice_flow, b"after");
    let events = events_for(&mut echo_conn, Duration::from_millis(300));
    let mut buf = [0u8; 2048];
    assert!(echo_conn.session.recv_datagram(&mut buf).is_none(), "revoked flow still delivers ({events:?})");
    // Bob may still reach db, but nobody may serve it any more.
    let _ = bob.session.send_datagram(bob_flow, b"x");
    bob.pump();
    // The revoked agent does not re-register by itself on this connection.
    let later = events_for(&mut alice, Duration::from_millis(500));
    assert!(!later.iter().any(|e| matches!(e, Event::Registered { .. })), "{later:?}");
    relay.shutdown();
}

#[test]
fn a_connector_allow_list_refuses_other_agents() {
    let (relay, _) = start(
        "[services.echo]\nconnectors = [\"echo-conn\"]\nagents = [\"alice\", \"bob\"]\n", // the relay allows both
    );
    let pki = relay.dev_pki.clone().unwrap();
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = ConnectorConfig::new(
        vec![relay.local_addr],
        vec![ServiceConfig {
            name: "echo".into(),
            icmp: true,
            backend: vec![BackendRoute { protocol: Proto::Udp, port: 7, target: echo.udp_addr.into() }],
            allow_agents: Some(vec!["spiffe://dev.ztna/agent/alice".into()]),
            path: Default::default(),
        }],
    );
    let (cert, key) = pki.issue(Kind::Connector, "echo-conn").unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.ca = Some(pki.ca.clone());
    cfg.cert = Some(cert);
    cfg.key = Some(key);
    let mut connector = Connector::new(cfg, 5).unwrap();
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
    // Bob is allowed by the relay, not by the connector: it refuses his
    // end-to-end session on the identity he proved in it.
    let routes = || vec![(svc("echo"), ztna_agent::route::Cidr::new([100, 100, 0, 10].into(), 32).unwrap())];
    let mut bob = AgentLink::new(relay.local_addr, id_tls(&relay, Kind::Agent, "bob"), routes(), 2).unwrap();
    assert!(bob.wait_ready(1, Duration::from_secs(3)).is_err(), "bob's session must not come up");
    let closed = bob.events.iter().find_map(|e| match e {
        AgentEvent::SessionClosed { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(closed.as_deref().is_some_and(|r| r.contains("allow_agents")), "bob: {:?}", bob.events);
    assert!(!bob.events.iter().any(|e| matches!(e, AgentEvent::SessionUp { .. })));
    // Bob retries with a backoff (1 s, 2 s, ...): each attempt is refused.
    assert!((1..=3).contains(&stats.flows_refused.load(Ordering::Relaxed)));
    // Alice gets through to the real backend.
    let mut alice = AgentLink::new(relay.local_addr, id_tls(&relay, Kind::Agent, "alice"), routes(), 3).unwrap();
    alice.wait_ready(1, T).unwrap();
    let me = std::net::SocketAddrV4::new("10.9.0.2".parse().unwrap(), 5000);
    let svc_addr = std::net::SocketAddrV4::new("100.100.0.10".parse().unwrap(), 7);
    let mut pkt = Vec::new();
    ztna_control::packet::build_ipv4_udp(me, svc_addr, b"allowed", &mut pkt).unwrap();
    let mut got = false;
    let end = Instant::now() + T;
    let mut buf = [0u8; 2048];
    while !got && Instant::now() < end {
        let _ = alice.send_packet(&pkt);
        for _ in 0..20 {
            alice.pump();
            while let Some(n) = alice.recv_packet(&mut buf) {
                got |= buf[..n].windows(7).any(|w| w == b"allowed");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(got, "alice's packet reached the backend and came back");
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    relay.shutdown();
}

#[test]
fn clients_refuse_a_relay_they_cannot_verify() {
    let (relay, _) = start(POLICY);
    let pki = relay.dev_pki.clone().unwrap();
    let (cert, key) = pki.issue(Kind::Agent, "alice").unwrap();
    // Trusting another CA: the client refuses the relay.
    let dir = tmpdir("client-ca");
    let other = pki::init_ca(&dir, "other.example", 1).unwrap();
    let tls = mutual_tls(&other.cert, &cert, &key);
    let mut c = client_as(&relay, &tls, &[(Role::Agent, "echo")], 1);
    let events = events_for(&mut c, Duration::from_millis(1500));
    assert!(!events.iter().any(|e| matches!(e, Event::Connected)), "{events:?}");
    // A wrong server name: the relay certificate covers localhost only.
    let mut cfg =
        ztna_control::client::ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "relay.evil");
    cfg.registrations = vec![(Role::Agent, svc("echo"))];
    let good = mutual_tls(&pki.ca, &cert, &key);
    let mut c = UdpClient::new(cfg, &good, "127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let events = events_for(&mut c, Duration::from_millis(1500));
    assert!(!events.iter().any(|e| matches!(e, Event::Connected)), "{events:?}");
    relay.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reload_swaps_the_relay_certificate_without_dropping_connections() {
    let (relay, _) = start(POLICY);
    let pki = relay.dev_pki.clone().unwrap();
    let mut old = RawClient::connect(&relay);
    let name_of =
        |raw: &RawClient| pki::identity_from_der(raw.conn.peer_cert().unwrap(), DEV_TRUST_DOMAIN).unwrap().name;
    assert_eq!(name_of(&old), "dev-relay");

    // A key that does not belong to the certificate: refused, nothing changes.
    let dir = tmpdir("relay-cert");
    let id = Identity { trust_domain: DEV_TRUST_DOMAIN.into(), kind: Kind::Relay, name: "relay-2".into() };
    let ips = ["127.0.0.1".parse().unwrap()];
    let (cert2, key2) = pki::issue(&pki.ca_files, &id, &["localhost".into()], &ips, 1, &dir).unwrap();
    std::fs::copy(&cert2, &pki.cert).unwrap();
    assert!(relay.reload().is_err(), "mismatched key refused");
    assert_eq!(name_of(&RawClient::connect(&relay)), "dev-relay", "old certificate still served");

    // Certificate and key together: new handshakes get the new certificate.
    std::fs::copy(&key2, &pki.key).unwrap();
    relay.reload().unwrap();
    let end = Instant::now() + T;
    loop {
        // Workers pick the new snapshot up on their next loop turn.
        if name_of(&RawClient::connect(&relay)) == "relay-2" {
            break;
        }
        assert!(Instant::now() < end, "new certificate never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection made before the reload still works.
    old.send_msg(&ztna_control::Message::Hello { version: ztna_control::wire::VERSION, software: "old".into() });
    old.pump_for(Duration::from_millis(200));
    assert!(old.messages().iter().any(|m| matches!(m, ztna_control::Message::HelloAck { .. })));
    assert!(!old.conn.is_closed());
    relay.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The TLS alert each refusal carries (docs/PROTOCOL.md §2.3): a client
/// completes its TLS 1.3 handshake before the relay checks its
/// certificate, then receives CONNECTION_CLOSE with CRYPTO_ERROR 0x100+alert.
#[test]
fn refusals_carry_the_documented_tls_alerts() {
    let (relay, _) = start(POLICY);
    let pki = relay.dev_pki.clone().unwrap();
    let dir = tmpdir("alerts");
    let now = unix_now();
    let raw = |name: &str, uris: &[&str], valid: (i64, i64)| {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        pki::issue_raw(&pki.ca_files, uris, valid, &cert, &key).unwrap();
        mutual_tls(&pki.ca, cert, key)
    };
    let close_code = |tls: &TlsOptions| {
        let mut c = RawClient::connect_as(&relay, tls);
        c.pump_for(Duration::from_secs(2));
        c.conn.peer_error().map(|e| (e.is_app, e.error_code))
    };
    let alice = "spiffe://dev.ztna/agent/alice";
    let expired = raw("expired", &[alice], (now - 7200, now - 3600));
    assert_eq!(close_code(&expired), Some((false, 0x12d)), "certificate_expired");
    let two = raw("two", &[alice, "spiffe://dev.ztna/agent/bob"], (now - 60, now + 3600));
    assert_eq!(close_code(&two), Some((false, 0x128)), "identity rule: handshake_failure");
    let other = pki::init_ca(&dir.join("other"), DEV_TRUST_DOMAIN, 1).unwrap();
    let id = Identity { trust_domain: DEV_TRUST_DOMAIN.into(), kind: Kind::Agent, name: "alice".into() };
    let (c, k) = pki::issue(&other, &id, &[], &[], 1, &dir.join("o")).unwrap();
    // The impostor CA has the same subject as the real one, so the chain
    // builds and the signature check fails: decrypt_error.
    assert_eq!(close_code(&mutual_tls(&pki.ca, c, k)), Some((false, 0x133)), "decrypt_error");
    let none = UdpClient::tls_with_ca(&pki.ca);
    assert_eq!(close_code(&none), Some((false, 0x174)), "certificate_required");
    relay.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}
