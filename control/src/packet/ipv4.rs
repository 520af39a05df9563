//! IPv4 (and, for the addresses only, IPv6) headers: parsing and building.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{internet_checksum, PacketError, IPV4_HEADER_LEN, IPV6_HEADER_LEN, TTL};

/// The IP version nibble of `pkt`, or `None` if it is empty.
pub fn ip_version(pkt: &[u8]) -> Option<u8> {
    pkt.first().map(|b| b >> 4)
}

/// The (source, destination) addresses of an IPv4 or IPv6 packet, read
/// without further checks; `None` if the version is neither or the buffer is
/// shorter than the fixed header.
fn addresses(pkt: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match ip_version(pkt)? {
        4 => {
            let h: &[u8; IPV4_HEADER_LEN] = pkt.first_chunk()?;
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Some((IpAddr::V4(src), IpAddr::V4(dst)))
        }
        6 => {
            let h: &[u8; IPV6_HEADER_LEN] = pkt.first_chunk()?;
            let src: [u8; 16] = h.get(8..24)?.try_into().ok()?;
            let dst: &[u8; 16] = h.last_chunk()?;
            Some((IpAddr::V6(Ipv6Addr::from(src)), IpAddr::V6(Ipv6Addr::from(*dst))))
        }
        _ => None,
    }
}

/// The destination address of an IPv4 or IPv6 packet (for routing by
/// destination); see [`addresses`] for what is checked.
pub fn destination(pkt: &[u8]) -> Option<IpAddr> {
    addresses(pkt).map(|(_, dst)| dst)
}

/// The source address of an IPv4 or IPv6 packet (to check who may speak on
/// a flow); see [`addresses`] for what is checked.
pub fn source(pkt: &[u8]) -> Option<IpAddr> {
    addresses(pkt).map(|(src, _)| src)
}

/// A parsed IPv4 packet, borrowing from the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number ([`PROTO_UDP`](super::PROTO_UDP), [`PROTO_TCP`](super::PROTO_TCP),
    /// [`PROTO_ICMP`](super::PROTO_ICMP), …).
    pub protocol: u8,
    pub ttl: u8,
    /// DSCP (upper 6 bits) and ECN (lower 2 bits).
    pub tos: u8,
    /// The DF ("don't fragment") flag.
    pub dont_fragment: bool,
    /// The whole IPv4 header, options included (its checksum verified).
    pub header: &'a [u8],
    /// The bytes after the header, up to the total length.
    pub payload: &'a [u8],
}

impl Ipv4<'_> {
    /// Header length in bytes (IHL × 4), 20 to 60.
    pub fn header_len(&self) -> usize {
        self.header.len()
    }

    /// Total length in bytes (header + payload).
    pub fn total_len(&self) -> usize {
        self.header.len() + self.payload.len()
    }
}

const IPV4_MF: u16 = 0x2000;
const IPV4_DF: u16 = 0x4000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// Parses an IPv4 packet. Checks, in order: version 4 (6 gives
/// `Ipv6Unsupported`), 20 bytes present, IHL ≥ 5, header present, header
/// checksum, total length ≥ header length and ≤ buffer length, not a
/// fragment. The protocol is not checked here (see
/// [`parse_transport`](super::parse_transport)).
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4<'_>, PacketError> {
    match ip_version(pkt) {
        None => return Err(PacketError::TooShort),
        Some(4) => {}
        Some(6) => return Err(PacketError::Ipv6Unsupported),
        Some(_) => return Err(PacketError::BadVersion),
    }
    let h: &[u8; IPV4_HEADER_LEN] = pkt.first_chunk().ok_or(PacketError::TooShort)?;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_LEN {
        return Err(PacketError::BadHeaderLength);
    }
    let header = pkt.get(..header_len).ok_or(PacketError::TooShort)?;
    if internet_checksum(&[header]) != 0 {
        return Err(PacketError::BadChecksum);
    }
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total_len < header_len {
        return Err(PacketError::BadTotalLength);
    }
    let payload = pkt.get(header_len..total_len).ok_or(PacketError::TooShort)?;
    let frag = u16::from_be_bytes([h[6], h[7]]);
    if frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Err(PacketError::Fragmented);
    }
    Ok(Ipv4 {
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        protocol: h[9],
        ttl: h[8],
        tos: h[1],
        dont_fragment: frag & IPV4_DF != 0,
        header,
        payload,
    })
}

/// An IPv4 header without options for a payload of `payload_len` bytes:
/// TOS 0, identification 0, DF, TTL 64, checksum filled in.
pub(super) fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
) -> Result<[u8; IPV4_HEADER_LEN], PacketError> {
    let total = payload_len.checked_add(IPV4_HEADER_LEN).ok_or(PacketError::TooLong)?;
    let [t0, t1] = u16::try_from(total).map_err(|_| PacketError::TooLong)?.to_be_bytes();
    let [f0, f1] = IPV4_DF.to_be_bytes();
    let [s0, s1, s2, s3] = src.octets();
    let [d0, d1, d2, d3] = dst.octets();
    let mut h = [0x45, 0, t0, t1, 0, 0, f0, f1, TTL, protocol, 0, 0, s0, s1, s2, s3, d0, d1, d2, d3];
    let [c0, c1] = internet_checksum(&[&h]).to_be_bytes();
    h[10] = c0;
    h[11] = c1;
    Ok(h)
}
