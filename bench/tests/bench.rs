//! End-to-end checks of the benchmark commands, each a second or two.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ztna_bench::load::LoadConfig;
use ztna_bench::naive::{self, NaiveMode};
use ztna_bench::relay_bench::{self, RelayBenchConfig, RelayTarget};
use ztna_bench::{demo, udp_bench};
use ztna_relay::limits::CongestionControl;
use ztna_udp::IoBackend;

#[test]
fn relay_bench_moderate_rate() {
    let cfg = RelayBenchConfig {
        target: RelayTarget::InProcess {
            workers: 1,
            io_backend: IoBackend::Auto,
            pin_cores: false,
            congestion_control: CongestionControl::Cubic,
        },
        load: LoadConfig {
            agents: 2,
            connectors: 1,
            size: 1200,
            rate: 2000,
            duration: Duration::from_secs(1),
            progress: false,
            ..LoadConfig::default()
        },
    };
    let r = relay_bench::run(&cfg).expect("relay bench runs");
    let res = &r.result;
    assert!(res.sent >= 1500, "about 2000 sent in 1 s: {}", res.sent);
    assert!(res.loss_pct < 1.0, "loss {:.3}% ({} of {})", res.loss_pct, res.lost, res.sent);
    assert_eq!(res.misrouted, 0);
    assert!(res.rtt.samples > 0 && res.rtt.p50_us > 0, "RTT histogram filled: {:?}", res.rtt);
    assert!(
        r.forwarded >= 2 * res.received,
        "relay counted {} forwarded for {} round trips",
        r.forwarded,
        res.received
    );
    let cpu = r.cpu_us_per_forwarded.expect("in-process CPU known");
    assert!(cpu > 0.0, "CPU per datagram {cpu}");
    assert!(res.per_agent.iter().all(|a| a.received > 0));
}

#[test]
fn forwarder_routes_each_agent_its_own_packets() {
    let load = LoadConfig {
        agents: 3,
        connectors: 2,
        size: 200,
        rate: 5000,
        duration: Duration::from_secs(1),
        progress: false,
        ..LoadConfig::default()
    };
    let r = udp_bench::run(IoBackend::Auto, &load).expect("forwarder bench runs");
    let res = &r.result;
    assert!(res.sent >= 3000, "about 5000 sent: {}", res.sent);
    // Each agent checks the flow header and the agent index and sequence
    // in every payload it receives: anything else counts as misrouted.
    assert_eq!(res.misrouted, 0, "every agent received only its own sequence numbers");
    assert_eq!(res.duplicates, 0);
    for (a, ag) in res.per_agent.iter().enumerate() {
        assert!(ag.received > 0, "agent {a} got its echoes");
        assert!(ag.received <= ag.sent);
    }
    assert!(res.loss_pct < 1.0, "loss {:.3}%", res.loss_pct);
    assert!(r.forwarded >= 2 * res.received);
    assert!(r.cpu_us_per_forwarded.is_some_and(|c| c > 0.0));
}

#[test]
fn forwarder_portable_backend_flat_out() {
    let load = LoadConfig {
        agents: 2,
        connectors: 1,
        size: 1200,
        rate: 0,
        window: 32,
        duration: Duration::from_millis(500),
        progress: false,
        ..LoadConfig::default()
    };
    let r = udp_bench::run(IoBackend::Portable, &load).expect("forwarder bench runs");
    assert_eq!(r.io_backend, "portable");
    assert!(r.result.received > 100, "{:?}", r.result);
    assert_eq!(r.result.misrouted, 0);
}

#[test]
fn demo_succeeds() {
    let r = demo::run(IoBackend::Auto).expect("demo sets up");
    assert!(r.success, "demo failed: {:?}", r.failures);
    assert_eq!(r.tunnel.received, demo::UDP_DATAGRAMS);
    assert_eq!(r.tunnel.tcp_bytes_echoed, demo::TCP_BYTES as u64);
    assert_eq!(r.tunnel.relay_workers, demo::WORKERS);
    assert!(r.tunnel.relay_forwarded >= 2 * r.tunnel.received);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["success"], true);
    for key in ["sent", "received", "observed_address", "relay_workers", "services", "tcp_bytes_echoed"] {
        assert!(!json[key].is_null(), "JSON summary has {key}");
    }
    assert_eq!(json["end_to_end"], true);
    assert_eq!(json["connector_identity"], "spiffe://dev.ztna/connector/tunnel-connector");
    assert!(json["rtt_us"]["p50"].as_u64().unwrap() > 0);
    assert!(json["rtt_us"]["p99"].as_u64().unwrap() >= json["rtt_us"]["p50"].as_u64().unwrap());
}

#[test]
fn e2e_cost_measures_both_variants() {
    let r = ztna_bench::e2e_cost::run(1200, 300).expect("e2e-cost runs");
    assert_eq!((r.packet_bytes, r.packets), (1200, 300));
    assert!(r.baseline_us_per_packet > 0.0 && r.e2e_us_per_packet > 0.0, "{r:?}");
    assert!(r.ratio.is_finite());
}

#[test]
fn naive_references_echo_and_forward_every_agent() {
    let load = LoadConfig {
        agents: 2,
        connectors: 1,
        size: 1200,
        rate: 2000,
        duration: Duration::from_secs(1),
        progress: false,
        ..LoadConfig::default()
    };
    for (mode, per_round_trip) in [(NaiveMode::Echo, 1), (NaiveMode::Relay, 2)] {
        let r = naive::run(mode, &load).expect("naive reference runs");
        let res = &r.result;
        assert!(res.sent >= 1500, "{mode:?}: about 2000 sent in 1 s: {}", res.sent);
        assert!(res.loss_pct < 1.0, "{mode:?}: loss {:.3}%", res.loss_pct);
        assert_eq!(res.misrouted, 0, "{mode:?}: every echo on the agent's own flow");
        assert!(res.per_agent.iter().all(|a| a.received > 0), "{mode:?}: every agent served");
        assert!(
            r.forwarded >= per_round_trip * res.received,
            "{mode:?}: {} datagrams handled for {} round trips",
            r.forwarded,
            res.received
        );
        assert!(r.cpu_us_per_forwarded.is_some_and(|c| c > 0.0), "{mode:?}: CPU measured");
    }
}
