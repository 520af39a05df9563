//! ClientSession against relays that do not answer (virtual time, no socket).

use super::*;
use crate::quic::{client_config, TlsOptions};

/// A session to a relay address where nothing answers (127.0.0.1:9),
/// from 127.0.0.1:5000, relay certificate not verified.
fn unreachable_session(start: Instant) -> ClientSession {
    let cfg = ClientConfig::new("127.0.0.1:9".parse().unwrap(), "127.0.0.1:5000".parse().unwrap(), "localhost");
    let tls = TlsOptions { verify_peer: false, ..TlsOptions::default() };
    ClientSession::new(cfg, client_config(&tls).unwrap(), 1, start)
}

/// A relay that never answers: each attempt gives up after the
/// handshake timeout and the next one waits a jittered, doubling delay
/// (1 s, 2 s, 4 s, … capped at 30 s). Virtual time; no socket.
#[test]
fn unreachable_relay_backs_off_visibly() {
    let start = Instant::now();
    let mut s = unreachable_session(start);
    let mut out = vec![0u8; 2048];
    let mut waits = Vec::new();
    let mut sent = 0;
    let mut t = start;
    while t < start + Duration::from_secs(120) {
        while s.poll_transmit(&mut out, t).is_some() {
            sent += 1; // into the void
        }
        if s.next_deadline().is_some_and(|d| d <= t) {
            s.handle_timeout(t);
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::Disconnected { reason, retry_in, .. } => {
                    assert!(reason.contains("no answer"), "{reason}");
                    waits.push(retry_in);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        t += Duration::from_millis(50);
    }
    assert!(sent > 0, "Initials were sent");
    assert!(waits.len() >= 5, "{waits:?}");
    let nominal = [1u64, 2, 4, 8, 16, 30, 30];
    for (w, n) in waits.iter().zip(nominal) {
        let n = Duration::from_secs(n);
        assert!(*w >= n / 2 && *w <= n, "wait {w:?} outside [{:?}, {n:?}]", n / 2);
    }
    assert_eq!(s.stats().disconnects as usize, waits.len());
    assert!(!s.is_connected());
}

/// Each failed attempt moves to the next relay of `[relay, fallbacks]`,
/// round robin: the Initials of successive attempts go to r0, r1, r2,
/// r0, …
#[test]
fn failed_attempts_rotate_through_the_fallback_relays() {
    let start = Instant::now();
    let relays: Vec<SocketAddr> =
        ["127.0.0.1:9", "127.0.0.2:9", "127.0.0.3:9"].iter().map(|a| a.parse().unwrap()).collect();
    let mut cfg = ClientConfig::new(relays[0], "127.0.0.1:5000".parse().unwrap(), "localhost");
    cfg.fallbacks = relays[1..].to_vec();
    let tls = TlsOptions { verify_peer: false, ..TlsOptions::default() };
    let mut s = ClientSession::new(cfg, client_config(&tls).unwrap(), 7, start);
    let mut out = vec![0u8; 2048];
    let mut attempts: Vec<SocketAddr> = Vec::new();
    let mut t = start;
    while attempts.len() < 5 && t < start + Duration::from_secs(120) {
        while let Some((_, to)) = s.poll_transmit(&mut out, t) {
            if attempts.last() != Some(&to) {
                attempts.push(to);
            }
            assert_eq!(to, s.relay(), "sent to the relay the session reports");
        }
        if s.next_deadline().is_some_and(|d| d <= t) {
            s.handle_timeout(t);
        }
        while s.poll_event().is_some() {}
        t += Duration::from_millis(50);
    }
    let expected: Vec<SocketAddr> = relays.iter().cycle().take(5).copied().collect();
    assert_eq!(attempts, expected);
}

/// The driver rebinds its socket (a new port after a Goodbye) while an
/// attempt is under way: the attempt starts again from the new address
/// (quiche would drop the relay's answers on a path it does not know);
/// the same address changes nothing.
#[test]
fn a_new_local_address_restarts_an_attempt_in_progress() {
    let start = Instant::now();
    let mut s = unreachable_session(start);
    let mut out = vec![0u8; 2048];
    assert!(s.poll_transmit(&mut out, start).is_some(), "the first Initial");
    assert_eq!(s.stats().connects, 1);
    s.set_local("127.0.0.1:5000".parse().unwrap());
    assert_eq!(s.stats().connects, 1, "same address: the attempt goes on");
    s.set_local("127.0.0.1:5001".parse().unwrap());
    assert_eq!(s.stats().connects, 2, "a new attempt from the new address");
    let (n, to) = s.poll_transmit(&mut out, start).expect("its Initial");
    assert!(n >= 1200 && to == "127.0.0.1:9".parse().unwrap(), "{n} bytes to {to}");
}
