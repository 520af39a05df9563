#![no_main]
//! The agent's C API (agent-sys/src/ffi.rs over core.rs), called the way a
//! packet-tunnel extension calls it, with every input a peer or the tunnel
//! controls coming from the fuzzer:
//!
//! - IP packets read from the tunnel device (`ztna_agent_send_ip`):
//!   routing by destination, ICMP "fragmentation needed" for packets too
//!   big for the path;
//! - UDP datagrams "from the relay" (`ztna_agent_recv_udp`): raw bytes into
//!   quiche, from the relay's or any other address (including bad address
//!   families);
//! - with the input's first bit set, a real QUIC connection (the agent
//!   verifies the server with the dev CA and presents its own certificate)
//!   to an in-process relay stand-in (quiche server) that answers Hello and
//!   Register like the relay, then sends fuzzer bytes on the control stream
//!   and fuzzer DATAGRAMs (flow header + IP packet), which the agent parses
//!   (`FrameDecoder`, `datagram::parse`, `packet::source` spoofing check)
//!   and hands out through `ztna_agent_poll_ip` / `ztna_agent_poll_event`;
//! - configuration strings (`ztna_agent_new`: addresses, CIDRs, service
//!   names, NULL pointers).
//!
//! No function may return ZTNA_ERR_PANIC (the API catches panics, so this
//! is how a panic shows up), codes must be documented ones, and what the
//! agent sends the relay must be well-formed: only Hello and Register for
//! its own services on the control stream, and datagrams whose flow is a
//! registered service whose routes contain the packet's destination.
//! Nothing is sent over a socket: the C API leaves I/O to the caller.
//!
//! Input: `[flags]` then records `[tag][len: u16 BE][bytes]` (see
//! `ztna_fuzz::records`); flags bit 0 = connect to the relay stand-in
//! first; bit 1 = the caller's clock (`now_us`) starts 100 s before the
//! end of u64. Record tag % 8: 0 send IP packet (tag bit 3: no results
//! array), 1 UDP from the relay, 2 UDP from `[family][16 ip][port BE]
//! [data]`, 3 relay → agent control-stream bytes, 4 relay → agent DATAGRAM,
//! 5 time passes (`[ms: u16 BE]`, or `[now_us: u64 BE]` to jump) and timers
//! run, 6 poll (`[cap: u16 BE]
//! [count]`), 7 `ztna_agent_new` with NUL-separated strings `relay, local,
//! server name, (service, cidr)*`.

use std::ffi::{c_char, CString};
use std::net::SocketAddr;
use std::ptr;

use libfuzzer_sys::fuzz_target;
use ztna_agent::ffi::*;
use ztna_agent::route::Cidr;
use ztna_control::identity::Kind;
use ztna_control::wire::{FrameDecoder, Message, Role, HEADER_LEN, MAX_BODY};
use ztna_control::{datagram, packet, wire};
use ztna_fuzz::peer;
use ztna_fuzz::records::{fields, records};

const RELAY: &str = "127.0.0.1:4433";
const LOCAL: &str = "127.0.0.1:5000";
/// The agent's routes. The relay stand-in registers service `i` as flow
/// `i + 1` (echo = 1, db = 2, v6 = 3).
const ROUTES: [(&str, &str); 3] = [("echo", "100.100.0.10/32"), ("db", "100.100.1.0/24"), ("v6", "fd00::/64")];

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn check(rc: i32) -> i32 {
    assert_ne!(rc, ZTNA_ERR_PANIC, "the agent panicked (caught by the C API)");
    rc
}

/// An agent handle, freed on drop.
struct Agent {
    h: *mut ZtnaAgent,
    now_us: u64,
}

impl Agent {
    fn new(seed: u64, now_us: u64) -> Agent {
        let relay = CString::new(RELAY).unwrap();
        let local = CString::new(LOCAL).unwrap();
        // Verifies the stand-in with the dev CA and presents a client
        // certificate, as a deployed agent does.
        let pki = peer::dev_pki();
        let (cert, key) = pki.issue(Kind::Agent, "alice").unwrap();
        let path = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
        let (ca, cert, key) = (path(&pki.ca), path(&cert), path(&key));
        let strings: Vec<(CString, CString)> =
            ROUTES.iter().map(|(s, c)| (CString::new(*s).unwrap(), CString::new(*c).unwrap())).collect();
        let routes: Vec<ZtnaRoute> =
            strings.iter().map(|(s, c)| ZtnaRoute { service: s.as_ptr(), cidr: c.as_ptr() }).collect();
        let cfg = ZtnaConfig {
            relay_addr: relay.as_ptr(),
            server_name: ptr::null(),
            ca_file: ca.as_ptr(),
            cert_file: cert.as_ptr(),
            key_file: key.as_ptr(),
            insecure_skip_verify: 0,
            local_addr: local.as_ptr(),
            routes: routes.as_ptr(),
            routes_len: routes.len(),
            pins: ptr::null(),
            pins_len: 0,
            seed,
            now_us,
        };
        let mut h = ptr::null_mut();
        // SAFETY: `cfg`, the strings and the routes array it points to live
        // until the call returns; `h` is a valid place for the handle.
        let rc = unsafe { ztna_agent_new(&cfg, &mut h) };
        assert_eq!(rc, ZTNA_OK);
        assert!(!h.is_null());
        Agent { h, now_us }
    }

    fn tick(&mut self, us: u64) {
        self.now_us = self.now_us.saturating_add(us);
    }

    /// Datagrams the agent wants to send (to the relay).
    fn poll_udp(&mut self) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut out = Vec::new();
        loop {
            let mut bufs = [[0u8; 1500]; 4];
            let mut ds: Vec<ZtnaDatagram> = bufs
                .iter_mut()
                .map(|b| ZtnaDatagram {
                    data: b.as_mut_ptr(),
                    len: 0,
                    cap: b.len(),
                    addr: ZtnaAddr { family: 0, ip: [0; 16], port: 0 },
                })
                .collect();
            // SAFETY: the handle is live; `ds` has `ds.len()` entries whose
            // `data` points to `cap` writable bytes of `bufs`, alive across
            // the call.
            let n = check(unsafe { ztna_agent_poll_udp(self.h, ds.as_mut_ptr(), ds.len(), self.now_us) });
            assert!(n >= 0 && n as usize <= ds.len(), "poll_udp returned {n}");
            for d in &ds[..n as usize] {
                assert!(d.len <= d.cap);
                // SAFETY: the agent wrote `d.len` bytes at `d.data`, which
                // still points into `bufs`.
                let bytes = unsafe { std::slice::from_raw_parts(d.data, d.len) }.to_vec();
                out.push((bytes, d.addr.socket_addr().expect("poll_udp returned address family 4 or 6")));
            }
            if (n as usize) < ds.len() {
                return out;
            }
        }
    }

    fn recv_udp(&mut self, data: &[u8], from: ZtnaAddr) -> i32 {
        let mut buf = data.to_vec();
        let d = ZtnaDatagram { data: buf.as_mut_ptr(), len: buf.len(), cap: buf.len(), addr: from };
        // SAFETY: the handle is live; one entry whose `data` holds `len`
        // writable bytes of `buf`, alive across the call.
        let rc = check(unsafe { ztna_agent_recv_udp(self.h, &d, 1, self.now_us) });
        let valid_family = matches!(from.family, 4 | 6);
        assert_eq!(rc, if valid_family { ZTNA_OK } else { ZTNA_ERR_INVALID });
        rc
    }

    fn send_ip(&mut self, pkt: &[u8], with_results: bool) {
        let p = ZtnaPacket { data: pkt.as_ptr().cast_mut(), len: pkt.len(), cap: pkt.len() };
        let mut results = [i32::MIN; 1];
        let res_ptr = if with_results { results.as_mut_ptr() } else { ptr::null_mut() };
        // SAFETY: the handle is live; one packet of `len` readable bytes
        // (only read, never written, despite the `*mut`); `res_ptr` is NULL
        // or has room for one code.
        let n = check(unsafe { ztna_agent_send_ip(self.h, &p, 1, res_ptr) });
        assert!(n == 0 || n == 1, "send_ip returned {n}");
        if with_results {
            let r = results[0];
            assert!(
                [
                    ZTNA_OK,
                    ZTNA_ERR_UNMAPPED,
                    ZTNA_ERR_NO_FLOW,
                    ZTNA_ERR_MALFORMED,
                    ZTNA_ERR_TOO_LARGE,
                    ZTNA_ERR_BACKPRESSURE
                ]
                .contains(&r),
                "send_ip result {r}"
            );
            assert_eq!(r == ZTNA_OK, n == 1);
            if r == ZTNA_ERR_MALFORMED {
                assert!(packet::destination(pkt).is_none());
            }
        }
    }

    fn poll(&mut self, cap: usize, count: usize) {
        let mut bufs = vec![vec![0u8; cap]; count];
        let mut ps: Vec<ZtnaPacket> =
            bufs.iter_mut().map(|b| ZtnaPacket { data: b.as_mut_ptr(), len: 0, cap: b.len() }).collect();
        // SAFETY: the handle is live; `ps` has `ps.len()` entries whose
        // `data` points to `cap` writable bytes of `bufs`.
        let n = check(unsafe { ztna_agent_poll_ip(self.h, ps.as_mut_ptr(), ps.len()) });
        assert!(n >= 0 && n as usize <= count, "poll_ip returned {n}");
        for p in &ps[..n as usize] {
            assert!(p.len <= p.cap);
        }
        let mut ev = ZtnaEvent {
            kind: 0,
            addr: ZtnaAddr { family: 0, ip: [0; 16], port: 0 },
            flow: 0,
            code: 0,
            retry_in_ms: 0,
            service: [0; 65],
            text: [0; 256],
        };
        for _ in 0..64 {
            // SAFETY: the handle is live; `ev` is a valid place for an event.
            let r = check(unsafe { ztna_agent_poll_event(self.h, &mut ev) });
            if r == 0 {
                break;
            }
            assert_eq!(r, 1);
            assert!((ZTNA_EVENT_CONNECTED..=ZTNA_EVENT_GOODBYE).contains(&ev.kind));
            assert_eq!(ev.service[64], 0, "service name not NUL-terminated");
        }
        // SAFETY: all-zero bytes are a valid ZtnaStats (plain integers).
        let mut st: ZtnaStats = unsafe { std::mem::zeroed() };
        // SAFETY: the handle is live; `st` is a valid place for the stats.
        assert_eq!(check(unsafe { ztna_agent_stats(self.h, &mut st) }), ZTNA_OK);
        assert!(st.connected <= 1);
        let mut deadline = 0u64;
        // SAFETY: the handle is live; `deadline` is a valid place.
        let r = check(unsafe { ztna_agent_next_timeout(self.h, &mut deadline) });
        assert!(r == 0 || r == 1);
    }

    /// Drains events: (Connected seen, Registered count).
    fn events(&mut self) -> (bool, usize) {
        let mut ev = ZtnaEvent {
            kind: 0,
            addr: ZtnaAddr { family: 0, ip: [0; 16], port: 0 },
            flow: 0,
            code: 0,
            retry_in_ms: 0,
            service: [0; 65],
            text: [0; 256],
        };
        let (mut connected, mut registered) = (false, 0);
        // SAFETY: the handle is live; `ev` is a valid place for an event.
        while check(unsafe { ztna_agent_poll_event(self.h, &mut ev) }) == 1 {
            connected |= ev.kind == ZTNA_EVENT_CONNECTED;
            registered += usize::from(ev.kind == ZTNA_EVENT_REGISTERED);
        }
        (connected, registered)
    }

    fn on_timeout(&mut self) {
        // SAFETY: the handle is live.
        assert_eq!(check(unsafe { ztna_agent_on_timeout(self.h, self.now_us) }), ZTNA_OK);
        // Time going backwards is refused, not a panic.
        if self.now_us > 0 {
            // SAFETY: the handle is live.
            assert_eq!(check(unsafe { ztna_agent_on_timeout(self.h, self.now_us - 1) }), ZTNA_ERR_INVALID);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: the handle came from ztna_agent_new and is not used again.
        unsafe { ztna_agent_free(self.h) };
    }
}

/// A relay stand-in: a quiche server that answers Hello and Register as
/// the relay does, and checks what the agent sends.
struct Relay {
    cfg: quiche::Config,
    conn: Option<quiche::Connection>,
    rx: FrameDecoder,
    tx: Vec<u8>,
    hello: bool,
    /// The fuzzer spoke on the control stream: it may have assigned flows
    /// of its own (RegisterOk), so datagrams are checked less strictly.
    fuzzed_control: bool,
}

impl Relay {
    fn new() -> Relay {
        Relay {
            cfg: peer::stand_in_server_config(),
            conn: None,
            rx: FrameDecoder::default(),
            tx: Vec::new(),
            hello: false,
            fuzzed_control: false,
        }
    }

    fn recv(&mut self, buf: &mut [u8], to: SocketAddr) {
        assert_eq!(to, sock(RELAY), "agent sent a datagram elsewhere than the relay");
        if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
            // The agent reconnects: a new connection, a new control stream.
            self.conn = None;
            self.rx = FrameDecoder::default();
            self.tx.clear();
            self.hello = false;
        }
        if self.conn.is_none() {
            let Ok(hdr) = quiche::Header::from_slice(buf, quiche::MAX_CONN_ID_LEN) else { return };
            if hdr.ty != quiche::Type::Initial {
                return;
            }
            let scid = quiche::ConnectionId::from_ref(&[0x0f; 16]);
            self.conn = quiche::accept(&scid, None, sock(RELAY), sock(LOCAL), &mut self.cfg).ok();
        }
        let Some(c) = &mut self.conn else { return };
        let _ = c.recv(buf, quiche::RecvInfo { from: sock(LOCAL), to: sock(RELAY) });
        if c.is_established() {
            self.read_control();
            self.read_datagrams();
        }
    }

    fn read_control(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let mut buf = [0u8; 2 * (HEADER_LEN + MAX_BODY)];
        loop {
            let room = self.rx.room().min(buf.len());
            let Ok((n, _)) = c.stream_recv(0, &mut buf[..room]) else { break };
            if n == 0 {
                break;
            }
            self.rx.push(&buf[..n]);
            loop {
                let m = match self.rx.next_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => panic!("agent sent a bad control frame: {e:?}"),
                };
                match m {
                    Message::Hello { version, .. } if !self.hello => {
                        assert_eq!(version, wire::VERSION);
                        self.hello = true;
                        Message::HelloAck { version }.encode(&mut self.tx);
                        Message::ObservedAddress { addr: sock(LOCAL) }.encode(&mut self.tx);
                    }
                    Message::Register { request_id, role: Role::Agent, service } if self.hello => {
                        let i = ROUTES.iter().position(|(s, _)| *s == service.as_str());
                        let i = i.unwrap_or_else(|| panic!("agent registered unknown service {service}"));
                        Message::RegisterOk { request_id, flow: i as u32 + 1 }.encode(&mut self.tx);
                    }
                    other => panic!("agent sent unexpected {other:?}"),
                }
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        let Some(c) = &mut self.conn else { return };
        if !self.tx.is_empty() {
            if let Ok(n) = c.stream_send(0, &self.tx, false) {
                self.tx.drain(..n);
            }
        }
    }

    fn read_datagrams(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let mut buf = [0u8; 2048];
        while let Ok(n) = c.dgram_recv(&mut buf) {
            let (flow, pkt) = datagram::parse(&buf[..n]).expect("agent sent a malformed datagram");
            let dst = packet::destination(pkt).expect("agent tunneled a packet without destination");
            let routed = |c: &str| c.parse::<Cidr>().unwrap().contains(dst);
            if self.fuzzed_control {
                assert!(ROUTES.iter().any(|(_, c)| routed(c)), "{dst} is outside every route");
            } else {
                let (service, cidr) = ROUTES.get(flow as usize - 1).expect("agent used an unregistered flow");
                assert!(routed(cidr), "{dst} sent on the flow of {service}");
            }
        }
    }

    /// Appends bytes to the control stream (the fuzzer speaking as relay).
    fn control(&mut self, bytes: &[u8]) {
        self.fuzzed_control = true;
        self.tx.extend_from_slice(bytes);
        self.flush();
    }

    fn datagram(&mut self, bytes: &[u8]) {
        if let Some(c) = &mut self.conn {
            let _ = c.dgram_send(bytes);
        }
    }

    fn send(&mut self, out: &mut [u8]) -> Option<usize> {
        let c = self.conn.as_mut()?;
        c.send(out).ok().map(|(n, _)| n)
    }
}

/// Moves packets both ways until both sides are quiet.
fn pump(agent: &mut Agent, relay: &mut Relay) {
    let mut out = [0u8; 1500];
    for _ in 0..32 {
        agent.tick(100);
        let mut moved = false;
        for (mut d, to) in agent.poll_udp() {
            relay.recv(&mut d, to);
            moved = true;
        }
        relay.flush();
        while let Some(n) = relay.send(&mut out) {
            agent.recv_udp(&out[..n], ZtnaAddr::from(sock(RELAY)));
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// `ztna_agent_new` with fuzzer strings; missing ones are NULL.
fn config_strings(bytes: &[u8]) {
    let strings: Vec<CString> = fields(bytes, 0).take(9).map(|f| CString::new(f).unwrap()).collect();
    let p = |i: usize| strings.get(i).map_or(ptr::null(), |s| s.as_ptr());
    let routes: Vec<ZtnaRoute> =
        (3..strings.len()).step_by(2).map(|i| ZtnaRoute { service: p(i), cidr: p(i + 1) }).collect();
    let cfg = ZtnaConfig {
        relay_addr: p(0),
        server_name: p(2),
        ca_file: ptr::null::<c_char>(),
        cert_file: ptr::null(),
        key_file: ptr::null(),
        insecure_skip_verify: 1,
        local_addr: p(1),
        routes: if routes.is_empty() { ptr::null() } else { routes.as_ptr() },
        routes_len: routes.len(),
        pins: ptr::null(),
        pins_len: 0,
        seed: 1,
        now_us: 0,
    };
    let mut h = ptr::null_mut();
    // SAFETY: `cfg` and everything it points to (strings, routes) live
    // across the call; `h` is a valid place for the handle.
    let rc = check(unsafe { ztna_agent_new(&cfg, &mut h) });
    assert!([ZTNA_OK, ZTNA_ERR_NULL, ZTNA_ERR_CONFIG, ZTNA_ERR_TLS].contains(&rc), "ztna_agent_new returned {rc}");
    assert_eq!(rc == ZTNA_OK, !h.is_null());
    // SAFETY: `h` is NULL or a handle from ztna_agent_new, not used again.
    unsafe { ztna_agent_free(h) };
}

fuzz_target!(init: peer::init(), |data: &[u8]| {
    let (flags, rest) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    // The caller's clock starts anywhere; bit 1: near the end of u64.
    let start_us = if flags & 2 == 2 { u64::MAX - 100_000_000 } else { 1_000_000 };
    let mut agent = Agent::new(u64::from(flags), start_us);
    let mut relay = Relay::new();
    let connect = flags & 1 == 1;
    if connect {
        pump(&mut agent, &mut relay);
        // The stand-in works: connected, and every service registered.
        let (connected, registered) = agent.events();
        assert!(connected && registered == ROUTES.len(), "handshake with the relay stand-in failed");
    }
    for (tag, bytes) in records(rest) {
        match tag % 8 {
            0 => agent.send_ip(bytes, tag & 8 == 0),
            1 => {
                agent.recv_udp(bytes, ZtnaAddr::from(sock(RELAY)));
            }
            2 => {
                let mut a = ZtnaAddr { family: 0, ip: [0; 16], port: 0 };
                let (head, payload) = bytes.split_at(bytes.len().min(19));
                if let Some((&f, tail)) = head.split_first() {
                    a.family = f;
                    let n = tail.len().min(16);
                    a.ip[..n].copy_from_slice(&tail[..n]);
                    if let [hi, lo] = tail.get(16..18).unwrap_or_default() {
                        a.port = u16::from_be_bytes([*hi, *lo]);
                    }
                }
                agent.recv_udp(payload, a);
            }
            3 => relay.control(bytes),
            4 => relay.datagram(bytes),
            5 => {
                if let Some(abs) = bytes.first_chunk::<8>() {
                    // The caller's clock jumps (forward only: backward is
                    // refused, see on_timeout).
                    agent.now_us = agent.now_us.max(u64::from_be_bytes(*abs));
                } else {
                    let ms = match bytes {
                        [hi, lo, ..] => u64::from(u16::from_be_bytes([*hi, *lo])),
                        [b] => u64::from(*b),
                        [] => 1,
                    };
                    agent.tick(ms * 1000);
                }
                agent.on_timeout();
            }
            6 => {
                let cap = match bytes {
                    [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])) % 2048,
                    _ => 1500,
                };
                let count = usize::from(bytes.get(2).copied().unwrap_or(0) % 4) + 1;
                agent.poll(cap, count);
            }
            _ => config_strings(bytes),
        }
        if connect {
            pump(&mut agent, &mut relay);
        }
    }
    pump(&mut agent, &mut relay);
    agent.poll(1500, 4);
});
