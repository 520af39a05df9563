#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Anti-amplification (RFC 9000 §8.1): to a source that sends one Initial
//! and never answers, the relay sends at most three times the bytes it
//! received, whatever the Retry mode.

use ztna_testkit::fixtures as common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use ztna_relay::security::RetryMode;
use ztna_relay::server;
use ztna_udp::IoBackend;

/// Sends one Initial from a fresh socket and collects what the relay sends
/// back for `listen`: (bytes in, bytes out, datagrams out).
fn silent_source(mode: RetryMode, listen: Duration) -> (usize, usize, usize) {
    let mut cfg = relay_config(1, IoBackend::Auto, true);
    cfg.limits.retry = mode;
    cfg.limits.handshake_timeout_ms = 60_000;
    let relay = server::start(&cfg).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let flight = first_flight(&mut silent_client_config(), sock.local_addr().unwrap(), relay.local_addr, 1);
    for d in &flight {
        assert!(d.len() >= 1200, "a client Initial is padded: {}", d.len());
        sock.send_to(d, relay.local_addr).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let (mut bytes, mut dgrams) = (0, 0);
    let end = Instant::now() + listen;
    let mut buf = [0u8; 65_536];
    while Instant::now() < end {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            bytes += n;
            dgrams += 1;
        }
    }
    relay.shutdown();
    (flight.iter().map(Vec::len).sum(), bytes, dgrams)
}

#[test]
fn silent_source_gets_at_most_three_times_its_bytes_in_every_retry_mode() {
    // Long enough for the first flight and three PTO rounds (1 s, 2 s, 4 s
    // with quiche's initial RTT): where quiche alone sent 5.3×.
    let listen = Duration::from_millis(7500);
    let modes = [RetryMode::Off, RetryMode::Auto, RetryMode::Always];
    let runs: Vec<_> = modes.iter().map(|&m| std::thread::spawn(move || (m, silent_source(m, listen)))).collect();
    for r in runs {
        let (mode, (rx, tx, dgrams)) = r.join().unwrap();
        eprintln!(
            "retry {mode:?}: {rx} bytes in, {tx} bytes out in {dgrams} datagrams, ratio {:.2}",
            tx as f64 / rx as f64
        );
        assert!(dgrams > 0, "{mode:?}: the relay answered at all");
        assert!(tx <= 3 * rx, "{mode:?}: {tx} bytes out for {rx} in ({:.2}×)", tx as f64 / rx as f64);
    }
}

/// quiche alone (no relay): what a server connection sends to a client
/// that sent one Initial and went silent. Documents the leak described at
/// `worker::amplification_room`.
#[test]
fn quiche_server_alone_to_a_silent_client() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let mut scfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    scfg.load_cert_chain_from_pem_file(pki.cert.to_str().unwrap()).unwrap();
    scfg.load_priv_key_from_pem_file(pki.key.to_str().unwrap()).unwrap();
    ztna_control::quic::apply_transport(&mut scfg).unwrap();
    let (server_addr, client_addr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
    let flight = first_flight(&mut silent_client_config(), client_addr, server_addr, 1);
    let mut conn =
        quiche::accept(&quiche::ConnectionId::from_ref(&[7u8; 16]), None, server_addr, client_addr, &mut scfg).unwrap();
    let rx: usize = flight.iter().map(Vec::len).sum();
    for mut d in flight {
        conn.recv(&mut d, quiche::RecvInfo { from: client_addr, to: server_addr }).unwrap();
    }
    let (mut tx, mut dgrams) = (0, 0);
    let mut out = [0u8; 1350];
    let end = Instant::now() + Duration::from_millis(7500);
    loop {
        while let Ok((n, _)) = conn.send(&mut out) {
            tx += n;
            dgrams += 1;
        }
        match conn.timeout_instant() {
            Some(t) if t < end => {
                std::thread::sleep(t.saturating_duration_since(Instant::now()));
                conn.on_timeout();
            }
            _ => break,
        }
    }
    eprintln!("quiche alone: {rx} bytes in, {tx} out in {dgrams} datagrams ({:.2}×)", tx as f64 / rx as f64);
    // Canary for the upstream bug: when quiche stops leaking padding past
    // its own limit this fails, and the relay's own accounting can go.
    assert!(tx > 3 * rx, "quiche now keeps 3× by itself: {tx} bytes out for {rx} in");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
