//! Direct-path candidates and path policy (docs/protocol/direct.md §11.2):
//! the addresses at which an end of an end-to-end session may be reachable
//! without a relay, and whether it wants to be.
//!
//! Also the punch packet: what a connector sends toward an agent's
//! candidates to open its own NAT. It is never valid QUIC (the fixed bit is
//! clear), so any QUIC stack drops it.

use std::net::{IpAddr, SocketAddr};

/// Most candidates one end advertises (a Candidates message with more is
/// malformed). Also bounds the direct paths a session probes at once.
pub const MAX_CANDIDATES: usize = 8;

/// Where a candidate address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CandidateKind {
    /// An address of one of the host's own interfaces.
    Host,
    /// The address a relay observed the end's packets come from (its NAT's
    /// mapping toward the relay).
    ServerReflexive,
    /// An address the operator configured (a known public IP:port).
    Configured,
    /// An address the peer's punch or probe packets came from.
    PeerReflexive,
}

impl CandidateKind {
    pub fn to_u8(self) -> u8 {
        match self {
            CandidateKind::Host => 1,
            CandidateKind::ServerReflexive => 2,
            CandidateKind::Configured => 3,
            CandidateKind::PeerReflexive => 4,
        }
    }

    pub fn from_u8(v: u8) -> Option<CandidateKind> {
        match v {
            1 => Some(CandidateKind::Host),
            2 => Some(CandidateKind::ServerReflexive),
            3 => Some(CandidateKind::Configured),
            4 => Some(CandidateKind::PeerReflexive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::Configured => "configured",
            CandidateKind::PeerReflexive => "prflx",
        }
    }
}

/// One candidate address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

/// Whether a session may leave the relay, as one end wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// Direct when a direct path works, the relay otherwise.
    #[default]
    Auto,
    /// Tunneled packets never go through the relay (they wait, then drop,
    /// until a direct path is validated).
    DirectOnly,
    /// Never direct: no candidates are sent, no punching.
    RelayOnly,
}

impl PathPolicy {
    pub fn to_u8(self) -> u8 {
        match self {
            PathPolicy::Auto => 0,
            PathPolicy::DirectOnly => 1,
            PathPolicy::RelayOnly => 2,
        }
    }

    pub fn from_u8(v: u8) -> Option<PathPolicy> {
        match v {
            0 => Some(PathPolicy::Auto),
            1 => Some(PathPolicy::DirectOnly),
            2 => Some(PathPolicy::RelayOnly),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<PathPolicy> {
        match s {
            "auto" => Some(PathPolicy::Auto),
            "direct-only" => Some(PathPolicy::DirectOnly),
            "relay-only" => Some(PathPolicy::RelayOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PathPolicy::Auto => "auto",
            PathPolicy::DirectOnly => "direct-only",
            PathPolicy::RelayOnly => "relay-only",
        }
    }

    /// The policy that holds when both ends state one: `relay-only` beats
    /// everything, then `direct-only`, then `auto`. (`relay-only` against
    /// `direct-only` leaves no path for tunneled packets: the relay-only
    /// end's refusal wins, and the other end's direct-only keeps them off
    /// the relay, so nothing flows and both ends count it.)
    pub fn strictest(self, other: PathPolicy) -> PathPolicy {
        use PathPolicy::*;
        match (self, other) {
            (RelayOnly, _) | (_, RelayOnly) => RelayOnly,
            (DirectOnly, _) | (_, DirectOnly) => DirectOnly,
            _ => Auto,
        }
    }
}

/// Whether a host address is worth advertising by default: not loopback,
/// unspecified, multicast or link-local (IPv4 169.254/16, IPv6 fe80::/10).
/// Tunnel interfaces are excluded by the caller, which knows them.
pub fn usable_host_ip(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_link_local()),
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || link_local)
        }
    }
}

/// Host candidates for a socket bound to `local`: each usable address of
/// `ips` of the socket's family (all of them for a wildcard IPv6 socket,
/// which is dual-stack; only `local`'s own address when it is bound to
/// one), with the socket's port.
pub fn host_candidates(ips: &[IpAddr], local: SocketAddr) -> Vec<Candidate> {
    ips.iter()
        .filter(|ip| usable_host_ip(**ip))
        .filter(|ip| match local.ip() {
            IpAddr::V4(l) if l.is_unspecified() => ip.is_ipv4(),
            IpAddr::V6(l) if l.is_unspecified() => true,
            l => **ip == l,
        })
        .map(|ip| Candidate { kind: CandidateKind::Host, addr: SocketAddr::new(*ip, local.port()) })
        .collect()
}

/// Most predicted ports one end punches at per round
/// (`DirectConfig::port_prediction`).
pub const MAX_PORT_PREDICTION: u16 = 1024;

/// Port prediction for a peer behind a NAT whose mapping depends on the
/// destination: the `n` ports nearest `center`'s (+1, −1, +2, −2, …;
/// never `center` itself, nor a port below 1024), at `center`'s IP. A NAT
/// that allocates sequentially, or from a small block (carrier-grade NATs
/// with port-block allocation), gives the peer's next mapping one of them.
pub fn predicted_ports(center: SocketAddr, n: u16) -> Vec<SocketAddr> {
    let c = i32::from(center.port());
    (1..=i32::from(MAX_PORT_PREDICTION))
        .flat_map(|d| [c + d, c - d])
        .filter_map(|p| u16::try_from(p).ok().filter(|p| *p >= 1024))
        .take(usize::from(n.min(MAX_PORT_PREDICTION)))
        .map(|p| SocketAddr::new(center.ip(), p))
        .collect()
}

/// Punch packets: `[0x10]["ztnapnch"][round: u32 BE][nonce: u64 BE]`, 21
/// bytes. The first byte has the QUIC fixed bit (0x40) clear.
pub mod punch {
    pub const LEN: usize = 21;
    const FIRST: u8 = 0x10;
    const MAGIC: &[u8; 8] = b"ztnapnch";

    /// Writes a punch packet for `round` and `nonce` (what the agent's
    /// PunchNow carried) into `out`; returns its length.
    pub fn write(round: u32, nonce: u64, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..LEN)?;
        out[0] = FIRST;
        out[1..9].copy_from_slice(MAGIC);
        out[9..13].copy_from_slice(&round.to_be_bytes());
        out[13..21].copy_from_slice(&nonce.to_be_bytes());
        Some(LEN)
    }

    /// The round and nonce of a punch packet, if `pkt` is one.
    pub fn parse(pkt: &[u8]) -> Option<(u32, u64)> {
        if pkt.len() != LEN || pkt.first() != Some(&FIRST) || pkt.get(1..9) != Some(&MAGIC[..]) {
            return None;
        }
        let round = u32::from_be_bytes(pkt.get(9..13)?.try_into().ok()?);
        let nonce = u64::from_be_bytes(pkt.get(13..21)?.try_into().ok()?);
        Some((round, nonce))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicted_ports_are_the_nearest_first_within_the_unprivileged_range() {
        let ports =
            |c: &str, n| -> Vec<u16> { predicted_ports(c.parse().unwrap(), n).into_iter().map(|a| a.port()).collect() };
        assert_eq!(ports("203.0.113.5:40000", 5), [40001, 39999, 40002, 39998, 40003]);
        assert_eq!(ports("203.0.113.5:1025", 4), [1026, 1024, 1027, 1028]);
        assert_eq!(ports("203.0.113.5:65534", 3), [65535, 65533, 65532]);
        assert_eq!(ports("203.0.113.5:40000", 0), Vec::<u16>::new());
        assert_eq!(predicted_ports("203.0.113.5:40000".parse().unwrap(), u16::MAX).len(), 1024);
        assert!(predicted_ports("[2001:db8::1]:5000".parse().unwrap(), 2).iter().all(|a| a.is_ipv6()));
    }

    #[test]
    fn strictest_policy_wins() {
        use PathPolicy::*;
        for (a, b, want) in [
            (Auto, Auto, Auto),
            (Auto, DirectOnly, DirectOnly),
            (DirectOnly, Auto, DirectOnly),
            (Auto, RelayOnly, RelayOnly),
            (DirectOnly, RelayOnly, RelayOnly),
            (RelayOnly, DirectOnly, RelayOnly),
        ] {
            assert_eq!(a.strictest(b), want, "{a:?} + {b:?}");
        }
        for p in [Auto, DirectOnly, RelayOnly] {
            assert_eq!(PathPolicy::parse(p.as_str()), Some(p));
            assert_eq!(PathPolicy::from_u8(p.to_u8()), Some(p));
        }
    }

    #[test]
    fn host_addresses_worth_advertising() {
        for (ip, want) in [
            ("192.168.1.10", true),
            ("10.0.0.1", true),
            ("2001:db8::1", true),
            ("127.0.0.1", false),
            ("::1", false),
            ("0.0.0.0", false),
            ("169.254.3.4", false),
            ("fe80::1", false),
            ("224.0.0.1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:192.0.2.1", true),
        ] {
            assert_eq!(usable_host_ip(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn host_candidates_follow_the_sockets_family_and_address() {
        let ips: Vec<IpAddr> = ["192.168.1.2", "10.0.0.2", "2001:db8::2", "127.0.0.1", "fe80::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let addrs = |local: &str| -> Vec<String> {
            host_candidates(&ips, local.parse().unwrap()).iter().map(|c| c.addr.to_string()).collect()
        };
        assert_eq!(addrs("0.0.0.0:4434"), ["192.168.1.2:4434", "10.0.0.2:4434"]);
        assert_eq!(addrs("[::]:4434"), ["192.168.1.2:4434", "10.0.0.2:4434", "[2001:db8::2]:4434"]);
        assert_eq!(addrs("10.0.0.2:9"), ["10.0.0.2:9"]);
    }

    #[test]
    fn punch_packets_roundtrip_and_are_not_quic() {
        let mut b = [0u8; 64];
        let n = punch::write(7, 0x0102_0304_0506_0708, &mut b).unwrap();
        assert_eq!(n, punch::LEN);
        assert_eq!(b[0] & 0x40, 0, "QUIC fixed bit clear");
        assert_eq!(punch::parse(&b[..n]), Some((7, 0x0102_0304_0506_0708)));
        assert_eq!(punch::parse(&b[..n - 1]), None);
        let mut other = b;
        other[3] ^= 1;
        assert_eq!(punch::parse(&other[..n]), None);
        assert!(punch::write(1, 1, &mut [0u8; 20]).is_none());
    }
}
