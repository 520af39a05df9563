//! The handshake phase: bare quiche clients doing full mutual-TLS
//! handshakes with the relay, back to back.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use ztna_control::quic::{self, TlsOptions, MAX_UDP_PAYLOAD};
use ztna_relay::server::RelayHandle;

use super::bench_relay::fill_counters;
use super::host::process_cpu;
use super::report::HandshakePhase;
use super::Rng;
use crate::load::{wait_readable, RttSummary};

/// A client handshake that has not completed after this long is abandoned.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Handshakes at least this slow are counted apart (with their causes).
const SLOW: Duration = Duration::from_millis(100);

/// One client slot of the handshake phase.
struct Slot {
    sock: UdpSocket,
    local: SocketAddr,
    conn: Option<quiche::Connection>,
    started: Instant,
    /// A non-Retry packet of the relay arrived for this attempt.
    got_server_packet: bool,
    /// A Retry arrived after such a packet.
    late_retry: bool,
}

fn send_all(conn: &mut quiche::Connection, sock: &UdpSocket, out: &mut [u8]) -> Result<(), quiche::Error> {
    loop {
        match conn.send(out) {
            Ok((n, info)) => {
                if let Some(b) = out.get(..n) {
                    let _ = sock.send_to(b, info.to);
                }
            }
            Err(quiche::Error::Done) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn error_name(conn: &quiche::Connection) -> String {
    if conn.is_timed_out() {
        return "idle timeout".into();
    }
    let show = |side: &str, e: &quiche::ConnectionError| {
        format!(
            "{side} {} {:#x} {}",
            if e.is_app { "app" } else { "transport" },
            e.error_code,
            String::from_utf8_lossy(&e.reason)
        )
    };
    if let Some(e) = conn.peer_error() {
        return show("relay", e);
    }
    if let Some(e) = conn.local_error() {
        return show("client", e);
    }
    "closed".into()
}

/// Runs the handshake phase against `relay` for `duration` with
/// `concurrency` clients presenting `tls`.
pub fn handshake_phase(
    h: &RelayHandle,
    tls: &TlsOptions,
    duration: Duration,
    concurrency: usize,
    progress: bool,
) -> Result<HandshakePhase> {
    let mut qcfg = quic::client_config(tls).map_err(|e| anyhow::anyhow!("client TLS config: {e}"))?;
    let relay = h.local_addr;
    let mut rng = Rng::seeded();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut out = vec![0u8; MAX_UDP_PAYLOAD.max(1500)];
    let mut buf = vec![0u8; 65_536];
    let mut slots = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let sock = UdpSocket::bind(SocketAddr::new(relay.ip(), 0)).context("binding a client socket")?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        slots.push(Slot {
            sock,
            local,
            conn: None,
            started: Instant::now(),
            got_server_packet: false,
            late_retry: false,
        });
    }
    let mut pfds: Vec<libc::pollfd> =
        slots.iter().map(|s| libc::pollfd { fd: s.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let mut r = HandshakePhase { concurrency, ..HandshakePhase::default() };

    let before = h.totals();
    let cpu0 = h.cpu_time();
    let pcpu0 = process_cpu();
    let start = Instant::now();
    let end = start + duration;
    let mut next_progress = start + Duration::from_secs(1);
    let mut last = (start, 0u64);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        for s in &mut slots {
            if s.conn.is_none() {
                let scid = rng.cid();
                let c = quiche::connect(
                    Some("localhost"),
                    &quiche::ConnectionId::from_ref(&scid),
                    s.local,
                    relay,
                    &mut qcfg,
                )
                .map_err(|e| anyhow::anyhow!("quiche::connect: {e}"))?;
                s.conn = Some(c);
                s.started = Instant::now();
                s.got_server_packet = false;
                s.late_retry = false;
                r.started += 1;
            }
            let Some(conn) = s.conn.as_mut() else { continue };
            while let Ok((n, from)) = s.sock.recv_from(&mut buf) {
                if let Some(b) = buf.get_mut(..n) {
                    match quiche::Header::from_slice(b, 16).map(|h| h.ty) {
                        Ok(quiche::Type::Retry) => {
                            r.retries_received += 1;
                            s.late_retry |= s.got_server_packet;
                        }
                        Ok(_) => s.got_server_packet = true,
                        Err(_) => {}
                    }
                    let _ = conn.recv(b, quiche::RecvInfo { from, to: s.local });
                }
            }
            let now = Instant::now();
            if conn.timeout_instant().is_some_and(|t| t <= now) {
                conn.on_timeout();
            }
            if conn.is_established() {
                let took = now.saturating_duration_since(s.started);
                let _ = hist.record((took.as_micros() as u64).max(1));
                r.completed += 1;
                r.retry_after_server_packet += u64::from(s.late_retry);
                if took >= SLOW {
                    r.slow += 1;
                    r.slow_with_retry_after_server_packet += u64::from(s.late_retry);
                }
                // The client's certificate and Finished, then the close:
                // the relay does the whole handshake including verifying
                // the client certificate.
                let _ = send_all(conn, &s.sock, &mut out);
                let _ = conn.close(true, 0, b"bench");
                let _ = send_all(conn, &s.sock, &mut out);
                s.conn = None;
                continue;
            }
            if conn.is_closed() {
                r.failed += 1;
                *r.failures.entry(error_name(conn)).or_default() += 1;
                s.conn = None;
                continue;
            }
            if now.saturating_duration_since(s.started) > GIVE_UP {
                r.abandoned += 1;
                let _ = conn.close(false, 0, b"");
                let _ = send_all(conn, &s.sock, &mut out);
                s.conn = None;
                continue;
            }
            if let Err(e) = send_all(conn, &s.sock, &mut out) {
                r.failed += 1;
                *r.failures.entry(format!("client send: {e}")).or_default() += 1;
                s.conn = None;
            }
        }
        let now = Instant::now();
        if progress && now >= next_progress {
            let dt = now.saturating_duration_since(last.0).as_secs_f64().max(1e-9);
            let _ = writeln!(
                std::io::stderr(),
                "[{:>5.1}s] handshakes {:>8} hs/s {:>8.0} failed {} relay conns_active {}",
                now.saturating_duration_since(start).as_secs_f64(),
                r.completed,
                r.completed.saturating_sub(last.1) as f64 / dt,
                r.failed + r.abandoned,
                h.totals().conns_active
            );
            last = (now, r.completed);
            next_progress += Duration::from_secs(1);
        }
        // Slots whose connection just ended start the next one at once.
        if slots.iter().any(|s| s.conn.is_none()) {
            continue;
        }
        let deadline = slots
            .iter()
            .filter_map(|s| s.conn.as_ref().and_then(quiche::Connection::timeout_instant))
            .chain([end, next_progress])
            .min()
            .unwrap_or(end);
        let wait = deadline.saturating_duration_since(now).min(Duration::from_millis(5));
        for p in &mut pfds {
            p.revents = 0;
        }
        if !wait.is_zero() {
            wait_readable(&mut pfds, wait);
        }
    }
    let elapsed = start.elapsed();
    let cpu1 = h.cpu_time();
    let pcpu1 = process_cpu();
    // Close what is still in flight so the relay does not keep it.
    for s in &mut slots {
        if let Some(conn) = s.conn.as_mut() {
            let _ = conn.close(false, 0, b"");
            let _ = send_all(conn, &s.sock, &mut out);
        }
    }
    // Let the relay read the last closes and count them.
    std::thread::sleep(Duration::from_millis(100));
    let after = h.totals();

    r.duration_secs = elapsed.as_secs_f64();
    r.handshakes_per_sec = r.completed as f64 / r.duration_secs.max(1e-9);
    r.latency = RttSummary::from_histogram(&hist);
    let relay_cpu = cpu1.saturating_sub(cpu0);
    r.relay_cpu_secs = relay_cpu.as_secs_f64();
    if r.completed > 0 {
        r.relay_cpu_us_per_handshake = Some(relay_cpu.as_secs_f64() * 1e6 / r.completed as f64);
    }
    if let (Some(a), Some(b)) = (pcpu0, pcpu1) {
        let client = b.saturating_sub(a).saturating_sub(relay_cpu);
        r.client_cpu_secs = Some(client.as_secs_f64());
        if r.completed > 0 {
            r.client_cpu_us_per_handshake = Some(client.as_secs_f64() * 1e6 / r.completed as f64);
        }
    }
    fill_counters(&before, &after, &mut r.retries_sent, &mut r.conns_accepted, &mut r.drops, &mut r.counters);
    r.handshakes_failed = after.handshakes_failed.saturating_sub(before.handshakes_failed);
    Ok(r)
}
