//! ICMP: echo request and reply, and "fragmentation needed" errors.

use std::net::Ipv4Addr;

use super::ipv4::ipv4_header;
use super::{
    internet_checksum, parse_ipv4, parse_transport, Ipv4, PacketError, Transport, ICMP_HEADER_LEN, IPV4_HEADER_LEN,
    PROTO_ICMP,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO_REQUEST: u8 = 8;

pub(super) fn parse_icmp(msg: &[u8]) -> Result<Transport<'_>, PacketError> {
    let h: &[u8; ICMP_HEADER_LEN] = msg.first_chunk().ok_or(PacketError::TooShort)?;
    if internet_checksum(&[msg]) != 0 {
        return Err(PacketError::BadChecksum);
    }
    let (ty, code) = (h[0], h[1]);
    Ok(match (ty, code) {
        (ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY, 0) => Transport::IcmpEcho {
            request: ty == ICMP_ECHO_REQUEST,
            id: u16::from_be_bytes([h[4], h[5]]),
            seq: u16::from_be_bytes([h[6], h[7]]),
            payload: msg.get(ICMP_HEADER_LEN..).unwrap_or_default(),
        },
        _ => Transport::IcmpOther { ty, code },
    })
}

/// Builds an IPv4/ICMP message into `out` (cleared first): `header` is the
/// 8-byte ICMP header with a zero checksum, `body` follows it.
fn build_icmp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    mut header: [u8; ICMP_HEADER_LEN],
    body: [&[u8]; 2],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    out.clear();
    let msg_len = body.iter().map(|b| b.len()).fold(ICMP_HEADER_LEN, usize::saturating_add);
    let ip = ipv4_header(src, dst, PROTO_ICMP, msg_len)?;
    let [b0, b1] = body;
    [header[2], header[3]] = internet_checksum(&[&header, b0, b1]).to_be_bytes();
    out.reserve(IPV4_HEADER_LEN + msg_len);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&header);
    out.extend_from_slice(b0);
    out.extend_from_slice(b1);
    Ok(())
}

/// Builds an ICMP echo request (`request`) or reply into `out` (cleared
/// first). Fails only with `TooLong`, leaving `out` empty.
pub fn build_icmp_echo(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    request: bool,
    id: u16,
    seq: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    let ty = if request { ICMP_ECHO_REQUEST } else { ICMP_ECHO_REPLY };
    let [i0, i1] = id.to_be_bytes();
    let [s0, s1] = seq.to_be_bytes();
    build_icmp(src, dst, [ty, 0, 0, 0, i0, i1, s0, s1], [payload, &[]], out)
}

/// Builds the echo reply to the echo request `request` into `out` (cleared
/// first): addresses swapped, type 0, same id, sequence number and payload.
/// Fails with the errors of [`parse_transport`], or `NotEchoRequest`; `out`
/// is then empty.
pub fn build_icmp_echo_reply(request: &Ipv4<'_>, out: &mut Vec<u8>) -> Result<(), PacketError> {
    out.clear();
    match parse_transport(request)? {
        Transport::IcmpEcho { request: true, id, seq, payload } => {
            build_icmp_echo(request.dst, request.src, false, id, seq, payload, out)
        }
        _ => Err(PacketError::NotEchoRequest),
    }
}

/// Whether RFC 1122 §3.2.2 allows an ICMP error about `ip`: not about an
/// ICMP error (or unknown ICMP type), nor about a packet whose source is
/// not a single host or whose destination is broadcast or multicast.
/// (Non-initial fragments never get here: [`parse_ipv4`] rejects them.)
fn icmp_error_allowed(ip: &Ipv4<'_>) -> bool {
    let src_ok = !(ip.src.is_unspecified() || ip.src.is_broadcast() || ip.src.is_multicast());
    let dst_ok = !(ip.dst.is_broadcast() || ip.dst.is_multicast());
    // Informational ICMP types; Linux likewise treats unknown types as errors.
    let informational = |ty: u8| matches!(ty, 0 | 8 | 9 | 10 | 13..=18);
    let not_icmp_error = ip.protocol != PROTO_ICMP || ip.payload.first().is_some_and(|&ty| informational(ty));
    src_ok && dst_ok && not_icmp_error
}

/// Builds an ICMP "fragmentation needed and DF set" message (type 3, code 4,
/// RFC 1191) about `original`, the IPv4 packet that did not fit, into `out`
/// (cleared first). It is sent from `router` to the original source,
/// carries `mtu` as the next-hop MTU, and quotes the original IP header and
/// the first 8 bytes of its payload.
///
/// `original` must parse with [`parse_ipv4`] (errors are passed on, so no
/// error is sent about a corrupt packet or a fragment), and RFC 1122 must
/// allow an ICMP error about it (else `IcmpErrorForbidden`). Whether it had
/// DF set is the caller's concern. On error `out` is empty.
pub fn build_icmp_frag_needed(
    original: &[u8],
    router: Ipv4Addr,
    mtu: u16,
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    out.clear();
    let ip = parse_ipv4(original)?;
    if !icmp_error_allowed(&ip) {
        return Err(PacketError::IcmpErrorForbidden);
    }
    let quoted_payload = ip.payload.get(..8).unwrap_or(ip.payload);
    let [m0, m1] = mtu.to_be_bytes();
    let header = [ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m0, m1];
    build_icmp(router, ip.src, header, [ip.header, quoted_payload], out)
}
