#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The relay-wide memory budget against one identity's flood: hundreds of
//! connections of one agent identity that stop acknowledging while the
//! connector keeps answering. The relay runs as its own process (the
//! `ztna-relay` binary) so that its resident set is measured alone.

use ztna_testkit::fixtures as common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::identity::Kind;
use ztna_control::{Code, Role};
use ztna_relay::pki::{self, DevPki};
use ztna_testkit::client_io::UdpClient;

const BIN: &str = env!("CARGO_BIN_EXE_ztna-relay");

/// The tests of this file measure resident memory and flood the relay
/// flat out: one at a time, so none measures another's load.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The relay binary: this build's, or `ZTNA_TEST_RELAY_BIN` (to measure a
/// release build, or an older relay, with the same flood).
fn relay_bin() -> String {
    std::env::var("ZTNA_TEST_RELAY_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// Attacking connections: 300, or `ZTNA_TEST_FLOOD_CONNS`.
fn flood_conns() -> usize {
    std::env::var("ZTNA_TEST_FLOOD_CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// (VmRSS, VmHWM) of `pid` in bytes.
fn rss_of(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = s.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Relay {
    child: Reap,
    addr: SocketAddr,
    pki: DevPki,
    metrics: SocketAddr,
}

/// The relay's memory budget gauges from its /metrics: (used, limit).
fn budget_of(r: &Relay) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let mut t = std::net::TcpStream::connect(r.metrics).ok()?;
    t.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    t.read_to_string(&mut body).ok()?;
    let gauge = |name: &str| -> Option<u64> {
        let line = body.lines().find(|l| l.split_whitespace().next() == Some(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|v| v as u64)
    };
    Some((gauge("ztna_relay_memory_budget_used_bytes")?, gauge("ztna_relay_memory_budget_bytes")?))
}

fn start_relay(limits: &str) -> Relay {
    let pki = pki::generate(&std::env::temp_dir()).unwrap();
    let policy = pki.dir.join("policy.toml");
    std::fs::write(&policy, "[services.echo]\nconnectors = [\"site\"]\nagents = [\"*\"]\n").unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = pki.dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{addr}\"\nworkers = 2\npin_cores = false\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             trust_domain = \"{}\"\npolicy = {:?}\nmetrics = \"{metrics}\"\n[limits]\nhandshakes_per_sec_per_ip = 0\nmax_conns_per_ip = 0\n{limits}",
            pki.cert,
            pki.key,
            pki.ca,
            pki::DEV_TRUST_DOMAIN,
            policy
        ),
    )
    .unwrap();
    let child = Command::new(relay_bin())
        .args(["--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(pki.dir.join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    Relay { child: Reap(child), addr, pki, metrics }
}

fn client_of(r: &Relay, kind: Kind, name: &str, from: &str, role: Role, seed: u64) -> UdpClient {
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    let mut cfg = ClientConfig::new(r.addr, local, "localhost");
    cfg.registrations = vec![(role, svc("echo"))];
    UdpClient::new(cfg, &r.pki.client_tls(kind, name).unwrap(), local, seed).unwrap()
}

/// An attacker's turn: send `n` datagrams, read everything, but hand
/// quiche only the small packets (the relay's ACKs of what we sent), so
/// the relay's datagram-carrying packets are never acknowledged.
fn attack_turn(c: &mut UdpClient, flow: u32, n: usize, buf: &mut [u8], out: &mut [u8]) {
    let payload = [0x45u8; 1100];
    for _ in 0..n {
        let _ = c.session.send_datagram(flow, &payload);
    }
    let now = Instant::now();
    while let Ok((len, from)) = c.socket().recv_from(buf) {
        if len < 200 {
            c.session.recv(&mut buf[..len], from, now);
        }
    }
    if c.session.next_deadline().is_some_and(|d| d <= now) {
        c.session.handle_timeout(now);
    }
    while let Some((len, to)) = c.session.poll_transmit(out, now) {
        let _ = c.socket().send_to(&out[..len], to);
    }
}

/// One bystander round trip during the flood, as an application would
/// try it: up to three sends, 400 ms apart. Returns (answered, answered
/// at the first attempt).
fn probe(alice: &mut UdpClient, connector: &mut UdpClient, flow: u32, n: usize) -> (bool, bool) {
    let payload = format!("still here {n}");
    let mut buf = [0u8; 2048];
    for attempt in 0..3 {
        if alice.session.send_datagram(flow, payload.as_bytes()).is_err() {
            continue;
        }
        let end = Instant::now() + Duration::from_millis(400);
        while Instant::now() < end {
            echo_all(connector);
            alice.pump();
            while let Some(len) = alice.session.recv_datagram(&mut buf) {
                if ztna_control::datagram::parse(&buf[..len]).is_ok_and(|(_, p)| p == payload.as_bytes()) {
                    return (true, attempt == 0);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    (false, false)
}

#[test]
fn one_identity_flood_stays_within_the_budget_and_others_keep_working() {
    let _serial = one_at_a_time();
    const BUDGET_MIB: u64 = 48;
    const UNCHARGED_MIB: u64 = 80;
    let attackers = flood_conns();
    let relay = start_relay(&format!("memory_budget_mib = {BUDGET_MIB}\nmax_conns_per_identity = 1000\n"));
    let pid = relay.child.0.id();
    let mut connector = client_of(&relay, Kind::Connector, "site", "127.0.0.1", Role::Connector, 1);
    until_registered(&mut connector, 1);
    let mut alice = client_of(&relay, Kind::Agent, "alice", "127.0.0.9", Role::Agent, 2);
    let alice_flow = until_registered(&mut alice, 1)[0];
    assert!(round_trip(&mut alice, std::slice::from_mut(&mut connector), alice_flow, b"before").is_some());
    let (baseline, _) = rss_of(pid);

    // Hundreds of connections of one identity, all registered for echo.
    let mut mallory: Vec<UdpClient> = (0..attackers)
        .map(|i| client_of(&relay, Kind::Agent, "mallory", "127.0.0.2", Role::Agent, 100 + i as u64))
        .collect();
    let mut flows: Vec<Option<u32>> = vec![None; attackers];
    let end = Instant::now() + Duration::from_secs(40);
    while flows.iter().any(Option::is_none) && Instant::now() < end {
        for (c, f) in mallory.iter_mut().zip(flows.iter_mut()) {
            c.pump();
            while let Some(e) = c.session.poll_event() {
                if let Event::Registered { flow, .. } = e {
                    *f = Some(flow);
                }
            }
        }
        connector.pump();
        alice.pump();
    }
    let registered = flows.iter().filter(|f| f.is_some()).count();
    assert!(registered >= attackers * 9 / 10, "attackers registered: {registered}");

    // The flood: they send, the connector answers, they never ACK.
    let (mut buf, mut out) = (vec![0u8; 65_536], vec![0u8; 2048]);
    let mut peak = 0u64;
    let mut bystander = (0, 0);
    let mut first_try = 0;
    let mut max_used = 0;
    let flood_end = Instant::now() + Duration::from_secs(15);
    let mut last_probe = Instant::now();
    while Instant::now() < flood_end {
        for (c, f) in mallory.iter_mut().zip(&flows) {
            if let Some(flow) = f {
                attack_turn(c, *flow, 8, &mut buf, &mut out);
            }
        }
        echo_all(&mut connector);
        alice.pump();
        if last_probe.elapsed() > Duration::from_millis(500) {
            last_probe = Instant::now();
            bystander.0 += 1;
            let (ok, first) = probe(&mut alice, &mut connector, alice_flow, bystander.0);
            bystander.1 += usize::from(ok);
            first_try += usize::from(first);
            let (used, limit) = budget_of(&relay).expect("budget gauges on /metrics");
            assert_eq!(limit, BUDGET_MIB << 20);
            max_used = max_used.max(used);
        }
        peak = peak.max(rss_of(pid).0);
    }
    let (_, hwm) = rss_of(pid);
    eprintln!(
        "relay RSS: baseline {} MiB, peak {} MiB (VmHWM {} MiB), budget {BUDGET_MIB} MiB; bystander {}/{} round trips \
         ({first_try} at the first attempt); budget used at most {} MiB",
        baseline >> 20,
        peak >> 20,
        hwm >> 20,
        bystander.1,
        bystander.0,
        max_used >> 20
    );
    // The shared figure lags each worker's own by less than one publish
    // step (budget.rs), so the relay may go past the limit by up to that
    // much per worker (2 here) before it notices.
    let slack = 2 * ztna_relay::budget::PUBLISH_STEP.unsigned_abs();
    assert!(
        max_used > 0 && max_used <= (BUDGET_MIB << 20) + slack,
        "what the relay holds for peers stays within its budget (and its documented publish slack)"
    );
    assert!(
        // What the budget does not see: quiche's loss-recovery state (a
        // record per packet in flight, each with a copy of the ACK ranges),
        // measured at 25-70 MiB in this flood (heaptrack; SECURITY.md,
        // "Known gaps"). This bound is loose: it catches the old
        // unbounded growth (172 MiB in 15 s, release build), not less.
        hwm <= baseline + ((BUDGET_MIB + UNCHARGED_MIB) << 20),
        "relay peak RSS {} MiB exceeds baseline {} MiB + budget {BUDGET_MIB} MiB + {UNCHARGED_MIB} MiB",
        hwm >> 20,
        baseline >> 20
    );
    assert_eq!(bystander.1, bystander.0, "another identity round-trips throughout the flood");

    // The flood ends: the memory goes back.
    for c in &mut mallory {
        c.session.close();
    }
    for _ in 0..5 {
        mallory.iter_mut().for_each(UdpClient::pump);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(mallory);
    // Closing connections drain (3 PTOs) before they are reaped; allow a
    // loaded machine some time.
    let settle = Instant::now() + Duration::from_secs(30);
    let mut after = rss_of(pid).0;
    while Instant::now() < settle && after > baseline + (32 << 20) {
        echo_all(&mut connector);
        alice.pump();
        std::thread::sleep(Duration::from_millis(10));
        after = rss_of(pid).0;
    }
    eprintln!("relay RSS after the flood: {} MiB", after >> 20);
    assert!(after <= baseline + (32 << 20), "RSS after the flood {} MiB, baseline {} MiB", after >> 20, baseline >> 20);
    assert!(round_trip(&mut alice, std::slice::from_mut(&mut connector), alice_flow, b"after").is_some());
    let _ = std::fs::remove_dir_all(&relay.pki.dir);
}

#[test]
fn connections_per_identity_are_capped() {
    let _serial = one_at_a_time();
    let relay = start_relay("max_conns_per_identity = 4\n");
    let mut clients: Vec<UdpClient> =
        (0..6).map(|i| client_of(&relay, Kind::Agent, "mallory", "127.0.0.3", Role::Agent, 10 + i)).collect();
    let mut other = client_of(&relay, Kind::Agent, "alice", "127.0.0.3", Role::Agent, 99);
    // Connected (the relay's HelloAck) comes before authentication is
    // checked by the relay's identity table, so count who stays up.
    let mut registered = vec![false; clients.len()];
    let mut limited = vec![false; clients.len()];
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        for (i, c) in clients.iter_mut().enumerate() {
            c.pump();
            while let Some(e) = c.session.poll_event() {
                match e {
                    Event::Connected => registered[i] = true,
                    Event::Goodbye { code: Code::LIMIT, reason } if reason.contains("identity") => limited[i] = true,
                    _ => {}
                }
            }
        }
        other.pump();
        std::thread::sleep(Duration::from_millis(2));
    }
    let ok = registered.iter().filter(|b| **b).count();
    let told = limited.iter().filter(|b| **b).count();
    eprintln!("connected {ok} of 6; refused with the identity limit: {told}");
    assert!(told >= 2, "the connections past the cap were told why");
    let held = registered.iter().zip(&limited).filter(|(r, l)| **r && !**l).count();
    assert_eq!(held, 4, "exactly max_conns_per_identity connections of one identity stay up");
    assert!(other.session.is_connected(), "another identity from the same address still gets in");
    let _ = std::fs::remove_dir_all(&relay.pki.dir);
}

/// Half-open connections are charged to the budget: `retry = "auto"`
/// demands Retry once the budget is half used, whatever the handshake
/// rate, and new connections stop well before the budget is gone.
#[test]
fn half_open_handshakes_turn_on_retry_before_the_budget_is_at_risk() {
    let _serial = one_at_a_time();
    use ztna_udp::IoBackend;
    let mut cfg = relay_config(1, IoBackend::Auto, true);
    cfg.limits.memory_budget_mib = 16;
    cfg.limits.retry_above_handshakes_per_sec = 1_000_000; // the rate alone never asks for Retry
    cfg.limits.handshakes_per_sec_per_ip = 0;
    cfg.limits.max_conns_per_ip = 0;
    cfg.limits.handshake_timeout_ms = 60_000;
    let relay = ztna_relay::server::start(&cfg).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let mut qcfg = silent_client_config();
    const INITIALS: usize = 800; // 800 × 32 KiB = 25 MiB of half-open state
    for i in 0..INITIALS {
        for d in first_flight(&mut qcfg, local, relay.local_addr, i as u64) {
            sock.send_to(&d, relay.local_addr).unwrap();
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = relay.totals();
    let (used, limit) = relay.memory_budget();
    eprintln!(
        "{INITIALS} silent first flights: {} connections accepted, {} Retries, {} refused at the budget; budget {} of {} MiB",
        t.conns_accepted,
        t.retries_sent,
        t.drop_memory_budget,
        used >> 20,
        limit >> 20
    );
    let per_conn = ztna_relay::worker::CONN_CHARGE;
    assert!(t.retries_sent > 0, "Retry switched on under memory pressure: {t:?}");
    assert!(
        t.conns_accepted * per_conn <= limit / 2 + 8 * per_conn,
        "half-open state stopped near half the budget: {} accepted",
        t.conns_accepted
    );
    assert!(used <= limit, "within the budget");
    relay.shutdown();
}

/// What a half-open connection really costs the relay process, against
/// what the budget charges for it ([`ztna_relay::worker::CONN_CHARGE`]).
#[test]
fn the_budget_charge_covers_a_half_open_connection() {
    let _serial = one_at_a_time();
    const N: usize = 1500;
    let relay = start_relay("retry = \"off\"\nhandshake_timeout_ms = 60000\nmemory_budget_mib = 1024\n");
    let pid = relay.child.0.id();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let mut qcfg = silent_client_config();
    // Wait until the relay answers at all, then take the baseline.
    let mut buf = vec![0u8; 65_536];
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut send_flight = |i: u64| {
        for d in first_flight(&mut qcfg, local, relay.addr, i) {
            sock.send_to(&d, relay.addr).unwrap();
        }
    };
    let end = Instant::now() + T;
    loop {
        send_flight(u64::MAX);
        if sock.recv_from(&mut buf).is_ok() {
            break;
        }
        assert!(Instant::now() < end, "relay answers");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (baseline, _) = rss_of(pid);
    for i in 0..N as u64 {
        send_flight(i);
        while sock.recv_from(&mut buf).is_ok() {}
    }
    std::thread::sleep(Duration::from_secs(1));
    let (held, _) = rss_of(pid);
    let per_conn = held.saturating_sub(baseline) / N as u64;
    let charge = ztna_relay::worker::CONN_CHARGE;
    eprintln!(
        "{N} half-open connections: RSS {} → {} MiB, {:.1} KiB each; the budget charges {} KiB",
        baseline >> 20,
        held >> 20,
        per_conn as f64 / 1024.0,
        charge / 1024
    );
    assert!(per_conn > 4 * 1024, "the connections were really held ({per_conn} bytes each)");
    assert!(per_conn <= charge * 5 / 4, "a half-open connection costs {per_conn} bytes, the budget charges {charge}");
    let _ = std::fs::remove_dir_all(&relay.pki.dir);
}
