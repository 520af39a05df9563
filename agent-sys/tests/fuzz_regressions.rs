#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Inputs the fuzz targets (fuzz/, scripts/fuzz.sh) found, replayed against
//! the C API. Each names its file under fuzz/regressions/.

use std::ffi::CString;
use std::ptr;

use ztna_agent::ffi::*;

fn agent(now_us: u64) -> *mut ZtnaAgent {
    // The agent needs its certificate and the organisation CA (end-to-end
    // sessions), even if no relay ever answers.
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let (cert, key) = pki.issue(ztna_control::identity::Kind::Agent, "fuzz").unwrap();
    let path = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let (ca, cert, key) = (path(&pki.ca), path(&cert), path(&key));
    let relay = CString::new("127.0.0.1:4433").unwrap();
    let local = CString::new("127.0.0.1:5000").unwrap();
    let (svc, cidr) = (CString::new("echo").unwrap(), CString::new("100.100.0.10/32").unwrap());
    let routes = [ZtnaRoute { service: svc.as_ptr(), cidr: cidr.as_ptr() }];
    let cfg = ZtnaConfig {
        relay_addr: relay.as_ptr(),
        server_name: ptr::null(),
        ca_file: ca.as_ptr(),
        cert_file: cert.as_ptr(),
        key_file: key.as_ptr(),
        insecure_skip_verify: 1,
        local_addr: local.as_ptr(),
        routes: routes.as_ptr(),
        routes_len: routes.len(),
        pins: ptr::null(),
        pins_len: 0,
        seed: 1,
        now_us,
    };
    let mut h = ptr::null_mut();
    // SAFETY: `cfg` and everything it points to live across the call.
    assert_eq!(unsafe { ztna_agent_new(&cfg, &mut h) }, ZTNA_OK);
    let _ = std::fs::remove_dir_all(&pki.dir);
    h
}

/// fuzz/regressions/agent_c_api/clock-near-u64-max: the caller's clock
/// jumps to the end of u64 while a connection attempt is pending. The
/// handshake timeout schedules a reconnect a second or so later, and
/// `ztna_agent_next_timeout` computes that deadline as `base_us + elapsed`
/// (ffi.rs `ZtnaAgent::micros`) without saturating: it overflows (a caught
/// panic, ZTNA_ERR_PANIC, with overflow checks; a wrapped deadline in the
/// past, so a busy loop, without). Expected: a deadline, saturated at the
/// end of the clock.
#[test]
fn next_timeout_near_the_end_of_the_clock() {
    let h = agent(1_000_000);
    let mut buf = [0u8; 1500];
    let mut d = ZtnaDatagram {
        data: buf.as_mut_ptr(),
        len: 0,
        cap: buf.len(),
        addr: ZtnaAddr { family: 0, ip: [0; 16], port: 0 },
    };
    // SAFETY: live handle; one entry with `cap` writable bytes.
    assert_eq!(unsafe { ztna_agent_poll_udp(h, &mut d, 1, 1_000_000) }, 1, "the Initial");
    let now = u64::MAX - 100;
    // SAFETY: live handle.
    assert_eq!(unsafe { ztna_agent_on_timeout(h, now) }, ZTNA_OK);
    let mut deadline = 0u64;
    // SAFETY: live handle; `deadline` is a valid place.
    let r = unsafe { ztna_agent_next_timeout(h, &mut deadline) };
    // SAFETY: the handle is not used again.
    unsafe { ztna_agent_free(h) };
    assert_eq!(r, 1, "next_timeout returned {r}");
    assert!(deadline >= now, "deadline {deadline} before now {now}");
}
