//! Direct paths of a session pair: candidates, punching, migration and
//! fallback over the in-test network of [`Pair`] (docs/protocol/direct.md).

use std::net::SocketAddr;
use std::time::Duration;

use super::{ip_packet, Pair, AGENT_ADDR, CONNECTOR_ADDR};
use crate::candidate::{Candidate, CandidateKind, PathPolicy};
use crate::e2e::{SendIpError, SessionEvent, Via};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A pair that is up, both ends with a candidate the other can reach
/// while the direct network is open.
fn pair_with_candidates(agent_policy: PathPolicy, connector_policy: PathPolicy) -> Pair {
    let mut p = Pair::healthy();
    p.direct.open = true;
    p.agent.set_path_policy(agent_policy);
    p.connector.set_path_policy(connector_policy);
    p.agent.set_candidates(vec![Candidate { kind: CandidateKind::ServerReflexive, addr: addr(AGENT_ADDR) }]);
    p.connector.set_candidates(vec![Candidate { kind: CandidateKind::Configured, addr: addr(CONNECTOR_ADDR) }]);
    p.run();
    assert!(p.agent.is_up() && p.connector.is_up());
    p
}

/// Runs in 10 ms steps until `done` or `limit`; returns the time it took.
fn until(p: &mut Pair, limit: Duration, mut done: impl FnMut(&mut Pair) -> bool) -> Option<Duration> {
    let start = p.now;
    while p.now - start < limit {
        p.wait(Duration::from_millis(10));
        if done(p) {
            return Some(p.now - start);
        }
    }
    None
}

/// Sends `n` packets from the agent, one per 10 ms step; returns how many
/// the connector received.
fn stream(p: &mut Pair, n: usize) -> usize {
    let mut got = 0;
    let mut out = [0u8; 1500];
    for i in 0..n {
        let _ = p.agent.send_ip(&ip_packet(i as u8));
        p.wait(Duration::from_millis(10));
        while p.connector.recv_ip(&mut out).is_some() {
            got += 1;
        }
    }
    got
}

#[test]
fn a_session_goes_direct_falls_back_to_the_relay_and_returns_without_a_new_handshake() {
    let mut p = pair_with_candidates(PathPolicy::Auto, PathPolicy::Auto);
    let (to_connector, to_agent) = (addr(CONNECTOR_ADDR), addr(AGENT_ADDR));
    let took = until(&mut p, Duration::from_secs(3), |p| p.agent.current_path() == Some(to_connector));
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "direct within a second: {took:?}");
    // Tunneled packets now go direct both ways; the connector followed.
    let relayed = p.direct.relay_packets;
    assert_eq!(stream(&mut p, 50), 50);
    assert_eq!(p.connector.current_path(), Some(to_agent));
    assert_eq!(p.direct.relay_packets, relayed, "nothing through the relay once direct");
    assert!(p.agent.path_counters().probes > 0 && p.connector.path_counters().punches > 0);

    // The direct network fails: back on the relay within the timeout,
    // and the packets sent meanwhile mostly arrive.
    p.direct.open = false;
    let took = until(&mut p, Duration::from_secs(5), |p| p.agent.current_path().is_none());
    assert!(took.is_some_and(|t| t <= Duration::from_millis(3100)), "fallback: {took:?}");
    assert_eq!(stream(&mut p, 50), 50, "the relay carries the session");
    assert_eq!(p.connector.current_path(), None, "the connector followed back");
    assert_eq!(p.agent.path_counters().direct_timeouts, 1);

    // It works again: a new round takes the session direct again.
    p.direct.open = true;
    let took = until(&mut p, Duration::from_secs(10), |p| p.agent.current_path() == Some(to_connector));
    assert!(took.is_some(), "direct again");
    assert_eq!(stream(&mut p, 20), 20);
    let c = p.agent.path_counters();
    assert_eq!((c.to_direct, c.to_relay), (2, 1), "{c:?}");
    assert!(p.agent.is_up() && p.connector.is_up(), "the same session throughout");
}

#[test]
fn relay_only_at_the_connector_keeps_every_packet_on_the_relay() {
    let mut p = pair_with_candidates(PathPolicy::Auto, PathPolicy::RelayOnly);
    assert_eq!(stream(&mut p, 20), 20);
    until(&mut p, Duration::from_secs(70), |_| false);
    assert_eq!(p.agent.path_policy(), PathPolicy::RelayOnly);
    assert_eq!(p.agent.current_path(), None);
    assert_eq!(p.direct.direct_packets + p.direct.punches, 0, "not one packet off the relay");
    assert_eq!(p.agent.path_counters().rounds, 0);
}

#[test]
fn direct_only_refuses_tunneled_packets_until_a_direct_path_is_up() {
    let mut p = Pair::healthy();
    p.agent.set_path_policy(PathPolicy::DirectOnly);
    p.run();
    assert_eq!(p.agent.send_ip(&ip_packet(1)), Err(SendIpError::NoPath), "no candidates, no path");
    p.direct.open = true;
    p.agent.set_candidates(vec![Candidate { kind: CandidateKind::ServerReflexive, addr: addr(AGENT_ADDR) }]);
    p.connector.set_candidates(vec![Candidate { kind: CandidateKind::Configured, addr: addr(CONNECTOR_ADDR) }]);
    assert!(until(&mut p, Duration::from_secs(3), |p| p.agent.current_path().is_some()).is_some());
    let relayed = p.direct.relay_packets;
    assert_eq!(stream(&mut p, 10), 10);
    assert_eq!(p.direct.relay_packets, relayed);
}

#[test]
fn a_replayed_packet_from_a_spoofed_source_does_not_move_the_connector() {
    let mut p = pair_with_candidates(PathPolicy::Auto, PathPolicy::Auto);
    assert!(until(&mut p, Duration::from_secs(3), |p| p.connector.current_path().is_some()).is_some());
    // Capture one direct packet of the agent's, then replay it (and a
    // forged one) from an address the attacker controls.
    p.agent.send_ip(&ip_packet(9)).unwrap();
    let mut buf = [0u8; 1500];
    let (n, via) = p.agent.poll_transmit(&mut buf, p.now).unwrap();
    assert_eq!(via, Via::Direct(addr(CONNECTOR_ADDR)));
    let captured = buf[..n].to_vec();
    p.connector.recv_via(&mut captured.clone(), Via::Direct(addr(AGENT_ADDR)), p.now);
    let attacker = Via::Direct(addr("192.0.2.66:666"));
    let rejected = p.connector.rejected();
    p.connector.recv_via(&mut captured.clone(), attacker, p.now);
    let mut forged = captured.clone();
    forged[n - 1] ^= 1;
    p.connector.recv_via(&mut forged, attacker, p.now);
    assert_eq!(p.connector.rejected(), rejected + 2, "a replay and a forgery, both refused");
    assert_eq!(p.connector.current_path(), Some(addr(AGENT_ADDR)));
    let mut sent_to_attacker = 0;
    while let Some((_, via)) = p.connector.poll_transmit(&mut buf, p.now) {
        sent_to_attacker += usize::from(via == attacker);
    }
    assert_eq!(sent_to_attacker, 0, "nothing goes to the spoofed source");
    let events: Vec<SessionEvent> = std::iter::from_fn(|| p.connector.poll_event()).collect();
    assert!(!events.iter().any(|e| matches!(e, SessionEvent::Closed { .. })), "{events:?}");
}

#[test]
fn the_direct_queue_is_bounded_and_only_short_headers_name_a_direct_cid() {
    use crate::e2e::{direct_dcid, DirectQueue};
    let mut q = DirectQueue::new(2);
    let to = addr(AGENT_ADDR);
    assert!(q.push(&[1, 2, 3], to) && q.push(&[4], to));
    assert!(!q.has_room() && !q.push(&[5], to), "full: refused, nothing queued");
    let mut out = [0u8; 8];
    assert_eq!(q.pop_into(&mut out), Some((3, to)));
    assert_eq!(&out[..3], &[1, 2, 3]);
    assert_eq!(q.pop_into(&mut out), Some((1, to)));
    assert_eq!(q.pop_into(&mut out), None);
    assert_eq!(direct_dcid(&[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9]), Some([1, 2, 3, 4, 5, 6, 7, 8]));
    assert_eq!(direct_dcid(&[0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8]), None, "long header");
    assert_eq!(direct_dcid(&[0x40, 1, 2]), None);
    assert_eq!(direct_dcid(&[]), None);
}
