#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Drain and scale-out with real relays on loopback: two relays that trust
//! one CA, a connector registered at both, an agent that fails over from
//! one to the other when the first drains.

use ztna_testkit::fixtures as common;

use std::time::{Duration, Instant};

use common::*;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::identity::Kind;
use ztna_control::{Code, Role};
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_testkit::client_io::UdpClient;
use ztna_udp::IoBackend;

/// A relay with the first relay's certificate and client CA (same
/// organisation), so clients of one are clients of the other.
fn sibling(first: &RelayHandle, grace_ms: u64) -> RelayHandle {
    let pki = first.dev_pki.as_ref().unwrap();
    let cfg = RelayConfig {
        dev: false,
        cert: Some(pki.cert.clone()),
        key: Some(pki.key.clone()),
        client_ca: Some(pki.ca.clone()),
        trust_domain: Some("dev.ztna".into()),
        shutdown_grace_ms: grace_ms,
        ..relay_config(2, IoBackend::Auto, true)
    };
    server::start(&cfg).unwrap()
}

fn first_relay(workers: usize, grace_ms: u64) -> RelayHandle {
    server::start(&RelayConfig { shutdown_grace_ms: grace_ms, ..relay_config(workers, IoBackend::Auto, true) }).unwrap()
}

/// A client of `relay` (identity from `first`'s CA) with the given
/// fallbacks and Goodbye behaviour.
fn session(
    first: &RelayHandle,
    relay: &RelayHandle,
    fallbacks: &[&RelayHandle],
    kind: Kind,
    name: &str,
    leave_on_goodbye: bool,
    seed: u64,
) -> UdpClient {
    let role = if kind == Kind::Connector { Role::Connector } else { Role::Agent };
    let mut cfg = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "localhost");
    cfg.fallbacks = fallbacks.iter().map(|r| r.local_addr).collect();
    cfg.leave_on_goodbye = leave_on_goodbye;
    cfg.registrations = vec![(role, svc("echo"))];
    UdpClient::new(cfg, &tls_for(first, kind, name), "127.0.0.1:0".parse().unwrap(), seed).unwrap()
}

/// Joins a relay's workers on another thread; returns how long they took.
fn join_in_background(r: RelayHandle) -> std::thread::JoinHandle<Duration> {
    let t = Instant::now();
    std::thread::spawn(move || {
        r.join();
        t.elapsed()
    })
}

#[test]
fn drain_moves_agents_to_another_relay_without_waiting_for_the_grace_period() {
    let r1 = first_relay(2, 10_000);
    let r2 = sibling(&r1, 10_000);
    // The connector holds one session per relay, pinned (as ztna-connector does).
    let mut c1 = session(&r1, &r1, &[], Kind::Connector, "c1", false, 1);
    let mut c2 = session(&r1, &r2, &[], Kind::Connector, "c1", false, 2);
    until_registered(&mut c1, 1);
    until_registered(&mut c2, 1);
    let mut agent = session(&r1, &r1, &[&r2], Kind::Agent, "laptop", true, 3);
    let flow = until_registered(&mut agent, 1)[0];
    let mut conns = vec![c1, c2];
    assert!(round_trip(&mut agent, &mut conns, flow, b"via r1").is_some());
    assert_eq!(agent.session.relay(), r1.local_addr);
    assert_eq!((r1.agents(), r2.agents()), (1, 0));

    let r1_addr = r1.local_addr;
    let t0 = Instant::now();
    r1.drain();
    assert!(r1.is_draining() && !r2.is_draining());
    let r1_join = join_in_background(r1);

    // The agent gets Goodbye{DRAINING}, leaves at once and registers at r2.
    let mut goodbye = None;
    let mut new_flow = None;
    let moved = run_until(std::slice::from_mut(&mut agent), &mut conns, T, |a| {
        while let Some(e) = a[0].session.poll_event() {
            match e {
                Event::Goodbye { code, .. } => goodbye = Some(code),
                Event::Registered { flow, .. } => new_flow = Some(flow),
                _ => {}
            }
        }
        new_flow.is_some()
    });
    let moved_after = t0.elapsed();
    assert!(moved, "agent re-registered elsewhere");
    assert_eq!(goodbye, Some(Code::DRAINING));
    assert_eq!(agent.session.relay(), r2.local_addr);
    let flow = new_flow.unwrap();
    assert!(round_trip(&mut agent, &mut conns, flow, b"via r2").is_some(), "traffic resumes through r2");
    let resumed_after = t0.elapsed();
    eprintln!("drain: agent registered at the other relay after {moved_after:?}, traffic after {resumed_after:?}");
    assert!(resumed_after < Duration::from_secs(3), "{resumed_after:?}");

    // With no agent left, r1 closes its connectors and exits long before
    // its 10 s grace period; the connector's r1 session sees SHUTDOWN.
    let mut c1_codes = Vec::new();
    let end = Instant::now() + T;
    while !r1_join.is_finished() && Instant::now() < end {
        let (c1, _) = conns.split_at_mut(1);
        c1[0].pump();
        echo_all(&mut conns[1]);
        agent.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = r1_join.join().unwrap();
    assert!(took < Duration::from_secs(3), "r1 exited after {took:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        conns[0].pump();
        while let Some(e) = conns[0].session.poll_event() {
            if let Event::Goodbye { code, .. } = e {
                c1_codes.push(code);
            }
        }
        if c1_codes.contains(&Code::SHUTDOWN) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(c1_codes.first(), Some(&Code::DRAINING), "the connector was told first, and stayed: {c1_codes:?}");
    assert!(c1_codes.contains(&Code::SHUTDOWN), "{c1_codes:?}");
    // The agent still works through r2; r1's address is gone.
    assert!(round_trip(&mut agent, &mut conns[1..], flow, b"still r2").is_some());
    assert_ne!(agent.session.relay(), r1_addr);
    r2.shutdown();
}

#[test]
fn drain_is_bounded_by_the_grace_period_and_refuses_new_clients() {
    // One worker: its Goodbye to the first client proves it is draining
    // before the late client's Initial arrives.
    let r1 = first_relay(1, 1500);
    // An agent that does not leave on Goodbye (an old client, say).
    let mut stubborn = session(&r1, &r1, &[], Kind::Agent, "old", false, 4);
    stubborn.wait_for(T, |e| matches!(e, Event::Connected), |_| {}).expect("connects");
    let refused_before = r1.totals().drop_initial;
    r1.drain();
    let t0 = Instant::now();
    let mut codes = Vec::new();
    match stubborn.wait_for(T, |e| matches!(e, Event::Goodbye { .. }), |_| {}) {
        Some(Event::Goodbye { code, .. }) => codes.push(code),
        other => panic!("no Goodbye: {other:?}"),
    }
    // A new client during the drain gets no connection.
    let mut late = session(&r1, &r1, &[], Kind::Agent, "late", true, 5);
    late.pump();
    let ev = stubborn.wait_for(
        Duration::from_secs(5),
        |e| matches!(e, Event::Disconnected { .. }),
        |e| {
            if let Event::Goodbye { code, .. } = e {
                codes.push(code)
            }
        },
    );
    let closed_after = t0.elapsed();
    assert!(ev.is_some(), "closed at the end of the grace period");
    assert_eq!(codes, vec![Code::DRAINING, Code::SHUTDOWN]);
    assert!(closed_after >= Duration::from_millis(900), "not before the grace period: {closed_after:?}");
    assert!(closed_after < Duration::from_millis(3000), "{closed_after:?}");
    late.pump();
    assert!(!late.session.is_connected());
    assert!(r1.totals().drop_initial > refused_before, "the late Initial was dropped and counted: {:?}", r1.totals());
    r1.join();
}
