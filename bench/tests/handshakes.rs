#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! `ztna-bench handshakes` in short: Retry on and off, and a stateless
//! flood with Retry always.

use std::time::Duration;

use ztna_bench::handshakes::{self, FloodSource, HandshakeConfig, RetryModeName};
use ztna_bench::relay_bench::dev_tls;
use ztna_relay::security::RetryMode;
use ztna_udp::IoBackend;

fn phase(mode: RetryModeName) -> handshakes::HandshakePhase {
    let h = handshakes::start_relay(mode.mode(), 1, IoBackend::Auto).expect("relay starts");
    let (agent, _) = dev_tls(&h).unwrap();
    let r = handshakes::handshake_phase(&h, &agent, Duration::from_secs(1), 4, false).expect("handshake phase runs");
    h.shutdown();
    r
}

#[test]
fn handshakes_with_retry_always_and_off() {
    let always = phase(RetryModeName::Always);
    assert!(always.completed > 0, "handshakes completed with Retry always: {always:?}");
    assert!(
        always.retries_sent >= always.completed,
        "every handshake went through a Retry: {} retries for {} handshakes",
        always.retries_sent,
        always.completed
    );
    assert!(always.latency.samples == always.completed && always.latency.p50_us > 0);
    assert_eq!(always.failed + always.abandoned, 0, "no failures: {:?}", always.failures);

    let off = phase(RetryModeName::Off);
    assert!(off.completed > 0, "handshakes completed with Retry off: {off:?}");
    assert_eq!(off.retries_sent, 0, "no Retry with Retry off");
    assert!(off.conns_accepted >= off.completed);
    assert_eq!(off.failed + off.abandoned, 0, "no failures: {:?}", off.failures);
}

#[test]
fn flood_with_retry_always_keeps_no_state() {
    let cfg = HandshakeConfig {
        modes: vec![RetryModeName::Always],
        duration: Duration::from_secs(1),
        flood: true,
        flood_source: FloodSource::Pool,
        flood_initials: 500,
        flood_sockets: 16,
        flood_wait: Duration::from_secs(3),
        progress: false,
        ..HandshakeConfig::default()
    };
    let h = handshakes::start_relay(RetryMode::Always, 1, IoBackend::Auto).expect("relay starts");
    let (agent, _) = dev_tls(&h).unwrap();
    let f = handshakes::flood_phase(&h, &agent, &cfg).expect("flood runs");
    h.shutdown();
    assert!(f.sent > 0 && f.relay_packets_rx > 0, "flood reached the relay: {f:?}");
    assert!(f.retries_sent > 0, "the relay answered with Retry: {f:?}");
    assert_eq!(f.conns_active_peak, 0, "Retry keeps no per-connection state");
    assert_eq!(f.conns_accepted, 0, "no connection without a valid token");
    assert_eq!(f.conns_active_after, 0);
    assert!(f.rss_baseline_kib > 0 && f.rss_peak_kib >= f.rss_baseline_kib);
}
