//! Control messages of `recvmsg`/`sendmsg`, parsed from and written to
//! plain bytes: the GRO segment size and the packet's local address
//! (`IP_PKTINFO` / `IPV6_PKTINFO`) on receive; the GSO segment size and
//! the source address on send. Each message is `cmsg_len` (usize), level
//! and type (i32), its data, padded to the alignment of usize.
//!
//! **PKTINFO.** A socket bound to `0.0.0.0` or `[::]` on a host with several
//! addresses would answer from whichever address the route picks, and a
//! client that sent to another one drops the answer. With [`enable_pktinfo`]
//! every receive says which local address it was sent to, and a send that
//! names its source ([`SendCmsgs::source`]) leaves from that address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use crate::offload::setsockopt_int;

const W: usize = std::mem::size_of::<usize>();
const HDR: usize = std::mem::size_of::<libc::cmsghdr>();

/// Control bytes for one receive: room for a GRO size and a PKTINFO
/// message (and a spare), aligned for cmsghdr.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct RecvCmsgBuf(pub [u8; 128]);

impl Default for RecvCmsgBuf {
    fn default() -> Self {
        RecvCmsgBuf([0; 128])
    }
}

/// What the control messages of one receive said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// GRO: the size of each coalesced datagram but the last.
    pub segment: Option<usize>,
    /// PKTINFO: the local address the datagram was sent to.
    pub dst: Option<IpAddr>,
}

/// Walks the messages in `control` (what the kernel wrote, cut to
/// `msg_controllen`).
pub fn parse(control: &[u8]) -> RecvMeta {
    let mut meta = RecvMeta::default();
    let mut rest = control;
    while let Some((level, ty, data, next)) = next_message(rest) {
        match (level, ty) {
            (libc::SOL_UDP, libc::UDP_GRO) => {
                meta.segment = data
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(i32::from_ne_bytes)
                    .and_then(|v| usize::try_from(v).ok())
                    .filter(|v| *v > 0);
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                // struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }:
                // spec_dst, the local address an answer leaves from (addr
                // is the header's destination, a broadcast one included).
                if let Some(a) = data.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                    meta.dst = Some(IpAddr::V4(Ipv4Addr::from(a)));
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                // struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
                if let Some(a) = data.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                    meta.dst = Some(IpAddr::V6(Ipv6Addr::from(a)));
                }
            }
            _ => {}
        }
        rest = next;
    }
    meta
}

/// The first message of `rest`: (level, type, data, what follows).
fn next_message(rest: &[u8]) -> Option<(i32, i32, &[u8], &[u8])> {
    let len = usize::from_ne_bytes(rest.get(..W)?.try_into().ok()?);
    let level = i32::from_ne_bytes(rest.get(W..W + 4)?.try_into().ok()?);
    let ty = i32::from_ne_bytes(rest.get(W + 4..W + 8)?.try_into().ok()?);
    if len < HDR {
        return None;
    }
    let data = rest.get(HDR..len)?;
    let next = rest.get(len.next_multiple_of(W)..).unwrap_or_default();
    Some((level, ty, data, next))
}

/// Control bytes for one send: a GSO size and a source address at most.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct SendCmsgs {
    buf: [u8; 96],
    len: usize,
}

impl Default for SendCmsgs {
    fn default() -> Self {
        SendCmsgs { buf: [0; 96], len: 0 }
    }
}

impl SendCmsgs {
    /// The bytes for `msg_control` / `msg_controllen` (empty: none).
    pub fn bytes(&mut self) -> (&mut [u8], usize) {
        let len = self.len;
        (self.buf.get_mut(..len).unwrap_or_default(), len)
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn push(&mut self, level: i32, ty: i32, data: &[u8]) {
        let len = HDR + data.len();
        let space = len.next_multiple_of(W);
        let Some(out) = self.buf.get_mut(self.len..self.len + space) else { return };
        let mut msg = Vec::with_capacity(space);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&level.to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.resize(HDR, 0);
        msg.extend_from_slice(data);
        msg.resize(space, 0);
        out.copy_from_slice(&msg);
        self.len += space;
    }

    /// GSO: the kernel cuts the send into datagrams of `size` bytes.
    pub fn segment(&mut self, size: u16) {
        self.push(libc::SOL_UDP, libc::UDP_SEGMENT, &size.to_ne_bytes());
    }

    /// The datagram leaves from `src` (on a socket of `v6` family; an IPv4
    /// source on an IPv6 socket is sent as IPv4).
    /// An unspecified `src` adds nothing (the kernel picks).
    pub fn source(&mut self, src: IpAddr, v6_socket: bool) {
        if src.is_unspecified() {
            return;
        }
        let v4 = match src {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        match (v4, src) {
            (Some(a), _) => {
                let mut d = [0u8; 12];
                // ipi_spec_dst: the source to use; ifindex 0, addr unused.
                d[4..8].copy_from_slice(&a.octets());
                self.push(libc::IPPROTO_IP, libc::IP_PKTINFO, &d);
            }
            (None, IpAddr::V6(a)) if v6_socket => {
                let mut d = [0u8; 20];
                d[..16].copy_from_slice(&a.octets());
                self.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &d);
            }
            _ => {}
        }
    }
}

/// Asks for each receive's local address (IPv4, and IPv6 on an IPv6
/// socket, whose IPv4-mapped receives report IPv4). True if the kernel
/// will report it.
pub fn enable_pktinfo(fd: RawFd, v6_socket: bool) -> bool {
    let v4 = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
    if v6_socket {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1) || v4
    } else {
        v4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        let mut c = SendCmsgs::default();
        c.push(level, ty, data);
        let (b, _) = c.bytes();
        b.to_vec()
    }

    #[test]
    fn receive_metadata_is_found_among_messages() {
        let gro = msg(libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes());
        assert_eq!(parse(&gro).segment, Some(1200));
        let mut pkt = [0u8; 12];
        pkt[4..8].copy_from_slice(&[127, 0, 0, 2]);
        let mut both = msg(libc::IPPROTO_IP, libc::IP_PKTINFO, &pkt);
        both.extend_from_slice(&gro);
        let m = parse(&both);
        assert_eq!((m.segment, m.dst), (Some(1200), Some(IpAddr::from([127, 0, 0, 2]))));
        let v6 = msg(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &[[0u8; 15].as_slice(), &[1], &[0; 4]].concat());
        assert_eq!(parse(&v6).dst, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn cut_or_bogus_control_bytes_yield_nothing() {
        let gro = msg(libc::SOL_UDP, libc::UDP_GRO, &1200i32.to_ne_bytes());
        assert_eq!(parse(&gro[..gro.len() - 8]), RecvMeta::default(), "cut short");
        assert_eq!(parse(&[]), RecvMeta::default());
        let mut bad = gro.clone();
        bad[..8].copy_from_slice(&3usize.to_ne_bytes());
        assert_eq!(parse(&bad), RecvMeta::default(), "a length below the header never loops");
        let mut huge = gro;
        huge[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(parse(&huge), RecvMeta::default());
    }

    #[test]
    fn send_messages_stack_and_map_ipv4_sources() {
        let mut c = SendCmsgs::default();
        c.segment(1200);
        c.source(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()), true);
        let (b, len) = c.bytes();
        assert_eq!(len, 24 + 32, "CMSG_SPACE(2) + CMSG_SPACE(sizeof in_pktinfo)");
        let (level, ty, data, rest) = next_message(b).unwrap();
        assert_eq!((level, ty, data), (libc::SOL_UDP, libc::UDP_SEGMENT, &1200u16.to_ne_bytes()[..]));
        let (level, ty, data, _) = next_message(rest).unwrap();
        assert_eq!((level, ty), (libc::IPPROTO_IP, libc::IP_PKTINFO), "a mapped source goes out as IPv4");
        assert_eq!(&data[4..8], &[10, 0, 0, 1]);
        let mut none = SendCmsgs::default();
        none.source(IpAddr::V6(Ipv6Addr::UNSPECIFIED), true);
        none.source(IpAddr::V4(Ipv4Addr::UNSPECIFIED), false);
        assert_eq!(none.bytes().1, 0, "an unspecified source adds nothing");
    }
}
