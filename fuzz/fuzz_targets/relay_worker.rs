#![no_main]
//! The relay's per-core engine (`dataplane/relay/src/worker/` `Worker`, hosted
//! as testkit's `RelayHost` as the in-memory tests do), fed
//! by in-process QUIC clients whose every control-stream byte and DATAGRAM
//! comes from the fuzzer, plus raw UDP packets from anywhere: packet
//! steering (`cid::owner`), QUIC header parsing, version negotiation, Retry
//! tokens, stateless resets, accept with the client certificate's identity,
//! the control channel (`FrameDecoder`, Hello, Register, Unregister,
//! FlowClose, policy, rate limits, agent ↔ connector binding) and datagram
//! forwarding (`datagram::parse`, `rewrite_in_place`).
//!
//! The worker runs as the relay does: mutual TLS against the dev CA (the
//! clients present SPIFFE certificates), a policy, Retry when asked. What
//! it sends back must be well-formed: control frames that decode, only
//! relay → client message types, and forwarded datagrams on flows the relay
//! announced to that client.
//!
//! Input: `[flags]` then records `[tag][len: u16 BE][bytes]` (see
//! `ztna_fuzz::records`). flags bit 0 / bit 1: client A / B completes the
//! QUIC handshake first; bit 2: Retry for every new connection; bit 3: B is
//! agent `mallory` (in no policy rule) instead of connector `echo-1`. A is
//! agent `alice`; either may send anything. Record tag % 8: 0/1
//! control-stream bytes from A/B, 2/3 DATAGRAM from A/B, 4 raw UDP packet
//! `[port BE][packet]` from 127.0.0.9 (tag bit 3: from A's address), 5 time
//! passes (`[ms: u16 BE]`) and timers run, 6 client closes (tag bit 3: B,
//! else A), 7 the worker begins its shutdown.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ztna_control::identity::Kind;
use ztna_control::wire::{FrameDecoder, Message, HEADER_LEN, MAX_BODY};
use ztna_control::{datagram, Code};
use ztna_relay::pki;
use ztna_relay::policy::Policy;
use ztna_relay::ratelimit::PerIp;
use ztna_relay::security::RetryMode;
use ztna_relay::limits::Limits;
use ztna_testkit::hosts::{RelayHost, RelaySpec, Steering};
use ztna_fuzz::peer;
use ztna_fuzz::records::records;

const RELAY: &str = "127.0.0.1:4433";
const CLIENT_A: &str = "127.0.0.1:6000";
const CLIENT_B: &str = "127.0.0.1:6001";
/// The relay's policy: agent alice (via a group) may reach echo, every
/// agent web; connector echo-1 serves both.
const POLICY: &str = r#"
[groups]
staff = ["alice"]

[services.echo]
connectors = ["echo-1"]
groups = ["staff"]

[services.web]
connectors = ["echo-1"]
agents = ["*"]
"#;

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A raw quiche client whose stream and datagrams the fuzzer writes.
struct Client {
    addr: SocketAddr,
    conn: quiche::Connection,
    rx: FrameDecoder,
    /// Flows the relay told this client about (RegisterOk, FlowOpen).
    flows: HashSet<u32>,
}

impl Client {
    fn new(addr: &str, scid: u8, kind: Kind, name: &str) -> Client {
        let addr = sock(addr);
        let scid = [scid; 16];
        let mut cfg = peer::client_config(kind, name);
        let id = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(Some("localhost"), &id, addr, sock(RELAY), &mut cfg).expect("quiche::connect");
        Client { addr, conn, rx: FrameDecoder::default(), flows: HashSet::new() }
    }

    /// Reads and checks what the relay sent.
    fn read(&mut self) {
        let mut buf = [0u8; 2 * (HEADER_LEN + MAX_BODY)];
        loop {
            let room = self.rx.room().min(buf.len());
            let Ok((n, _)) = self.conn.stream_recv(0, &mut buf[..room]) else { break };
            if n == 0 {
                break;
            }
            self.rx.push(&buf[..n]);
            loop {
                match self.rx.next_message() {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => break,
                    Err(e) => panic!("relay sent a bad control frame: {e:?}"),
                }
            }
        }
        while let Ok(n) = self.conn.dgram_recv(&mut buf) {
            let (flow, _) = datagram::parse(&buf[..n]).expect("relay forwarded a malformed datagram");
            assert!(self.flows.contains(&flow), "relay forwarded on flow {flow}, never announced");
        }
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::RegisterOk { flow, .. } | Message::FlowOpen { flow, .. } => {
                assert!((1..=datagram::MAX_FLOW).contains(&flow));
                self.flows.insert(flow);
            }
            Message::HelloAck { .. }
            | Message::ObservedAddress { .. }
            | Message::RegisterError { .. }
            | Message::FlowClose { .. }
            | Message::Error { .. }
            | Message::Goodbye { .. } => {}
            other => panic!("relay sent {other:?}"),
        }
    }
}

struct World {
    now: Instant,
    relay: RelayHost,
    clients: Vec<Client>,
}

impl World {
    fn new(flags: u8) -> World {
        let now = Instant::now();
        let retry = if flags & 4 == 4 { RetryMode::Always } else { RetryMode::Off };
        let limits = Limits { max_registrations: 8, max_control_backlog: 64 * 1024, retry, ..Limits::default() };
        let spec = RelaySpec {
            addr: sock(RELAY),
            workers: 1,
            node_id: 7,
            limits,
            tls: peer::relay_tls(),
            policy: Policy::from_toml(POLICY, pki::DEV_TRUST_DOMAIN).expect("policy"),
            per_ip: PerIp::new(64, 100, 1000),
            steering: Steering::ByCid,
        };
        let relay = RelayHost::new(spec, now).expect("relay worker");
        let b = if flags & 8 == 8 { (Kind::Agent, "mallory") } else { (Kind::Connector, "echo-1") };
        let clients = vec![Client::new(CLIENT_A, 0xa0, Kind::Agent, "alice"), Client::new(CLIENT_B, 0xb0, b.0, b.1)];
        World { now, relay, clients }
    }

    /// Moves packets until quiet. `active[i]`: client i may send.
    fn pump(&mut self, active: [bool; 2]) {
        let mut out = [0u8; 2048];
        for _ in 0..64 {
            let mut moved = false;
            for (c, on) in self.clients.iter_mut().zip(active) {
                if !on {
                    continue;
                }
                while let Ok((n, info)) = c.conn.send(&mut out) {
                    assert_eq!(info.to, sock(RELAY));
                    self.relay.handle_packet(&mut out[..n], c.addr, self.now);
                    moved = true;
                }
            }
            for (mut p, to) in self.relay.flush(self.now) {
                if let Some(c) = self.clients.iter_mut().find(|c| c.addr == to) {
                    let _ = c.conn.recv(&mut p, quiche::RecvInfo { from: sock(RELAY), to });
                    moved = true;
                }
            }
            for c in &mut self.clients {
                c.read();
            }
            if !moved {
                return;
            }
        }
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        for w in self.relay.workers_mut() {
            w.handle_timeouts(self.now);
        }
        for c in &mut self.clients {
            c.conn.on_timeout();
        }
    }
}

fuzz_target!(init: peer::init(), |data: &[u8]| {
    let (flags, rest) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    let mut w = World::new(flags);
    // Handshakes first, for the clients the flags select.
    let mut active = [flags & 1 == 1, flags & 2 == 2];
    w.pump(active);
    for (c, on) in w.clients.iter().zip(active) {
        assert!(!on || c.conn.is_established(), "handshake with the worker failed");
    }
    for (tag, bytes) in records(rest) {
        let who = usize::from(tag & 1);
        match tag % 8 {
            0 | 1 => {
                active[who] = true;
                let _ = w.clients[who].conn.stream_send(0, bytes, false);
            }
            2 | 3 => {
                active[who] = true;
                let _ = w.clients[who].conn.dgram_send(bytes);
            }
            4 => {
                let (port, pkt) = match bytes {
                    [hi, lo, pkt @ ..] => (u16::from_be_bytes([*hi, *lo]), pkt),
                    _ => (0, bytes),
                };
                let from = if tag & 8 == 8 { sock(CLIENT_A) } else { SocketAddr::from(([127, 0, 0, 9], port)) };
                let mut p = pkt.to_vec();
                w.relay.handle_packet(&mut p, from, w.now);
            }
            5 => {
                let ms = match bytes {
                    [hi, lo, ..] => u64::from(u16::from_be_bytes([*hi, *lo])),
                    [b] => u64::from(*b),
                    [] => 1,
                };
                w.tick(Duration::from_millis(ms));
            }
            6 => {
                let c = &mut w.clients[usize::from(tag & 8 == 8)];
                let _ = c.conn.close(true, 0, b"fuzz");
            }
            _ => {
                for wk in w.relay.workers_mut() {
                    wk.begin_shutdown(Code::NO_ERROR, "fuzz", Duration::from_millis(100), w.now);
                }
            }
        }
        w.pump(active);
    }
    w.tick(Duration::from_secs(1));
    w.pump(active);
});
