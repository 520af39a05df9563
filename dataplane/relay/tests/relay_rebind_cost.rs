//! The cost of a ConnectorUp/ConnectorDown at the relay workers: it visits
//! only the agent connections that hold a flow for that service
//! (`routing::AgentIndex`), not every flow (the old `rebind_where` scanned
//! them all). One check (`rebind_visits`) and one measurement (ignored by
//! default; run with
//! `cargo test -p ztna-relay --test relay_rebind_cost -- --ignored --nocapture`):
//! the worker's CPU per pair with many agent flows against none.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use ztna_testkit::fixtures as common;

use std::time::{Duration, Instant};

use common::*;
use ztna_control::{Message, Role};
use ztna_udp::IoBackend;

/// CPU time of the relay's worker thread 0 (relay-w0), from schedstat.
fn worker_cpu() -> Duration {
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "relay-w0" {
            let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap();
            return Duration::from_nanos(s.split_whitespace().next().unwrap().parse().unwrap());
        }
    }
    panic!("no relay-w0 thread");
}

/// CPU of relay-w0 per Register+Unregister pair of service "x" by a raw
/// connector, averaged over `pairs`.
fn toggle_cost(relay: &ztna_relay::server::RelayHandle, pairs: u32) -> Duration {
    let mut raw = RawClient::connect_as(relay, &tls_for(relay, ztna_control::identity::Kind::Connector, "c1"));
    raw.send_msg(&Message::Hello { version: 1, software: "toggle".into() });
    raw.pump_for(Duration::from_millis(100));
    // Idle baseline of the worker over the same wall time is subtracted.
    let idle0 = worker_cpu();
    let t0 = Instant::now();
    raw.pump_for(Duration::from_millis(300));
    let idle_rate = (worker_cpu() - idle0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let c0 = worker_cpu();
    let t0 = Instant::now();
    for i in 0..pairs {
        raw.send_msg(&Message::Register { request_id: 1000 + i, role: Role::Connector, service: svc("x") });
        let end = Instant::now() + T;
        let flow = loop {
            raw.pump();
            let found = raw.messages().iter().rev().find_map(|m| match m {
                Message::RegisterOk { request_id, flow } if *request_id == 1000 + i => Some(*flow),
                _ => None,
            });
            if let Some(f) = found {
                break f;
            }
            assert!(Instant::now() < end, "not registered: {:?}", raw.messages().last());
            std::thread::sleep(Duration::from_millis(1));
        };
        raw.send_msg(&Message::Unregister { flow });
        raw.pump_for(Duration::from_millis(5));
    }
    let spent = (worker_cpu() - c0).as_secs_f64() - idle_rate * t0.elapsed().as_secs_f64();
    Duration::from_secs_f64(spent.max(0.0) / f64::from(pairs))
}

#[test]
fn connector_up_down_visits_only_the_services_agents() {
    let relay = start_relay(1, IoBackend::Auto, false);
    let services: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let regs: Vec<(Role, &str)> = services.iter().map(|s| (Role::Connector, s.as_str())).collect();
    let mut conn = client(&relay, &regs, 0);
    until_registered(&mut conn, regs.len());
    let aregs: Vec<(Role, &str)> = services.iter().map(|s| (Role::Agent, s.as_str())).collect();
    let mut agents: Vec<_> = (0..5u64).map(|i| client(&relay, &aregs, 2000 + i)).collect();
    for a in &mut agents {
        until_registered(a, aregs.len());
    }
    let before = relay.totals().rebind_visits;
    // A service none of the 50 agent flows uses: nothing to visit.
    let mut other = client(&relay, &[(Role::Connector, "x")], 1);
    until_registered(&mut other, 1);
    other.session.close();
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        other.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.totals().rebind_visits, before, "ConnectorUp/Down of an unused service visits no agent");
    // A second connector for s0: exactly the five agent connections of s0.
    let mut second = client(&relay, &[(Role::Connector, "s0")], 2);
    until_registered(&mut second, 1);
    let end = Instant::now() + T;
    while relay.totals().rebind_visits < before + 5 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(relay.totals().rebind_visits, before + 5, "visits the agents of s0 only");
    relay.shutdown();
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn connector_up_down_cost_with_agent_flows() {
    let relay = start_relay(1, IoBackend::Auto, false);
    const PAIRS: u32 = 30;
    let empty = toggle_cost(&relay, PAIRS);

    // A connector serving s0..s59, and 50 agents registering all of them.
    let services: Vec<String> = (0..60).map(|i| format!("s{i}")).collect();
    let regs: Vec<(Role, &str)> = services.iter().map(|s| (Role::Connector, s.as_str())).collect();
    let mut conn = client(&relay, &regs, 0);
    until_registered(&mut conn, regs.len());
    let aregs: Vec<(Role, &str)> = services.iter().map(|s| (Role::Agent, s.as_str())).collect();
    let mut agents = Vec::new();
    for i in 0..50u64 {
        let mut a = client(&relay, &aregs, 1000 + i);
        let end = Instant::now() + T;
        while a.session.flow_for(&svc("s59")).is_none() {
            assert!(Instant::now() < end, "agent {i} did not register");
            a.pump();
            echo_all(&mut conn);
            while a.session.poll_event().is_some() {}
            std::thread::sleep(Duration::from_millis(1));
        }
        agents.push(a);
    }
    let flows = agents.len() * services.len();
    // Keep everyone alive while measuring.
    let keep = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end {
            for a in &mut agents {
                a.pump();
            }
            echo_all(&mut conn);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let full = toggle_cost(&relay, PAIRS);
    keep.join().unwrap();
    println!(
        "relay-w0 CPU per ConnectorUp+ConnectorDown: {:.1} us with 0 agent flows, {:.1} us with {flows} (ratio {:.1})",
        empty.as_secs_f64() * 1e6,
        full.as_secs_f64() * 1e6,
        full.as_secs_f64() / empty.as_secs_f64().max(1e-9)
    );
    relay.shutdown();
}
