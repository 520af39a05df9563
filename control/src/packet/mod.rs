//! The IP packets carried through the tunnel: IPv4 with UDP, TCP or ICMP.
//!
//! The agent reads IP packets from its TUN device and sends them as DATAGRAM
//! payloads; the connector turns them into real UDP, ICMP and TCP traffic
//! and builds the reply packets. This module parses those packets into
//! borrowed views and builds replies into a caller-provided buffer. It is
//! pure: no I/O, no clock, no allocation except growing the output `Vec`.
//!
//! Parsing never panics. Every malformed packet yields a [`PacketError`];
//! parsed values are only ever returned together with bytes that passed all
//! length and checksum checks. Accepted packets:
//!
//! * IPv4 only (IPv6 gives [`PacketError::Ipv6Unsupported`]; [`destination`]
//!   still reads an IPv6 destination for routing). Header options are
//!   skipped; bytes after the IPv4 total length (link padding) are ignored.
//! * No fragments: the tunnel carries whole packets, so MF set or a nonzero
//!   fragment offset gives [`PacketError::Fragmented`].
//! * Every checksum is verified: IPv4 header, UDP (unless 0, "no checksum"),
//!   TCP, ICMP. Packets from a TUN device without offloads carry full
//!   checksums.
//!
//! Builders write IPv4 headers with TTL 64, DF set, identification 0, TOS 0
//! and no options, and fill in every checksum.

use std::fmt;

mod checksum;
mod icmp;
mod ipv4;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;

pub use checksum::{internet_checksum, pseudo_header_checksum};
pub use icmp::{build_icmp_echo, build_icmp_echo_reply, build_icmp_frag_needed};
pub use ipv4::{destination, ip_version, parse_ipv4, source, Ipv4};
pub use tcp::{build_ipv4_tcp, TcpFlags, TcpHeader};
pub use udp::build_ipv4_udp;

use icmp::parse_icmp;
use tcp::parse_tcp;
use udp::parse_udp;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Length of an IPv4 header without options (all built packets).
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of a TCP header without options.
pub const TCP_HEADER_LEN: usize = 20;
/// Length of an ICMP header (type, code, checksum, 4 type-specific bytes).
pub const ICMP_HEADER_LEN: usize = 8;
/// TTL of every built packet.
pub const TTL: u8 = 64;

/// Why a packet was rejected (or could not be built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketError {
    /// The buffer ends before the packet does: shorter than a fixed header,
    /// than the IPv4 header length or total length, than the UDP length, or
    /// than the TCP data offset. Every truncated packet gives this.
    TooShort,
    /// The IP version nibble is neither 4 nor 6.
    BadVersion,
    /// A header length field is impossible: IPv4 IHL < 5, TCP data offset
    /// < 5, or a TCP option whose length is < 2, runs past the header, or
    /// (for MSS) is not 4.
    BadHeaderLength,
    /// A length field is smaller than the header it includes: IPv4 total
    /// length < IHL × 4, or UDP length < 8.
    BadTotalLength,
    /// An IPv4 fragment (MF set or nonzero offset).
    Fragmented,
    /// An IP protocol other than ICMP (1), TCP (6) or UDP (17).
    UnsupportedProtocol(u8),
    /// An IPv6 packet where IPv4 was required.
    Ipv6Unsupported,
    /// The IPv4 header, UDP, TCP or ICMP checksum does not verify.
    BadChecksum,
    /// Building: the packet would exceed 65 535 bytes.
    TooLong,
    /// [`build_icmp_echo_reply`]: the packet is not an ICMP echo request.
    NotEchoRequest,
    /// [`build_icmp_frag_needed`]: RFC 1122 §3.2.2 forbids an ICMP error
    /// about this packet (it is an ICMP error itself, or its source is not a
    /// single host, or its destination is broadcast or multicast).
    IcmpErrorForbidden,
}

impl PacketError {
    /// Stable lower-case name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::TooShort => "too_short",
            Self::BadVersion => "bad_version",
            Self::BadHeaderLength => "bad_header_length",
            Self::BadTotalLength => "bad_total_length",
            Self::Fragmented => "fragmented",
            Self::UnsupportedProtocol(_) => "unsupported_protocol",
            Self::Ipv6Unsupported => "ipv6_unsupported",
            Self::BadChecksum => "bad_checksum",
            Self::TooLong => "too_long",
            Self::NotEchoRequest => "not_echo_request",
            Self::IcmpErrorForbidden => "icmp_error_forbidden",
        }
    }
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("packet truncated"),
            Self::BadVersion => f.write_str("IP version is neither 4 nor 6"),
            Self::BadHeaderLength => f.write_str("invalid header length (IHL, TCP data offset or TCP option)"),
            Self::BadTotalLength => f.write_str("length field smaller than its header (IPv4 total or UDP length)"),
            Self::Fragmented => f.write_str("IPv4 fragment"),
            Self::UnsupportedProtocol(p) => write!(f, "unsupported IP protocol {p}"),
            Self::Ipv6Unsupported => f.write_str("IPv6 packet where IPv4 is required"),
            Self::BadChecksum => f.write_str("checksum mismatch"),
            Self::TooLong => f.write_str("packet would exceed 65535 bytes"),
            Self::NotEchoRequest => f.write_str("not an ICMP echo request"),
            Self::IcmpErrorForbidden => f.write_str("no ICMP error may be sent about this packet"),
        }
    }
}

impl std::error::Error for PacketError {}

/// The transport layer of an IPv4 packet, borrowing from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    Udp {
        src_port: u16,
        dst_port: u16,
        /// The UDP payload, up to the UDP length.
        payload: &'a [u8],
    },
    Tcp {
        src_port: u16,
        dst_port: u16,
        header: TcpHeader,
        /// The segment data after the header and options.
        payload: &'a [u8],
    },
    /// Echo request (type 8) or reply (type 0), code 0.
    IcmpEcho { request: bool, id: u16, seq: u16, payload: &'a [u8] },
    /// Any other ICMP message (checksum verified).
    IcmpOther { ty: u8, code: u8 },
}

/// Parses the UDP, TCP or ICMP message in `ip`'s payload and verifies its
/// checksum. Other protocols give `UnsupportedProtocol`.
pub fn parse_transport<'a>(ip: &Ipv4<'a>) -> Result<Transport<'a>, PacketError> {
    match ip.protocol {
        PROTO_UDP => parse_udp(ip.src, ip.dst, ip.payload),
        PROTO_TCP => parse_tcp(ip.src, ip.dst, ip.payload),
        PROTO_ICMP => parse_icmp(ip.payload),
        p => Err(PacketError::UnsupportedProtocol(p)),
    }
}
