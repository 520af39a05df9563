#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code
//! End-to-end sessions through real relay workers, in memory: what the
//! relay can see (never a tunneled byte), what a relay that tampers with
//! payloads achieves (nothing but drops), what another agent on the same
//! connector can do with captured inner packets (nothing), and an inner
//! handshake flood from one identity (bounded; another identity connects).

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ztna_agent::agent_core::{AgentConfig, AgentCore, SessionState};
use ztna_agent::direct::PathSettings;
use ztna_agent::route::Cidr;
use ztna_connector::{BackendRoute, ConnectorConfig, Proto, ServiceConfig, Target};
use ztna_control::candidate::PathPolicy;
use ztna_control::client::{ClientConfig, ClientSession};
use ztna_control::e2e::{self, E2eSession, Rejections};
use ztna_control::identity::Kind;
use ztna_control::packet::{self, TcpFlags, TcpHeader};
use ztna_control::{datagram, quic, Role, ServiceName};
use ztna_relay::pki::DevPki;
use ztna_testkit::hosts::{AgentHost, ClientHost, ConnectorHost, RelayHost, RelaySpec};
use ztna_testkit::net::{HostId, NetConfig, Sim};

const POLICY: &str = "[services.echo]\nconnectors = [\"c\"]\nagents = [\"*\"]\n";
const SERVICE_ADDR: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(100, 100, 0, 10), 7);
const INNER_SRC: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 9, 0, 2), 5000);
const MARKER: &[u8] = b"MARKER-7f3a-not-for-the-relay";
const RELAY: &str = "127.0.0.1:4433";

fn relay() -> SocketAddr {
    RELAY.parse().unwrap()
}

fn backend() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 7], 7))
}

fn connector(pki: &DevPki, now: Instant, tune: impl FnOnce(&mut ConnectorConfig)) -> ConnectorHost {
    let svc = ServiceConfig {
        name: "echo".into(),
        icmp: true,
        backend: vec![
            BackendRoute { protocol: Proto::Udp, port: 7, target: Target::from(backend()) },
            BackendRoute { protocol: Proto::Tcp, port: 7, target: Target::from(backend()) },
        ],
        allow_agents: None,
        path: Default::default(),
    };
    let mut cfg = ConnectorConfig::new(vec![relay()], vec![svc]);
    let (cert, key) = pki.issue(Kind::Connector, "c").unwrap();
    cfg.ca = Some(pki.ca.clone());
    cfg.cert = Some(cert);
    cfg.key = Some(key);
    tune(&mut cfg);
    let targets = HashMap::from([(Target::from(backend()), backend())]);
    ConnectorHost::new("127.0.0.3:4434".parse().unwrap(), cfg, targets, &[relay()], 11, now).unwrap()
}

fn agent(pki: &DevPki, name: &str, port: u16, now: Instant) -> AgentHost {
    let local: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let cfg = AgentConfig {
        relay: relay(),
        fallback_relays: Vec::new(),
        server_name: "localhost".into(),
        local,
        tls: pki.client_tls(Kind::Agent, name).unwrap(),
        pinned_connectors: Vec::new(),
        // What the relay sees and does is the subject here: every packet
        // goes through it (sim_direct.rs has direct paths).
        paths: PathSettings { default_policy: PathPolicy::RelayOnly, ..PathSettings::default() },
        routes: vec![(ServiceName::new("echo").unwrap(), Cidr::new("100.100.0.0".parse().unwrap(), 24).unwrap())],
    };
    AgentHost::new(local, AgentCore::new(cfg, u64::from(port), now).unwrap())
}

/// A 1000-byte UDP packet to the echo service carrying the marker.
fn udp_probe(seq: u8) -> Vec<u8> {
    let mut payload = MARKER.to_vec();
    payload.resize(1000, seq);
    let mut p = Vec::new();
    packet::build_ipv4_udp(INNER_SRC, SERVICE_ADDR, &payload, &mut p).unwrap();
    p
}

/// A TCP segment (ACK, with data) to the echo service carrying the marker.
fn tcp_probe() -> Vec<u8> {
    let mut payload = MARKER.to_vec();
    payload.resize(1000, b'.');
    let header =
        TcpHeader { seq: 1, ack: 1, flags: TcpFlags(TcpFlags::PSH.0 | TcpFlags::ACK.0), window: 65535, mss: None };
    let mut p = Vec::new();
    packet::build_ipv4_tcp(SocketAddrV4::new(*INNER_SRC.ip(), 5001), SERVICE_ADDR, &header, &payload, &mut p).unwrap();
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every datagram the relay's workers received, in order.
type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

fn sim_with_relay(pki: &DevPki, tap: impl Fn(&mut [u8]) + Send + Sync + 'static) -> (Sim, HostId) {
    let mut sim = Sim::new(NetConfig { delay: Duration::from_millis(2), ..NetConfig::default() });
    let r = sim.add(RelayHost::new(RelaySpec::dev(relay(), 2, pki, POLICY).unwrap(), sim.now()).unwrap());
    let tap = Arc::new(tap);
    for w in sim.host::<RelayHost>(r).workers_mut() {
        let t = Arc::clone(&tap);
        w.set_datagram_tap(Some(Box::new(move |d: &mut [u8]| t(d))));
    }
    sim.max_step = Duration::from_millis(5);
    (sim, r)
}

/// The inner packet of a datagram (after its flow id).
fn inner(d: &[u8]) -> &[u8] {
    datagram::parse(d).map(|(_, p)| p).unwrap_or_default()
}

#[test]
fn the_relay_never_sees_a_tunneled_byte() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let (mut sim, _) = sim_with_relay(&pki, move |d| s.lock().unwrap().push(d.to_vec()));
    let now = sim.now();
    let c = sim.add(connector(&pki, now, |_| {}));
    let a = sim.add(agent(&pki, "a", 5000, now));
    // Queue tunneled packets as soon as the flow exists, before the inner
    // handshake: they wait in the agent.
    assert!(sim.run_until(Duration::from_secs(10), |sim| sim.host::<AgentHost>(a).registered(1)));
    for i in 0..3 {
        sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(i)).unwrap();
    }
    sim.host::<AgentHost>(a).core.send_ip_packet(&tcp_probe()).unwrap();
    let mut seen_before_up = None;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        if seen_before_up.is_none() && sim.host::<AgentHost>(a).core.sessions_up() == 1 {
            seen_before_up = Some(seen.lock().unwrap().len());
        }
        sim.host::<AgentHost>(a).ip_packets.len() >= 3
    }));
    for i in 3..20 {
        sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(i)).unwrap();
        sim.host::<AgentHost>(a).core.send_ip_packet(&tcp_probe()).unwrap();
    }
    let echoed = |sim: &mut Sim| sim.host::<AgentHost>(a).ip_packets.iter().filter(|p| contains(p, MARKER)).count();
    assert!(sim.run_until(Duration::from_secs(10), |sim| echoed(sim) >= 20));

    // The tunnel works: the echoes carry the marker back to the agent ...
    let conn = sim.host::<ConnectorHost>(c);
    assert!(conn.backends.udp_received.iter().any(|(_, p)| contains(p, MARKER)), "the backend got the marker");
    let stats = conn.engine.stats().snapshot();
    assert!(stats.drop_tcp_no_connection > 0, "the TCP segments reached the connector's TCP endpoint");
    // ... and the relay saw none of it, in either direction.
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 40, "the relay forwarded the traffic: {}", seen.len());
    assert!(!seen.iter().any(|d| contains(d, MARKER)), "a tunneled byte in clear at the relay");
    // Before the session was up, only handshake packets crossed: long
    // headers, or short-header packets too small to hold a 1000-byte
    // tunneled packet (the agent's SessionHello, ACKs).
    let before = seen_before_up.expect("the session came up");
    for d in &seen[..before] {
        let pkt = inner(d);
        assert!(pkt.first().is_some_and(|f| f & 0x80 != 0) || pkt.len() < 600, "{} bytes before up", pkt.len());
    }
    drop(seen);
    who_is_connected(&mut sim, c, a);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// What the connector's `/status` and the agent's status report: the relay
/// session with the observed address, and the session with the identity
/// each end proved.
fn who_is_connected(sim: &mut Sim, c: HostId, a: HostId) {
    let st = sim.host::<ConnectorHost>(c).engine.status();
    let [r] = st.relays.as_slice() else { panic!("one relay: {st:?}") };
    assert_eq!(r.relay, relay());
    assert!(r.connected, "{st:?}");
    assert_eq!(r.observed, Some("127.0.0.3:4434".parse().unwrap()), "{st:?}");
    assert_eq!(r.services, ["echo"]);
    assert_eq!(r.agent_flows, 1);
    assert_eq!((st.sessions_total, st.sessions_up, st.sessions_omitted), (1, 1, 0), "{st:?}");
    let [s] = st.sessions.as_slice() else { panic!("one session: {st:?}") };
    assert!(s.proven && s.up && s.agent.ends_with("/agent/a"), "{s:?}");
    assert_eq!((s.service.as_deref(), s.relay), (Some("echo"), Some(relay())));
    assert!(st.udp_flows >= 1, "{st:?}");
    let t = sim.host::<AgentHost>(a).core.tunnel_status();
    let [echo] = t.as_slice() else { panic!("one tunnel: {t:?}") };
    assert_eq!((echo.service.as_str(), echo.session), ("echo", SessionState::Up));
    assert!(echo.flow.is_some() && echo.proven.as_deref().is_some_and(|p| p.ends_with("/connector/c")), "{echo:?}");
    assert_eq!(echo.connector, echo.proven);
}

#[test]
fn a_relay_that_flips_bits_gets_its_packets_rejected_and_the_session_recovers() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let flip = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&flip);
    let (mut sim, _) = sim_with_relay(&pki, move |d: &mut [u8]| {
        if f.load(Ordering::Relaxed) {
            if let Some(last) = d.last_mut() {
                *last ^= 0x20;
            }
        }
    });
    let now = sim.now();
    let c = sim.add(connector(&pki, now, |_| {}));
    let a = sim.add(agent(&pki, "a", 5000, now));
    assert!(sim.run_until(Duration::from_secs(10), |sim| sim.host::<AgentHost>(a).core.sessions_up() == 1));

    flip.store(true, Ordering::Relaxed);
    let received_before = sim.host::<ConnectorHost>(c).backends.udp_received.len();
    for i in 0..10 {
        sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(i)).unwrap();
    }
    sim.run_until(Duration::from_secs(2), |_| false);
    let conn = sim.host::<ConnectorHost>(c);
    assert_eq!(conn.backends.udp_received.len(), received_before, "nothing altered reached the backend");
    let rejected = conn.engine.stats().snapshot().e2e_packets_rejected;
    assert!(rejected >= 10, "altered packets counted: {rejected}");
    assert!(sim.host::<AgentHost>(a).ip_packets.is_empty());

    flip.store(false, Ordering::Relaxed);
    let sent_at = sim.now();
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        let h = sim.host::<AgentHost>(a);
        if h.ip_packets.is_empty() && sim.now() > sent_at + Duration::from_millis(100) {
            let _ = sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(99));
        }
        !sim.host::<AgentHost>(a).ip_packets.is_empty()
    }));
    let h = sim.host::<AgentHost>(a);
    assert!(contains(&h.ip_packets[0], MARKER));
    assert_eq!(h.core.stats().e2e_handshakes, 1, "the same session recovered: no new handshake");
    assert!(h.core.stats().e2e_packets_rejected > 0 || rejected > 0);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A protocol client registered as an agent for echo under `name`.
fn raw_agent(pki: &DevPki, name: &str, port: u16, now: Instant) -> ClientHost {
    let local: SocketAddr = format!("127.0.0.5:{port}").parse().unwrap();
    let mut cfg = ClientConfig::new(relay(), local, "localhost");
    cfg.registrations = vec![(Role::Agent, ServiceName::new("echo").unwrap())];
    let tls = pki.client_tls(Kind::Agent, name).unwrap();
    ClientHost::new(local, ClientSession::new(cfg, quic::client_config(&tls).unwrap(), u64::from(port), now))
}

fn flow_of(h: &ClientHost) -> Option<u32> {
    h.events.iter().find_map(|e| match e {
        ztna_control::client::Event::Registered { flow, .. } => Some(*flow),
        _ => None,
    })
}

#[test]
fn another_agent_cannot_read_or_inject_into_a_session() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let captured: Seen = Arc::default();
    let cap = Arc::clone(&captured);
    let (mut sim, _) = sim_with_relay(&pki, move |d| cap.lock().unwrap().push(d.to_vec()));
    let now = sim.now();
    let c = sim.add(connector(&pki, now, |_| {}));
    let a = sim.add(agent(&pki, "alice", 5000, now));
    let m = sim.add(raw_agent(&pki, "mallory", 6000, now));
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        sim.host::<AgentHost>(a).core.sessions_up() == 1 && flow_of(sim.host::<ClientHost>(m)).is_some()
    }));
    for i in 0..5 {
        sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(i)).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(5), |sim| sim.host::<AgentHost>(a).ip_packets.len() >= 5));
    let received = sim.host::<ConnectorHost>(c).backends.udp_received.len();
    let rejected = sim.host::<ConnectorHost>(c).engine.stats().snapshot().e2e_packets_rejected;

    // Mallory replays every inner packet she could get hold of (here: all
    // of them, as the relay saw them) on her own flow, and forges more.
    let flow = flow_of(sim.host::<ClientHost>(m)).unwrap();
    let packets: Vec<Vec<u8>> = captured.lock().unwrap().iter().map(|d| inner(d).to_vec()).collect();
    let mut sent = 0;
    for p in &packets {
        let mut forged = p.clone();
        if let Some(b) = forged.get_mut(20) {
            *b ^= 1;
        }
        for pkt in [p, &forged] {
            if sim.host::<ClientHost>(m).session.send_datagram(flow, pkt).is_ok() {
                sent += 1;
            }
        }
        sim.run_until(Duration::from_millis(2), |_| false);
    }
    sim.run_until(Duration::from_secs(1), |_| false);
    assert!(sent > 20);
    let conn = sim.host::<ConnectorHost>(c);
    assert_eq!(conn.backends.udp_received.len(), received, "nothing replayed or forged reached the backend");
    assert!(conn.engine.stats().snapshot().e2e_packets_rejected > rejected, "the replays were rejected");
    let got = &sim.host::<ClientHost>(m).datagrams;
    assert!(!got.iter().any(|(_, d)| contains(d, MARKER)), "mallory read nothing");
    // Alice's session still works, on her own flow.
    sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(42)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| sim.host::<AgentHost>(a).ip_packets.len() >= 6));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn an_inner_handshake_flood_from_one_identity_leaves_room_for_others() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let (mut sim, _) = sim_with_relay(&pki, |_| {});
    let now = sim.now();
    let c = sim.add(connector(&pki, now, |cfg| {
        cfg.max_e2e_handshakes = 16;
        cfg.max_e2e_handshakes_per_identity = 4;
    }));
    // Twelve connections of one identity, each starting an inner handshake
    // it never finishes.
    let flooders: Vec<HostId> = (0..12).map(|i| sim.add(raw_agent(&pki, "mallory", 6000 + i, now))).collect();
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        flooders.iter().all(|f| flow_of(sim.host::<ClientHost>(*f)).is_some())
    }));
    let tls = pki.client_tls(Kind::Agent, "mallory").unwrap();
    let mut cfg = e2e::client_config(&tls, Arc::new(Rejections::default())).unwrap();
    for (i, f) in flooders.iter().enumerate() {
        let connector_id = "spiffe://dev.ztna/connector/c";
        let svc = ServiceName::new("echo").unwrap();
        let mut s = E2eSession::connect(&mut cfg, [i as u8 + 1; 8], "dev.ztna", connector_id, svc, sim.now()).unwrap();
        let mut out = [0u8; 1500];
        let (n, _) = s.poll_transmit(&mut out, sim.now()).unwrap();
        let h = sim.host::<ClientHost>(*f);
        let flow = flow_of(h).unwrap();
        h.session.send_datagram(flow, &out[..n]).unwrap();
    }
    sim.run_until(Duration::from_millis(500), |_| false);
    let conn = sim.host::<ConnectorHost>(c);
    let stats = conn.engine.stats().snapshot();
    assert_eq!(conn.engine.e2e_handshaking(), 4, "{stats:?}");
    assert_eq!(stats.e2e_handshakes_refused, 8, "{stats:?}");

    // Another identity still gets its session.
    let a = sim.add(agent(&pki, "alice", 5000, sim.now()));
    assert!(sim.run_until(Duration::from_secs(10), |sim| sim.host::<AgentHost>(a).core.sessions_up() == 1));
    sim.host::<AgentHost>(a).core.send_ip_packet(&udp_probe(1)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| !sim.host::<AgentHost>(a).ip_packets.is_empty()));
    // The flood's half-open sessions expire (handshake timeout).
    assert!(sim.run_until(Duration::from_secs(10), |sim| sim.host::<ConnectorHost>(c).engine.e2e_handshaking() == 0));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn an_agent_the_connector_denies_retries_at_the_backoff_cap_not_every_second() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let (mut sim, _) = sim_with_relay(&pki, |_| {});
    let now = sim.now();
    let td =
        pki.client_tls(Kind::Agent, "x").map(|t| ztna_control::e2e::own_identity(&t).unwrap().trust_domain).unwrap();
    let c = sim.add(connector(&pki, now, |cfg| {
        cfg.services[0].allow_agents = Some(vec![format!("spiffe://{td}/agent/someone-else")]);
    }));
    let a = sim.add(agent(&pki, "a", 5000, now));
    let handshakes = |sim: &mut Sim| sim.host::<AgentHost>(a).core.stats().e2e_handshakes;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        sim.host::<ConnectorHost>(c).engine.stats().snapshot().flows_refused >= 1
    }));
    assert_eq!(handshakes(&mut sim), 1);
    // A refused session is not retried on the short backoff (1 s, 2 s, …) ...
    // (quiche's timers run on the wall clock, so this takes 25 s of it.)
    sim.run_until(Duration::from_secs(25), |_| false);
    assert_eq!(handshakes(&mut sim), 1, "retried before the backoff cap");
    assert_eq!(sim.host::<AgentHost>(a).core.sessions_up(), 0);
    // ... but it is retried: a policy fix needs no agent restart.
    assert!(sim.run_until(Duration::from_secs(10), |sim| handshakes(sim) >= 2));
    let _ = std::fs::remove_dir_all(&pki.dir);
}
