#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Relay replicas that share one private key (one Kubernetes Secret) and
//! one config: a packet carrying one replica's connection ID, sent to the
//! other, must never produce a stateless reset that the first replica's
//! client would honour (RFC 9000 §10.3, §21.11).

use ztna_testkit::fixtures as common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use ztna_control::identity::Kind;
use ztna_control::quic::TlsOptions;
use ztna_control::Message;
use ztna_relay::pki::{self, DevPki, DEV_TRUST_DOMAIN};
use ztna_relay::server::{self, RelayConfig, RelayHandle};

/// The default config, as every replica of a Deployment gets it, with the
/// same certificate and key (only the listen port differs, and the test
/// conveniences: two workers, no pinning, a short grace).
fn replica_config(pki: &DevPki) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(2),
        cert: Some(pki.cert.clone()),
        key: Some(pki.key.clone()),
        client_ca: Some(pki.ca.clone()),
        trust_domain: Some(DEV_TRUST_DOMAIN.into()),
        policy_toml: Some(test_policy()),
        pin_cores: false,
        shutdown_grace_ms: 1000,
        ..RelayConfig::default()
    }
}

fn tls(pki: &DevPki) -> TlsOptions {
    pki.client_tls(Kind::Connector, "c0").unwrap()
}

/// Sends a 57-byte short-header packet for `cid` to `to` and returns every
/// answer within 300 ms (a stateless reset, if any).
fn probe(to: SocketAddr, cid: &[u8]) -> Vec<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut pkt = vec![0x41];
    pkt.extend_from_slice(cid);
    pkt.extend_from_slice(&[0x5a; 40]);
    sock.send_to(&pkt, to).unwrap();
    let end = Instant::now() + Duration::from_millis(300);
    let mut answers = Vec::new();
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            answers.push(buf[..n].to_vec());
        }
    }
    answers
}

/// The CID the relay chose for `raw`'s connection and the reset token it
/// announced for it (stateless_reset_token transport parameter).
fn cid_and_token(raw: &RawClient) -> (Vec<u8>, [u8; 16]) {
    let token = raw.conn.peer_transport_params().unwrap().stateless_reset_token.unwrap();
    (raw.conn.destination_id().to_vec(), token.to_be_bytes())
}

/// Hands `packet` to the client as if it came from the relay at `from`.
fn inject(raw: &mut RawClient, from: SocketAddr, packet: &[u8]) {
    let to = raw.conn.path_stats().next().unwrap().local_addr;
    let mut p = packet.to_vec();
    let _ = raw.conn.recv(&mut p, quiche::RecvInfo { from, to });
}

/// The connection still carries control messages.
fn still_works(raw: &mut RawClient, what: &str) {
    assert!(!raw.conn.is_closed() && !raw.conn.is_draining(), "{what}: the client's connection ended");
    raw.send_msg(&Message::Hello { version: ztna_control::wire::VERSION, software: "replica".into() });
    raw.pump_for(Duration::from_millis(300));
    assert!(raw.messages().iter().any(|m| matches!(m, Message::HelloAck { .. })), "{what}: no HelloAck");
}

/// For a client of `owner`: `other` never answers its CID with a reset
/// bearing `owner`'s token, and whatever it answers, injected toward the
/// client as if from `owner`, does not end the connection.
fn assert_no_valid_reset(owner: &RelayHandle, other: &RelayHandle, raw: &mut RawClient, what: &str) {
    let (cid, token) = cid_and_token(raw);
    for _ in 0..3 {
        for answer in probe(other.local_addr, &cid) {
            assert_ne!(
                answer[answer.len().saturating_sub(16)..],
                token[..],
                "{what}: a valid reset for the owner's CID"
            );
            inject(raw, owner.local_addr, &answer);
        }
    }
    still_works(raw, what);
}

#[test]
fn replicas_from_one_key_never_reset_each_others_connections() {
    let pki = pki::generate(&std::env::temp_dir()).unwrap();
    let a = server::start(&replica_config(&pki)).unwrap();
    let b = server::start(&replica_config(&pki)).unwrap();
    let mut client_a = RawClient::connect_as(&a, &tls(&pki));
    let mut client_b = RawClient::connect_as(&b, &tls(&pki));

    // The control: a relay answers a CID in its own layout that it does not
    // know (same first four bytes as its client's, other random bytes) with
    // a stateless reset, so a probe that gets no reset from the other
    // replica proves something.
    let (cid_a, _) = cid_and_token(&client_a);
    let mut unknown = cid_a.clone();
    unknown[4..].copy_from_slice(&[0x77; 12]);
    let answers = probe(a.local_addr, &unknown);
    assert!(answers.iter().any(|p| (21..57).contains(&p.len())), "the relay resets its own unknown CIDs: {answers:?}");

    assert_no_valid_reset(&a, &b, &mut client_a, "B probed with A's CID");
    assert_no_valid_reset(&b, &a, &mut client_b, "A probed with B's CID");

    // The injection is a real test: the genuine token does end a connection.
    let (_, token) = cid_and_token(&client_a);
    let mut forged = vec![0x41; 43];
    forged[43 - 16..].copy_from_slice(&token);
    inject(&mut client_a, a.local_addr, &forged);
    assert!(client_a.conn.is_closed() || client_a.conn.is_draining(), "a reset with the announced token is honoured");

    a.shutdown();
    b.shutdown();
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A configured node id is stable: it is what the CIDs carry, and a relay
/// started again with the same key and node id (a restart) resets the
/// first one's connections with the token their clients hold. Replicas
/// with distinct configured node ids do not reset each other.
#[test]
fn a_configured_node_id_keeps_restart_resets() {
    let pki = pki::generate(&std::env::temp_dir()).unwrap();
    let with_node = |n: u16| {
        let mut cfg = replica_config(&pki);
        cfg.node_id = Some(n);
        server::start(&cfg).unwrap()
    };
    let first = with_node(0x1234);
    let mut client = RawClient::connect_as(&first, &tls(&pki));
    let (cid, token) = cid_and_token(&client);
    assert_eq!(cid[..3], [0x0f, 0x12, 0x34], "the configured node id is in the CID");
    assert_eq!(first.node_id(), 0x1234);

    let other = with_node(0x1235);
    assert_no_valid_reset(&first, &other, &mut client, "another configured node id");
    other.shutdown();

    let restarted = with_node(0x1234);
    let resets = probe(restarted.local_addr, &cid);
    assert!(resets.iter().any(|r| r[r.len() - 16..] == token[..]), "the restart resets with the old token: {resets:?}");
    inject(&mut client, first.local_addr, resets.first().unwrap());
    assert!(client.conn.is_closed(), "the client honours it");
    first.shutdown();
    restarted.shutdown();
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// The default: every start draws its own non-zero node id, CIDs carry it,
/// and steering by the worker byte still holds.
#[test]
fn the_default_node_id_is_drawn_per_start() {
    let pki = pki::generate(&std::env::temp_dir()).unwrap();
    let relays: Vec<RelayHandle> = (0..4).map(|_| server::start(&replica_config(&pki)).unwrap()).collect();
    for r in &relays {
        assert_ne!(r.node_id(), 0);
        let raw = RawClient::connect_as(r, &tls(&pki));
        let cid = raw.conn.destination_id().to_vec();
        assert_eq!(cid[1..3], r.node_id().to_be_bytes(), "CIDs carry the drawn node id");
        assert_eq!(r.totals().handoff_out, 0, "steering by the worker byte: {:?}", r.totals());
    }
    let mut ids: Vec<u16> = relays.iter().map(RelayHandle::node_id).collect();
    ids.dedup();
    // Four draws from 65 535 values: two equal neighbour pairs (a failure)
    // about once in 10^9 runs.
    assert!(ids.len() >= 3, "node ids are drawn, not fixed: {ids:?}");
    for r in relays {
        r.shutdown();
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}
