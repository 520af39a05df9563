#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Builds tests/c/agent_test.c with -Wall -Wextra -Werror and
//! AddressSanitizer against the static library and runs it against a real
//! relay, connector and echo service on loopback.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_connector::{BackendRoute, Connector, ConnectorConfig, Proto, ServiceConfig};
use ztna_control::identity::Kind;
use ztna_relay::server::{self, RelayConfig};
use ztna_testkit::echo::EchoServer;

/// Resident-memory bound for the C test under load. iOS kills a packet
/// tunnel extension above 50 MB; the agent must stay well below (the
/// AddressSanitizer runtime's shadow memory is mostly not resident).
const RSS_LIMIT_KB: u64 = 40 * 1024;

fn target_dir() -> PathBuf {
    // target/<profile>/deps/c_api-<hash> → target/<profile>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

#[test]
fn c_program_against_real_relay_and_connector() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let lib = target_dir().join("libztna_agent.a");
    assert!(lib.exists(), "{} missing: build the staticlib first (cargo build -p ztna-agent-sys)", lib.display());
    // Two builds of the same program: with AddressSanitizer for memory
    // errors, and optimised without it for the resident-memory bound
    // (ASan's quarantine and shadow memory would dominate RSS).
    let compile = |name: &str, flags: &[&str]| {
        let exe = target_dir().join(name);
        let out = Command::new("cc")
            .args(["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-g"])
            .args(flags)
            .arg(format!("-I{dir}/include"))
            .arg(format!("{dir}/tests/c/agent_test.c"))
            .arg(&lib)
            // BoringSSL inside the archive is C++.
            .args(["-lstdc++", "-lpthread", "-ldl", "-lm", "-o"])
            .arg(&exe)
            .output()
            .expect("cc runs");
        assert!(out.status.success(), "C test does not compile:\n{}", String::from_utf8_lossy(&out.stderr));
        exe
    };
    let asan = compile("ztna_agent_c_test_asan", &["-fsanitize=address", "-fno-omit-frame-pointer"]);
    let plain = compile("ztna_agent_c_test", &["-O2"]);

    let relay = server::start(&RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(2),
        dev: true,
        pin_cores: false,
        policy_toml: Some("[services.echo]\nconnectors = [\"echo-connector\"]\nagents = [\"c-agent\"]\n".into()),
        ..RelayConfig::default()
    })
    .unwrap();
    let pki = relay.dev_pki.as_ref().unwrap();
    let ca = pki.ca.clone();
    let (agent_cert, agent_key) = pki.issue(Kind::Agent, "c-agent").unwrap();
    let (conn_cert, conn_key) = pki.issue(Kind::Connector, "echo-connector").unwrap();
    let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = ConnectorConfig::new(
        vec![relay.local_addr],
        vec![ServiceConfig {
            name: "echo".into(),
            icmp: true,
            backend: vec![BackendRoute { protocol: Proto::Udp, port: 7, target: echo.udp_addr.into() }],
            allow_agents: None,
            path: Default::default(),
        }],
    );
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.ca = Some(ca.clone());
    cfg.cert = Some(conn_cert);
    cfg.key = Some(conn_key);
    let mut connector = Connector::new(cfg, 7).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + Duration::from_secs(10);
    while !connector.is_ready() {
        connector.turn(Duration::from_millis(10)).unwrap();
        assert!(Instant::now() < end, "connector did not register");
    }
    let stats = Arc::clone(&connector.stats);
    let t = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || connector.run(&stop).unwrap())
    };

    let run = |exe: &PathBuf, load_secs: &str, rss_limit_kb: u64| {
        let out = Command::new(exe)
            .arg(relay.local_addr.to_string())
            .arg(&ca)
            .arg(&agent_cert)
            .arg(&agent_key)
            .arg(load_secs)
            .arg(rss_limit_kb.to_string())
            .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let (asan_ok, asan_out, asan_err) = run(&asan, "1", u64::MAX / 2048);
    let (ok, stdout, stderr) = run(&plain, "3", RSS_LIMIT_KB);
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    relay.shutdown();
    assert!(asan_ok, "C test under AddressSanitizer failed:\n{asan_out}\n{asan_err}");
    assert!(ok, "C test failed:\n{stdout}\n{stderr}");
    let result = stdout.lines().find(|l| l.starts_with("RESULT")).expect("RESULT line");
    println!("{result}");
    assert!(result.contains("echoes=100 pongs=1"));
    // The extension's one socket talked to the connector directly too: the
    // relay observed the connector on loopback, reachable, so the session
    // moved off the relay (docs/protocol/direct.md).
    let field = |k: &str| -> u64 {
        result.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(field("direct_in=") > 0 && field("direct_out=") > 0, "{result}");
    assert_eq!(field("sessions_direct="), 1, "{result}");
    assert!(field("path_to_direct=") >= 1, "{result}");
    // 3.3: the move was an event, and the path telemetry counts it.
    assert!(field("path_events=") >= 1, "{result}");
    assert!(field("ttd_count=") >= 1 && field("ttd_le_3s=") >= 1, "{result}");
    assert!(field("rounds=") >= 1 && field("rounds_direct=") + 1 >= field("rounds="), "{result}");
    assert!(field("direct_bytes_in=") > field("direct_in="), "{result}");
    // The agent with a wrong server_name got the whole reason.
    let refused = stdout.lines().find(|l| l.starts_with("REFUSED")).expect("REFUSED line");
    println!("{refused}");
    assert!(refused.contains("TLS alert bad_certificate") && refused.contains("URI SANs: spiffe://dev.ztna/relay/"));
    assert!(asan_out.contains("echoes=100 pongs=1"));
    let st = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    assert!(st(&stats.icmp_echo_replies) >= 1);
    assert!(st(&stats.udp_to_backend) >= 100);
    assert!(echo.stats.udp_datagrams.load(Ordering::Relaxed) >= 100);
}
