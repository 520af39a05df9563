//! The TUN device: created with tun-rs (name, address, MTU, up, IFF_NO_PI,
//! non-blocking), routes installed with `ip route add … dev TUN` (an
//! existing route for the same prefix is an error, never silently replaced).
//!
//! Routes go through iproute2 rather than netlink: tun-rs manages routes on
//! the BSDs and macOS only, the netlink crates (rtnetlink, neli) bring an
//! async runtime or a large API for three lines of work, and `ip` is
//! already a prerequisite of the network-namespace tests. It runs once per
//! prefix at start-up, never on the packet path. The routes need no
//! cleanup: the kernel deletes them with the device, which goes away when
//! the agent closes its file descriptor (the device is not persistent).

use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use tun_rs::{DeviceBuilder, SyncDevice};
use ztna_agent::route::Cidr;

use crate::config::Config;

/// Creates the device, sets its address and MTU, brings it up.
pub fn create(cfg: &Config) -> Result<SyncDevice> {
    let b = DeviceBuilder::new().name(cfg.tun_name.clone()).mtu(cfg.mtu);
    let b = match cfg.tun_address.addr() {
        IpAddr::V4(a) => b.ipv4(a, cfg.tun_address.prefix(), None),
        IpAddr::V6(a) => b.ipv6(a, cfg.tun_address.prefix()),
    };
    let dev = b
        .build_sync()
        .with_context(|| format!("creating TUN device {} (needs CAP_NET_ADMIN and /dev/net/tun)", cfg.tun_name))?;
    dev.set_nonblocking(true).context("TUN non-blocking mode")?;
    if !cfg.uses_ipv6() {
        // No IPv6 service: keep the kernel's own IPv6 chatter (router
        // solicitations, MLD) off the device. Best effort.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", cfg.tun_name), "1");
    }
    Ok(dev)
}

/// Routes `cidr` through the device (replacing an existing route).
pub fn add_route(dev: &str, cidr: &Cidr) -> Result<()> {
    let family = if cidr.addr().is_ipv4() { "-4" } else { "-6" };
    let net = Cidr::new(network(cidr.addr(), cidr.prefix()), cidr.prefix()).unwrap_or(*cidr);
    let out = Command::new("ip")
        .args([family, "route", "add", &net.to_string(), "dev", dev])
        .output()
        .context("running `ip route add` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip route add {net} dev {dev}: {} (a route for this prefix already exists? the agent does not replace routes it does not own)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The network address of `addr/prefix` (`ip` refuses host bits).
fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u32::from(a) & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u128::from(a) & mask).to_be_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_clears_host_bits() {
        let n = |a: &str, p| network(a.parse().unwrap(), p).to_string();
        assert_eq!(n("100.100.1.7", 24), "100.100.1.0");
        assert_eq!(n("100.100.1.7", 32), "100.100.1.7");
        assert_eq!(n("100.100.1.7", 0), "0.0.0.0");
        assert_eq!(n("fd00:64::5", 64), "fd00:64::");
    }
}
