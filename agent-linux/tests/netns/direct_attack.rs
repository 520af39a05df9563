//! A direct path under attack, with the real agent, connector and relay: a
//! third host on the WAN that knows the connector's candidate (and sees a
//! copy of every packet the agent sends it directly) replays those packets
//! from its own address, alters them, and sends made-up packets. None is
//! taken: the session stays on the agent's address, nothing is sent to the
//! third host, traffic goes on, and every packet is counted.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::lab::{can_run, with_netns, Lab};
use crate::probe::{http_get_in, json_in, udp_probe_from};
use crate::start::{bins, bring_up_with, Running, CONNECTOR_HEALTH};
use crate::{NAT_WAN_IP, RELAY_IP, SITE_IP};

/// The third host's tap: copies of the agent's direct packets arrive here.
const TAP: &str = "10.201.0.2:5555";

fn metric(lab: &Lab, name: &str) -> u64 {
    let (code, body) = http_get_in(&lab.site, CONNECTOR_HEALTH.parse().unwrap(), "/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The connector's view of its one session's direct path.
fn connector_direct(lab: &Lab) -> Option<String> {
    let s = json_in(&lab.site, CONNECTOR_HEALTH.parse().unwrap(), "/status");
    s["sessions"][0]["direct"].as_str().map(str::to_owned)
}

#[test]
fn a_third_host_cannot_inject_into_or_divert_a_direct_path() {
    if !can_run() {
        return;
    }
    let b = bins();
    let lab = Lab::new("attack");
    let Running { pki: _pki, relay: _relay, connector: _connector, mut agent, _echo } =
        bring_up_with(&lab, &b, "auto", "");
    let direct = |l: &str| l.starts_with("path service=echo via=direct");
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let warmup = std::thread::spawn(move || udp_probe_from(&ns, &bench, 20, 20));
    agent.wait_out(0, Duration::from_secs(5), direct).expect("direct path");
    warmup.join().unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // connector status refreshes every second
    let before = connector_direct(&lab).expect("connector on the direct path");
    assert!(before.starts_with(&format!("{NAT_WAN_IP}:")), "{before}");

    // The third host (the relay's namespace, another port: any host on the
    // WAN) gets a copy of every packet the agent sends the connector.
    lab.nft(
        &lab.site,
        &format!(
            "table ip ztna_tap {{\n chain tap {{\n  type filter hook prerouting priority -300; policy accept;\n  \
             ip saddr {NAT_WAN_IP} udp dport 4434 dup to {RELAY_IP} device \"eth0\"\n }}\n}}\n"
        ),
    );
    lab.nft(
        &lab.relay,
        &format!(
            "table ip ztna_tap {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {SITE_IP} udp dport 4434 dnat to {TAP}\n }}\n}}\n"
        ),
    );
    let relay_ns = lab.relay.clone();
    let capture = std::thread::spawn(move || {
        with_netns(&relay_ns, || {
            let s = UdpSocket::bind(TAP).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let (mut got, until) = (Vec::new(), Instant::now() + Duration::from_secs(3));
            let mut buf = [0u8; 2048];
            while Instant::now() < until && got.len() < 100 {
                if let Ok(n) = s.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
            }
            got
        })
    });
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let (sent, got) = std::thread::spawn(move || udp_probe_from(&ns, &bench, 100, 10)).join().unwrap();
    assert_eq!((sent, got), (100, 100));
    let captured = capture.join().unwrap();
    for ns in [&lab.site, &lab.relay] {
        crate::lab::ok(crate::lab::in_ns(ns, "nft").args(["delete", "table", "ip", "ztna_tap"]));
    }
    assert!(captured.len() >= 50, "the tap saw {} packets", captured.len());

    // Replay, alter, make up; meanwhile traffic goes on.
    let (drop0, rej0, hs0) = (
        metric(&lab, "ztna_connector_drop_direct_total"),
        metric(&lab, "ztna_connector_e2e_packets_rejected_total"),
        metric(&lab, "ztna_connector_e2e_handshakes_total"),
    );
    let mark = agent.out_len();
    let (ns, bench) = (lab.agent.clone(), b.bench.clone());
    let traffic = std::thread::spawn(move || udp_probe_from(&ns, &bench, 300, 5));
    let relay_ns = lab.relay.clone();
    let (forged, answers) = with_netns(&relay_ns, move || {
        let s = UdpSocket::bind(format!("{RELAY_IP}:0")).unwrap();
        let to: SocketAddr = format!("{SITE_IP}:4434").parse().unwrap();
        let mut forged = 0u64;
        for (i, p) in captured.iter().enumerate() {
            // The genuine packet, from another address (a replay).
            s.send_to(p, to).unwrap();
            // Altered: its tag no longer matches.
            let mut altered = p.clone();
            if let Some(last) = altered.last_mut() {
                *last ^= 0x55;
            }
            s.send_to(&altered, to).unwrap();
            // Made up: a short header with an unknown CID, a punch packet
            // of a guessed round, an Initial.
            let mut unknown = p.clone();
            for b in unknown.iter_mut().skip(1).take(8) {
                *b = b.wrapping_add(i as u8 | 1);
            }
            s.send_to(&unknown, to).unwrap();
            let mut punch = [0u8; 21];
            punch[0] = 0x10;
            punch[1..9].copy_from_slice(b"ztnapnch");
            punch[12] = i as u8;
            s.send_to(&punch, to).unwrap();
            let mut initial = vec![0u8; 1200];
            initial[..5].copy_from_slice(&[0xc3, 0, 0, 0, 1]);
            s.send_to(&initial, to).unwrap();
            forged += 4;
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nothing comes back to the third host: no path is validated
        // toward it, nothing is answered.
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        let mut buf = [0u8; 2048];
        let mut answers = 0;
        while s.recv(&mut buf).is_ok() {
            answers += 1;
        }
        (forged, answers)
    });
    let (sent, got) = traffic.join().unwrap();
    eprintln!("forged {forged} packets (and replayed a quarter as many); UDP echo meanwhile {got}/{sent}");
    assert_eq!(answers, 0, "the connector answered the third host");
    assert!(got * 100 >= sent * 98, "traffic during the attack: {got}/{sent}");
    assert!(agent.wait_out(mark, Duration::from_millis(200), |l| l.starts_with("path ")).is_none(), "path changed");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(connector_direct(&lab), Some(before), "the session stays on the agent's address");
    let (drop1, rej1, hs1) = (
        metric(&lab, "ztna_connector_drop_direct_total"),
        metric(&lab, "ztna_connector_e2e_packets_rejected_total"),
        metric(&lab, "ztna_connector_e2e_handshakes_total"),
    );
    eprintln!("connector: drop_direct +{}, e2e_packets_rejected +{}", drop1 - drop0, rej1 - rej0);
    assert_eq!(hs1, hs0, "no session started from a made-up Initial");
    // Unknown CIDs, punches and Initials are dropped before any session
    // (3 of every 4 forged); altered packets and replays fail in theirs.
    assert!(drop1 - drop0 >= forged / 4 * 3, "made-up packets are counted as drop_direct");
    assert!((drop1 - drop0) + (rej1 - rej0) >= forged, "every forged packet is counted");
}
