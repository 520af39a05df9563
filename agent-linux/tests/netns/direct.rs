//! Direct paths with the real agent (TUN), connector and relay: the agent
//! behind the lab's NAT punches to the connector (which is not behind one)
//! from its one socket, the session moves off the relay, falls back when a
//! firewall closes the direct path, and returns when it opens again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::lab::{can_run, Lab};
use crate::probe::{agent_stats, http_get_in, relay_counter, tcp_probe_from, udp_probe, udp_probe_from};
use crate::start::{bins, bring_up_with, Running, AGENT_STATUS, CONNECTOR_HEALTH};
use crate::{RELAY_IP, SITE_IP};

fn direct_line(l: &str) -> bool {
    l.starts_with("path service=echo via=direct")
}

#[test]
fn the_agent_goes_direct_through_its_nat_falls_back_to_the_relay_and_returns() {
    if !can_run() {
        return;
    }
    let b = bins();
    let lab = Lab::new("direct");
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } =
        bring_up_with(&lab, &b, "auto", "");
    let metrics: SocketAddr = format!("{RELAY_IP}:9090").parse().unwrap();

    // The first tunneled packets go through the relay; the session is
    // direct (to the connector's address as the relay observed it) soon.
    let t = Instant::now();
    let (sent, got) = udp_probe(&lab, &b, 20, 20);
    assert_eq!((sent, got), (20, 20));
    let line = agent.wait_out(0, Duration::from_secs(5), direct_line).expect("direct path");
    eprintln!("{line} ({:?} after the first packet)", t.elapsed());
    assert!(line.contains(&format!("addr={SITE_IP}:4434")), "{line}");
    let ttd: u64 = line.rsplit("time_to_direct_ms=").next().and_then(|v| v.parse().ok()).unwrap();
    assert!(ttd < 3000, "time to direct {ttd} ms");

    // On the direct path the relay forwards nothing.
    std::thread::sleep(Duration::from_millis(1100)); // relay publishes counters every second
    let before = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    let (sent, got) = udp_probe(&lab, &b, 200, 5);
    assert_eq!((sent, got), (200, 200), "UDP echo over the direct path");
    std::thread::sleep(Duration::from_millis(1100));
    let after = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    assert_eq!(after, before, "nothing through the relay while direct");

    // A firewall closes the direct path: the session falls back to the
    // relay; echoes sent all along mostly arrive.
    let mark = agent.out_len();
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let probe = std::thread::spawn(move || udp_probe_from(&ns, &bench, 600, 5));
    std::thread::sleep(Duration::from_millis(500));
    lab.block(SITE_IP);
    let t = Instant::now();
    let back = agent.wait_out(mark, Duration::from_secs(5), |l| l == "path service=echo via=relay state=lost");
    let took = t.elapsed();
    let (sent, got) = probe.join().unwrap();
    eprintln!("fallback after {took:?}: {back:?}; UDP echo across it {got}/{sent} at 5 ms spacing");
    assert!(back.is_some(), "back on the relay");
    assert!(took < Duration::from_secs(2), "fallback took {took:?}");
    assert!(got * 100 >= sent * 60, "echo across the fallback: {got}/{sent}");
    let (sent, got) = udp_probe(&lab, &b, 100, 5);
    assert_eq!((sent, got), (100, 100), "UDP echo on the relay");

    // Open again: a later round takes it direct again, with the same
    // session (no new handshake).
    let mark = agent.out_len();
    lab.unblock();
    let t = Instant::now();
    let again = agent.wait_out(mark, Duration::from_secs(75), direct_line);
    eprintln!("direct again after {:?}: {again:?}", t.elapsed());
    assert!(again.is_some(), "direct again");
    let (sent, got) = udp_probe(&lab, &b, 100, 5);
    assert_eq!((sent, got), (100, 100), "UDP echo, direct again");
    let s = agent_stats(&mut agent);
    assert_eq!(s["e2e_handshakes"], 1, "one session throughout: {s:?}");
    assert!(s["direct_packets_in"] >= 300 && s["direct_packets_out"] >= 300, "{s:?}");

    // Both ends export it: the agent's /metrics (its status listener) and
    // the connector's.
    std::thread::sleep(Duration::from_millis(1100)); // published every second
    let (code, m) = http_get_in(&lab.agent, AGENT_STATUS.parse().unwrap(), "/metrics");
    assert_eq!(code, 200, "{m}");
    let value = |m: &str, k: &str| -> f64 {
        let line = m.lines().find(|l| l.starts_with(k) && l[k.len()..].starts_with(' '));
        line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
    };
    assert_eq!(value(&m, "ztna_agent_sessions_direct"), 1.0, "{m}");
    assert_eq!(value(&m, "ztna_agent_sessions_by_path{state=\"direct\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "ztna_agent_path_to_direct_total"), 2.0, "{m}");
    assert_eq!(value(&m, "ztna_agent_path_to_relay_total"), 1.0, "{m}");
    assert_eq!(value(&m, "ztna_agent_time_to_direct_seconds_count"), 1.0, "{m}");
    assert_eq!(value(&m, "ztna_agent_time_to_direct_seconds_bucket{le=\"3\"}"), 1.0, "{m}");
    assert!(value(&m, "ztna_agent_direct_bytes_in_total") > 300.0 * 40.0, "{m}");
    let (code, c) = http_get_in(&lab.site, CONNECTOR_HEALTH.parse().unwrap(), "/metrics");
    assert_eq!(code, 200, "{c}");
    assert_eq!(value(&c, "ztna_connector_sessions_by_path{state=\"direct\"}"), 1.0, "{c}");
    assert_eq!(value(&c, "ztna_connector_time_to_direct_seconds_count"), 1.0, "{c}");
    assert!(value(&c, "ztna_connector_punch_rounds_direct_total") >= 1.0, "{c}");
}

/// 10 MB through the tunnel's TCP while the session goes relay → direct →
/// (direct blocked) relay → direct again: it arrives byte for byte, with
/// one session throughout. Rounds come faster than by default
/// (`[direct]`), so the whole dance fits in the transfer's 10 s.
#[test]
fn a_tcp_transfer_survives_every_path_switch() {
    if !can_run() {
        return;
    }
    let b = bins();
    let lab = Lab::new("switch");
    // Closed from the start: the session comes up on the relay and its
    // first round fails.
    lab.block(SITE_IP);
    let timings = "[direct]\nsecond_round_ms = 4000\nmin_round_gap_ms = 2000\n";
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } =
        bring_up_with(&lab, &b, "auto", timings);
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    // 10 MB at 1000 kB/s: about 10 s.
    let transfer = std::thread::spawn(move || tcp_probe_from(&ns, &bench, 10_000_000, Some(1000), 40));
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    lab.unblock();
    let mut mark = agent.out_len();
    let first = agent.wait_out(mark, Duration::from_secs(8), direct_line);
    eprintln!("relay -> direct at {:?}: {first:?}", t.elapsed());
    assert!(first.is_some(), "direct after the second round");
    std::thread::sleep(Duration::from_millis(500));
    mark = agent.out_len();
    lab.block(SITE_IP);
    let back = agent.wait_out(mark, Duration::from_secs(4), |l| l == "path service=echo via=relay state=lost");
    eprintln!("direct -> relay at {:?}", t.elapsed());
    assert!(back.is_some(), "fallback to the relay");
    std::thread::sleep(Duration::from_millis(1000));
    mark = agent.out_len();
    lab.unblock();
    let again = agent.wait_out(mark, Duration::from_secs(6), direct_line);
    eprintln!("relay -> direct again at {:?}", t.elapsed());
    assert!(again.is_some(), "direct again");
    let (verified, line) = transfer.join().unwrap();
    eprintln!("{line} (all done at {:?})", t.elapsed());
    assert!(verified, "10 MB byte for byte across the switches: {line}");
    let s = agent_stats(&mut agent);
    assert_eq!(s["e2e_handshakes"], 1, "one session throughout: {s:?}");
}

/// `direct-only` at the agent: tunneled packets wait for the direct path
/// (refused until then, counted), none ever crosses the relay (the
/// connector drops and counts any that would), and when the direct path
/// closes the service stops rather than falling back to the relay.
#[test]
fn a_direct_only_service_never_carries_data_through_the_relay() {
    if !can_run() {
        return;
    }
    let b = bins();
    let lab = Lab::new("dironly");
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } =
        bring_up_with(&lab, &b, "direct-only", "");
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let first = std::thread::spawn(move || udp_probe_from(&ns, &bench, 50, 20));
    agent.wait_out(0, Duration::from_secs(5), direct_line).expect("direct path");
    let (sent, got) = first.join().unwrap();
    eprintln!("while punching: {got}/{sent} echoes");
    let (sent, got) = udp_probe(&lab, &b, 200, 5);
    assert_eq!((sent, got), (200, 200), "UDP echo over the direct path");

    // The direct path closes: the session goes back to the relay for its
    // control traffic, the service's packets are refused.
    let mark = agent.out_len();
    lab.block(SITE_IP);
    agent.wait_out(mark, Duration::from_secs(5), |l| l.starts_with("path service=echo via=relay")).expect("fallback");
    let refused_before = agent_stats(&mut agent)["drop_no_flow"];
    let (sent, got) = udp_probe(&lab, &b, 50, 10);
    assert_eq!((sent, got), (50, 0), "nothing through the relay while the direct path is closed");
    let s = agent_stats(&mut agent);
    assert!(s["drop_no_flow"] >= refused_before + 50, "refused in the agent and counted: {s:?}");
    std::thread::sleep(Duration::from_millis(1100)); // connector publishes every second
    let (code, m) = http_get_in(&lab.site, CONNECTOR_HEALTH.parse().unwrap(), "/metrics");
    assert_eq!(code, 200);
    let early = m.lines().find_map(|l| l.strip_prefix("ztna_connector_e2e_early_dropped_total "));
    assert_eq!(early, Some("0"), "the agent sent no tunneled packet through the relay:\n{m}");
}
