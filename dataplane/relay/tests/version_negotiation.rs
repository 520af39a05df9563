#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! When the relay answers with Version Negotiation (docs/PROTOCOL.md §2.1):
//! only a long-header packet with the v1 Initial type bits and an unknown
//! version, in a UDP payload of at least 1200 bytes.

use ztna_testkit::fixtures as common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use ztna_udp::IoBackend;

const DCID: [u8; 16] = [0x42; 16];
const SCID: [u8; 8] = [0x17; 8];

/// A long header of `version` with type bits `ty`, our CIDs, an empty
/// token and zero padding up to `len` bytes.
fn long_header(version: u32, ty: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0xc0 | (ty << 4)];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(DCID.len() as u8);
    p.extend_from_slice(&DCID);
    p.push(SCID.len() as u8);
    p.extend_from_slice(&SCID);
    p.push(0); // token length (a varint)
    p.resize(len, 0);
    p
}

fn answer(sock: &UdpSocket, to: std::net::SocketAddr, pkt: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(pkt, to).unwrap();
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn version_negotiation_only_for_initials_of_at_least_1200_bytes() {
    let relay = start_relay(1, IoBackend::Portable, false);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let unknown = 0x1a2a_3a4a;

    let vn = answer(&sock, relay.local_addr, &long_header(unknown, 0, 1200)).expect("Version Negotiation");
    assert!(vn.len() <= 256, "{}", vn.len());
    assert_eq!(vn[0] & 0x80, 0x80, "long header");
    assert_eq!(&vn[1..5], &[0, 0, 0, 0], "version 0");
    // CIDs swapped: its DCID is our SCID, its SCID our DCID.
    assert_eq!(usize::from(vn[5]), SCID.len());
    assert_eq!(&vn[6..14], &SCID);
    assert_eq!(usize::from(vn[14]), DCID.len());
    assert_eq!(&vn[15..31], &DCID);
    assert_eq!(&vn[31..], &[0, 0, 0, 1], "the one supported version");

    // Nothing for 1199 bytes (it would amplify), nor for other packet types.
    assert_eq!(answer(&sock, relay.local_addr, &long_header(unknown, 0, 1199)), None);
    assert_eq!(answer(&sock, relay.local_addr, &long_header(unknown, 2, 1200)), None, "Handshake type bits");
    // A token length that runs past the datagram: unparseable, dropped.
    let mut bad = long_header(unknown, 0, 1200);
    bad[1 + 4 + 1 + 16 + 1 + 8] = 0x7f; // 2-byte varint: 0x3fff bytes of token
    bad[1 + 4 + 1 + 16 + 1 + 8 + 1] = 0xff;
    assert_eq!(answer(&sock, relay.local_addr, &bad), None, "unparseable token length");
    relay.shutdown();
}
