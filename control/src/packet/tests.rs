//! Known answers, error cases and property tests of the parsers and builders.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

// Known answers. Captured on Linux over lo with raw sockets; where the
// kernel left a partial checksum (UDP/TCP on lo are offloaded), the
// checksum was recomputed with an independent Python implementation.

/// 127.0.0.1:40000 → 127.0.0.53:5353 "hello tunnel\n"; IP id 0xf06b, DF,
/// kernel IP checksum 0x4c22; UDP checksum 0xba21 (recomputed).
const UDP: &str = "45000029f06b400040114c227f0000017f000035 9c4014e90015ba21 68656c6c6f2074756e6e656c0a";

/// Echo request 127.0.0.1 → 127.1.2.3, id 0x4d2e, seq 7, Linux ping style
/// 48-byte payload; kernel IP header (checksum 0xa11a), ICMP checksum
/// 0xa4d8 (computed by Python).
const ECHO_REQUEST: &str = "4500004c999140004001a11a7f0000017f010203 0800a4d84d2e0007
    6650a1b2000c3f10101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637";

/// The kernel's reply to ECHO_REQUEST (IP id 0x0618, no DF; ICMP
/// checksum 0xacd8 computed by the kernel).
const ECHO_REPLY_KERNEL: &str = "4500004c06180000400174947f0102037f000001 0000acd84d2e0007
    6650a1b2000c3f10101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637";

/// Our reply: same ICMP message, IP header with id 0, DF (checksum 0x3aac
/// computed by Python).
const ECHO_REPLY_OURS: &str = "4500004c0000400040013aac7f0102037f000001 0000acd84d2e0007
    6650a1b2000c3f10101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637";

/// Linux SYN 127.0.0.1:41000 → 127.0.0.1:9, options MSS 65495, SACK
/// permitted, timestamps, NOP, window scale 10; TCP checksum 0xca37
/// (recomputed).
const TCP_SYN: &str = "4500003c09634000400633577f0000017f000001
    a0280009e3d466fc00000000a002ffd7ca370000 0204ffd70402080a6ff92acb000000000103030a";

/// The kernel's RST|ACK to TCP_SYN: every byte (both checksums included)
/// written by Linux, with exactly our builder's IP parameters.
const TCP_RST: &str = "450000280000400040063cce7f0000017f000001 0009a02800000000e3d466fd50140000c6ca0000";

/// ICMP frag needed about UDP from 100.64.0.1, MTU 1200 (computed by Python).
const FRAG_NEEDED: &str = "450000380000400040015783644000017f000001 03048ceb000004b0
    45000029f06b400040114c227f0000017f0000359c4014e90015ba21";

fn sock(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

/// Recomputes the IPv4 header checksum (test fixture surgery).
fn fix_ip_checksum(pkt: &mut [u8]) {
    let hl = usize::from(pkt[0] & 0x0f) * 4;
    pkt[10] = 0;
    pkt[11] = 0;
    let c = internet_checksum(&[&pkt[..hl]]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Recomputes the transport checksum over everything after the IP
/// header (if long enough to hold the field).
fn fix_l4_checksum(pkt: &mut [u8]) {
    let hl = usize::from(pkt[0] & 0x0f) * 4;
    let (src, dst, proto) =
        (Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]), Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]), pkt[9]);
    let off = match proto {
        PROTO_ICMP => 2,
        PROTO_UDP => 6,
        PROTO_TCP => 16,
        _ => return,
    };
    let l4 = &mut pkt[hl..];
    if l4.len() < off + 2 {
        return;
    }
    l4[off] = 0;
    l4[off + 1] = 0;
    let c = if proto == PROTO_ICMP { internet_checksum(&[l4]) } else { pseudo_header_checksum(src, dst, proto, &[l4]) };
    l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn checksum_known_answers() {
    // RFC 1071 §3 example: sum ddf2, checksum 220d.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(internet_checksum(&[&data]), 0x220d);
    // Odd chunk boundaries give the same result.
    assert_eq!(internet_checksum(&[&data[..1], &data[1..4], &[], &data[4..7], &data[7..]]), 0x220d);
    for i in 0..=data.len() {
        assert_eq!(internet_checksum(&[&data[..i], &data[i..]]), 0x220d);
    }
    // The classic Wikipedia IPv4 header example: checksum b861.
    let h = hex("4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7");
    assert_eq!(internet_checksum(&[&h]), 0xb861);
    assert_eq!(internet_checksum(&[]), 0xffff);
    assert_eq!(internet_checksum(&[&[0xab]]), !0xab00);
}

#[test]
fn udp_known_answer() {
    let pkt = hex(UDP);
    let ip = parse_ipv4(&pkt).unwrap();
    assert_eq!(ip.src, Ipv4Addr::new(127, 0, 0, 1));
    assert_eq!(ip.dst, Ipv4Addr::new(127, 0, 0, 53));
    assert_eq!((ip.protocol, ip.ttl, ip.tos, ip.dont_fragment), (PROTO_UDP, 64, 0, true));
    assert_eq!((ip.header_len(), ip.total_len()), (20, pkt.len()));
    assert_eq!(
        parse_transport(&ip).unwrap(),
        Transport::Udp { src_port: 40000, dst_port: 5353, payload: b"hello tunnel\n" }
    );
    assert_eq!(destination(&pkt), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53))));
    assert_eq!(source(&pkt), Some(IpAddr::V4(ip.src)));
    assert_eq!(ip_version(&pkt), Some(4));

    // Our builder differs only in the IP id (0) and hence the checksums.
    let mut out = Vec::new();
    build_ipv4_udp(sock([127, 0, 0, 1], 40000), sock([127, 0, 0, 53], 5353), b"hello tunnel\n", &mut out).unwrap();
    assert_eq!(out[20..26], pkt[20..26]);
    assert_eq!(out[28..], pkt[28..]);
    assert_eq!(parse_transport(&parse_ipv4(&out).unwrap()), parse_transport(&ip));

    // The builder reproduces the Wikipedia header exactly (115 bytes).
    build_ipv4_udp(sock([192, 168, 0, 1], 1), sock([192, 168, 0, 199], 2), &[7; 87], &mut out).unwrap();
    assert_eq!(out[..20], hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7"));
}

#[test]
fn udp_checksum_zero_means_none_and_length_bounds_payload() {
    let mut pkt = hex(UDP);
    pkt[26] = 0;
    pkt[27] = 0;
    let ip = parse_ipv4(&pkt).unwrap();
    assert!(matches!(parse_transport(&ip), Ok(Transport::Udp { payload: b"hello tunnel\n", .. })));

    // UDP length shorter than the IP payload: trailing bytes ignored.
    pkt[25] = 8 + 5;
    let ip = parse_ipv4(&pkt).unwrap();
    assert!(matches!(parse_transport(&ip), Ok(Transport::Udp { payload: b"hello", .. })));
    // UDP length below the header, or beyond the IP payload.
    pkt[25] = 7;
    assert_eq!(parse_transport(&parse_ipv4(&pkt).unwrap()), Err(PacketError::BadTotalLength));
    pkt[25] = 8 + 14;
    assert_eq!(parse_transport(&parse_ipv4(&pkt).unwrap()), Err(PacketError::TooShort));
}

#[test]
fn builder_maps_zero_udp_checksum_to_ffff() {
    // Find a payload whose UDP checksum computes to 0, by adjusting two
    // bytes: the checksum is then sent as 0xffff and still verifies.
    let (src, dst) = (sock([10, 0, 0, 1], 1000), sock([10, 0, 0, 2], 2000));
    let mut out = Vec::new();
    build_ipv4_udp(src, dst, &[0, 0], &mut out).unwrap();
    let c = u16::from_be_bytes([out[26], out[27]]);
    // Adding word w to the data lowers the checksum by w; w = c makes it 0.
    let payload = c.to_be_bytes();
    build_ipv4_udp(src, dst, &payload, &mut out).unwrap();
    assert_eq!(out[26..28], [0xff, 0xff]);
    let ip = parse_ipv4(&out).unwrap();
    assert!(matches!(parse_transport(&ip), Ok(Transport::Udp { src_port: 1000, .. })));
}

#[test]
fn icmp_echo_known_answer() {
    let req = hex(ECHO_REQUEST);
    let ip = parse_ipv4(&req).unwrap();
    assert_eq!((ip.src, ip.dst, ip.protocol), (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 1, 2, 3), 1));
    let Transport::IcmpEcho { request: true, id: 0x4d2e, seq: 7, payload } = parse_transport(&ip).unwrap() else {
        panic!("not an echo request");
    };
    assert_eq!(payload.len(), 48);
    assert_eq!(payload, &req[28..]);

    let kernel = hex(ECHO_REPLY_KERNEL);
    let kip = parse_ipv4(&kernel).unwrap();
    assert!(!kip.dont_fragment);
    assert_eq!(parse_transport(&kip).unwrap(), Transport::IcmpEcho { request: false, id: 0x4d2e, seq: 7, payload });

    let mut out = Vec::new();
    build_icmp_echo_reply(&ip, &mut out).unwrap();
    assert_eq!(out, hex(ECHO_REPLY_OURS));
    assert_eq!(out[20..], kernel[20..]);

    // A reply is not a request.
    assert_eq!(build_icmp_echo_reply(&kip, &mut out), Err(PacketError::NotEchoRequest));
    assert!(out.is_empty());
    let udp = hex(UDP);
    assert_eq!(build_icmp_echo_reply(&parse_ipv4(&udp).unwrap(), &mut out), Err(PacketError::NotEchoRequest));
}

#[test]
fn tcp_known_answers() {
    let syn = hex(TCP_SYN);
    let ip = parse_ipv4(&syn).unwrap();
    assert_eq!(
        parse_transport(&ip).unwrap(),
        Transport::Tcp {
            src_port: 41000,
            dst_port: 9,
            header: TcpHeader { seq: 0xe3d466fc, ack: 0, flags: TcpFlags::SYN, window: 65495, mss: Some(65495) },
            payload: &[],
        }
    );

    let rst = hex(TCP_RST);
    let ip = parse_ipv4(&rst).unwrap();
    let header = TcpHeader { seq: 0, ack: 0xe3d466fd, flags: TcpFlags::RST | TcpFlags::ACK, window: 0, mss: None };
    assert_eq!(parse_transport(&ip).unwrap(), Transport::Tcp { src_port: 9, dst_port: 41000, header, payload: &[] });
    assert!(header.flags.contains(TcpFlags::RST) && !header.flags.contains(TcpFlags::SYN));

    // The builder reproduces the kernel's RST byte for byte.
    let mut out = Vec::new();
    build_ipv4_tcp(sock([127, 0, 0, 1], 9), sock([127, 0, 0, 1], 41000), &header, &[], &mut out).unwrap();
    assert_eq!(out, rst);
}

#[test]
fn tcp_option_errors() {
    let syn = hex(TCP_SYN);
    let check = |edit: &dyn Fn(&mut Vec<u8>), want: Result<Option<u16>, PacketError>| {
        let mut p = syn.clone();
        edit(&mut p);
        fix_l4_checksum(&mut p);
        let got = parse_transport(&parse_ipv4(&p).unwrap()).map(|t| match t {
            Transport::Tcp { header, .. } => header.mss,
            _ => panic!("not tcp"),
        });
        assert_eq!(got, want);
    };
    check(&|_| {}, Ok(Some(65495)));
    check(&|p| p[41] = 3, Err(PacketError::BadHeaderLength)); // MSS length 3
    check(&|p| p[41] = 0, Err(PacketError::BadHeaderLength)); // option length 0
    check(&|p| p[45] = 30, Err(PacketError::BadHeaderLength)); // SACK-permitted runs past header
    check(&|p| p[40] = 0, Ok(None)); // EOL first: nothing else is read
    check(&|p| p[32] = 0x40, Err(PacketError::BadHeaderLength)); // data offset 4
    check(&|p| p[32] = 0xf0, Err(PacketError::TooShort)); // data offset 60 > 40-byte segment
}

#[test]
fn tcp_options_after_garbage_nop() {
    // Replacing the MSS kind (02) by NOP makes the MSS length byte (04)
    // an option kind, and the MSS value's first byte (0xff) its length,
    // which runs past the header.
    let mut p = hex(TCP_SYN);
    p[40] = 1;
    fix_l4_checksum(&mut p);
    assert_eq!(parse_transport(&parse_ipv4(&p).unwrap()), Err(PacketError::BadHeaderLength));
}

#[test]
fn frag_needed_known_answer() {
    let udp = hex(UDP);
    let mut out = Vec::new();
    build_icmp_frag_needed(&udp, Ipv4Addr::new(100, 64, 0, 1), 1200, &mut out).unwrap();
    assert_eq!(out, hex(FRAG_NEEDED));
    let ip = parse_ipv4(&out).unwrap();
    assert_eq!((ip.src, ip.dst), (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(127, 0, 0, 1)));
    assert_eq!(parse_transport(&ip), Ok(Transport::IcmpOther { ty: 3, code: 4 }));
    assert_eq!(ip.payload[6..8], 1200u16.to_be_bytes());
    assert_eq!(ip.payload[8..], udp[..28]);

    // Payload shorter than 8 bytes: quoted whole. An echo request may
    // get an error; ICMP errors, multicast and broadcast may not.
    build_icmp_echo(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), true, 1, 2, &[], &mut out).unwrap();
    let echo = out.clone();
    build_icmp_frag_needed(&echo, Ipv4Addr::new(10, 9, 9, 9), 576, &mut out).unwrap();
    assert_eq!(out.len(), 20 + 8 + 28);
    assert_eq!(out[28..], echo[..]);
    let error = out.clone();
    assert_eq!(
        build_icmp_frag_needed(&error, Ipv4Addr::new(10, 9, 9, 9), 576, &mut out),
        Err(PacketError::IcmpErrorForbidden)
    );
    assert!(out.is_empty());
    for (src, dst) in [([10, 0, 0, 1], [224, 0, 0, 251]), ([10, 0, 0, 1], [255; 4]), ([0; 4], [10, 0, 0, 2])] {
        build_ipv4_udp(sock(src, 5353), sock(dst, 5353), b"x", &mut out).unwrap();
        let p = out.clone();
        assert_eq!(
            build_icmp_frag_needed(&p, Ipv4Addr::new(10, 9, 9, 9), 576, &mut out),
            Err(PacketError::IcmpErrorForbidden)
        );
    }
    // Errors of the original are passed on.
    assert_eq!(build_icmp_frag_needed(&udp[..30], Ipv4Addr::LOCALHOST, 576, &mut out), Err(PacketError::TooShort));
}

#[test]
fn ip_header_errors() {
    let udp = hex(UDP);
    let with = |i: usize, v: u8, fix: bool| {
        let mut p = udp.clone();
        p[i] = v;
        if fix {
            fix_ip_checksum(&mut p);
        }
        parse_ipv4(&p).map(|_| ())
    };
    assert_eq!(parse_ipv4(&[]), Err(PacketError::TooShort));
    assert_eq!(parse_ipv4(&[0x45]), Err(PacketError::TooShort));
    assert_eq!(with(0, 0x55, true), Err(PacketError::BadVersion));
    assert_eq!(with(0, 0x05, true), Err(PacketError::BadVersion));
    assert_eq!(with(0, 0x44, false), Err(PacketError::BadHeaderLength));
    assert_eq!(with(0, 0x4f, false), Err(PacketError::TooShort)); // 60-byte header, 41-byte buffer
    assert_eq!(with(8, 1, false), Err(PacketError::BadChecksum));
    assert_eq!(with(19, 54, false), Err(PacketError::BadChecksum));
    assert_eq!(with(3, 19, true), Err(PacketError::BadTotalLength));
    assert_eq!(with(3, 42, true), Err(PacketError::TooShort));
    assert_eq!(with(9, 47, true), Ok(()));
    let mut gre = udp.clone();
    gre[9] = 47;
    fix_ip_checksum(&mut gre);
    assert_eq!(parse_transport(&parse_ipv4(&gre).unwrap()), Err(PacketError::UnsupportedProtocol(47)));

    // Link padding after the total length is ignored.
    let mut padded = udp.clone();
    padded.extend_from_slice(&[0; 6]);
    let ip = parse_ipv4(&padded).unwrap();
    assert_eq!(ip.total_len(), udp.len());
    assert!(parse_transport(&ip).is_ok());

    // Options: a 24-byte header (NOP NOP NOP EOL) is skipped.
    let mut opts = udp[..20].to_vec();
    opts[0] = 0x46;
    opts[3] += 4;
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&udp[20..]);
    fix_ip_checksum(&mut opts);
    let ip = parse_ipv4(&opts).unwrap();
    assert_eq!(ip.header_len(), 24);
    assert!(matches!(parse_transport(&ip), Ok(Transport::Udp { payload: b"hello tunnel\n", .. })));
}

#[test]
fn fragments_rejected() {
    let udp = hex(UDP);
    for (b6, b7, want) in [
        (0x20, 0x00, Err(PacketError::Fragmented)), // MF, first fragment
        (0x00, 0x01, Err(PacketError::Fragmented)), // offset 8, last fragment
        (0x3f, 0xff, Err(PacketError::Fragmented)),
        (0x40, 0x00, Ok(true)), // DF only
        (0x00, 0x00, Ok(false)),
        (0x80, 0x00, Ok(false)), // reserved bit ignored
    ] {
        let mut p = udp.clone();
        p[6] = b6;
        p[7] = b7;
        fix_ip_checksum(&mut p);
        assert_eq!(parse_ipv4(&p).map(|ip| ip.dont_fragment), want, "{b6:02x}{b7:02x}");
    }
}

#[test]
fn transport_checksums_verified() {
    for fixture in [UDP, ECHO_REQUEST, TCP_SYN, TCP_RST] {
        let good = hex(fixture);
        for i in 20..good.len() {
            let mut p = good.clone();
            p[i] ^= 0x01;
            let ip = parse_ipv4(&p).unwrap();
            let got = parse_transport(&ip);
            // Flipping a length or data offset bit may fail earlier.
            assert!(got.is_err(), "{fixture} byte {i}: {got:?}");
            if ![24, 25, 32].contains(&i) {
                assert_eq!(got, Err(PacketError::BadChecksum), "{fixture} byte {i}");
            }
        }
    }
}

#[test]
fn truncations_are_errors() {
    for fixture in [UDP, ECHO_REQUEST, TCP_SYN, TCP_RST, FRAG_NEEDED] {
        let good = hex(fixture);
        for n in 0..good.len() {
            assert_eq!(parse_ipv4(&good[..n]), Err(PacketError::TooShort), "{fixture} cut at {n}");
            // Truncated with a consistent IP header: the transport fails.
            if n >= 20 {
                let mut p = good[..n].to_vec();
                p[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                fix_ip_checksum(&mut p);
                let ip = parse_ipv4(&p).unwrap();
                assert!(parse_transport(&ip).is_err(), "{fixture} cut at {n}");
            }
        }
    }
}

#[test]
fn ipv6() {
    // 2001:db8::1 → 2001:db8::2, UDP, 8-byte payload.
    let pkt = hex("6000 0000 0008 1140 2001 0db8 0000 0000 0000 0000 0000 0001
         2001 0db8 0000 0000 0000 0000 0000 0002 1234 0035 0008 0000");
    assert_eq!(parse_ipv4(&pkt), Err(PacketError::Ipv6Unsupported));
    assert_eq!(ip_version(&pkt), Some(6));
    assert_eq!(destination(&pkt), Some("2001:db8::2".parse().unwrap()));
    assert_eq!(source(&pkt), Some("2001:db8::1".parse().unwrap()));
    assert_eq!(source(&pkt[..39]), None);
    assert_eq!(destination(&pkt[..39]), None);
    assert_eq!(destination(&hex(UDP)[..19]), None);
    assert_eq!(destination(&[0x55; 40]), None);
    assert_eq!(destination(&[]), None);
    assert_eq!(ip_version(&[]), None);
    let mut out = Vec::new();
    assert_eq!(build_icmp_frag_needed(&pkt, Ipv4Addr::LOCALHOST, 1280, &mut out), Err(PacketError::Ipv6Unsupported));
}

#[test]
fn too_long() {
    let mut out = vec![1, 2, 3];
    let big = vec![0; 65_535 - 28 + 1];
    let (a, b) = (sock([10, 0, 0, 1], 1), sock([10, 0, 0, 2], 2));
    assert_eq!(build_ipv4_udp(a, b, &big, &mut out), Err(PacketError::TooLong));
    assert!(out.is_empty());
    build_ipv4_udp(a, b, &big[1..], &mut out).unwrap();
    assert_eq!(out.len(), 65_535);
    assert!(parse_transport(&parse_ipv4(&out).unwrap()).is_ok());
    let h = TcpHeader { mss: Some(1), ..TcpHeader::default() };
    assert_eq!(build_ipv4_tcp(a, b, &h, &big[16..], &mut out), Err(PacketError::TooLong));
    build_ipv4_tcp(a, b, &h, &big[17..], &mut out).unwrap();
    assert_eq!(out.len(), 65_535);
    assert_eq!(build_icmp_echo(*a.ip(), *b.ip(), true, 0, 0, &big, &mut out), Err(PacketError::TooLong));
}

#[test]
fn error_names() {
    let all = [
        PacketError::TooShort,
        PacketError::BadVersion,
        PacketError::BadHeaderLength,
        PacketError::BadTotalLength,
        PacketError::Fragmented,
        PacketError::UnsupportedProtocol(47),
        PacketError::Ipv6Unsupported,
        PacketError::BadChecksum,
        PacketError::TooLong,
        PacketError::NotEchoRequest,
        PacketError::IcmpErrorForbidden,
    ];
    let names: std::collections::HashSet<_> = all.iter().map(|e| e.name()).collect();
    assert_eq!(names.len(), all.len());
    assert_eq!(PacketError::UnsupportedProtocol(47).to_string(), "unsupported IP protocol 47");
}

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=1400)
}

/// Exercises every parser and parser-driven builder on `bytes`.
fn parse_everything(bytes: &[u8]) {
    let _ = ip_version(bytes);
    let _ = destination(bytes);
    let mut out = Vec::new();
    let _ = build_icmp_frag_needed(bytes, Ipv4Addr::new(10, 0, 0, 1), 1280, &mut out);
    if let Ok(ip) = parse_ipv4(bytes) {
        assert!(ip.total_len() <= bytes.len());
        let _ = parse_transport(&ip);
        let _ = build_icmp_echo_reply(&ip, &mut out);
    }
}

proptest! {
    #[test]
    fn udp_roundtrip(src in addr(), dst in addr(), sp in any::<u16>(), dp in any::<u16>(), data in payload()) {
        let mut out = Vec::new();
        build_ipv4_udp(SocketAddrV4::new(src, sp), SocketAddrV4::new(dst, dp), &data, &mut out).unwrap();
        prop_assert_eq!(out.len(), 28 + data.len());
        prop_assert_eq!(destination(&out), Some(IpAddr::V4(dst)));
        prop_assert_eq!(source(&out), Some(IpAddr::V4(src)));
        let ip = parse_ipv4(&out).unwrap();
        prop_assert_eq!((ip.src, ip.dst, ip.protocol, ip.ttl, ip.dont_fragment), (src, dst, PROTO_UDP, TTL, true));
        prop_assert_eq!(
            parse_transport(&ip).unwrap(),
            Transport::Udp { src_port: sp, dst_port: dp, payload: &data }
        );
    }

    #[test]
    fn tcp_roundtrip(
        src in addr(), dst in addr(), sp in any::<u16>(), dp in any::<u16>(),
        seq in any::<u32>(), ack in any::<u32>(), flags in any::<u8>(), window in any::<u16>(),
        mss in proptest::option::of(any::<u16>()), data in payload(),
    ) {
        let header = TcpHeader { seq, ack, flags: TcpFlags(flags), window, mss };
        let mut out = Vec::new();
        build_ipv4_tcp(SocketAddrV4::new(src, sp), SocketAddrV4::new(dst, dp), &header, &data, &mut out).unwrap();
        prop_assert_eq!(out.len(), 40 + if mss.is_some() { 4 } else { 0 } + data.len());
        let ip = parse_ipv4(&out).unwrap();
        prop_assert_eq!((ip.src, ip.dst, ip.protocol), (src, dst, PROTO_TCP));
        prop_assert_eq!(
            parse_transport(&ip).unwrap(),
            Transport::Tcp { src_port: sp, dst_port: dp, header, payload: &data }
        );
    }

    #[test]
    fn icmp_echo_roundtrip(src in addr(), dst in addr(), id in any::<u16>(), seq in any::<u16>(), data in payload()) {
        let mut req = Vec::new();
        build_icmp_echo(src, dst, true, id, seq, &data, &mut req).unwrap();
        let ip = parse_ipv4(&req).unwrap();
        prop_assert_eq!((ip.src, ip.dst, ip.protocol), (src, dst, PROTO_ICMP));
        prop_assert_eq!(parse_transport(&ip).unwrap(), Transport::IcmpEcho { request: true, id, seq, payload: &data });
        let mut reply = Vec::new();
        build_icmp_echo_reply(&ip, &mut reply).unwrap();
        let rip = parse_ipv4(&reply).unwrap();
        prop_assert_eq!((rip.src, rip.dst), (dst, src));
        prop_assert_eq!(parse_transport(&rip).unwrap(), Transport::IcmpEcho { request: false, id, seq, payload: &data });
    }

    #[test]
    fn frag_needed_roundtrip(src in addr(), dst in addr(), router in addr(), mtu in any::<u16>(), data in payload()) {
        let mut pkt = Vec::new();
        build_ipv4_udp(SocketAddrV4::new(src, 1), SocketAddrV4::new(dst, 2), &data, &mut pkt).unwrap();
        let mut out = Vec::new();
        match build_icmp_frag_needed(&pkt, router, mtu, &mut out) {
            Ok(()) => {
                let ip = parse_ipv4(&out).unwrap();
                prop_assert_eq!((ip.src, ip.dst), (router, src));
                prop_assert_eq!(parse_transport(&ip).unwrap(), Transport::IcmpOther { ty: 3, code: 4 });
                prop_assert_eq!(&ip.payload[6..8], &mtu.to_be_bytes());
                prop_assert_eq!(&ip.payload[8..], &pkt[..28]); // IP header + UDP header
            }
            Err(e) => {
                prop_assert_eq!(e, PacketError::IcmpErrorForbidden);
                prop_assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn truncated_builds_are_errors(data in payload(), cut in any::<prop::sample::Index>()) {
        let mut out = Vec::new();
        build_ipv4_udp(sock([10, 0, 0, 1], 1), sock([10, 0, 0, 2], 2), &data, &mut out).unwrap();
        let n = cut.index(out.len());
        prop_assert_eq!(parse_ipv4(&out[..n]), Err(PacketError::TooShort));
        parse_everything(&out[..n]);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
        parse_everything(&bytes);
    }

    /// Random transport bytes behind a valid IPv4 header (random IHL and
    /// options), with valid checksums so the transport parsers run.
    #[test]
    fn garbage_transport_never_panics(
        ihl in 5u8..=15,
        proto in prop_oneof![Just(PROTO_ICMP), Just(PROTO_TCP), Just(PROTO_UDP), any::<u8>()],
        flags in prop_oneof![Just(0u8), Just(0x40), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..200),
        udp_len_ok in any::<bool>(),
        fix_l4 in any::<bool>(),
    ) {
        let hl = usize::from(ihl) * 4;
        let mut p = vec![0u8; hl];
        p[0] = 0x40 | ihl;
        p[6] = flags;
        p[8] = 64;
        p[9] = proto;
        p[12..20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend_from_slice(&body);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        if proto == PROTO_UDP && udp_len_ok && body.len() >= 8 {
            p[hl + 4..hl + 6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        }
        if fix_l4 {
            fix_l4_checksum(&mut p);
        }
        fix_ip_checksum(&mut p);
        parse_everything(&p);
        if flags & 0x3f == 0 {
            prop_assert!(parse_ipv4(&p).is_ok());
        }
    }
}
