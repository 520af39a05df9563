#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Relay behaviour against real sockets on 127.0.0.1: many clients, both
//! I/O backends, steering, cross-worker forwarding, registry semantics.

use ztna_testkit::fixtures as common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use ztna_control::client::Event;
use ztna_control::{Code, Role};
use ztna_relay::server::RelayHandle;
use ztna_relay::stats::StatsSnapshot;
use ztna_testkit::client_io::UdpClient;
use ztna_udp::IoBackend;

const AGENTS: usize = 20;
const PER_FLOW: u32 = 10;

/// 2 connectors (connector 0 also serves "db") and 20 agents (every 4th
/// also uses "db"); each agent flow sends PER_FLOW tagged datagrams and
/// must get exactly its own back.
fn many_clients(relay: &RelayHandle) {
    let mut connectors = vec![
        client(relay, &[(Role::Connector, "echo"), (Role::Connector, "db")], 100),
        client(relay, &[(Role::Connector, "echo")], 101),
    ];
    until_registered(&mut connectors[0], 2);
    until_registered(&mut connectors[1], 1);

    let mut agents = Vec::new();
    let mut flows: Vec<Vec<u32>> = Vec::new();
    for i in 0..AGENTS {
        let regs: &[(Role, &str)] =
            if i % 4 == 0 { &[(Role::Agent, "echo"), (Role::Agent, "db")] } else { &[(Role::Agent, "echo")] };
        let mut a = client(relay, regs, i as u64);
        flows.push(until_registered(&mut a, regs.len()));
        agents.push(a);
    }
    for (i, a) in agents.iter_mut().enumerate() {
        for &f in &flows[i] {
            for seq in 0..PER_FLOW {
                let mut p = Vec::from((i as u32).to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
                p.extend_from_slice(&seq.to_be_bytes());
                a.session.send_datagram(f, &p).unwrap();
            }
        }
    }
    let mut got: Vec<HashMap<u32, u32>> = vec![HashMap::new(); AGENTS];
    let mut buf = [0u8; 2048];
    let ok = run_until(&mut agents, &mut connectors, T, |agents| {
        for (i, a) in agents.iter_mut().enumerate() {
            while let Some(n) = a.session.recv_datagram(&mut buf) {
                let (flow, p) = ztna_control::datagram::parse(&buf[..n]).unwrap();
                let owner = u32::from_be_bytes(p[0..4].try_into().unwrap());
                let sent_on = u32::from_be_bytes(p[4..8].try_into().unwrap());
                assert_eq!(owner as usize, i, "a reply reached the wrong agent");
                assert_eq!(sent_on, flow, "a reply came back on the wrong flow");
                *got[i].entry(flow).or_default() += 1;
            }
        }
        got.iter().enumerate().all(|(i, m)| flows[i].iter().all(|f| m.get(f) == Some(&PER_FLOW)))
    });
    assert!(ok, "not every datagram came back: {got:?}");
}

fn accepted_once(relay: &RelayHandle, clients: u64) -> Vec<StatsSnapshot> {
    let per = relay.worker_stats();
    let accepted: u64 = per.iter().map(|s| s.conns_accepted).sum();
    // Each connection was created by exactly one worker: had its packets
    // reached two workers, both would have accepted it.
    assert_eq!(accepted, clients, "connections accepted {per:?}");
    assert!(per.iter().all(|s| s.conns_accepted > 0), "both workers own connections: {per:?}");
    per
}

fn run_backend(backend: IoBackend) {
    let relay = start_relay(2, backend, true);
    many_clients(&relay);
    let per = accepted_once(&relay, AGENTS as u64 + 2);
    assert!(relay.steering, "BPF steering attached");
    for s in &per {
        assert_eq!(s.handoff_out, 0, "with BPF steering no packet reaches a non-owner: {s:?}");
    }
    let t = relay.totals();
    assert!(t.datagrams_cross_worker > 0, "some flows crossed workers: {t:?}");
    let flows = AGENTS as u64 + (AGENTS as u64).div_ceil(4);
    assert!(t.datagrams_forwarded >= 2 * flows * u64::from(PER_FLOW));
    relay.shutdown();
}

#[test]
fn many_clients_io_uring() {
    assert!(ztna_udp::uring_available(), "io_uring must be available on the CI machine");
    run_backend(IoBackend::Uring);
}

#[test]
fn many_clients_portable() {
    run_backend(IoBackend::Portable);
}

#[test]
fn without_bpf_misrouted_packets_are_handed_to_their_owner() {
    for backend in [IoBackend::Uring, IoBackend::Portable] {
        let relay = start_relay(2, backend, false);
        many_clients(&relay);
        let per = accepted_once(&relay, AGENTS as u64 + 2);
        let out: u64 = per.iter().map(|s| s.handoff_out).sum();
        assert!(out > 0, "the kernel hash misroutes some packets: {per:?}");
        // A packet handed off just before the snapshot may still sit in the
        // owner's queue: wait until the owners have caught up.
        let (mut out, mut inn) = (0, 1);
        let end = std::time::Instant::now() + Duration::from_secs(2);
        while out != inn && std::time::Instant::now() < end {
            let per = relay.worker_stats();
            out = per.iter().map(|s| s.handoff_out).sum();
            inn = per.iter().map(|s| s.handoff_in).sum();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out, inn, "every handed-off packet was processed by its owner");
        assert_eq!(relay.totals().drop_handoff_queue_full, 0);
        relay.shutdown();
    }
}

/// Connects agents until one lands on a different worker than the
/// connector, then checks the datagrams crossed the mesh.
#[test]
fn cross_worker_forwarding_is_forced() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut conn = client(&relay, &[(Role::Connector, "echo")], 1);
    until_registered(&mut conn, 1);
    let conn_worker = relay.worker_stats().iter().position(|s| s.conns_accepted == 1).unwrap();
    let mut connectors = vec![conn];
    let mut seed = 10;
    let (mut agent, flow) = loop {
        let before = relay.worker_stats();
        let mut a = client(&relay, &[(Role::Agent, "echo")], seed);
        seed += 1;
        let flow = until_registered(&mut a, 1)[0];
        let after = relay.worker_stats();
        let w = (0..2).find(|&w| after[w].conns_accepted > before[w].conns_accepted).unwrap();
        if w != conn_worker {
            break (a, flow);
        }
        assert!(seed < 60, "no agent landed on the other worker");
    };
    let before = relay.totals();
    for i in 0..20u8 {
        assert_eq!(round_trip(&mut agent, &mut connectors, flow, &[i; 100]).as_deref(), Some(&[i; 100][..]));
    }
    let after = relay.totals();
    assert!(after.datagrams_cross_worker - before.datagrams_cross_worker >= 40, "{after:?}");
    relay.shutdown();
}

#[test]
fn observed_address_after_handshake_and_after_rebinding() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut c = client(&relay, &[], 5);
    let first = match c.wait_for(T, |e| matches!(e, Event::ObservedAddress(_)), |_| {}) {
        Some(Event::ObservedAddress(a)) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(first, c.local_addr().unwrap(), "relay reports the address it sees");
    // NAT rebinding: same connection, new source port.
    c.rebind().unwrap();
    let new_local = c.local_addr().unwrap();
    let mut saw = None;
    for _ in 0..20 {
        // Traffic on the new path makes the relay notice it.
        c.session.handle_timeout(std::time::Instant::now() + Duration::from_secs(11));
        if let Some(Event::ObservedAddress(a)) =
            c.wait_for(Duration::from_millis(500), |e| matches!(e, Event::ObservedAddress(_)), |_| {})
        {
            saw = Some(a);
            break;
        }
    }
    assert_eq!(saw, Some(new_local), "relay announces the new address");
    relay.shutdown();
}

#[test]
fn connector_hears_flow_open_and_close_and_agents_fail_over() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut connectors =
        vec![client(&relay, &[(Role::Connector, "echo")], 1), client(&relay, &[(Role::Connector, "echo")], 2)];
    until_registered(&mut connectors[0], 1);
    until_registered(&mut connectors[1], 1);
    let mut agent = client(&relay, &[(Role::Agent, "echo")], 3);
    let flow = until_registered(&mut agent, 1)[0];
    assert!(round_trip(&mut agent, &mut connectors, flow, b"one").is_some());
    // Which connector got the FlowOpen?
    let mut opened = [0usize; 2];
    for (i, c) in connectors.iter_mut().enumerate() {
        opened[i] = events_for(c, Duration::from_millis(50))
            .iter()
            .filter(|e| matches!(e, Event::FlowOpened { agent_addr, .. } if *agent_addr == agent.local_addr().unwrap()))
            .count();
    }
    assert_eq!(opened.iter().sum::<usize>(), 1, "exactly one connector serves the flow");
    let serving = opened.iter().position(|&n| n == 1).unwrap();
    // The serving connector leaves: the agent's flow moves to the other.
    let mut gone = connectors.remove(serving);
    gone.session.close();
    for _ in 0..50 {
        gone.pump();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut echoed = None;
    for i in 0..100u8 {
        echoed = round_trip(&mut agent, &mut connectors, flow, &[i; 8]);
        if echoed.is_some() {
            break;
        }
    }
    assert!(echoed.is_some(), "agent flow failed over to the remaining connector");
    // The agent leaves: the remaining connector gets FlowClose(agent_gone).
    agent.session.close();
    for _ in 0..50 {
        agent.pump();
        std::thread::sleep(Duration::from_millis(2));
    }
    let ev = events_for(&mut connectors[0], Duration::from_millis(500));
    assert!(
        ev.iter().any(|e| matches!(e, Event::FlowClosed { code, .. } if *code == Code::AGENT_GONE)),
        "FlowClose(agent_gone) expected, got {ev:?}"
    );
    relay.shutdown();
}

#[test]
fn registration_errors_unknown_duplicate_limit() {
    let relay = start_relay(1, IoBackend::Auto, true);
    let mut a = client(&relay, &[(Role::Agent, "nobody-serves-this")], 1);
    match a.wait_for(T, |e| matches!(e, Event::RegisterFailed { .. }), |_| {}) {
        Some(Event::RegisterFailed { code, .. }) => assert_eq!(code, Code::UNKNOWN_SERVICE),
        other => panic!("{other:?}"),
    }
    // Duplicates and the per-connection limit, with a raw client.
    let mut raw = RawClient::connect(&relay);
    raw.send_msg(&ztna_control::Message::Hello { version: ztna_control::wire::VERSION, software: "t".into() });
    for i in 0..65u32 {
        let service = svc(&format!("s{i}"));
        raw.send_msg(&ztna_control::Message::Register { request_id: i, role: Role::Connector, service });
    }
    raw.send_msg(&ztna_control::Message::Register { request_id: 99, role: Role::Connector, service: svc("s0") });
    raw.pump_for(Duration::from_millis(300));
    let msgs = raw.messages();
    let errs: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            ztna_control::Message::RegisterError { request_id, code, .. } => Some((*request_id, *code)),
            _ => None,
        })
        .collect();
    assert!(errs.contains(&(64, Code::LIMIT)), "{errs:?}");
    assert!(errs.contains(&(99, Code::LIMIT)) || errs.contains(&(99, Code::DUPLICATE)), "{errs:?}");
    let oks = msgs.iter().filter(|m| matches!(m, ztna_control::Message::RegisterOk { .. })).count();
    assert_eq!(oks, 64);
    assert!(!raw.conn.is_closed(), "registration errors keep the connection");
    relay.shutdown();
}

#[test]
fn duplicate_registration_is_refused() {
    let relay = start_relay(1, IoBackend::Auto, true);
    let mut raw = RawClient::connect(&relay);
    raw.send_msg(&ztna_control::Message::Hello { version: ztna_control::wire::VERSION, software: "t".into() });
    for id in [1, 2] {
        raw.send_msg(&ztna_control::Message::Register { request_id: id, role: Role::Connector, service: svc("x") });
    }
    raw.pump_for(Duration::from_millis(200));
    let msgs = raw.messages();
    assert!(msgs.iter().any(|m| matches!(m, ztna_control::Message::RegisterOk { request_id: 1, .. })));
    assert!(msgs.iter().any(
        |m| matches!(m, ztna_control::Message::RegisterError { request_id: 2, code, .. } if *code == Code::DUPLICATE)
    ));
    relay.shutdown();
}

#[test]
fn shutdown_sends_goodbye_and_is_bounded() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut clients: Vec<UdpClient> = (0..4).map(|i| client(&relay, &[], i)).collect();
    for c in &mut clients {
        c.wait_for(T, |e| matches!(e, Event::Connected), |_| {}).unwrap();
    }
    relay.signal_shutdown();
    let t = std::time::Instant::now();
    for c in &mut clients {
        match c.wait_for(T, |e| matches!(e, Event::Goodbye { .. }), |_| {}) {
            Some(Event::Goodbye { code, .. }) => assert_eq!(code, Code::SHUTDOWN),
            other => panic!("no goodbye: {other:?}"),
        }
        let d = c.wait_for(T, |e| matches!(e, Event::Disconnected { .. }), |_| {});
        assert!(matches!(d, Some(Event::Disconnected { .. })));
    }
    relay.shutdown();
    assert!(t.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t.elapsed());
}

#[test]
fn register_churn_is_rate_limited() {
    let relay = start_relay(1, IoBackend::Auto, true);
    let mut raw = RawClient::connect(&relay);
    raw.send_msg(&ztna_control::Message::Hello { version: ztna_control::wire::VERSION, software: "churn".into() });
    // 200 register/unregister pairs back to back: far beyond the burst.
    for i in 0..200u32 {
        raw.send_msg(&ztna_control::Message::Register { request_id: i, role: Role::Connector, service: svc("c") });
        raw.send_msg(&ztna_control::Message::Unregister { flow: i + 1 });
    }
    raw.pump_for(Duration::from_millis(500));
    let limited = raw
        .messages()
        .iter()
        .filter(|m| matches!(m, ztna_control::Message::RegisterError { code, .. } if *code == Code::LIMIT))
        .count();
    assert!(limited > 100, "most of the churn is refused, got {limited} LIMIT errors");
    assert!(!raw.conn.is_closed(), "rate limiting does not close the connection");
    relay.shutdown();
}

#[test]
fn full_connectors_refuse_instead_of_looping() {
    let mut cfg = relay_config(2, IoBackend::Auto, true);
    // Each connector holds its service handle plus one agent leg.
    cfg.limits.max_flows_per_conn = 2;
    let relay = ztna_relay::server::start(&cfg).unwrap();
    let mut cs = [client(&relay, &[(Role::Connector, "echo")], 1), client(&relay, &[(Role::Connector, "echo")], 2)];
    until_registered(&mut cs[0], 1);
    until_registered(&mut cs[1], 1);
    let mut served = 0;
    let mut refused = 0;
    for seed in 10..13 {
        let mut a = client(&relay, &[(Role::Agent, "echo")], seed);
        match a.wait_for(T, |e| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. }), |_| {}) {
            Some(Event::Registered { .. }) => served += 1,
            Some(Event::RegisterFailed { code, .. }) => {
                assert_eq!(code, Code::UNKNOWN_SERVICE);
                refused += 1;
            }
            other => panic!("no answer: {other:?}"),
        }
        for c in cs.iter_mut() {
            c.pump();
        }
    }
    assert_eq!((served, refused), (2, 1), "two connectors with room for one flow each");
    relay.shutdown();
}

/// A connector restarts: the agent keeps its flow id; the relay rebinds
/// the flow to the new connector and traffic resumes without the agent
/// registering again.
#[test]
fn connector_restart_flows_recover() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut first = client(&relay, &[(Role::Connector, "echo")], 1);
    until_registered(&mut first, 1);
    let mut agent = client(&relay, &[(Role::Agent, "echo")], 2);
    let flow = until_registered(&mut agent, 1)[0];
    let mut cs = vec![first];
    assert!(round_trip(&mut agent, &mut cs, flow, b"before").is_some());
    let mut gone = cs.pop().unwrap();
    gone.session.close();
    for _ in 0..50 {
        gone.pump();
        agent.pump();
        std::thread::sleep(Duration::from_millis(2));
    }
    // While no connector serves the service, datagrams are counted drops.
    let before = relay.totals().drop_no_connector;
    agent.session.send_datagram(flow, b"nobody home").unwrap();
    let end = std::time::Instant::now() + T;
    while relay.totals().drop_no_connector == before {
        agent.pump();
        assert!(std::time::Instant::now() < end, "drop not counted");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut second = client(&relay, &[(Role::Connector, "echo")], 3);
    until_registered(&mut second, 1);
    let mut cs = vec![second];
    let mut back = None;
    for i in 0..100u8 {
        back = round_trip(&mut agent, &mut cs, flow, &[i; 16]);
        if back.is_some() {
            break;
        }
    }
    assert!(back.is_some(), "traffic resumed on the same flow id");
    let ev = events_for(&mut agent, Duration::from_millis(50));
    assert!(!ev.iter().any(|e| matches!(e, Event::Registered { .. })), "no re-registration needed: {ev:?}");
    relay.shutdown();
}
