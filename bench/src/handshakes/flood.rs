//! The flood phase: client Initials that never complete, and the relay's
//! memory and connections under them.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ztna_control::quic::{self, TlsOptions};
use ztna_relay::server::RelayHandle;

use super::bench_relay::fill_counters;
use super::config::{FloodSource, HandshakeConfig};
use super::host::{malloc_trim, rss_kib, udp_rcvbuf_errors};
use super::report::{FloodPhase, FloodSample};
use super::Rng;

/// Memory and gauge sampling interval during the flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Flood sends between drains of the flood sockets' receive queues.
const DRAIN_EVERY: u64 = 1024;
/// Receive buffer asked for on flood sockets (the kernel caps it).
const FLOOD_RCVBUF: usize = 4 << 20;

/// The first datagram of a new client connection (a padded Initial), and
/// how many datagrams its whole first flight has (`count_flight`).
fn first_initial(
    qcfg: &mut quiche::Config,
    rng: &mut Rng,
    local: SocketAddr,
    relay: SocketAddr,
    out: &mut [u8],
    count_flight: bool,
) -> Result<(usize, usize)> {
    let scid = rng.cid();
    let mut c = quiche::connect(Some("localhost"), &quiche::ConnectionId::from_ref(&scid), local, relay, qcfg)
        .map_err(|e| anyhow::anyhow!("quiche::connect: {e}"))?;
    let (n, _) = c.send(out).map_err(|e| anyhow::anyhow!("first send: {e}"))?;
    let mut flight = 1;
    if count_flight {
        let mut more = [0u8; 1500];
        while c.send(&mut more).is_ok() {
            flight += 1;
        }
    }
    Ok((n, flight))
}

struct FloodSockets {
    socks: Vec<UdpSocket>,
    locals: Vec<SocketAddr>,
    rx: u64,
    rx_bytes: u64,
    buf: Vec<u8>,
}

impl FloodSockets {
    fn new(n: usize, ip: std::net::IpAddr) -> Result<Self> {
        let mut socks = Vec::with_capacity(n);
        let mut locals = Vec::with_capacity(n);
        for _ in 0..n {
            let s = UdpSocket::bind(SocketAddr::new(ip, 0)).context("binding a flood socket")?;
            s.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(FLOOD_RCVBUF);
            locals.push(s.local_addr()?);
            socks.push(s);
        }
        Ok(FloodSockets { socks, locals, rx: 0, rx_bytes: 0, buf: vec![0u8; 65_536] })
    }

    /// Reads (and discards) what the relay sent back.
    fn drain(&mut self) {
        for s in &self.socks {
            while let Ok(n) = s.recv(&mut self.buf) {
                self.rx += 1;
                self.rx_bytes += n as u64;
            }
        }
    }
}

/// Runs the flood phase against `relay`.
pub fn flood_phase(h: &RelayHandle, tls: &TlsOptions, cfg: &HandshakeConfig) -> Result<FloodPhase> {
    let mut qcfg = quic::client_config(tls).map_err(|e| anyhow::anyhow!("client TLS config: {e}"))?;
    let relay = h.local_addr;
    let mut rng = Rng::seeded();
    let mut socks = FloodSockets::new(cfg.flood_sockets, relay.ip())?;
    let nsock = socks.socks.len();
    let mut out = vec![0u8; 1500];
    let mut r = FloodPhase {
        source: format!("{:?}", cfg.flood_source).to_lowercase(),
        sockets: nsock,
        ..FloodPhase::default()
    };

    // The pool (or a timing sample for `fresh`).
    let gen_count = match cfg.flood_source {
        FloodSource::Pool => cfg.flood_initials,
        FloodSource::Fresh => 1000,
    };
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let t = Instant::now();
    for i in 0..gen_count {
        let local = socks.locals.get(i % nsock).copied().context("no flood socket")?;
        let (n, flight) = first_initial(&mut qcfg, &mut rng, local, relay, &mut out, i == 0)?;
        if i == 0 {
            r.first_flight_datagrams = flight;
        }
        if cfg.flood_source == FloodSource::Pool {
            pool.push(out.get(..n).context("short Initial")?.to_vec());
        }
        r.initial_bytes = n;
    }
    let gen = t.elapsed();
    r.generation_per_sec = gen_count as f64 / gen.as_secs_f64().max(1e-9);
    if cfg.flood_source == FloodSource::Pool {
        r.generation_secs = gen.as_secs_f64();
        if cfg.progress {
            let _ = writeln!(
                std::io::stderr(),
                "generated {} distinct Initials ({} bytes each) in {:.3} s = {:.0}/s",
                pool.len(),
                r.initial_bytes,
                r.generation_secs,
                r.generation_per_sec
            );
        }
    }

    // Settle, then the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let before = h.totals();
    r.rss_baseline_kib = rss_kib()?;
    let snmp0 = udp_rcvbuf_errors();
    let cpu0 = h.cpu_time();
    let start = Instant::now();
    let end = start + cfg.duration;
    let sample = |r: &mut FloodPhase, sent: u64, t0: Instant| -> Result<FloodSample> {
        let s = h.totals();
        let rss = rss_kib()?;
        r.rss_peak_kib = r.rss_peak_kib.max(rss);
        r.conns_active_peak = r.conns_active_peak.max(s.conns_active);
        let fs = FloodSample {
            t_secs: t0.elapsed().as_secs_f64(),
            rss_kib: rss,
            conns_active: s.conns_active,
            sent,
            relay_packets_rx: s.packets_rx.saturating_sub(before.packets_rx),
        };
        r.samples.push(fs);
        Ok(fs)
    };
    r.rss_peak_kib = r.rss_baseline_kib;
    let mut next_sample = start + SAMPLE_EVERY;
    let mut next_progress = start + Duration::from_secs(1);
    let mut i: u64 = 0;
    let mut sent: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_sample {
            let s = sample(&mut r, sent, start)?;
            next_sample += SAMPLE_EVERY;
            if cfg.progress && now >= next_progress {
                let _ = writeln!(
                    std::io::stderr(),
                    "[{:>5.1}s] flood sent {:>9} relay read {:>9} conns_active {:>7} RSS {:>8} KiB",
                    s.t_secs,
                    sent,
                    s.relay_packets_rx,
                    s.conns_active,
                    s.rss_kib
                );
                next_progress += Duration::from_secs(1);
            }
        }
        for _ in 0..DRAIN_EVERY {
            let k = (i % nsock as u64) as usize;
            let Some(sock) = socks.socks.get(k) else { break };
            let ok = match cfg.flood_source {
                FloodSource::Pool => {
                    let p = (i % pool.len().max(1) as u64) as usize;
                    pool.get(p).is_some_and(|pkt| sock.send_to(pkt, relay).is_ok())
                }
                FloodSource::Fresh => {
                    let local = socks.locals.get(k).copied().context("no flood socket")?;
                    let (n, _) = first_initial(&mut qcfg, &mut rng, local, relay, &mut out, false)?;
                    r.distinct_initials += 1;
                    out.get(..n).is_some_and(|pkt| sock.send_to(pkt, relay).is_ok())
                }
            };
            if ok {
                sent += 1;
            } else {
                r.send_errors += 1;
            }
            i += 1;
        }
        socks.drain();
    }
    let flood_time = start.elapsed();
    let s = sample(&mut r, sent, start)?;
    r.conns_active_end_of_flood = s.conns_active;
    r.rss_end_of_flood_kib = s.rss_kib;
    if cfg.flood_source == FloodSource::Pool {
        r.distinct_initials = (pool.len() as u64).min(sent);
    }

    // Wait for the relay to read its backlog and drop its half-open
    // connections (idle timeout), or `flood_wait`.
    let wait_start = Instant::now();
    let mut last_rx = s.relay_packets_rx;
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        socks.drain();
        let s = sample(&mut r, sent, start)?;
        let quiet = s.relay_packets_rx == last_rx;
        last_rx = s.relay_packets_rx;
        if (s.conns_active == 0 && quiet) || wait_start.elapsed() >= cfg.flood_wait {
            break;
        }
        if cfg.progress && Instant::now() >= next_progress {
            let _ = writeln!(
                std::io::stderr(),
                "[{:>5.1}s] waiting: relay conns_active {:>7} RSS {:>8} KiB",
                s.t_secs,
                s.conns_active,
                s.rss_kib
            );
            next_progress += Duration::from_secs(1);
        }
    }
    r.waited_secs = wait_start.elapsed().as_secs_f64();
    let cpu1 = h.cpu_time();
    let after = h.totals();
    r.conns_active_after = after.conns_active;
    r.rss_after_kib = rss_kib()?;
    drop(pool);
    if malloc_trim() {
        r.rss_after_trim_kib = rss_kib().ok();
    }
    if let (Some(a), Some(b)) = (snmp0, udp_rcvbuf_errors()) {
        r.udp_rcvbuf_errors = Some(b.saturating_sub(a));
    }
    r.duration_secs = flood_time.as_secs_f64();
    r.sent = sent;
    r.sent_per_sec = sent as f64 / r.duration_secs.max(1e-9);
    r.relay_packets_rx = after.packets_rx.saturating_sub(before.packets_rx);
    r.relay_packets_rx_per_sec = r.relay_packets_rx as f64 / r.duration_secs.max(1e-9);
    r.responses_rx = socks.rx;
    r.response_bytes_rx = socks.rx_bytes;
    let relay_cpu = cpu1.saturating_sub(cpu0);
    r.relay_cpu_secs = relay_cpu.as_secs_f64();
    if r.relay_packets_rx > 0 {
        r.relay_cpu_us_per_initial = Some(relay_cpu.as_secs_f64() * 1e6 / r.relay_packets_rx as f64);
    }
    if r.conns_active_peak > 0 {
        let grown = r.rss_peak_kib.saturating_sub(r.rss_baseline_kib) as f64 * 1024.0;
        r.rss_bytes_per_conn = Some(grown / r.conns_active_peak as f64);
    }
    fill_counters(&before, &after, &mut r.retries_sent, &mut r.conns_accepted, &mut r.drops, &mut r.counters);
    Ok(r)
}
