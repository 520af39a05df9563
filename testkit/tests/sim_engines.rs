#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The three engines together, without a socket: relay workers, a connector
//! engine (over in-memory echo backends) and agent cores exchange packets
//! through testkit's in-memory network, which delays, reorders, duplicates
//! and drops them, on a virtual clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ztna_agent::agent_core::{AgentConfig, AgentCore, AgentEvent};
use ztna_agent::direct::PathSettings;
use ztna_agent::route::Cidr;
use ztna_connector::{BackendRoute, ConnectorConfig, PathMode, Proto, ServiceConfig, Target};
use ztna_control::candidate::PathPolicy;
use ztna_control::e2e::PathState;
use ztna_control::identity::Kind;
use ztna_control::packet::{self, Transport};
use ztna_control::ServiceName;
use ztna_relay::pki::DevPki;
use ztna_testkit::hosts::{AgentHost, ConnectorHost, RelayHost, RelaySpec, Steering};
use ztna_testkit::net::{HostId, NetConfig, Sim};

const POLICY: &str = "[services.echo]\nconnectors = [\"c\"]\nagents = [\"*\"]\n";
/// Where the agents route the service, and the address they send to.
const SERVICE_NET: &str = "100.100.0.0";
const SERVICE_ADDR: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(100, 100, 0, 10), 7);
/// Every agent uses the same inner source address: only the flow tells
/// the connector (and the relay) whose packet it is.
const INNER_SRC: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 9, 0, 2), 5000);

fn backend() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 7], 7))
}

fn connector(pki: &DevPki, at: SocketAddr, relays: &[SocketAddr], now: Instant) -> ConnectorHost {
    connector_with(pki, at, relays, PathPolicy::Auto, now)
}

fn connector_with(
    pki: &DevPki,
    at: SocketAddr,
    relays: &[SocketAddr],
    path: PathPolicy,
    now: Instant,
) -> ConnectorHost {
    let svc = ServiceConfig {
        name: "echo".into(),
        icmp: true,
        backend: vec![BackendRoute { protocol: Proto::Udp, port: 7, target: Target::from(backend()) }],
        allow_agents: None,
        path: PathMode(path),
    };
    let mut cfg = ConnectorConfig::new(relays.to_vec(), vec![svc]);
    let (cert, key) = pki.issue(Kind::Connector, "c").unwrap();
    cfg.ca = Some(pki.ca.clone());
    cfg.cert = Some(cert);
    cfg.key = Some(key);
    let targets = HashMap::from([(Target::from(backend()), backend())]);
    ConnectorHost::new(at, cfg, targets, relays, 11, now).unwrap()
}

fn agent(pki: &DevPki, i: usize, relay: SocketAddr, fallback: Vec<SocketAddr>, now: Instant) -> AgentHost {
    // These tests are about the relay path unless they say otherwise: the
    // agent never leaves it.
    agent_with(pki, i, relay, fallback, PathPolicy::RelayOnly, now)
}

fn agent_with(
    pki: &DevPki,
    i: usize,
    relay: SocketAddr,
    fallback: Vec<SocketAddr>,
    policy: PathPolicy,
    now: Instant,
) -> AgentHost {
    let local: SocketAddr = format!("127.0.0.2:{}", 5000 + i).parse().unwrap();
    let cfg = AgentConfig {
        relay,
        fallback_relays: fallback,
        server_name: "localhost".into(),
        local,
        tls: pki.client_tls(Kind::Agent, &format!("a{i}")).unwrap(),
        pinned_connectors: Vec::new(),
        paths: PathSettings { default_policy: policy, ..PathSettings::default() },
        routes: vec![(ServiceName::new("echo").unwrap(), Cidr::new(SERVICE_NET.parse().unwrap(), 24).unwrap())],
    };
    AgentHost::new(local, AgentCore::new(cfg, 100 + i as u64, now).unwrap())
}

/// The UDP packet agent `i` sends as its `seq`th: its index and the number
/// in the payload.
fn probe(i: usize, seq: u32) -> Vec<u8> {
    let mut payload = vec![i as u8];
    payload.extend_from_slice(&seq.to_be_bytes());
    let mut p = Vec::new();
    packet::build_ipv4_udp(INNER_SRC, SERVICE_ADDR, &payload, &mut p).unwrap();
    p
}

/// The payload of an echo as the agent's TUN device gets it: from the
/// service address back to the inner source.
fn echo_payload(ip: &[u8]) -> Vec<u8> {
    let v4 = packet::parse_ipv4(ip).expect("IPv4 from the tunnel");
    match packet::parse_transport(&v4) {
        Ok(Transport::Udp { src_port, dst_port, payload }) => {
            assert_eq!(SocketAddrV4::new(v4.src, src_port), SERVICE_ADDR, "the echo comes from the service");
            assert_eq!(SocketAddrV4::new(v4.dst, dst_port), INNER_SRC);
            payload.to_vec()
        }
        other => panic!("not a UDP echo: {other:?}"),
    }
}

/// Sends one probe per agent every `pace` once it is registered, and
/// counts the echoes each gets, checking that each is its own.
struct Traffic {
    pace: Duration,
    per_agent: u32,
    sent: HashMap<usize, u32>,
    last: HashMap<usize, Instant>,
    echoed: HashMap<usize, u32>,
}

impl Traffic {
    fn new(pace: Duration, per_agent: u32) -> Traffic {
        Traffic { pace, per_agent, sent: HashMap::new(), last: HashMap::new(), echoed: HashMap::new() }
    }

    fn step(&mut self, sim: &mut Sim, agents: &[HostId]) {
        let now = sim.now();
        for (i, id) in agents.iter().enumerate() {
            let a = sim.host::<AgentHost>(*id);
            for ip in a.ip_packets.drain(..) {
                let payload = echo_payload(&ip);
                assert_eq!(payload.first(), Some(&(i as u8)), "agent {i} got another agent's echo");
                *self.echoed.entry(i).or_default() += 1;
            }
            let due = self.last.get(&i).is_none_or(|t| now.duration_since(*t) >= self.pace);
            let n = self.sent.entry(i).or_default();
            if a.core.sessions_up() == 1 && due && *n < self.per_agent && a.core.send_ip_packet(&probe(i, *n)).is_ok() {
                *n += 1;
                self.last.insert(i, now);
            }
        }
    }

    fn echoed(&self, i: usize) -> u32 {
        self.echoed.get(&i).copied().unwrap_or(0)
    }
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// An echo crosses four lossy hops (agent→relay→connector→relay→agent) at
/// 5 % loss each: about 81 % come back on average; 65 % leaves room for
/// the variance of 150 samples.
const MIN_ECHOES: u32 = 98;

#[test]
fn relay_connector_and_agents_deliver_each_echo_to_its_agent_over_a_lossy_network() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let cfg = NetConfig {
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(15),
        loss: 0.05,
        duplicate: 0.02,
        seed: 3,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(cfg);
    let mut spec = RelaySpec::dev(relay, 2, &pki, POLICY).unwrap();
    spec.steering = Steering::Random(5);
    let r = sim.add(RelayHost::new(spec, sim.now()).unwrap());
    let now = sim.now();
    let c = sim.add(connector(&pki, "127.0.0.3:4434".parse().unwrap(), &[relay], now));
    let agents: Vec<HostId> = (0..3).map(|i| sim.add(agent(&pki, i, relay, Vec::new(), now))).collect();

    let mut traffic = Traffic::new(Duration::from_millis(5), 150);
    sim.max_step = Duration::from_millis(5);
    let done = sim.run_until(Duration::from_secs(30), |sim| {
        traffic.step(sim, &agents);
        (0..3).all(|i| traffic.echoed(i) >= MIN_ECHOES)
    });
    let conn = sim.host::<ConnectorHost>(c);
    let stats = conn.engine.stats().snapshot();
    assert!(done, "echoes per agent {:?}; connector {stats:?}", traffic.echoed);
    // Three agent flows with the same inner 5-tuple: three backend flows.
    assert_eq!(conn.backends.udp_opened, 3);
    assert!(conn.engine.is_ready());
    assert!(count(&conn.engine.stats().udp_from_backend) >= u64::from(3 * MIN_ECHOES));
    assert!(sim.net.stats.lost > 0 && sim.net.stats.duplicated > 0, "the network did drop and duplicate");
    let relay_host = sim.host::<RelayHost>(r);
    let forwarded: u64 = relay_host.workers().iter().map(|w| w.stats().snapshot().datagrams_forwarded).sum();
    assert!(forwarded >= u64::from(6 * MIN_ECHOES), "both directions went through the relay: {forwarded}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A network with relays A (returned as a host) and B, and the PKI they
/// share.
fn two_relays() -> (DevPki, Sim, HostId, SocketAddr, SocketAddr) {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let (relay_a, relay_b): (SocketAddr, SocketAddr) =
        ("127.0.0.1:4433".parse().unwrap(), "127.0.0.1:4435".parse().unwrap());
    let cfg = NetConfig { delay: Duration::from_millis(2), jitter: Duration::from_millis(4), ..NetConfig::default() };
    let mut sim = Sim::new(cfg);
    let a = sim.add(RelayHost::new(RelaySpec::dev(relay_a, 1, &pki, POLICY).unwrap(), sim.now()).unwrap());
    let mut spec_b = RelaySpec::dev(relay_b, 1, &pki, POLICY).unwrap();
    spec_b.node_id = 1;
    sim.add(RelayHost::new(spec_b, sim.now()).unwrap());
    (pki, sim, a, relay_a, relay_b)
}

#[test]
fn an_agent_that_moves_to_another_relay_keeps_its_end_to_end_session_and_flow_state() {
    let (pki, mut sim, a, relay_a, relay_b) = two_relays();
    let now = sim.now();
    let c = sim.add(connector(&pki, "127.0.0.3:4434".parse().unwrap(), &[relay_a, relay_b], now));
    let agents = vec![sim.add(agent(&pki, 0, relay_a, vec![relay_b], now))];

    // Echoes flow through relay A.
    let mut traffic = Traffic::new(Duration::from_millis(10), 40);
    sim.max_step = Duration::from_millis(5);
    assert!(sim.run_until(Duration::from_secs(20), |sim| {
        traffic.step(sim, &agents);
        traffic.echoed(0) >= 10
    }));
    let before = sim.host::<ConnectorHost>(c).backends.udp_opened;
    assert_eq!(before, 1);

    // Relay A drains: the agent moves to B; its end-to-end session (and
    // with it the connector's flow state) carries on over B.
    let now = sim.now();
    for w in sim.host::<RelayHost>(a).workers_mut() {
        w.begin_drain(now);
    }
    let echoed_before = traffic.echoed(0);
    // Virtual time; generous because quiche's own timers read the real
    // clock, which a loaded machine lets run ahead.
    assert!(sim.run_until(Duration::from_secs(40), |sim| {
        traffic.step(sim, &agents);
        let moved = sim.host::<AgentHost>(agents[0]).core.relay() == relay_b;
        moved && traffic.echoed(0) >= echoed_before + 10
    }));
    let conn = sim.host::<ConnectorHost>(c);
    let stats = conn.engine.stats().snapshot();
    // The same end-to-end session went on over relay B: one handshake.
    assert_eq!((stats.e2e_handshakes, stats.e2e_established), (1, 1), "{stats:?}");
    assert_eq!(conn.backends.udp_opened, 1, "the backend flow carried on: no new socket");
    assert_eq!(sim.host::<AgentHost>(agents[0]).core.stats().e2e_handshakes, 1);
    assert_eq!(sim.host::<AgentHost>(agents[0]).core.relay().ip(), IpAddr::from([127, 0, 0, 1]));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

fn forwarded(sim: &mut Sim, r: HostId) -> u64 {
    sim.host::<RelayHost>(r).workers().iter().map(|w| w.stats().snapshot().datagrams_forwarded).sum()
}

fn direct_path(sim: &mut Sim, a: HostId) -> Option<SocketAddr> {
    sim.host::<AgentHost>(a).core.tunnel_status().first().and_then(|t| t.direct)
}

/// Runs `traffic` until `done`; returns (virtual time taken, probes sent
/// and echoes received meanwhile).
fn phase(
    sim: &mut Sim,
    traffic: &mut Traffic,
    agents: &[HostId],
    limit: Duration,
    mut done: impl FnMut(&mut Sim) -> bool,
) -> (Option<Duration>, u32, u32) {
    let (start, sent, echoed) = (sim.now(), traffic.sent.get(&0).copied().unwrap_or(0), traffic.echoed(0));
    let ok = sim.run_until(limit, |sim| {
        traffic.step(sim, agents);
        done(sim)
    });
    let took = ok.then(|| sim.now() - start);
    (took, traffic.sent.get(&0).copied().unwrap_or(0) - sent, traffic.echoed(0) - echoed)
}

#[test]
fn a_session_goes_direct_falls_back_to_the_relay_when_the_path_is_blocked_and_returns() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let cfg = NetConfig { delay: Duration::from_millis(5), jitter: Duration::from_millis(1), ..NetConfig::default() };
    let mut sim = Sim::new(cfg);
    let r = sim.add(RelayHost::new(RelaySpec::dev(relay, 1, &pki, POLICY).unwrap(), sim.now()).unwrap());
    let now = sim.now();
    let c = sim.add(connector(&pki, "127.0.0.3:4434".parse().unwrap(), &[relay], now));
    let agents = vec![sim.add(agent_with(&pki, 0, relay, Vec::new(), PathPolicy::Auto, now))];
    let a = agents[0];
    let (agent_ip, connector_ip) = (IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3]));
    // 100 probes a second.
    let mut traffic = Traffic::new(Duration::from_millis(10), 100_000);
    sim.max_step = Duration::from_millis(2);
    assert!(sim.run_until(Duration::from_secs(10), |sim| sim.host::<AgentHost>(a).core.sessions_up() == 1));

    // The first packet goes through the relay; the session is direct
    // within a second (the connector's candidate is what the relay
    // observed; nothing stands between them).
    let (took, sent, echoed) =
        phase(&mut sim, &mut traffic, &agents, Duration::from_secs(3), |s| direct_path(s, a).is_some());
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "time to direct {took:?}");
    assert_eq!(direct_path(&mut sim, a), Some("127.0.0.3:4434".parse().unwrap()));
    eprintln!("to direct: {took:?}, {echoed}/{sent} echoes");
    // Packets in flight when the agent moved still cross the relay, and
    // the connector moves at the first of the agent's it gets directly.
    phase(&mut sim, &mut traffic, &agents, Duration::from_millis(100), |_| false);
    let before = forwarded(&mut sim, r);
    let (_, sent, echoed) = phase(&mut sim, &mut traffic, &agents, Duration::from_secs(2), |_| false);
    assert!(echoed + 3 >= sent, "direct: {echoed}/{sent}");
    assert_eq!(forwarded(&mut sim, r) - before, 0, "nothing through the relay while direct");

    // A firewall starts dropping the direct path: back on the relay.
    sim.net.block(agent_ip, connector_ip);
    let (took, sent, echoed) =
        phase(&mut sim, &mut traffic, &agents, Duration::from_secs(6), |s| direct_path(s, a).is_none());
    eprintln!("back to the relay: {took:?}, {echoed}/{sent} echoes");
    assert!(took.is_some_and(|t| t <= Duration::from_secs(4)), "fallback {took:?}");
    // The connector follows at the agent's first packet over the relay;
    // what it had in flight on the dead path is lost.
    phase(&mut sim, &mut traffic, &agents, Duration::from_millis(500), |_| false);
    let (_, sent, echoed) = phase(&mut sim, &mut traffic, &agents, Duration::from_secs(2), |_| false);
    assert!(echoed + 3 >= sent, "on the relay: {echoed}/{sent}");

    // Unblocked: a later round takes it direct again.
    sim.net.unblock(agent_ip, connector_ip);
    let (took, sent, echoed) =
        phase(&mut sim, &mut traffic, &agents, Duration::from_secs(70), |s| direct_path(s, a).is_some());
    eprintln!("direct again: {took:?}, {echoed}/{sent} echoes");
    assert!(took.is_some(), "direct again");
    // The connector follows at the agent's next packet.
    phase(&mut sim, &mut traffic, &agents, Duration::from_millis(200), |_| false);
    let h = sim.host::<AgentHost>(a);
    assert_eq!(h.core.stats().e2e_handshakes, 1, "one session throughout");
    let paths = h.core.tunnel_status().first().and_then(|t| t.paths.clone()).unwrap();
    assert_eq!((paths.to_direct, paths.to_relay), (2, 1), "{paths:?}");
    // Each move was an event, the fallback with its reason; the first
    // went into the time-to-direct histogram.
    let moves: Vec<(Option<SocketAddr>, PathState)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::PathChanged { direct, state, .. } => Some((*direct, *state)),
            _ => None,
        })
        .collect();
    let d = Some("127.0.0.3:4434".parse().unwrap());
    assert_eq!(moves, [(d, PathState::Direct), (None, PathState::Lost), (d, PathState::Direct)]);
    assert_eq!(h.core.time_to_direct().count, 1);
    assert_eq!(h.core.time_to_direct().buckets[4], 1, "within a second");
    let st = h.core.stats();
    assert!(st.punch_rounds_direct >= 1 && st.punch_rounds >= st.punch_rounds_direct, "{st:?}");
    assert!(st.direct_bytes_in > st.direct_packets_in * 20 && st.direct_bytes_out > 0, "{st:?}");
    let host = sim.host::<ConnectorHost>(c);
    let conn = host.engine.stats().snapshot();
    assert!(conn.direct_packets_in > 0 && conn.direct_packets_out > 0, "{conn:?}");
    assert!(conn.direct_bytes_in > conn.direct_packets_in * 20, "{conn:?}");
    // The connector followed every switch, and timed the first.
    assert_eq!((conn.path_to_direct, conn.path_to_relay), (2, 1), "{conn:?}");
    assert_eq!(host.engine.direct_metrics().snapshot().count, 1);
    assert_eq!(host.engine.status().sessions_direct, 1);
    assert_eq!(host.engine.status().sessions_by_path.get("direct"), Some(&1));
    assert_eq!(host.engine.status().sessions.first().map(|s| s.path), Some("direct"));
    assert_eq!(conn.punch_rounds_direct, st.punch_rounds_direct, "{conn:?}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn a_relay_only_service_never_goes_direct() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let mut sim = Sim::new(NetConfig { delay: Duration::from_millis(2), ..NetConfig::default() });
    let r = sim.add(RelayHost::new(RelaySpec::dev(relay, 1, &pki, POLICY).unwrap(), sim.now()).unwrap());
    let now = sim.now();
    let c = sim.add(connector_with(&pki, "127.0.0.3:4434".parse().unwrap(), &[relay], PathPolicy::RelayOnly, now));
    let agents = vec![sim.add(agent_with(&pki, 0, relay, Vec::new(), PathPolicy::Auto, now))];
    let mut traffic = Traffic::new(Duration::from_millis(10), 100_000);
    sim.max_step = Duration::from_millis(5);
    let (_, sent, echoed) = phase(&mut sim, &mut traffic, &agents, Duration::from_secs(12), |_| false);
    assert!(sent > 500 && echoed + 3 >= sent, "{echoed}/{sent}");
    assert_eq!(direct_path(&mut sim, agents[0]), None);
    let state = sim.host::<AgentHost>(agents[0]).core.tunnel_status().first().and_then(|t| t.path_state);
    assert_eq!(state, Some(PathState::RelayOnly));
    let conn = sim.host::<ConnectorHost>(c).engine.stats().snapshot();
    assert_eq!((conn.direct_packets_in, conn.direct_packets_out), (0, 0), "{conn:?}");
    assert!(forwarded(&mut sim, r) >= 2 * u64::from(echoed));
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn a_move_onto_a_connector_replica_of_the_same_identity_starts_a_new_session_within_seconds() {
    // Two replicas of connector "c" (one certificate and key, as one
    // Kubernetes Secret gives them), each on its own relay. When the agent
    // moves from relay A to relay B its inner packets reach replica 2,
    // which does not hold the session: its stateless reset (from the
    // identity's key, which both replicas share) makes the agent handshake
    // again at once instead of after its silence timeout.
    let (pki, mut sim, a, relay_a, relay_b) = two_relays();
    let now = sim.now();
    let c1 = sim.add(connector(&pki, "127.0.0.3:4434".parse().unwrap(), &[relay_a], now));
    let c2 = sim.add(connector(&pki, "127.0.0.4:4434".parse().unwrap(), &[relay_b], now));
    let agents = vec![sim.add(agent(&pki, 0, relay_a, vec![relay_b], now))];

    let mut traffic = Traffic::new(Duration::from_millis(10), 400);
    sim.max_step = Duration::from_millis(5);
    assert!(sim.run_until(Duration::from_secs(20), |sim| {
        traffic.step(sim, &agents);
        traffic.echoed(0) >= 10
    }));
    assert_eq!(sim.host::<ConnectorHost>(c1).engine.stats().snapshot().e2e_established, 1);

    let moved_at = sim.now();
    for w in sim.host::<RelayHost>(a).workers_mut() {
        w.begin_drain(moved_at);
    }
    let mut on_b = None;
    let mut echoed_at_move = 0;
    assert!(
        sim.run_until(Duration::from_secs(40), |sim| {
            traffic.step(sim, &agents);
            if on_b.is_none() && sim.host::<AgentHost>(agents[0]).core.relay() == relay_b {
                on_b = Some(sim.now());
                echoed_at_move = traffic.echoed(0);
            }
            on_b.is_some() && traffic.echoed(0) >= echoed_at_move + 10
        }),
        "echoes {}; replica 2 {:?}",
        traffic.echoed(0),
        sim.host::<ConnectorHost>(c2).engine.stats().snapshot()
    );
    let on_b = on_b.unwrap();
    let resumed = sim.now().saturating_duration_since(on_b);
    let replica2 = sim.host::<ConnectorHost>(c2).engine.stats().snapshot();
    assert!(replica2.e2e_resets_sent >= 1, "replica 2 told the agent it holds no such session: {replica2:?}");
    assert_eq!((replica2.e2e_handshakes, replica2.e2e_established), (1, 1), "{replica2:?}");
    let agent_handshakes = sim.host::<AgentHost>(agents[0]).core.stats().e2e_handshakes;
    assert_eq!(agent_handshakes, 2, "one session per replica");
    // Ten echoes at 10 ms after the new handshake; the silence timeout
    // (25 s) is what it would have taken without the reset.
    assert!(resumed < Duration::from_secs(5), "10 echoes through replica 2 took {resumed:?} after the move");
    eprintln!("moved after {:?}; 10 echoes through replica 2 {resumed:?} later", on_b - moved_at);
    let _ = std::fs::remove_dir_all(&pki.dir);
}
