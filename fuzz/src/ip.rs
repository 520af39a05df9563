//! Checksum fix-ups for fuzzed IPv4 packets.

use std::net::Ipv4Addr;

use ztna_control::packet::{internet_checksum, pseudo_header_checksum, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// Rewrites the IPv4 header checksum and the UDP, TCP or ICMP checksum of
/// `p` so that they verify, as far as the length fields allow. Packets that
/// are not IPv4 or too short for their header are left alone; lengths are
/// not changed (so length checks still see the fuzzer's values).
pub fn fix_checksums(p: &mut [u8]) {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return;
    }
    let hl = usize::from(p[0] & 0x0f) * 4;
    if hl < 20 || p.len() < hl {
        return;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).clamp(hl, p.len());
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let proto = p[9];
    let seg = &mut p[hl..total];
    match proto {
        PROTO_UDP if seg.len() >= 8 => {
            let len = usize::from(u16::from_be_bytes([seg[4], seg[5]])).clamp(8, seg.len());
            let s = &mut seg[..len];
            s[6..8].fill(0);
            let c = match pseudo_header_checksum(src, dst, PROTO_UDP, &[s]) {
                0 => 0xffff,
                c => c,
            };
            s[6..8].copy_from_slice(&c.to_be_bytes());
        }
        PROTO_TCP if seg.len() >= 20 => {
            seg[16..18].fill(0);
            let c = pseudo_header_checksum(src, dst, PROTO_TCP, &[seg]);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
        }
        PROTO_ICMP if seg.len() >= 8 => {
            seg[2..4].fill(0);
            let c = internet_checksum(&[seg]);
            seg[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
    p[10..12].fill(0);
    let c = internet_checksum(&[&p[..hl]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}
