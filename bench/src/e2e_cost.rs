//! `ztna-bench e2e-cost`: what the end-to-end session costs per packet.
//!
//! In memory, on this thread, with real quiche connections and the
//! organisation CA's certificates: the *baseline* carries each IP packet
//! as a DATAGRAM of one QUIC connection (the relay leg alone: what an
//! agent and a connector did per packet when the relay terminated the
//! session); *end to end* carries it as a DATAGRAM of the inner session,
//! whose packets are DATAGRAMs (behind a flow id) of the outer one, as the
//! agent and connector do now. Both directions' packets and ACKs are
//! processed; the CPU time covers both ends (agent + connector), so the
//! ratio is the per-packet cost of the new design over the old. The relay
//! does the same work either way (it forwards outer DATAGRAMs), which
//! `ztna-bench relay` measures. This baseline exists only here: the product
//! has no cleartext mode.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztna_control::e2e::{self, E2eSession, Rejections, SessionEvent};
use ztna_control::identity::Kind;
use ztna_control::{datagram, packet, ServiceName};

#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    pub packet_bytes: usize,
    pub packets: u64,
    pub baseline_us_per_packet: f64,
    pub e2e_us_per_packet: f64,
    /// e2e / baseline, measured in this run.
    pub ratio: f64,
}

/// A client/server pair, handshake and SessionHello done. `outer`: sized
/// like a relay leg (1400-byte UDP payloads), else like an inner session
/// (1352).
fn pair(pki: &ztna_relay::pki::DevPki, tag: u8, outer: bool) -> Result<(E2eSession, E2eSession)> {
    let atls = pki.client_tls(Kind::Agent, "cost-agent")?;
    let ctls = pki.client_tls(Kind::Connector, "cost-connector")?;
    let td = e2e::own_identity(&atls)?.trust_domain;
    let mut acfg = e2e::client_config(&atls, std::sync::Arc::new(Rejections::default()))?;
    let mut ccfg = e2e::server_config(&ctls, std::sync::Arc::new(Rejections::default()))?;
    if outer {
        acfg.set_max_send_udp_payload_size(ztna_control::quic::MAX_UDP_PAYLOAD);
        ccfg.set_max_send_udp_payload_size(ztna_control::quic::MAX_UDP_PAYLOAD);
    }
    let expect = format!("spiffe://{td}/connector/cost-connector");
    let now = Instant::now();
    let svc = ServiceName::new("echo").context("service")?;
    let mut a = E2eSession::connect(&mut acfg, [tag; 8], &td, &expect, svc, now)?;
    let mut c = E2eSession::accept(&mut ccfg, [tag ^ 0xff; 8], &td, &e2e::ResetKey::from_tls(&ctls)?, now)?;
    let mut buf = vec![0u8; 1500];
    for _ in 0..100 {
        while let Some((n, _)) = a.poll_transmit(&mut buf, now) {
            c.recv(&mut buf[..n], now);
        }
        while let Some(e) = c.poll_event() {
            if matches!(e, SessionEvent::Hello { .. }) {
                c.admit();
            }
        }
        while let Some((n, _)) = c.poll_transmit(&mut buf, now) {
            a.recv(&mut buf[..n], now);
        }
        if a.is_up() && c.is_up() {
            return Ok((a, c));
        }
    }
    bail!("the session did not come up")
}

/// Moves everything `from` has to send into `to` (through `wrap` first).
fn flush(from: &mut E2eSession, to: &mut E2eSession, buf: &mut [u8], now: Instant) {
    while let Some((n, _)) = from.poll_transmit(buf, now) {
        if let Some(p) = buf.get_mut(..n) {
            to.recv(p, now);
        }
    }
}

fn baseline(pki: &ztna_relay::pki::DevPki, pkt: &[u8], packets: u64) -> Result<Duration> {
    let (mut a, mut c) = pair(pki, 1, true)?;
    let (mut buf, mut out) = (vec![0u8; 1500], vec![0u8; 1500]);
    let now = Instant::now();
    let t0 = crate::cpu::thread_cpu_time();
    let mut got = 0u64;
    let mut sent = 0u64;
    while got < packets {
        for _ in 0..16 {
            if sent < packets && a.send_ip(pkt).is_ok() {
                sent += 1;
            }
        }
        flush(&mut a, &mut c, &mut buf, now);
        while c.recv_ip(&mut out).is_some() {
            got += 1;
        }
        flush(&mut c, &mut a, &mut buf, now);
        if sent >= packets && got < packets {
            // Lost to a full queue: resend what is missing.
            sent = got;
        }
    }
    Ok(crate::cpu::thread_cpu_time().saturating_sub(t0))
}

fn end_to_end(pki: &ztna_relay::pki::DevPki, pkt: &[u8], packets: u64) -> Result<Duration> {
    let (mut ia, mut ic) = pair(pki, 2, false)?;
    let (mut oa, mut oc) = pair(pki, 3, true)?;
    // `outer` is where wrap encodes (its length follows each packet); `rx`
    // is the full-size buffer unwrap receives into.
    let (mut buf, mut outer, mut rx, mut inner) = (vec![0u8; 1500], Vec::new(), vec![0u8; 1500], vec![0u8; 1500]);
    let flow = 7u32;
    let now = Instant::now();
    let t0 = crate::cpu::thread_cpu_time();
    let (mut got, mut sent) = (0u64, 0u64);
    // Inner packets of `from` as outer DATAGRAMs of `via` (flow id first),
    // while `via` has room: as the agent and connector do, a full outer
    // queue leaves them with the inner session.
    let wrap = |from: &mut E2eSession, via: &mut E2eSession, buf: &mut Vec<u8>, outer: &mut Vec<u8>| {
        while via.datagram_room() {
            let Some((n, _)) = from.poll_transmit(buf, now) else { break };
            datagram::encode_into(flow, buf.get(..n).unwrap_or_default(), outer);
            let _ = via.send_ip(outer);
        }
    };
    // Outer DATAGRAMs of `via` into the inner session `to`.
    let unwrap = |via: &mut E2eSession, to: &mut E2eSession, rx: &mut Vec<u8>| {
        while let Some(n) = via.recv_ip(rx) {
            let Some(d) = rx.get_mut(..n) else { continue };
            let Ok((_, p)) = datagram::parse(d) else { continue };
            let start = n - p.len();
            if let Some(p) = rx.get_mut(start..n) {
                to.recv(p, now);
            }
        }
    };
    while got < packets {
        for _ in 0..16 {
            if sent < packets && ia.send_ip(pkt).is_ok() {
                sent += 1;
            }
        }
        wrap(&mut ia, &mut oa, &mut buf, &mut outer);
        flush(&mut oa, &mut oc, &mut buf, now);
        unwrap(&mut oc, &mut ic, &mut rx);
        while ic.recv_ip(&mut inner).is_some() {
            got += 1;
        }
        wrap(&mut ic, &mut oc, &mut buf, &mut outer);
        flush(&mut oc, &mut oa, &mut buf, now);
        unwrap(&mut oa, &mut ia, &mut rx);
        if sent >= packets && got < packets {
            sent = got;
        }
    }
    Ok(crate::cpu::thread_cpu_time().saturating_sub(t0))
}

/// Measures both for `packets` UDP packets of `size` bytes (IP included).
pub fn run(size: usize, packets: u64) -> Result<CostReport> {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir())?;
    let src = std::net::SocketAddrV4::new([100, 64, 0, 2].into(), 4000);
    let dst = std::net::SocketAddrV4::new([100, 100, 0, 10].into(), 7);
    let mut pkt = Vec::new();
    packet::build_ipv4_udp(src, dst, &vec![0x5a; size.saturating_sub(28).max(1)], &mut pkt)?;
    // Alternate, so neither gets a warmer cache or CPU frequency.
    let (mut b, mut e) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..3 {
        b += baseline(&pki, &pkt, packets / 3)?;
        e += end_to_end(&pki, &pkt, packets / 3)?;
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
    let n = (packets / 3 * 3).max(1) as f64;
    let (bu, eu) = (b.as_secs_f64() * 1e6 / n, e.as_secs_f64() * 1e6 / n);
    Ok(CostReport {
        packet_bytes: pkt.len(),
        packets: packets / 3 * 3,
        baseline_us_per_packet: bu,
        e2e_us_per_packet: eu,
        ratio: eu / bu.max(1e-9),
    })
}

impl CostReport {
    pub fn print(&self) {
        println!(
            "{} B packets x {}: baseline (relay leg only) {:.2} us, end to end {:.2} us CPU per packet \
             (agent + connector); ratio {:.2}",
            self.packet_bytes, self.packets, self.baseline_us_per_packet, self.e2e_us_per_packet, self.ratio
        );
    }
}
