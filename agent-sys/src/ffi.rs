//! C API over [`AgentCore`].
//!
//! Conventions (also in the generated header):
//! - Every function returns `ZTNA_OK` (0) or a negative `ZTNA_ERR_*` code,
//!   or a non-negative count where documented; `ztna_strerror` names codes.
//! - Buffers are caller-owned. Batch calls take arrays of
//!   [`ZtnaPacket`]/[`ZtnaDatagram`] whose `data`/`cap` describe the buffer
//!   and whose `len` is the input length (send) or is set to the output
//!   length (poll). Nothing is allocated per packet.
//! - Time is the caller's monotonic clock in microseconds (`now_us`); it
//!   must not go backwards.
//! - A handle is not thread-safe: calls on one handle must not overlap.
//!   Different handles are independent.
//! - Every function checks its pointers and catches panics
//!   (`ZTNA_ERR_PANIC`); after a panic the handle should be freed.

use std::ffi::{c_char, CStr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use ztna_control::quic::TlsOptions;
use ztna_control::ServiceName;

use crate::agent_core::{AgentConfig, AgentCore, AgentError, AgentEvent, DropReason};
pub use crate::ffi_direct::{ztna_agent_set_host_addresses, ZTNA_MAX_HOST_ADDRESSES};
pub use crate::ffi_stats::{ztna_agent_path_stats, ztna_agent_stats, ZtnaPathStats, ZtnaStats};
use crate::route::Cidr;

pub const ZTNA_OK: i32 = 0;
/// A required pointer was NULL.
pub const ZTNA_ERR_NULL: i32 = -1;
/// A configuration value could not be parsed (address, CIDR, service name).
pub const ZTNA_ERR_CONFIG: i32 = -2;
/// TLS material could not be read or used (a file missing or unreadable,
/// no valid PEM, a key that does not match its certificate).
pub const ZTNA_ERR_TLS: i32 = -3;
/// A caller buffer is too small for the item (item dropped and counted).
pub const ZTNA_ERR_BUFFER: i32 = -4;
/// The packet is not a valid IPv4/IPv6 packet.
pub const ZTNA_ERR_MALFORMED: i32 = -5;
/// No route for the packet's destination (dropped, never sent).
pub const ZTNA_ERR_UNMAPPED: i32 = -6;
/// The destination's service is not registered yet, its end-to-end
/// session is not up (and its queue is full), or its policy is
/// `direct-only` and no direct path is up.
pub const ZTNA_ERR_NO_FLOW: i32 = -7;
/// The packet exceeds what the path to the relay carries.
pub const ZTNA_ERR_TOO_LARGE: i32 = -8;
/// Not connected or the send queue is full: retry later.
pub const ZTNA_ERR_BACKPRESSURE: i32 = -9;
/// A Rust panic was caught; the handle is in an unknown state.
pub const ZTNA_ERR_PANIC: i32 = -10;
/// An argument is out of range (e.g. time going backwards, bad family).
pub const ZTNA_ERR_INVALID: i32 = -11;
/// The service's relay flow is bound to a connector its pins do not accept.
pub const ZTNA_ERR_NOT_PINNED: i32 = -12;

/// API version: major << 16 | minor. Bumped on any ABI change (minor:
/// additions only; 3.1 added `ztna_agent_last_failure`, 3.2 the direct-path
/// counters of `ZtnaStats`, 3.3 `ZTNA_EVENT_PATH_CHANGED`,
/// `ztna_agent_path_stats` and `ztna_agent_set_host_addresses`).
pub const ZTNA_API_VERSION: u32 = 3 << 16 | 3;

/// A network address: `family` is 4 or 6; for IPv4 the first 4 bytes of
/// `ip` are used.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ZtnaAddr {
    pub family: u8,
    pub ip: [u8; 16],
    pub port: u16,
}

/// A caller-owned buffer holding (or receiving) one IP packet.
#[repr(C)]
#[derive(Debug)]
pub struct ZtnaPacket {
    pub data: *mut u8,
    /// Bytes in use (input), or bytes written (output).
    pub len: usize,
    /// Bytes available at `data`.
    pub cap: usize,
}

/// A caller-owned buffer holding (or receiving) one UDP datagram with its
/// peer address (source on input, destination on output).
#[repr(C)]
#[derive(Debug)]
pub struct ZtnaDatagram {
    pub data: *mut u8,
    pub len: usize,
    pub cap: usize,
    pub addr: ZtnaAddr,
}

/// One destination route: service `name` serves prefix `cidr`
/// (e.g. "echo", "100.100.0.10/32").
#[repr(C)]
pub struct ZtnaRoute {
    pub service: *const c_char,
    pub cidr: *const c_char,
}

/// A connector identity accepted for a service: its SPIFFE ID
/// (e.g. "spiffe://corp.example/connector/db-1"). A service with pins
/// accepts only those connectors end to end.
#[repr(C)]
pub struct ZtnaPin {
    pub service: *const c_char,
    pub connector: *const c_char,
}

/// Agent configuration. Strings are NUL-terminated UTF-8, borrowed only
/// for the duration of `ztna_agent_new`.
#[repr(C)]
pub struct ZtnaConfig {
    /// Relay address, "IP:PORT".
    pub relay_addr: *const c_char,
    /// TLS server name of the relay (NULL: "localhost").
    pub server_name: *const c_char,
    /// PEM file of the organisation CA: it signs the relay and the
    /// connectors (required: end-to-end sessions verify the connector
    /// against it, never against the system store).
    pub ca_file: *const c_char,
    /// PEM certificate of this agent: one URI SAN
    /// `spiffe://<trust-domain>/agent/<name>`. The relay refuses agents
    /// without one (mutual TLS).
    pub cert_file: *const c_char,
    /// PEM private key of `cert_file`.
    pub key_file: *const c_char,
    /// Nonzero DISABLES verification of the relay's certificate (local
    /// experiments only; logged). Zero, the value of a zero-initialised
    /// struct, verifies.
    pub insecure_skip_verify: i32,
    /// Local address of the caller's UDP socket, "IP:PORT".
    pub local_addr: *const c_char,
    pub routes: *const ZtnaRoute,
    pub routes_len: usize,
    /// Connector pins (may be NULL with `pins_len` 0).
    pub pins: *const ZtnaPin,
    pub pins_len: usize,
    /// Seed for connection ids and jitter (use a random value).
    pub seed: u64,
    /// The caller's clock now.
    pub now_us: u64,
}

/// Event kinds reported by `ztna_agent_poll_event`.
pub const ZTNA_EVENT_CONNECTED: u32 = 1;
pub const ZTNA_EVENT_OBSERVED_ADDRESS: u32 = 2;
pub const ZTNA_EVENT_REGISTERED: u32 = 3;
pub const ZTNA_EVENT_REGISTER_FAILED: u32 = 4;
pub const ZTNA_EVENT_DISCONNECTED: u32 = 5;
pub const ZTNA_EVENT_GOODBYE: u32 = 6;
/// The service's end-to-end session is up; `text` holds the connector
/// identity it proved.
pub const ZTNA_EVENT_SESSION_UP: u32 = 7;
/// The service's end-to-end session ended; `text` holds the reason. A new
/// one is tried after a backoff.
pub const ZTNA_EVENT_SESSION_CLOSED: u32 = 8;
/// The service's session moved between the relay and a direct path (3.3):
/// `addr` is the peer's address on the direct path (family 0: the relay
/// carries it now), `text` the path state (`direct`, or why the relay:
/// `lost`, `no_answer`, `relay_only`, ...; docs/protocol/direct.md §11.8).
pub const ZTNA_EVENT_PATH_CHANGED: u32 = 9;

/// An event. Fields not used by `kind` are zero.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ZtnaEvent {
    pub kind: u32,
    /// OBSERVED_ADDRESS: the relay's view of our address; PATH_CHANGED:
    /// the direct path's peer address (family 0: the relay).
    pub addr: ZtnaAddr,
    /// REGISTERED: flow id.
    pub flow: u32,
    /// REGISTER_FAILED / GOODBYE: protocol code (docs/PROTOCOL.md).
    pub code: u16,
    /// DISCONNECTED: milliseconds until the next connection attempt.
    pub retry_in_ms: u64,
    /// REGISTERED / REGISTER_FAILED / SESSION_* / PATH_CHANGED: service
    /// name, NUL-terminated.
    pub service: [u8; 65],
    /// SESSION_UP: connector identity; SESSION_CLOSED, DISCONNECTED:
    /// reason (whole: `ztna_agent_last_failure`); PATH_CHANGED: the path
    /// state. NUL-terminated, cut at
    /// 255 bytes.
    pub text: [u8; 256],
}

/// Opaque agent handle.
pub struct ZtnaAgent {
    pub(crate) core: AgentCore,
    base: Instant,
    base_us: u64,
    last_us: u64,
}

impl ZtnaAgent {
    fn instant(&mut self, now_us: u64) -> Result<Instant, i32> {
        if now_us < self.last_us {
            return Err(ZTNA_ERR_INVALID);
        }
        self.last_us = now_us;
        Ok(self.base + Duration::from_micros(now_us - self.base_us))
    }

    fn micros(&self, t: Instant) -> u64 {
        // Saturating: a caller's clock near the end of u64 must not wrap a
        // deadline into the past (found by the agent_c_api fuzz target).
        let elapsed = u64::try_from(t.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX);
        self.base_us.saturating_add(elapsed)
    }
}

pub(crate) fn guard(f: impl FnOnce() -> i32) -> i32 {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(ZTNA_ERR_PANIC)
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char) -> Result<Option<&'a str>, i32> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map(Some).map_err(|_| ZTNA_ERR_CONFIG)
}

impl From<SocketAddr> for ZtnaAddr {
    fn from(a: SocketAddr) -> ZtnaAddr {
        let mut ip = [0u8; 16];
        let family = match a.ip() {
            IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                6
            }
        };
        ZtnaAddr { family, ip, port: a.port() }
    }
}

impl ZtnaAddr {
    /// The address, or None for a family other than 4 and 6.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(self.ip[0], self.ip[1], self.ip[2], self.ip[3])),
            6 => IpAddr::V6(Ipv6Addr::from(self.ip)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// The API version (`ZTNA_API_VERSION`).
#[no_mangle]
pub extern "C" fn ztna_version() -> u32 {
    ZTNA_API_VERSION
}

/// A static, NUL-terminated description of an error code.
#[no_mangle]
pub extern "C" fn ztna_strerror(code: i32) -> *const c_char {
    let s: &'static [u8] = match code {
        ZTNA_OK => b"ok\0",
        ZTNA_ERR_NULL => b"null pointer argument\0",
        ZTNA_ERR_CONFIG => b"invalid configuration value\0",
        ZTNA_ERR_TLS => b"TLS configuration failed\0",
        ZTNA_ERR_BUFFER => b"buffer too small\0",
        ZTNA_ERR_MALFORMED => b"malformed IP packet\0",
        ZTNA_ERR_UNMAPPED => b"no route for destination\0",
        ZTNA_ERR_NO_FLOW => b"service not registered yet\0",
        ZTNA_ERR_TOO_LARGE => b"packet too large for the path\0",
        ZTNA_ERR_BACKPRESSURE => b"not connected or queue full\0",
        ZTNA_ERR_PANIC => b"internal panic\0",
        ZTNA_ERR_INVALID => b"invalid argument\0",
        ZTNA_ERR_NOT_PINNED => b"connector not accepted by the pins\0",
        _ => b"unknown error code\0",
    };
    s.as_ptr().cast()
}

/// Creates an agent. On success stores the handle in `*out` and returns
/// `ZTNA_OK`.
///
/// # Safety
/// `cfg` and `out` must be valid pointers; the strings and the routes array
/// in `cfg` must be valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_new(cfg: *const ZtnaConfig, out: *mut *mut ZtnaAgent) -> i32 {
    guard(|| {
        if cfg.is_null() || out.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL; valid per the contract.
        let c = unsafe { &*cfg };
        // SAFETY: strings valid per the contract.
        let parsed = (|| unsafe {
            let relay: SocketAddr =
                opt_str(c.relay_addr)?.ok_or(ZTNA_ERR_NULL)?.parse().map_err(|_| ZTNA_ERR_CONFIG)?;
            let local: SocketAddr =
                opt_str(c.local_addr)?.ok_or(ZTNA_ERR_NULL)?.parse().map_err(|_| ZTNA_ERR_CONFIG)?;
            let server_name = opt_str(c.server_name)?.unwrap_or("localhost").to_owned();
            // The C boundary reads the TLS files (the core does no I/O).
            let read = |p: Option<&str>| p.map(std::fs::read).transpose().map_err(|_| ZTNA_ERR_TLS);
            let ca_pem = read(opt_str(c.ca_file)?)?;
            let cert_pem = read(opt_str(c.cert_file)?)?;
            let key_pem = read(opt_str(c.key_file)?)?;
            let mut routes = Vec::new();
            if c.routes_len > 0 {
                if c.routes.is_null() {
                    return Err(ZTNA_ERR_NULL);
                }
                for r in std::slice::from_raw_parts(c.routes, c.routes_len) {
                    let name = opt_str(r.service)?.ok_or(ZTNA_ERR_NULL)?;
                    let service = ServiceName::new(name).ok_or(ZTNA_ERR_CONFIG)?;
                    let cidr: Cidr = opt_str(r.cidr)?.ok_or(ZTNA_ERR_NULL)?.parse().map_err(|_| ZTNA_ERR_CONFIG)?;
                    routes.push((service, cidr));
                }
            }
            let mut pinned_connectors = Vec::new();
            if c.pins_len > 0 {
                if c.pins.is_null() {
                    return Err(ZTNA_ERR_NULL);
                }
                for p in std::slice::from_raw_parts(c.pins, c.pins_len) {
                    let name = opt_str(p.service)?.ok_or(ZTNA_ERR_NULL)?;
                    let service = ServiceName::new(name).ok_or(ZTNA_ERR_CONFIG)?;
                    let connector = opt_str(p.connector)?.ok_or(ZTNA_ERR_NULL)?;
                    let id = ztna_control::identity::Identity::parse(connector).map_err(|_| ZTNA_ERR_CONFIG)?;
                    if id.kind != ztna_control::identity::Kind::Connector {
                        return Err(ZTNA_ERR_CONFIG);
                    }
                    pinned_connectors.push((service, connector.to_owned()));
                }
            }
            let tls = TlsOptions { ca_pem, cert_pem, key_pem, verify_peer: c.insecure_skip_verify == 0 };
            Ok(AgentConfig {
                relay,
                fallback_relays: Vec::new(),
                server_name,
                local,
                tls,
                routes,
                pinned_connectors,
                paths: Default::default(),
            })
        })();
        let acfg = match parsed {
            Ok(a) => a,
            Err(e) => return e,
        };
        let base = Instant::now();
        match AgentCore::new(acfg, c.seed, base) {
            Ok(core) => {
                let h = Box::new(ZtnaAgent { core, base, base_us: c.now_us, last_us: c.now_us });
                // SAFETY: `out` checked non-NULL.
                unsafe { *out = Box::into_raw(h) };
                ZTNA_OK
            }
            Err(e) => error_code(&e),
        }
    })
}

/// The C code of an [`AgentError`] (the one place they are mapped).
fn error_code(e: &AgentError) -> i32 {
    match e {
        AgentError::Tls(_) => ZTNA_ERR_TLS,
    }
}

/// Frees an agent (NULL is ignored).
///
/// # Safety
/// `agent` must come from `ztna_agent_new` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_free(agent: *mut ZtnaAgent) {
    if !agent.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: created by Box::into_raw in ztna_agent_new.
            drop(unsafe { Box::from_raw(agent) });
        }));
    }
}

/// Feeds `count` UDP datagrams received from the relay (`addr` = source).
/// Returns `ZTNA_OK` or an error.
///
/// # Safety
/// `agent` valid; `dgrams` points to `count` entries whose `data` holds
/// `len` writable bytes (decrypted in place).
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_recv_udp(
    agent: *mut ZtnaAgent,
    dgrams: *const ZtnaDatagram,
    count: usize,
    now_us: u64,
) -> i32 {
    guard(|| {
        if agent.is_null() || (dgrams.is_null() && count > 0) {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL; not shared during the call.
        let a = unsafe { &mut *agent };
        let now = match a.instant(now_us) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if count == 0 {
            return ZTNA_OK;
        }
        // SAFETY: `count` entries per the contract.
        let all = unsafe { std::slice::from_raw_parts(dgrams, count) };
        // Check the whole batch first, so an error means nothing was fed.
        if all.iter().any(|d| d.data.is_null()) {
            return ZTNA_ERR_NULL;
        }
        if all.iter().any(|d| d.addr.socket_addr().is_none()) {
            return ZTNA_ERR_INVALID;
        }
        for d in all {
            let Some(from) = d.addr.socket_addr() else { return ZTNA_ERR_INVALID };
            // SAFETY: `data` holds `len` writable bytes per the contract.
            let buf = unsafe { std::slice::from_raw_parts_mut(d.data, d.len) };
            a.core.recv_udp(buf, from, now);
        }
        ZTNA_OK
    })
}

/// Sends `count` IP packets read from the tunnel. Returns the number
/// accepted (>= 0). `results`, if not NULL, receives a code per packet
/// (`ZTNA_OK` or `ZTNA_ERR_UNMAPPED`, `_NO_FLOW`, `_MALFORMED`,
/// `_TOO_LARGE`, `_BACKPRESSURE`); every refused packet is also counted.
///
/// # Safety
/// `agent` valid; `pkts` points to `count` entries with `len` readable
/// bytes each; `results` is NULL or has room for `count` codes.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_send_ip(
    agent: *mut ZtnaAgent,
    pkts: *const ZtnaPacket,
    count: usize,
    results: *mut i32,
) -> i32 {
    guard(|| {
        if agent.is_null() || (pkts.is_null() && count > 0) {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        if count == 0 {
            return 0;
        }
        let mut accepted = 0i32;
        // SAFETY: `count` entries per the contract.
        for (i, p) in unsafe { std::slice::from_raw_parts(pkts, count) }.iter().enumerate() {
            let r = if p.data.is_null() {
                ZTNA_ERR_NULL
            } else {
                // SAFETY: `len` readable bytes per the contract.
                let data = unsafe { std::slice::from_raw_parts(p.data, p.len) };
                match a.core.send_ip_packet(data) {
                    Ok(()) => ZTNA_OK,
                    Err(DropReason::Malformed) => ZTNA_ERR_MALFORMED,
                    Err(DropReason::Unmapped) => ZTNA_ERR_UNMAPPED,
                    Err(DropReason::NoFlow) => ZTNA_ERR_NO_FLOW,
                    Err(DropReason::TooLarge) => ZTNA_ERR_TOO_LARGE,
                    Err(DropReason::Backpressure) => ZTNA_ERR_BACKPRESSURE,
                    Err(DropReason::NotPinned) => ZTNA_ERR_NOT_PINNED,
                }
            };
            if r == ZTNA_OK {
                accepted += 1;
            }
            if !results.is_null() {
                // SAFETY: room for `count` codes per the contract.
                unsafe { *results.add(i) = r };
            }
        }
        accepted
    })
}

/// Fills up to `count` caller buffers with UDP datagrams to send to the
/// relay (`addr` = destination, `len` = bytes written). Returns how many
/// were filled. Buffers should hold at least 1500 bytes.
///
/// # Safety
/// `agent` valid; `out` points to `count` entries with `cap` writable
/// bytes at `data`.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_poll_udp(
    agent: *mut ZtnaAgent,
    out: *mut ZtnaDatagram,
    count: usize,
    now_us: u64,
) -> i32 {
    guard(|| {
        if agent.is_null() || (out.is_null() && count > 0) {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        let now = match a.instant(now_us) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if count == 0 {
            return 0;
        }
        let mut n = 0;
        // SAFETY: `count` entries per the contract (non-NULL, count > 0).
        for d in unsafe { std::slice::from_raw_parts_mut(out, count) } {
            if d.data.is_null() {
                // Entries already filled stay valid: report them.
                return if n > 0 { n } else { ZTNA_ERR_NULL };
            }
            // SAFETY: `cap` writable bytes per the contract.
            let buf = unsafe { std::slice::from_raw_parts_mut(d.data, d.cap) };
            match a.core.poll_udp(buf, now) {
                Some((len, to)) => {
                    d.len = len;
                    d.addr = ZtnaAddr::from(to);
                    n += 1;
                }
                None => break,
            }
        }
        n
    })
}

/// Fills up to `count` caller buffers with inbound IP packets for the
/// tunnel. Returns how many were filled. Packets larger than a buffer's
/// `cap` are dropped and counted (`drop_truncated`).
///
/// # Safety
/// `agent` valid; `out` points to `count` entries with `cap` writable
/// bytes at `data`.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_poll_ip(agent: *mut ZtnaAgent, out: *mut ZtnaPacket, count: usize) -> i32 {
    guard(|| {
        if agent.is_null() || (out.is_null() && count > 0) {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        if count == 0 {
            return 0;
        }
        let mut n = 0;
        // SAFETY: `count` entries per the contract (non-NULL, count > 0).
        for p in unsafe { std::slice::from_raw_parts_mut(out, count) } {
            if p.data.is_null() {
                // Entries already filled stay valid: report them.
                return if n > 0 { n } else { ZTNA_ERR_NULL };
            }
            // SAFETY: `cap` writable bytes per the contract.
            let buf = unsafe { std::slice::from_raw_parts_mut(p.data, p.cap) };
            match a.core.poll_ip_packet(buf) {
                Some(len) => {
                    p.len = len;
                    n += 1;
                }
                None => break,
            }
        }
        n
    })
}

/// Stores the next event in `*out`: returns 1 if there was one, 0 if not.
///
/// # Safety
/// `agent` and `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_poll_event(agent: *mut ZtnaAgent, out: *mut ZtnaEvent) -> i32 {
    guard(|| {
        if agent.is_null() || out.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        let Some(e) = a.core.poll_event() else { return 0 };
        let mut ev = ZtnaEvent {
            kind: 0,
            addr: ZtnaAddr { family: 0, ip: [0; 16], port: 0 },
            flow: 0,
            code: 0,
            retry_in_ms: 0,
            service: [0; 65],
            text: [0; 256],
        };
        let set_text = |s: &str, ev: &mut ZtnaEvent| {
            let b = s.as_bytes();
            let n = b.len().min(255);
            ev.text[..n].copy_from_slice(&b[..n]);
        };
        let set_service = |s: &ServiceName, ev: &mut ZtnaEvent| {
            let b = s.as_str().as_bytes();
            let n = b.len().min(64);
            ev.service[..n].copy_from_slice(&b[..n]);
        };
        match e {
            AgentEvent::Connected => ev.kind = ZTNA_EVENT_CONNECTED,
            AgentEvent::ObservedAddress(addr) => {
                ev.kind = ZTNA_EVENT_OBSERVED_ADDRESS;
                ev.addr = ZtnaAddr::from(addr);
            }
            AgentEvent::Registered { service, flow } => {
                ev.kind = ZTNA_EVENT_REGISTERED;
                ev.flow = flow;
                set_service(&service, &mut ev);
            }
            AgentEvent::RegisterFailed { service, code, .. } => {
                ev.kind = ZTNA_EVENT_REGISTER_FAILED;
                ev.code = code.0;
                set_service(&service, &mut ev);
            }
            AgentEvent::Disconnected { retry_in, reason, .. } => {
                ev.kind = ZTNA_EVENT_DISCONNECTED;
                set_text(&reason, &mut ev);
                ev.retry_in_ms = retry_in.as_millis().min(u128::from(u64::MAX)) as u64;
            }
            AgentEvent::Goodbye { code } => {
                ev.kind = ZTNA_EVENT_GOODBYE;
                ev.code = code.0;
            }
            AgentEvent::SessionUp { service, connector } => {
                ev.kind = ZTNA_EVENT_SESSION_UP;
                set_service(&service, &mut ev);
                set_text(&connector, &mut ev);
            }
            AgentEvent::SessionClosed { service, reason } => {
                ev.kind = ZTNA_EVENT_SESSION_CLOSED;
                set_service(&service, &mut ev);
                set_text(&reason, &mut ev);
            }
            AgentEvent::PathChanged { service, direct, state } => {
                ev.kind = ZTNA_EVENT_PATH_CHANGED;
                set_service(&service, &mut ev);
                set_text(state.as_str(), &mut ev);
                if let Some(a) = direct {
                    ev.addr = ZtnaAddr::from(a);
                }
            }
        }
        // SAFETY: checked non-NULL.
        unsafe { *out = ev };
        1
    })
}

/// Microseconds (caller clock) at which `ztna_agent_on_timeout` should
/// run next, stored in `*deadline_us`. Returns 1 if there is a deadline,
/// 0 if none.
///
/// # Safety
/// `agent` and `deadline_us` valid.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_next_timeout(agent: *const ZtnaAgent, deadline_us: *mut u64) -> i32 {
    guard(|| {
        if agent.is_null() || deadline_us.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &*agent };
        match a.core.next_deadline() {
            Some(t) => {
                // SAFETY: checked non-NULL.
                unsafe { *deadline_us = a.micros(t) };
                1
            }
            None => 0,
        }
    })
}

/// Runs expired timers (keepalive, loss recovery, reconnect).
///
/// # Safety
/// `agent` valid.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_on_timeout(agent: *mut ZtnaAgent, now_us: u64) -> i32 {
    guard(|| {
        if agent.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &mut *agent };
        match a.instant(now_us) {
            Ok(now) => {
                a.core.handle_timeout(now);
                ZTNA_OK
            }
            Err(e) => e,
        }
    })
}

/// Copies why the relay connection last ended (the reason of the last
/// DISCONNECTED event, whole: for a refused relay certificate the expected
/// name, what the certificate holds and the CA) into `buf`, NUL-terminated
/// and cut to `len - 1` bytes. Returns the reason's full length (without
/// the NUL), 0 before the first disconnect; call again with a larger buffer
/// when it is `>= len`. `buf` may be NULL when `len` is 0.
///
/// # Safety
/// `agent` valid; `buf` valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_last_failure(agent: *const ZtnaAgent, buf: *mut c_char, len: usize) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        if agent.is_null() {
            return 0;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &*agent };
        let text = a.core.last_failure().as_bytes();
        if !buf.is_null() && len > 0 {
            let n = text.len().min(len - 1);
            // SAFETY: the caller gives `len` writable bytes at `buf`; we
            // write `n + 1 <= len`.
            let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), n + 1) };
            out[..n].copy_from_slice(&text[..n]);
            out[n] = 0;
        }
        text.len()
    }))
    .unwrap_or(0)
}
