//! Destination routing: which service a tunneled packet belongs to.

use std::net::IpAddr;
use std::str::FromStr;

use ztna_control::ServiceName;

/// An IPv4 or IPv6 prefix, e.g. `100.100.0.10/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("bad address in {s:?}"))?;
        let prefix = match p {
            Some(p) => p.parse::<u8>().map_err(|_| format!("bad prefix in {s:?}"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("prefix too long in {s:?}"))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Longest-prefix-match table from destination to service.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<(Cidr, ServiceName)>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<(Cidr, ServiceName)>) -> Self {
        // Longest prefix first, so the first match wins.
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix));
        RouteTable { routes }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&ServiceName> {
        self.routes.iter().find(|(c, _)| c.contains(ip)).map(|(_, s)| s)
    }

    pub fn services(&self) -> Vec<ServiceName> {
        let mut v: Vec<ServiceName> = self.routes.iter().map(|(_, s)| s.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn cidrs(&self) -> impl Iterator<Item = &Cidr> {
        self.routes.iter().map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let s = |n| ServiceName::new(n).unwrap();
        let t = RouteTable::new(vec![
            ("100.100.0.0/16".parse().unwrap(), s("wide")),
            ("100.100.0.10/32".parse().unwrap(), s("echo")),
            ("fd00::/64".parse().unwrap(), s("v6")),
        ]);
        assert_eq!(t.lookup("100.100.0.10".parse().unwrap()), Some(&s("echo")));
        assert_eq!(t.lookup("100.100.7.1".parse().unwrap()), Some(&s("wide")));
        assert_eq!(t.lookup("100.101.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("fd00::5".parse().unwrap()), Some(&s("v6")));
        assert_eq!(t.lookup("fd01::5".parse().unwrap()), None);
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("9.9.9.9".parse().unwrap()));
    }
}
