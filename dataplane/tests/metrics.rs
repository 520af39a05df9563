#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Prometheus export: real histograms with buckets and a worker label.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use ztna_control::Role;
use ztna_dataplane::io::IoBackend;

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[test]
fn metrics_endpoint_serves_counters_and_latency_histogram() {
    let prom = ztna_dataplane::metrics::install_recorder().unwrap();
    let relay = start_relay(2, IoBackend::Auto, true);
    let port = ztna_dataplane::metrics::serve_relay("127.0.0.1:0".parse().unwrap(), prom, relay.lifecycle()).unwrap();
    relay.spawn_metrics_publisher().unwrap();
    let mut c = client(&relay, &[(Role::Connector, "echo")], 1);
    until_registered(&mut c, 1);
    let mut a = client(&relay, &[(Role::Agent, "echo")], 2);
    let flow = until_registered(&mut a, 1)[0];
    let mut cs = vec![c];
    for i in 0..10u8 {
        assert!(round_trip(&mut a, &mut cs, flow, &[i; 32]).is_some());
    }
    let mut body = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        body = scrape(port);
        if body.contains("ztna_relay_datagrams_forwarded_total") && body.contains("_bucket") {
            break;
        }
    }
    assert!(body.contains("ztna_relay_forward_latency_seconds_bucket{"), "histogram, not summary:\n{body}");
    assert!(body.contains("le=\"0.0001\""), "configured buckets:\n{body}");
    assert!(body.contains("ztna_relay_datagrams_forwarded_total{worker=\""), "{body}");
    assert!(body.contains("ztna_relay_drops_total{"), "{body}");
    assert!(body.contains("reason=\"unknown_flow\""), "{body}");
    assert!(body.contains("ztna_relay_registrations_total{"), "{body}");
    assert!(body.contains("ztna_relay_connections{worker=\""), "{body}");
    relay.shutdown();
}
