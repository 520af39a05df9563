#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // test code

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::codes::Code;
use crate::test_pki::{ca, leaf, Ca};
use crate::wire::ServiceName;

const TD: &str = "corp.test";

/// TLS options holding a certificate for `uri` issued by `ca` (client
/// authentication only, as the organisation CA issues them), trusting `trust`.
fn tls(ca: &Ca, trust: &Ca, uri: &str) -> TlsOptions {
    let (cert, key) = leaf(ca, uri, 1);
    TlsOptions::mutual(trust.cert.to_pem().unwrap(), cert.to_pem().unwrap(), key.private_key_to_pem_pkcs8().unwrap())
}

fn agent_uri() -> String {
    format!("spiffe://{TD}/agent/a")
}
fn connector_uri() -> String {
    format!("spiffe://{TD}/connector/c")
}
fn svc() -> ServiceName {
    ServiceName::new("echo").unwrap()
}

pub(super) struct Pair {
    pub(super) agent: E2eSession,
    pub(super) connector: E2eSession,
    agent_rej: Arc<Rejections>,
    connector_rej: Arc<Rejections>,
    pub(super) now: Instant,
    /// Applied to every packet on its way (a misbehaving relay).
    tamper: Option<fn(&mut Vec<u8>)>,
    /// The direct network: packets to `connector_addr` (from the agent)
    /// and to `agent_addr` (from the connector) pass while it is open;
    /// each end sees the other's address as the source.
    pub(super) direct: Direct,
}

#[derive(Default)]
pub(super) struct Direct {
    pub(super) open: bool,
    /// Inner packets each way through the relay, and directly.
    pub(super) relay_packets: u64,
    pub(super) direct_packets: u64,
    pub(super) punches: u64,
}

pub(super) const AGENT_ADDR: &str = "198.51.100.2:5000";
pub(super) const CONNECTOR_ADDR: &str = "203.0.113.3:4433";

impl Pair {
    fn new(agent_tls: TlsOptions, connector_tls: TlsOptions, expect: &str) -> Pair {
        let now = Instant::now();
        let (agent_rej, connector_rej) = (Arc::new(Rejections::default()), Arc::new(Rejections::default()));
        let mut acfg = client_config(&agent_tls, Arc::clone(&agent_rej)).unwrap();
        let mut ccfg = server_config(&connector_tls, Arc::clone(&connector_rej)).unwrap();
        let td = own_identity(&agent_tls).unwrap().trust_domain;
        let agent = E2eSession::connect(&mut acfg, [1; CID_LEN], &td, expect, svc(), now).unwrap();
        let reset = ResetKey::from_tls(&connector_tls).unwrap();
        let connector = E2eSession::accept(&mut ccfg, [2; CID_LEN], TD, &reset, now).unwrap();
        Pair { agent, connector, agent_rej, connector_rej, now, tamper: None, direct: Direct::default() }
    }

    pub(super) fn healthy() -> Pair {
        let ca = ca();
        Pair::new(tls(&ca, &ca, &agent_uri()), tls(&ca, &ca, &connector_uri()), &connector_uri())
    }

    /// Lets `d` pass (timers run on both ends), then moves what is due.
    pub(super) fn wait(&mut self, d: Duration) -> Vec<SessionEvent> {
        self.now += d;
        self.agent.handle_timeout(self.now);
        self.connector.handle_timeout(self.now);
        self.run()
    }

    /// Moves packets both ways until quiet; answers Hello with admit.
    pub(super) fn run(&mut self) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        let mut buf = [0u8; 1500];
        let (agent_addr, connector_addr) = (AGENT_ADDR.parse().unwrap(), CONNECTOR_ADDR.parse().unwrap());
        for _ in 0..50 {
            let mut moved = false;
            while let Some((n, via)) = self.agent.poll_transmit(&mut buf, self.now) {
                let mut p = buf[..n].to_vec();
                moved = true;
                match via {
                    Via::Relay => {
                        if let Some(t) = self.tamper {
                            t(&mut p);
                        }
                        self.direct.relay_packets += 1;
                        self.connector.recv(&mut p, self.now);
                    }
                    Via::Direct(to) if to == connector_addr && self.direct.open => {
                        self.direct.direct_packets += 1;
                        self.connector.recv_via(&mut p, Via::Direct(agent_addr), self.now);
                    }
                    Via::Direct(_) => {}
                }
            }
            while let Some((n, via)) = self.connector.poll_transmit(&mut buf, self.now) {
                let mut p = buf[..n].to_vec();
                moved = true;
                match via {
                    Via::Relay => {
                        if let Some(t) = self.tamper {
                            t(&mut p);
                        }
                        self.direct.relay_packets += 1;
                        self.agent.recv(&mut p, self.now);
                    }
                    Via::Direct(to) if to == agent_addr && self.direct.open => {
                        if self.agent.on_punch(connector_addr, &p) {
                            self.direct.punches += 1;
                        } else {
                            self.direct.direct_packets += 1;
                            self.agent.recv_via(&mut p, Via::Direct(connector_addr), self.now);
                        }
                    }
                    Via::Direct(_) => {}
                }
            }
            while let Some(e) = self.connector.poll_event() {
                if matches!(e, SessionEvent::Hello { .. }) {
                    self.connector.admit();
                }
                events.push(e);
            }
            while let Some(e) = self.agent.poll_event() {
                events.push(e);
            }
            if !moved {
                break;
            }
            self.now += Duration::from_millis(1);
        }
        events
    }
}

pub(super) fn ip_packet(tag: u8) -> Vec<u8> {
    let mut p = vec![tag; TUNNEL_MTU];
    p[0] = 0x45;
    p
}

#[test]
fn a_session_comes_up_and_carries_packets_queued_before_it() {
    let mut p = Pair::healthy();
    p.agent.send_ip(&ip_packet(7)).unwrap();
    let ev = p.run();
    assert!(ev.contains(&SessionEvent::Up), "{ev:?}");
    assert!(p.agent.is_up() && p.connector.is_up());
    assert_eq!(p.connector.peer().unwrap().uri(), agent_uri());
    assert_eq!(p.agent.peer().unwrap().uri(), connector_uri());
    assert_eq!(p.connector.service(), Some(&svc()));
    let mut out = [0u8; 1500];
    let n = p.connector.recv_ip(&mut out).expect("the queued packet arrives once up");
    assert_eq!(out[..n], ip_packet(7)[..]);
    p.connector.send_ip(&ip_packet(9)).unwrap();
    p.run();
    let n = p.agent.recv_ip(&mut out).unwrap();
    assert_eq!(out[..n], ip_packet(9)[..]);
    assert_eq!(p.agent.rejected() + p.connector.rejected(), 0);
}

#[test]
fn only_max_pending_packets_wait_for_the_handshake() {
    let mut p = Pair::healthy();
    for i in 0..MAX_PENDING {
        p.agent.send_ip(&ip_packet(i as u8)).unwrap();
    }
    assert_eq!(p.agent.send_ip(&ip_packet(0)), Err(session::SendIpError::Full));
    // Nothing in clear or otherwise: no DATAGRAM before the session is up.
    assert!(p.connector.recv_ip(&mut [0u8; 1500]).is_none());
    assert_eq!(p.agent.send_ip(&vec![0x45; 1500]), Err(session::SendIpError::TooLarge));
}

#[test]
fn datagram_room_reports_a_full_queue_before_send_ip_refuses() {
    let mut p = Pair::healthy();
    assert!(!p.agent.datagram_room(), "no room before the session is up");
    p.run();
    let mut queued = 0;
    while p.agent.datagram_room() {
        p.agent.send_ip(&ip_packet(1)).unwrap();
        queued += 1;
    }
    assert_eq!(queued, super::DGRAM_QUEUE_LEN);
    assert_eq!(p.agent.send_ip(&ip_packet(1)), Err(session::SendIpError::Full));
    let mut buf = [0u8; 1500];
    assert!(p.agent.poll_transmit(&mut buf, p.now).is_some());
    assert!(p.agent.datagram_room(), "a sent packet makes room");
}

#[test]
fn a_connector_identity_other_than_the_named_one_is_refused() {
    let ca = ca();
    let other = format!("spiffe://{TD}/connector/other");
    let mut p = Pair::new(tls(&ca, &ca, &agent_uri()), tls(&ca, &ca, &connector_uri()), &other);
    p.agent.send_ip(&ip_packet(1)).unwrap();
    let ev = p.run();
    assert!(ev.iter().any(|e| matches!(e, SessionEvent::Closed { identity_mismatch: true, .. })), "{ev:?}");
    assert!(p.connector.recv_ip(&mut [0u8; 1500]).is_none());
    p.wait(Duration::from_secs(6));
    assert!(p.connector.is_closed() && p.agent.is_closed());
}

#[test]
fn an_agent_certificate_presented_as_connector_is_refused_by_the_agent() {
    let ca = ca();
    let fake = format!("spiffe://{TD}/agent/mallory");
    let mut p = Pair::new(tls(&ca, &ca, &agent_uri()), tls(&ca, &ca, &fake), &fake);
    p.run();
    assert_eq!(p.agent_rej.identity.load(Ordering::Relaxed), 1);
    assert!(p.agent.is_closed() && !p.connector.is_up());
    p.wait(Duration::from_secs(6));
    assert!(p.connector.is_closed());
}

#[test]
fn a_relay_certificate_as_agent_is_refused_by_the_connector() {
    let ca = ca();
    let relay = format!("spiffe://{TD}/relay/r");
    let mut p = Pair::new(tls(&ca, &ca, &relay), tls(&ca, &ca, &connector_uri()), &connector_uri());
    p.run();
    assert_eq!(p.connector_rej.identity.load(Ordering::Relaxed), 1);
    assert!(!p.agent.is_up() && !p.connector.is_up());
}

#[test]
fn a_peer_under_another_ca_is_refused() {
    let (ca, rogue) = (ca(), ca());
    let mut p = Pair::new(tls(&ca, &ca, &agent_uri()), tls(&rogue, &ca, &connector_uri()), &connector_uri());
    p.run();
    assert_eq!(p.agent_rej.unknown_ca.load(Ordering::Relaxed), 1);
    assert!(!p.agent.is_up());
}

#[test]
fn flipped_bits_are_rejected_and_the_session_recovers() {
    let mut p = Pair::healthy();
    p.run();
    assert!(p.agent.is_up());
    p.tamper = Some(|pkt: &mut Vec<u8>| {
        let last = pkt.len() - 1;
        pkt[last] ^= 0x01;
    });
    p.agent.send_ip(&ip_packet(3)).unwrap();
    p.run();
    assert!(p.connector.rejected() >= 1);
    assert!(p.connector.recv_ip(&mut [0u8; 1500]).is_none(), "nothing altered is delivered");
    p.tamper = None;
    p.agent.send_ip(&ip_packet(4)).unwrap();
    p.run();
    let mut out = [0u8; 1500];
    let n = p.connector.recv_ip(&mut out).expect("the session works again");
    assert_eq!(out[..n], ip_packet(4)[..]);
}

#[test]
fn a_refused_session_tells_the_agent_the_code() {
    let mut p = Pair::healthy();
    // Run without admitting: answer Hello with refuse.
    let mut buf = [0u8; 1500];
    let mut events = Vec::new();
    for _ in 0..20 {
        while let Some((n, _)) = p.agent.poll_transmit(&mut buf, p.now) {
            p.connector.recv(&mut buf[..n].to_vec(), p.now);
        }
        while let Some(e) = p.connector.poll_event() {
            if matches!(e, SessionEvent::Hello { .. }) {
                p.connector.refuse(Code::DENIED, "not allowed");
            }
        }
        while let Some((n, _)) = p.connector.poll_transmit(&mut buf, p.now) {
            p.agent.recv(&mut buf[..n].to_vec(), p.now);
        }
        while let Some(e) = p.agent.poll_event() {
            events.push(e);
        }
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SessionEvent::Closed { code: Some(c), .. } if *c == u64::from(Code::DENIED.0))),
        "{events:?}"
    );
}

#[test]
fn dcid_of_long_and_short_headers() {
    let mut p = Pair::healthy();
    let mut buf = [0u8; 1500];
    let (n, _) = p.agent.poll_transmit(&mut buf, p.now).unwrap();
    assert!(is_initial(&buf[..n]));
    assert!(packet_dcid(&buf[..n]).is_some_and(|d| d.len() >= 8));
    assert_eq!(packet_dcid(&[0x40, 1, 2, 3, 4, 5, 6, 7, 8]), Some(&[1, 2, 3, 4, 5, 6, 7, 8][..]));
    assert_eq!(packet_dcid(&[0x40, 1]), None);
    assert!(!is_initial(&[0x40, 0, 0, 0, 1]));
}

#[test]
fn an_uncarried_session_freezes_its_timers_and_ends_after_the_idle_timeout() {
    let mut p = Pair::healthy();
    p.run();
    assert!(p.agent.is_up());
    p.agent.set_carried(false, p.now);
    // Frozen: no probe, keepalive or silence timer runs between relay legs.
    let until = p.now + Duration::from_millis(IDLE_TIMEOUT_MS);
    assert_eq!(p.agent.next_deadline(), Some(until));
    p.agent.handle_timeout(p.now + Duration::from_secs(60));
    assert!(p.agent.is_up(), "a minute between relays does not end the session");
    // Back on a flow: it works at once.
    p.now += Duration::from_secs(60);
    p.agent.set_carried(true, p.now);
    p.agent.send_ip(&ip_packet(5)).unwrap();
    p.run();
    let mut out = [0u8; 1500];
    assert!(p.connector.recv_ip(&mut out).is_some());
    // Never carried again: it ends.
    p.agent.set_carried(false, p.now);
    p.agent.handle_timeout(p.now + Duration::from_millis(IDLE_TIMEOUT_MS));
    assert!(p.agent.is_closed());
}

/// One packet `from` → `to`, what `from` sends now (None: nothing).
fn one(from: &mut E2eSession, to: &mut E2eSession, now: Instant) -> Option<usize> {
    let mut buf = [0u8; 1500];
    let (n, _) = from.poll_transmit(&mut buf, now)?;
    to.recv(&mut buf[..n], now);
    Some(n)
}

#[test]
fn an_ack_waits_for_the_next_packet_or_the_ack_delay() {
    let mut p = Pair::healthy();
    p.run();
    p = Pair { now: p.now + Duration::from_millis(100), ..p };
    let now = p.now;
    // One tunneled packet in: nothing of the connector's own to send, so
    // its ACK waits, with a deadline no later than ACK_DELAY.
    p.agent.send_ip(&ip_packet(1)).unwrap();
    assert!(one(&mut p.agent, &mut p.connector, now).is_some());
    assert!(p.agent.poll_transmit(&mut [0u8; 1500], now).is_none());
    assert_eq!(one(&mut p.connector, &mut p.agent, now), None, "a lone ACK waits");
    let due = p.connector.next_deadline().unwrap();
    assert!(due <= now + session::ACK_DELAY, "{:?}", due - now);
    // The reply carries the ACK: one packet, not two.
    p.connector.send_ip(&ip_packet(2)).unwrap();
    assert!(one(&mut p.connector, &mut p.agent, now).is_some());
    assert_eq!(one(&mut p.connector, &mut p.agent, now), None);
    let mut out = [0u8; 1500];
    assert!(p.agent.recv_ip(&mut out).is_some());
    // A second unacknowledged packet is acknowledged at once.
    p.connector.recv_ip(&mut out).unwrap();
    for tag in [3, 4] {
        p.agent.send_ip(&ip_packet(tag)).unwrap();
        assert!(one(&mut p.agent, &mut p.connector, now).is_some());
    }
    assert!(one(&mut p.connector, &mut p.agent, now).is_some(), "every second packet is acknowledged at once");
    // A lone packet's ACK goes when the delay has passed.
    p.agent.send_ip(&ip_packet(5)).unwrap();
    assert!(one(&mut p.agent, &mut p.connector, now).is_some());
    assert_eq!(one(&mut p.connector, &mut p.agent, now), None);
    let later = now + session::ACK_DELAY;
    p.connector.handle_timeout(later);
    // A driver that cannot send now (a full relay queue) must not find the
    // spent ACK deadline still due: it would spin.
    assert!(p.connector.next_deadline().is_none_or(|d| d > later), "the ACK deadline is spent");
    assert!(one(&mut p.connector, &mut p.agent, later).is_some(), "the ACK goes after ACK_DELAY");
    assert_eq!(p.agent.rejected() + p.connector.rejected(), 0);
}

#[test]
fn a_stateless_reset_from_the_connectors_key_ends_the_session_and_one_from_another_key_does_not() {
    let ca = ca();
    let connector_tls = tls(&ca, &ca, &connector_uri());
    let mut p = Pair::new(tls(&ca, &ca, &agent_uri()), connector_tls.clone(), &connector_uri());
    p.run();
    assert!(p.agent.is_up());
    // The agent's packets carry the connector's connection ID.
    let cid = p.connector.source_id();
    let mut out = [0u8; 64];
    // Someone without the key (the relay, another connector) cannot reset it.
    let other = ResetKey::from_tls(&tls(&ca, &ca, &connector_uri())).unwrap();
    let n = other.write_reset(&cid, 60, &mut out).unwrap();
    assert!(!p.agent.recv(&mut out[..n], p.now), "a forged reset is not authentic");
    assert!(p.agent.is_up(), "a reset under another key changes nothing");
    // A connector holding the key (restarted, or a replica with the same
    // identity) that has no state for the session resets it.
    let same = ResetKey::from_tls(&connector_tls).unwrap();
    let n = same.write_reset(&cid, 60, &mut out).unwrap();
    p.agent.recv(&mut out[..n], p.now);
    let ev: Vec<_> = std::iter::from_fn(|| p.agent.poll_event()).collect();
    assert!(p.agent.is_closed());
    assert!(
        ev.iter()
            .any(|e| matches!(e, SessionEvent::Closed { reason, .. } if reason.contains("reset by the connector"))),
        "{ev:?}"
    );
}

#[path = "direct_tests.rs"]
mod direct;
