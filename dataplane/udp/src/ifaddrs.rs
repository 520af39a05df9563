//! The host's interface addresses (getifaddrs): what an agent or a
//! connector advertises as host candidates for direct paths.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The addresses of every interface that is up, except loopback ones and
/// interfaces whose name starts with one of `exclude` (the agent's own
/// TUN device, say). Link-local and other unusable addresses are left to
/// the caller's filter.
pub fn host_addresses(exclude: &[&str]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with
    // freeifaddrs; on failure it leaves `head` untouched (null).
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let flags = ifa.ifa_flags as libc::c_int;
        if ifa.ifa_addr.is_null() || flags & libc::IFF_UP == 0 || flags & libc::IFF_LOOPBACK != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if exclude.iter().any(|p| !p.is_empty() && name.starts_with(p)) {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose
        // family says which sockaddr_* it is.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip.filter(|ip| !out.contains(ip)) {
            out.push(ip);
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_no_loopback_and_honours_exclusions() {
        let all = super::host_addresses(&[]);
        assert!(all.iter().all(|ip| !ip.is_loopback()), "{all:?}");
        // Excluding every name (all start with "") is not allowed to
        // match: an empty prefix is ignored. Excluding by a real prefix of
        // each interface removes them all.
        assert_eq!(super::host_addresses(&[""]), all);
        let none = super::host_addresses(&[
            "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u",
            "v", "w", "x", "y", "z",
        ]);
        assert!(none.is_empty(), "{none:?}");
    }
}
