#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! UDP and TCP through agent core → relay → connector → echo, in-process.

use ztna_bench::tunnel;
use ztna_udp::IoBackend;

#[test]
fn udp_and_tcp_through_the_whole_tunnel() {
    let r = tunnel::run(2, IoBackend::Auto, 300, 32, 2 << 20).unwrap();
    assert_eq!(r.received, 300, "{r:?}");
    assert_eq!(r.tcp_bytes_echoed, 2 << 20);
    assert!(r.observed_address.ip().is_loopback());
    assert!(r.rtt_us.p50 > 0 && r.rtt_us.p99 >= r.rtt_us.p50);
    assert!(r.agent_cpu_us_per_packet > 0.0);
    assert_eq!(r.agent_drops, 0);
    assert!(r.relay_forwarded >= 600);
}
