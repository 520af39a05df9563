#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The `ztna-relay` binary: config checking, flags, SIGTERM drain.

use ztna_testkit::fixtures as common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::Code;
use ztna_testkit::client_io::UdpClient;

const BIN: &str = env!("CARGO_BIN_EXE_ztna-relay");

fn tmp(name: &str, body: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ztna-test-{}-{name}", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

/// A bad config prints its cause chain (`Error: … Caused by: …`) and no
/// stack backtrace, even with RUST_BACKTRACE set.
#[test]
fn bad_config_reports_a_cause_chain_not_a_backtrace() {
    let bad = tmp("typo.toml", "listen = \"127.0.0.1:4500\"\ndev = true\n[limits]\nmax_conns = \"many\"\n");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("Error: "), "{err}");
    assert!(err.contains("Caused by:") && err.contains("max_conns"), "the cause names the key: {err}");
    assert!(!err.contains("backtrace") && !err.contains("Backtrace"), "no backtrace: {err}");
    let _ = std::fs::remove_file(bad);
}

#[test]
fn check_config_accepts_good_and_rejects_unknown_keys() {
    let good =
        tmp("good.toml", "listen = \"127.0.0.1:4500\"\nworkers = 2\ndev = true\n[limits]\nmax_registrations = 8\n");
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers 2"));

    // Flags override the file.
    let out = Command::new(BIN).args(["check-config", "--workers", "3", "--config"]).arg(&good).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers 3"));

    let bad = tmp("bad.toml", "listen = \"127.0.0.1:4500\"\ndev = true\nworkerz = 2\n");
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("workerz"), "names the unknown key");

    let nocert = tmp("nocert.toml", "listen = \"127.0.0.1:4500\"\n");
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&nocert).output().unwrap();
    assert!(!out.status.success(), "cert and key are required without dev mode");

    // Real certificates but no client CA: refused (mutual TLS is not optional).
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let body = format!("cert = {:?}\nkey = {:?}\n", pki.cert, pki.key);
    let noca = tmp("noca.toml", &body);
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&noca).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("client_ca"), "{}", String::from_utf8_lossy(&out.stderr));
    // With client CA and trust domain, a broken policy file is named.
    let broken = tmp("broken-policy.toml", "[services.echo]\nconnectors = [\"*\"]\n");
    let full = tmp(
        "full.toml",
        &format!("{body}client_ca = {:?}\ntrust_domain = \"dev.ztna\"\npolicy = {:?}\n", pki.ca, broken),
    );
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&full).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wildcard"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&broken, "[services.echo]\nconnectors = [\"c1\"]\nagents = [\"*\"]\n").unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&full).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&pki.dir);
    for p in [good, bad, nocert, noca, broken, full] {
        let _ = std::fs::remove_file(p);
    }
}

/// SIGTERM drains: /readyz turns 503 (/healthz stays 200), every client
/// gets Goodbye{DRAINING}, and the relay exits as soon as the last agent
/// has left, well before its grace period.
#[test]
fn sigterm_drains_readiness_goodbye_and_early_exit() {
    for backend in ["uring", "portable"] {
        let http: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut child = Command::new(BIN)
            .args(["--dev", "--listen", "127.0.0.1:0", "--workers", "2", "--io-backend", backend, "--metrics"])
            .arg(http.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let pid = child.id();
        let mut child = Reap(child);
        let mut lines = BufReader::new(stdout).lines();
        let addr: SocketAddr = lines.next().unwrap().unwrap().strip_prefix("listening on ").unwrap().parse().unwrap();
        let ca = lines.next().unwrap().unwrap().strip_prefix("dev CA: ").unwrap().to_owned();
        let get = |path: &str| ztna_ops::http::get(http, path).map(|(s, _)| s).unwrap_or(0);
        assert_eq!((get("/healthz"), get("/readyz")), (200, 200), "{backend}: healthy and ready");
        let (_, metrics) = ztna_ops::http::get(http, "/metrics").unwrap();
        assert!(metrics.contains("ztna_relay_packets_received_total"), "{backend}: {metrics}");

        // An agent that stays on Goodbye keeps the drain going, so the
        // probes can be read during it.
        let mut cfg = ClientConfig::new(addr, "127.0.0.1:0".parse().unwrap(), "localhost");
        cfg.leave_on_goodbye = false;
        // The dev CA's key sits next to its certificate: issue a client.
        let ca_dir = std::path::Path::new(&ca).parent().unwrap();
        let ca_files = ztna_relay::pki::CaFiles::in_dir(ca_dir);
        let id = ztna_control::identity::Identity::parse("spiffe://dev.ztna/agent/sigterm").unwrap();
        let (cert, key) = ztna_relay::pki::issue(&ca_files, &id, &[], &[], 1, ca_dir).unwrap();
        let tls = ztna_testkit::fixtures::mutual_tls(&ca, cert, key);
        let mut c = UdpClient::new(cfg, &tls, "127.0.0.1:0".parse().unwrap(), 1).unwrap();
        c.wait_for(T, |e| matches!(e, Event::Connected), |_| {}).expect("connects to the binary");

        // SAFETY: plain kill(2) on our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        match c.wait_for(T, |e| matches!(e, Event::Goodbye { .. }), |_| {}) {
            Some(Event::Goodbye { code, .. }) => assert_eq!(code, Code::DRAINING),
            other => panic!("{backend}: no Goodbye: {other:?}"),
        }
        assert_eq!((get("/healthz"), get("/readyz")), (200, 503), "{backend}: alive but not ready while draining");
        let (_, metrics) = ztna_ops::http::get(http, "/metrics").unwrap();
        let draining = metrics.lines().any(|l| l == "ztna_relay_draining 1");
        // The publisher copies once a second: give it one turn.
        let draining = draining || {
            std::thread::sleep(Duration::from_millis(1100));
            let (_, m) = ztna_ops::http::get(http, "/metrics").unwrap();
            m.lines().any(|l| l == "ztna_relay_draining 1")
        };
        assert!(draining, "{backend}: ztna_relay_draining gauge");
        // The agent leaves: the relay exits well before its 10 s grace.
        c.session.close();
        let t = Instant::now();
        let status = loop {
            c.pump();
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{backend}: relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{backend}: exit status {status}");
    }
}

/// `ztna-relay ca`: an organisation CA and a relay certificate that real
/// clients verify (the zero-trust work adds client certificates on top).
#[test]
fn ca_tool_issues_a_relay_certificate_clients_verify() {
    let dir = std::env::temp_dir().join(format!("ztna-test-{}-ca", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("ca").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let d = dir.to_str().unwrap();
    run(&["init", "--dir", d, "--trust-domain", "corp.example"]);
    let out = run(&[
        "issue",
        "--dir",
        d,
        "--trust-domain",
        "corp.example",
        "--kind",
        "relay",
        "--name",
        "r1",
        "--dns",
        "localhost",
    ]);
    assert!(out.contains("spiffe://corp.example/relay/r1"));
    // Invalid names are refused.
    let bad = Command::new(BIN)
        .args(["ca", "issue", "--dir", d, "--trust-domain", "corp.example", "--kind", "admin", "--name", "x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let relay = ztna_relay::server::start(&ztna_relay::server::RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(1),
        cert: Some(dir.join("relay-r1.pem")),
        key: Some(dir.join("relay-r1.key")),
        client_ca: Some(dir.join("ca.pem")),
        trust_domain: Some("corp.example".into()),
        pin_cores: false,
        ..Default::default()
    })
    .unwrap();
    let cfg = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "localhost");
    let out = run(&["issue", "--dir", d, "--trust-domain", "corp.example", "--kind", "agent", "--name", "alice"]);
    assert!(out.contains("spiffe://corp.example/agent/alice"));
    let tls = ztna_testkit::fixtures::mutual_tls(
        dir.join("ca.pem"),
        dir.join("agent-alice.pem"),
        dir.join("agent-alice.key"),
    );
    let mut c = UdpClient::new(cfg, &tls, "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    assert!(c.wait_for(T, |e| matches!(e, Event::Connected), |_| {}).is_some(), "client verifies the relay");
    relay.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGHUP reloads the policy from disk: a broken file is refused (logged,
/// old policy kept), a valid one that drops a permission closes the
/// agent's flow with FlowClose{denied} while its connection stays up.
#[test]
fn sighup_reloads_policy_and_refuses_broken_files() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let policy = pki.dir.join("policy.toml");
    std::fs::write(&policy, "[services.echo]\nconnectors = [\"c\"]\nagents = [\"a\"]\n").unwrap();
    let log = pki.dir.join("relay.log");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .arg("--cert")
        .arg(&pki.cert)
        .arg("--key")
        .arg(&pki.key)
        .arg("--client-ca")
        .arg(&pki.ca)
        .args(["--trust-domain", ztna_relay::pki::DEV_TRUST_DOMAIN])
        .arg("--policy")
        .arg(&policy)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let pid = child.id() as i32;
    let _child = Reap(child);
    let line = BufReader::new(stdout).lines().next().unwrap().unwrap();
    let addr: SocketAddr = line.strip_prefix("listening on ").unwrap().parse().unwrap();
    let mk = |kind, name: &str, role| {
        let (cert, key) = pki.issue(kind, name).unwrap();
        let mut cfg = ClientConfig::new(addr, "127.0.0.1:0".parse().unwrap(), "localhost");
        cfg.registrations = vec![(role, svc("echo"))];
        let tls = ztna_testkit::fixtures::mutual_tls(&pki.ca, cert, key);
        UdpClient::new(cfg, &tls, "127.0.0.1:0".parse().unwrap(), 1).unwrap()
    };
    use ztna_control::identity::Kind;
    use ztna_control::Role;
    let mut conn = mk(Kind::Connector, "c", Role::Connector);
    until_registered(&mut conn, 1);
    let mut agent = mk(Kind::Agent, "a", Role::Agent);
    let flow = until_registered(&mut agent, 1)[0];

    let hup = || {
        // SAFETY: plain kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGHUP) };
    };
    let log_has = |needle: &str| {
        let end = Instant::now() + T;
        loop {
            if std::fs::read_to_string(&log).unwrap_or_default().contains(needle) {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::fs::write(&policy, "[services.echo]\nconnectors = [\"*\"]\n").unwrap();
    hup();
    assert!(log_has("reload refused"), "a broken policy is refused and logged");
    assert!(round_trip(&mut agent, std::slice::from_mut(&mut conn), flow, b"kept").is_some(), "old policy kept");

    std::fs::write(&policy, "[services.echo]\nconnectors = [\"c\"]\n").unwrap();
    hup();
    match agent.wait_for(T, |e| matches!(e, Event::FlowClosed { .. }), |_| {}) {
        Some(Event::FlowClosed { flow: f, code }) => assert_eq!((f, code), (flow, Code::DENIED)),
        other => panic!("{other:?}"),
    }
    assert!(log_has("reloaded certificate, key, client CA and policy"));
    assert!(agent.session.is_connected(), "the connection survives the reload");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// systemd's notify protocol: READY=1 once running, WATCHDOG=1 at half the
/// interval while the workers turn, STOPPING=1 when SIGTERM starts the
/// drain (a Unix datagram socket stands in for systemd).
#[test]
fn sd_notify_ready_watchdog_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("ztna-test-{}-notify", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let child = Command::new(BIN)
        .args(["--dev", "--listen", "127.0.0.1:0", "--workers", "1"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut child = Reap(child);
    // The child's WATCHDOG_PID is unset, so the watchdog applies to it.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !(got.contains(&"READY=1".to_owned()) && got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2) {
        let n = sock.recv(&mut buf).expect("notification within 10 s");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(got.first().map(String::as_str), Some("READY=1"), "{got:?}");
    // SAFETY: plain kill(2) on our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    assert!(child.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}
