//! UDP: parsing and building.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::ipv4::ipv4_header;
use super::{pseudo_header_checksum, PacketError, Transport, IPV4_HEADER_LEN, PROTO_UDP, UDP_HEADER_LEN};

pub(super) fn parse_udp(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> Result<Transport<'_>, PacketError> {
    let h: &[u8; UDP_HEADER_LEN] = seg.first_chunk().ok_or(PacketError::TooShort)?;
    let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if len < UDP_HEADER_LEN {
        return Err(PacketError::BadTotalLength);
    }
    // Bytes after the UDP length (inside the IP payload) are ignored.
    let seg = seg.get(..len).ok_or(PacketError::TooShort)?;
    let checksum = u16::from_be_bytes([h[6], h[7]]);
    if checksum != 0 && pseudo_header_checksum(src, dst, PROTO_UDP, &[seg]) != 0 {
        return Err(PacketError::BadChecksum);
    }
    Ok(Transport::Udp {
        src_port: u16::from_be_bytes([h[0], h[1]]),
        dst_port: u16::from_be_bytes([h[2], h[3]]),
        payload: seg.get(UDP_HEADER_LEN..).unwrap_or_default(),
    })
}

/// Builds an IPv4/UDP packet into `out` (cleared first). Fails only with
/// `TooLong` (payload over 65 507 bytes), leaving `out` empty.
pub fn build_ipv4_udp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    out.clear();
    let udp_len = payload.len().saturating_add(UDP_HEADER_LEN);
    let ip = ipv4_header(*src.ip(), *dst.ip(), PROTO_UDP, udp_len)?;
    let [s0, s1] = src.port().to_be_bytes();
    let [d0, d1] = dst.port().to_be_bytes();
    // ipv4_header succeeded, so udp_len fits a u16.
    let [l0, l1] = u16::try_from(udp_len).map_err(|_| PacketError::TooLong)?.to_be_bytes();
    let mut udp = [s0, s1, d0, d1, l0, l1, 0, 0];
    let checksum = match pseudo_header_checksum(*src.ip(), *dst.ip(), PROTO_UDP, &[&udp, payload]) {
        0 => 0xffff,
        c => c,
    };
    [udp[6], udp[7]] = checksum.to_be_bytes();
    out.reserve(IPV4_HEADER_LEN + udp_len);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&udp);
    out.extend_from_slice(payload);
    Ok(())
}
