//! The C API of direct paths beyond the counters: the device's interface
//! addresses, which the core pairs with the socket's port as host
//! candidates (docs/protocol/direct.md §11.1; the extension enumerates
//! them, e.g. with getifaddrs, and calls again when they change).

use std::net::IpAddr;

use crate::ffi::{guard, ZtnaAddr, ZtnaAgent, ZTNA_ERR_INVALID, ZTNA_ERR_NULL, ZTNA_OK};

/// Most addresses one call takes (the core advertises at most 4 host
/// candidates).
pub const ZTNA_MAX_HOST_ADDRESSES: usize = 64;

/// Replaces the device's interface addresses (3.3): `count` entries at
/// `addrs` (family 4 or 6; ports are ignored). Loopback, link-local,
/// multicast and unspecified addresses are left out by the core; leave out
/// the tunnel's own address. `count` 0 (and `addrs` NULL) clears them.
/// Returns `ZTNA_ERR_INVALID` for a bad family or more than
/// `ZTNA_MAX_HOST_ADDRESSES` entries (nothing changes then).
///
/// # Safety
/// `agent` valid; `addrs` valid for `count` entries.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_set_host_addresses(
    agent: *mut ZtnaAgent,
    addrs: *const ZtnaAddr,
    count: usize,
) -> i32 {
    guard(|| {
        if agent.is_null() || (addrs.is_null() && count > 0) {
            return ZTNA_ERR_NULL;
        }
        if count > ZTNA_MAX_HOST_ADDRESSES {
            return ZTNA_ERR_INVALID;
        }
        let list: &[ZtnaAddr] = if count == 0 {
            &[]
        } else {
            // SAFETY: non-NULL and valid for `count` entries per the
            // caller's contract.
            unsafe { std::slice::from_raw_parts(addrs, count) }
        };
        let Some(ips) = list.iter().map(|a| a.socket_addr().map(|s| s.ip())).collect::<Option<Vec<IpAddr>>>() else {
            return ZTNA_ERR_INVALID;
        };
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        a.core.set_host_addresses(ips);
        ZTNA_OK
    })
}
