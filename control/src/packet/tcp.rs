//! TCP: flags, the header fields the tunnel uses, parsing and building.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::ipv4::ipv4_header;
use super::{pseudo_header_checksum, PacketError, Transport, IPV4_HEADER_LEN, PROTO_TCP, TCP_HEADER_LEN};

/// TCP header flags (the low 8 flag bits; NS/AE is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);
    pub const ECE: TcpFlags = TcpFlags(0x40);
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

/// The TCP header fields the tunnel uses, for parsing and building.
/// The urgent pointer is ignored (built as 0); of the options, only MSS is
/// read (others are skipped) and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpHeader {
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub window: u16,
    /// The MSS option (kind 2), wherever it appears (normally only on SYN).
    pub mss: Option<u16>,
}

pub(super) fn parse_tcp(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> Result<Transport<'_>, PacketError> {
    let h: &[u8; TCP_HEADER_LEN] = seg.first_chunk().ok_or(PacketError::TooShort)?;
    let data_offset = usize::from(h[12] >> 4) * 4;
    if data_offset < TCP_HEADER_LEN {
        return Err(PacketError::BadHeaderLength);
    }
    let (header, payload) = seg.split_at_checked(data_offset).ok_or(PacketError::TooShort)?;
    if pseudo_header_checksum(src, dst, PROTO_TCP, &[seg]) != 0 {
        return Err(PacketError::BadChecksum);
    }
    let mss = tcp_mss(header.get(TCP_HEADER_LEN..).unwrap_or_default())?;
    Ok(Transport::Tcp {
        src_port: u16::from_be_bytes([h[0], h[1]]),
        dst_port: u16::from_be_bytes([h[2], h[3]]),
        header: TcpHeader {
            seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            flags: TcpFlags(h[13]),
            window: u16::from_be_bytes([h[14], h[15]]),
            mss,
        },
        payload,
    })
}

/// Walks the TCP options and returns the MSS option, if any.
fn tcp_mss(mut opts: &[u8]) -> Result<Option<u16>, PacketError> {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const MSS: u8 = 2;
    let mut mss = None;
    while let Some((&kind, rest)) = opts.split_first() {
        match kind {
            EOL => break,
            NOP => opts = rest,
            _ => {
                let len = rest.first().map(|&l| usize::from(l)).ok_or(PacketError::BadHeaderLength)?;
                if len < 2 {
                    return Err(PacketError::BadHeaderLength);
                }
                let (opt, tail) = opts.split_at_checked(len).ok_or(PacketError::BadHeaderLength)?;
                if kind == MSS {
                    match *opt {
                        [_, _, hi, lo] => mss = Some(u16::from_be_bytes([hi, lo])),
                        _ => return Err(PacketError::BadHeaderLength),
                    }
                }
                opts = tail;
            }
        }
    }
    Ok(mss)
}

/// Builds an IPv4/TCP packet into `out` (cleared first), with the MSS
/// option when `header.mss` is set. Fails only with `TooLong`, leaving `out`
/// empty.
pub fn build_ipv4_tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    header: &TcpHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), PacketError> {
    out.clear();
    const MSS_OPTION_LEN: usize = 4;
    let header_len = TCP_HEADER_LEN + if header.mss.is_some() { MSS_OPTION_LEN } else { 0 };
    let seg_len = payload.len().saturating_add(header_len);
    let ip = ipv4_header(*src.ip(), *dst.ip(), PROTO_TCP, seg_len)?;
    let [s0, s1] = src.port().to_be_bytes();
    let [d0, d1] = dst.port().to_be_bytes();
    let [q0, q1, q2, q3] = header.seq.to_be_bytes();
    let [a0, a1, a2, a3] = header.ack.to_be_bytes();
    let [w0, w1] = header.window.to_be_bytes();
    let [m0, m1] = header.mss.unwrap_or(0).to_be_bytes();
    let doff = ((header_len / 4) as u8) << 4;
    #[rustfmt::skip]
    let mut tcp = [
        s0, s1, d0, d1,
        q0, q1, q2, q3,
        a0, a1, a2, a3,
        doff, header.flags.0, w0, w1,
        0, 0, 0, 0, // checksum, urgent pointer
        2, 4, m0, m1, // MSS option, cut off below when absent
    ];
    let checksum = {
        let tcp_header = tcp.get(..header_len).unwrap_or(&tcp);
        pseudo_header_checksum(*src.ip(), *dst.ip(), PROTO_TCP, &[tcp_header, payload])
    };
    [tcp[16], tcp[17]] = checksum.to_be_bytes();
    out.reserve(IPV4_HEADER_LEN + seg_len);
    out.extend_from_slice(&ip);
    out.extend_from_slice(tcp.get(..header_len).unwrap_or(&tcp));
    out.extend_from_slice(payload);
    Ok(())
}
