//! One relay: the agent through NAT, relay restart and loss; 10 MB of TCP
//! through the tunnel under loss.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::lab::{can_run, ip, Lab};
use crate::probe::{agent_stats, agent_status, json_in, ping, relay_counter, tcp_probe, udp_probe};
use crate::start::{bins, bring_up, start_relay, Running, AGENT_STATUS, CONNECTOR_HEALTH};
use crate::{AGENT_IP, NAT_WAN_IP, RELAY_IP, SITE_IP, UNMAPPED, VIP};

/// Ping and UDP echo through NAT → relay → connector (agent and connector
/// verify the relay by its IP address: `server_name` is the address, the
/// certificate has it as an IP SAN); the observed address is the NAT's; an unmapped destination never leaves the agent; the agent
/// survives a relay restart; traffic flows with 5% loss on the uplink.
#[test]
fn agent_through_nat_relay_restart_and_loss() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let b = bins();
    let lab = Lab::new("main");
    let Running { pki, mut relay, mut connector, mut agent, _echo } = bring_up(&lab, &b);
    eprintln!("up after {:?}", t0.elapsed());

    // The relay sees the NAT's public side, not the agent's address.
    let obs = agent.wait_out(0, Duration::from_secs(5), |l| l.starts_with("observed address ")).expect("observed");
    let obs: SocketAddr = obs.trim_start_matches("observed address ").parse().unwrap();
    assert_eq!(obs.ip().to_string(), NAT_WAN_IP, "observed address is the NAT's wan side");
    assert_ne!(obs.ip().to_string(), AGENT_IP);

    // ICMP echo, answered by the connector.
    assert_eq!(ping(&lab, VIP, 3), 3, "ping {VIP} through the tunnel");
    who_is_connected(&lab, &mut agent);

    // UDP echo through the tunnel to the backend.
    let (sent, got) = udp_probe(&lab, &b, 50, 5);
    assert_eq!((sent, got), (50, 50), "UDP echo without loss");

    // An unmapped destination inside the TUN's routes never leaves the
    // agent: the agent counts it, sends nothing, the relay forwards nothing.
    ip(&["-n", &lab.agent, "route", "add", "100.100.0.0/24", "dev", "zt0"]);
    let metrics: SocketAddr = format!("{RELAY_IP}:9090").parse().unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // relay publishes counters every second
    let fwd_before = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    let before = agent_stats(&mut agent);
    assert_eq!(ping(&lab, UNMAPPED, 3), 0, "no reply from an unmapped destination");
    let after = agent_stats(&mut agent);
    std::thread::sleep(Duration::from_millis(1100));
    let fwd_after = relay_counter(&lab, metrics, "ztna_relay_datagrams_forwarded_total");
    // 3 pings and 50 datagrams, each forwarded both ways.
    assert!(fwd_before >= 106, "relay counted the earlier traffic ({fwd_before})");
    assert!(after["drop_unmapped"] >= before["drop_unmapped"] + 3, "unmapped drops counted: {before:?} → {after:?}");
    assert_eq!(after["packets_out"], before["packets_out"], "nothing tunneled for the unmapped destination");
    assert_eq!(fwd_after, fwd_before, "the relay forwarded nothing meanwhile");
    eprintln!("checks before restart done after {:?}", t0.elapsed());

    // Relay restart on the same address with the same certificate: agent
    // and connector reconnect with backoff, traffic resumes.
    let (a_mark, c_mark) = (agent.out_len(), connector.err.lock().unwrap().len());
    assert!(relay.stop(Duration::from_secs(5)), "relay exits cleanly on SIGTERM");
    agent
        .wait_out(a_mark, Duration::from_secs(5), |l| l.starts_with("disconnected retry_in_ms="))
        .expect("agent disconnect");
    let restart = Instant::now();
    relay = start_relay(&lab, &b, &pki);
    connector.wait_err(c_mark, Duration::from_secs(20), |l| l.contains("registered")).expect("connector re-registered");
    agent.wait_out(a_mark, Duration::from_secs(20), |l| l.starts_with("registered echo")).expect("agent re-registered");
    eprintln!("agent re-registered {:?} after the relay restart", restart.elapsed());
    assert_eq!(ping(&lab, VIP, 3), 3, "ping after the relay restart");
    let (_, got) = udp_probe(&lab, &b, 20, 5);
    assert_eq!(got, 20, "UDP echo after the relay restart");
    let s = agent_stats(&mut agent);
    assert!(s["connects"] >= 2 && s["disconnects"] >= 1, "reconnect counted: {s:?}");
    // The agent's UDP socket (a new one after the restart) uses GSO and GRO
    // unless the suite runs with ZTNA_UDP_OFFLOAD=off.
    let on = u64::from(ztna_udp::offload::allowed());
    assert_eq!((s["udp_gso"], s["udp_gro"], s["udp_gso_errors"]), (on, on, 0), "{s:?}");

    // 5% random loss each way on the NAT's uplink: traffic still flows.
    lab.add_uplink_loss(true);
    let (sent, got) = udp_probe(&lab, &b, 200, 5);
    eprintln!("UDP echo under 5% loss each way: {got}/{sent}");
    assert!(got * 100 >= sent * 70, "UDP echo under 5% loss each way: {got}/{sent}");
    assert!(lab.loss_drops() > 0, "the loss rules dropped packets");
    let replies = ping(&lab, VIP, 5);
    assert!(replies >= 1, "ping under loss: {replies}/5");

    // Clean exit: SIGTERM prints final counters and removes the device.
    let mark = agent.out_len();
    assert!(agent.stop(Duration::from_secs(5)), "agent exits cleanly on SIGTERM");
    assert!(agent.wait_out(mark, Duration::from_secs(1), |l| l.starts_with("stats ")).is_some(), "final stats");
    let links = ip(&["-n", &lab.agent, "link", "show"]);
    assert!(!links.contains("zt0"), "TUN device gone after exit: {links}");
    let routes = ip(&["-n", &lab.agent, "route", "show"]);
    assert!(!routes.contains("100.100.0."), "routes gone with the device: {routes}");
    drop(relay);
    eprintln!("total {:?}", t0.elapsed());
}

/// Issue 15: relay, connector and agent each say who is connected, with
/// the observed addresses (the agent's is the NAT's) and the identities
/// the end-to-end session proved.
fn who_is_connected(lab: &Lab, agent: &mut crate::lab::Proc) {
    let metrics: SocketAddr = format!("{RELAY_IP}:9090").parse().unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // status rows are refreshed every second
    let relay = json_in(&lab.relay, metrics, "/status");
    assert_eq!((relay["agents"].as_u64(), relay["connectors"].as_u64()), (Some(1), Some(1)), "{relay}");
    let conns = relay["connections"].as_array().unwrap();
    let row = |kind: &str| conns.iter().find(|c| c["identity"].as_str().unwrap().contains(kind)).unwrap().clone();
    let (a, c) = (row("/agent/laptop"), row("/connector/site"));
    assert!(a["observed"].as_str().unwrap().starts_with(&format!("{NAT_WAN_IP}:")), "{relay}");
    assert!(c["observed"].as_str().unwrap().starts_with(&format!("{SITE_IP}:")), "{relay}");
    assert_eq!((a["role"].as_str(), a["flows"].as_u64()), (Some("agent"), Some(1)), "{relay}");
    assert_eq!(relay["services"]["echo"]["connectors"], 1, "{relay}");

    let connector = json_in(&lab.site, CONNECTOR_HEALTH.parse().unwrap(), "/status");
    let r = &connector["relays"][0];
    assert_eq!(r["relay"].as_str(), Some(format!("{RELAY_IP}:4433").as_str()), "{connector}");
    assert_eq!(r["connected"], true, "{connector}");
    assert!(r["observed"].as_str().unwrap().starts_with(&format!("{SITE_IP}:")), "{connector}");
    assert_eq!(r["services"], serde_json::json!(["echo"]), "{connector}");
    assert_eq!(connector["sessions_up"], 1, "{connector}");
    let s = &connector["sessions"][0];
    assert!(s["agent"].as_str().unwrap().ends_with("/agent/laptop"), "{connector}");
    assert_eq!(
        (s["proven"].as_bool(), s["up"].as_bool(), s["service"].as_str()),
        (Some(true), Some(true), Some("echo"))
    );

    for (what, status) in [
        ("SIGUSR1", agent_status(agent)),
        ("GET /status", json_in(&lab.agent, AGENT_STATUS.parse().unwrap(), "/status")),
    ] {
        assert_eq!(status["connected"], true, "{what}: {status}");
        assert!(status["observed"].as_str().unwrap().starts_with(&format!("{NAT_WAN_IP}:")), "{what}: {status}");
        let echo = &status["services"][0];
        assert_eq!(
            (echo["service"].as_str(), echo["session"].as_str()),
            (Some("echo"), Some("up")),
            "{what}: {status}"
        );
        assert!(echo["proven"].as_str().unwrap().ends_with("/connector/site"), "{what}: {status}");
        assert_eq!(echo["connector"], echo["proven"], "{what}: {status}");
    }
}

/// 1 MB without loss, then 10 MB with 5% loss, through a TCP connection
/// from a real socket in the agent namespace (kernel TCP → TUN → agent →
/// relay → connector's userspace TCP → backend echo, and back); every byte
/// verified.
fn tcp_10mb(test: &str, loss_both_ways: bool, timeout_s: u32) {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let b = bins();
    let lab = Lab::new(test);
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } = bring_up(&lab, &b);
    let (ok, line) = tcp_probe(&lab, &b, 1_000_000, 20);
    eprintln!("{line} (no loss)");
    assert!(ok, "1 MB TCP echo without loss: {line}");
    lab.add_uplink_loss(loss_both_ways);
    let (ok, line) = tcp_probe(&lab, &b, 10_000_000, timeout_s);
    eprintln!("{line} (5% loss, both ways: {loss_both_ways})");
    assert!(ok, "10 MB TCP echo under 5% loss: {line}");
    let dropped = lab.loss_drops();
    eprintln!("loss rule dropped {dropped} packets");
    assert!(dropped > 100, "the loss rule dropped packets ({dropped})");
    let s = agent_stats(&mut agent);
    assert_eq!(s["drop_too_large"], 0, "the TUN MTU fits the tunnel: {s:?}");
    eprintln!("total {:?}", t0.elapsed());
}

/// 5% loss on packets leaving the NAT through its uplink (agent → relay:
/// the upload and the agent's ACKs).
#[test]
fn tcp_10mb_through_tunnel_with_uplink_loss() {
    tcp_10mb("tcp", false, 40);
}

/// 5% loss both ways on the uplink: the echo's return leg (the connector's
/// smoltcp as the sender) loses segments too. Known slow: 10 MB took 40 s+
/// and did not finish in some runs (smoltcp retransmits go-back-N from the
/// first unacknowledged byte and doubles its RTO up to 10 s on repeated
/// losses), so it is outside the default run.
#[test]
#[ignore = "slow: connector-side TCP recovers poorly from downstream loss; run with --ignored"]
fn tcp_10mb_through_tunnel_with_loss_both_ways() {
    tcp_10mb("tcpboth", true, 120);
}
