//! Probes from inside the lab: counters of the agent and the relay, ping,
//! `ztna-bench udp-probe` and `tcp-probe`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::lab::{in_ns, run, with_netns, Lab, Proc};
use crate::start::Bins;
use crate::VIP;

/// `stats k=v …` line → map.
pub fn parse_stats(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Asks the agent for its counters (SIGUSR1) and returns them.
pub fn agent_stats(agent: &mut Proc) -> HashMap<String, u64> {
    let from = agent.out_len();
    agent.signal(libc::SIGUSR1);
    let line = agent.wait_out(from, Duration::from_secs(5), |l| l.starts_with("stats ")).expect("agent prints stats");
    parse_stats(&line)
}

/// `GET path` from inside namespace `ns` ((0, "") when it cannot connect).
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &'static str) -> (u16, String) {
    with_netns(ns, move || ztna_ops::http::get(addr, path).unwrap_or((0, String::new())))
}

/// The JSON of `GET path` from inside namespace `ns` (panics unless 200).
pub fn json_in(ns: &str, addr: SocketAddr, path: &'static str) -> serde_json::Value {
    let (status, body) = http_get_in(ns, addr, path);
    assert_eq!(status, 200, "GET {path} in {ns}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} in {ns} is not JSON ({e}): {body}"))
}

/// Asks the agent for its status (SIGUSR1 prints `status {JSON}`).
pub fn agent_status(agent: &mut Proc) -> serde_json::Value {
    let from = agent.out_len();
    agent.signal(libc::SIGUSR1);
    let line = agent.wait_out(from, Duration::from_secs(5), |l| l.starts_with("status ")).expect("agent prints status");
    serde_json::from_str(line.trim_start_matches("status ")).unwrap()
}

/// Sum of a counter over the relay's workers, from its Prometheus
/// endpoint inside the relay namespace.
pub fn relay_counter(lab: &Lab, metrics: SocketAddr, name: &'static str) -> u64 {
    let text = with_netns(&lab.relay, move || {
        let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    });
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// `ping -c N` from the agent namespace; returns replies received.
pub fn ping(lab: &Lab, to: &str, count: u32) -> u32 {
    ping_from(&lab.agent, to, count)
}

pub fn ping_from(ns: &str, to: &str, count: u32) -> u32 {
    let out = run(in_ns(ns, "ping").args(["-n", "-q", "-c", &count.to_string(), "-i", "0.2", "-W", "1", to]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" packets transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Pings `to` once at a time until one answers: how long that took, or
/// None after `within`.
pub fn ping_until(ns: &str, to: &str, within: Duration) -> Option<Duration> {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if ping_from(ns, to, 1) == 1 {
            return Some(t.elapsed());
        }
    }
    None
}

/// `ztna-bench udp-probe` from the agent namespace to the VIP's echo port.
pub fn udp_probe(lab: &Lab, b: &Bins, count: u32, interval_ms: u32) -> (u64, u64) {
    udp_probe_from(&lab.agent, &b.bench, count, interval_ms)
}

pub fn udp_probe_from(ns: &str, bench: &Path, count: u32, interval_ms: u32) -> (u64, u64) {
    let out = run(in_ns(ns, bench).args([
        "udp-probe",
        "--to",
        &format!("{VIP}:7"),
        "--count",
        &count.to_string(),
        "--size",
        "200",
        "--interval-ms",
        &interval_ms.to_string(),
        "--wait-ms",
        "1500",
        "--min",
        "0",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("udp-probe "))
        .unwrap_or_else(|| panic!("udp-probe printed no result: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let m = parse_stats(line);
    (m["sent"], m["received"])
}

/// `ztna-bench tcp-probe` from the agent namespace: `bytes` through the
/// VIP's TCP echo port, verified byte for byte. Returns (verified, line).
pub fn tcp_probe(lab: &Lab, b: &Bins, bytes: u64, timeout_s: u32) -> (bool, String) {
    tcp_probe_from(&lab.agent, &b.bench, bytes, None, timeout_s)
}

pub fn tcp_probe_from(ns: &str, bench: &Path, bytes: u64, rate_kbps: Option<u64>, timeout_s: u32) -> (bool, String) {
    let rate = rate_kbps.map(|r| r.to_string());
    let mut args = vec!["tcp-probe", "--to", &format!("{VIP}:7")].into_iter().map(str::to_owned).collect::<Vec<_>>();
    args.extend(["--bytes".into(), bytes.to_string(), "--timeout".into(), timeout_s.to_string()]);
    if let Some(r) = rate {
        args.extend(["--rate-kbps".into(), r]);
    }
    let out = run(in_ns(ns, bench).args(&args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("tcp-probe "))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("tcp-probe printed no result: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success() && line.contains("verified=true"), line)
}
