//! Small network tools for end-to-end tests: `echo` (UDP + TCP echo
//! servers until a signal), `udp-probe` (datagrams to an echo service,
//! echoes counted) and `tcp-probe` (a byte stream through a TCP echo
//! service, verified byte for byte).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztna_testkit::echo::EchoServer;

/// Runs UDP and TCP echo on `udp` and `tcp` until `stop` is set; prints
/// `echo udp ADDR tcp ADDR` once listening.
pub fn echo(udp: SocketAddr, tcp: SocketAddr, stop: &AtomicBool) -> Result<()> {
    let e = EchoServer::start(udp, tcp).with_context(|| format!("echo on udp {udp} tcp {tcp}"))?;
    println!("echo udp {} tcp {}", e.udp_addr, e.tcp_addr);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "echo stats udp_datagrams={} tcp_connections={} tcp_bytes={}",
        e.stats.udp_datagrams.load(Ordering::Relaxed),
        e.stats.tcp_connections.load(Ordering::Relaxed),
        e.stats.tcp_bytes.load(Ordering::Relaxed)
    );
    Ok(())
}

/// What `udp-probe` saw.
#[derive(Debug, Clone, Serialize)]
pub struct UdpProbeReport {
    pub sent: u64,
    pub received: u64,
    pub rtt_avg_ms: f64,
    pub rtt_max_ms: f64,
}

impl UdpProbeReport {
    pub fn line(&self) -> String {
        format!(
            "udp-probe sent={} received={} rtt_avg_ms={:.2} rtt_max_ms={:.2}",
            self.sent, self.received, self.rtt_avg_ms, self.rtt_max_ms
        )
    }
}

/// Sends `count` datagrams of `size` bytes (at least 8), one every
/// `interval`, to a UDP echo service; waits up to `wait` after the last one
/// and counts distinct, intact echoes.
pub fn udp_probe(
    to: SocketAddr,
    count: u32,
    size: usize,
    interval: Duration,
    wait: Duration,
) -> Result<UdpProbeReport> {
    let size = size.max(8);
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let s = UdpSocket::bind(bind)?;
    s.connect(to).with_context(|| format!("connecting to {to}"))?;
    s.set_nonblocking(true)?;
    // Tags this run's datagrams: stray or stale echoes do not count.
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let nonce = std::process::id().rotate_left(16) ^ clock.subsec_nanos();
    let payload = |seq: u32, out: &mut Vec<u8>| {
        out.clear();
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&nonce.to_be_bytes());
        out.extend((8..size).map(|i| (i as u32 ^ seq) as u8));
    };
    let start = Instant::now();
    let mut sent_at: Vec<Option<Instant>> = vec![None; count as usize];
    let mut seen = vec![false; count as usize];
    let (mut received, mut rtt_sum, mut rtt_max) = (0u64, 0.0f64, 0.0f64);
    let (mut out, mut buf, mut expect) = (Vec::with_capacity(size), vec![0u8; 65_536], Vec::with_capacity(size));
    let mut next = 0u32;
    let mut deadline = None;
    loop {
        let now = Instant::now();
        if next < count && now >= start + interval * next {
            payload(next, &mut out);
            // A send error (no route yet, ICMP unreachable) is a loss.
            let _ = s.send(&out);
            if let Some(t) = sent_at.get_mut(next as usize) {
                *t = Some(now);
            }
            next += 1;
            if next == count {
                deadline = Some(now + wait);
            }
        }
        while let Ok(n) = s.recv(&mut buf) {
            let Some(d) = buf.get(..n) else { continue };
            let (Some(seq), Some(tag)) = (d.get(..4), d.get(4..8)) else { continue };
            let seq = u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]);
            if tag != nonce.to_be_bytes() || seq >= count {
                continue;
            }
            payload(seq, &mut expect);
            let (Some(seen), Some(Some(t0))) = (seen.get_mut(seq as usize), sent_at.get(seq as usize)) else {
                continue;
            };
            if *seen || d != expect.as_slice() {
                continue;
            }
            *seen = true;
            received += 1;
            let rtt = t0.elapsed().as_secs_f64() * 1e3;
            rtt_sum += rtt;
            rtt_max = rtt_max.max(rtt);
        }
        if received == u64::from(count) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let rtt_avg_ms = if received > 0 { rtt_sum / received as f64 } else { 0.0 };
    Ok(UdpProbeReport { sent: u64::from(next), received, rtt_avg_ms, rtt_max_ms: rtt_max })
}

/// What `tcp-probe` saw.
#[derive(Debug, Clone, Serialize)]
pub struct TcpProbeReport {
    pub bytes: u64,
    pub echoed: u64,
    pub verified: bool,
    pub elapsed_ms: u64,
}

impl TcpProbeReport {
    pub fn line(&self) -> String {
        let mbit = if self.elapsed_ms > 0 { self.echoed as f64 * 8.0 / (self.elapsed_ms as f64 * 1e3) } else { 0.0 };
        format!(
            "tcp-probe bytes={} echoed={} verified={} elapsed_ms={} mbit_s={mbit:.1}",
            self.bytes, self.echoed, self.verified, self.elapsed_ms
        )
    }
}

/// The byte at offset `i` of the probe stream (position-dependent, so a
/// lost, duplicated or reordered segment shows).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Connects to a TCP echo service, writes `bytes` bytes of a known pattern
/// (at most `rate` bytes per second when given, so the stream can span an
/// event such as a relay drain) while reading the echo back, and verifies
/// every byte. Gives up after `timeout` (the report then says how far it
/// got).
pub fn tcp_probe(to: SocketAddr, bytes: u64, rate: Option<u64>, timeout: Duration) -> Result<TcpProbeReport> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, timeout.min(Duration::from_secs(10)))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    w.set_write_timeout(Some(timeout))?;
    let writer = std::thread::Builder::new().name("tcp-probe-tx".into()).spawn(move || -> std::io::Result<()> {
        let mut chunk = vec![0u8; if rate.is_some() { 8 * 1024 } else { 64 * 1024 }];
        let mut off = 0u64;
        while off < bytes {
            if let Some(r) = rate.filter(|r| *r > 0) {
                let due = start + Duration::from_secs_f64(off as f64 / r as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            let n = (bytes - off).min(chunk.len() as u64) as usize;
            for (k, b) in chunk.iter_mut().take(n).enumerate() {
                *b = pattern(off + k as u64);
            }
            w.write_all(chunk.get(..n).unwrap_or_default())?;
            off += n as u64;
        }
        w.shutdown(Shutdown::Write)
    })?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut echoed, mut verified) = (0u64, true);
    while echoed < bytes {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let got = buf.get(..n).unwrap_or_default();
                if got.iter().enumerate().any(|(k, b)| *b != pattern(echoed + k as u64)) {
                    verified = false;
                    echoed += n as u64;
                    break;
                }
                echoed += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    let wrote = writer.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
    let verified = verified && echoed == bytes && wrote.is_ok();
    Ok(TcpProbeReport { bytes, echoed, verified, elapsed_ms: start.elapsed().as_millis() as u64 })
}

/// Fails unless the UDP probe got at least `min` echoes.
pub fn check_udp(r: &UdpProbeReport, min: u64) -> Result<()> {
    if r.received < min {
        bail!("{} of {} echoes, wanted at least {min}", r.received, r.sent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_against_local_echo() {
        let e = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let r = udp_probe(e.udp_addr, 20, 200, Duration::from_millis(1), Duration::from_secs(2)).unwrap();
        assert_eq!((r.sent, r.received), (20, 20), "{}", r.line());
        assert!(check_udp(&r, 20).is_ok());
        let t = tcp_probe(e.tcp_addr, 3_000_000, None, Duration::from_secs(20)).unwrap();
        assert!(t.verified, "{}", t.line());
        assert_eq!(t.echoed, 3_000_000);
    }

    #[test]
    fn udp_probe_counts_losses() {
        // Nothing listens: every datagram is lost.
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = s.local_addr().unwrap();
        drop(s);
        let r = udp_probe(to, 5, 64, Duration::from_millis(1), Duration::from_millis(100)).unwrap();
        assert_eq!((r.sent, r.received), (5, 0));
        assert!(check_udp(&r, 1).is_err());
    }
}
