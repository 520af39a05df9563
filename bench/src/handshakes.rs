//! `ztna-bench handshakes`: the relay's handshake rate with Retry on and
//! off, and its memory under a flood of Initials that never complete.
//!
//! Both phases run against a relay started in this process (dev PKI,
//! 127.0.0.1) with the per-source-IP limits switched off
//! (`max_conns_per_ip = 0`, `handshakes_per_sec_per_ip = 0`): every client
//! comes from 127.0.0.1, so those limits would cap the measurement instead
//! of the relay's handshake path.
//!
//! - Handshake phase: `concurrency` bare quiche clients, one UDP socket
//!   each, each doing a full mutual-TLS handshake with the bench agent's
//!   certificate. A handshake counts when the client is established; the
//!   client then sends its last flight (certificate, Finished) and a
//!   CONNECTION_CLOSE and the slot starts the next one.
//! - Flood phase: client Initials (padded to 1200 bytes) from a pool of UDP
//!   sockets, as fast as one thread can send, never answering the relay.
//!   The Initials are generated up front (a fresh quiche connection each,
//!   timed) and replayed: rewriting the DCID of a finished Initial is not
//!   possible, since the Initial keys derive from it. With `fresh` every
//!   packet is a new connection's first flight instead (slower to send).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use ztna_control::quic::{self, TlsOptions, IDLE_TIMEOUT_MS, MAX_UDP_PAYLOAD};
use ztna_dataplane::io::IoBackend;
use ztna_dataplane::relay::{self, LimitsConfig, RelayConfig, RelayHandle};
use ztna_dataplane::security::RetryMode;
use ztna_dataplane::stats::StatsSnapshot;

use crate::cpu;
use crate::load::{wait_readable, RttSummary};
use crate::relay_bench::{bench_policy, counter_deltas, dev_tls, SERVICE};

/// A client handshake that has not completed after this long is abandoned.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Handshakes at least this slow are counted apart (with their causes).
const SLOW: Duration = Duration::from_millis(100);
/// Memory and gauge sampling interval during the flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Flood sends between drains of the flood sockets' receive queues.
const DRAIN_EVERY: u64 = 1024;
/// Receive buffer asked for on flood sockets (the kernel caps it).
const FLOOD_RCVBUF: usize = 4 << 20;

/// Where flood packets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloodSource {
    /// Generate `flood_initials` distinct Initials first, then replay them
    /// round-robin (each always from the same socket).
    Pool,
    /// A new quiche connection per packet, generated while sending.
    Fresh,
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeConfig {
    /// One run (fresh relay) per mode.
    pub modes: Vec<RetryModeName>,
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
    pub concurrency: usize,
    /// Relay worker threads.
    pub workers: usize,
    pub io_backend: IoBackend,
    pub flood: bool,
    pub flood_source: FloodSource,
    /// Distinct Initials generated for `FloodSource::Pool`.
    pub flood_initials: usize,
    /// UDP sockets (source ports) the flood uses.
    pub flood_sockets: usize,
    /// Longest wait after the flood for the relay to drop its half-open
    /// connections (its handshake timeout is the idle timeout).
    #[serde(serialize_with = "ser_secs")]
    pub flood_wait: Duration,
    /// Progress lines on stderr.
    #[serde(skip)]
    pub progress: bool,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A [`RetryMode`] that serialises as its config spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RetryModeName {
    Always,
    Auto,
    Off,
}

impl RetryModeName {
    pub fn mode(self) -> RetryMode {
        match self {
            RetryModeName::Always => RetryMode::Always,
            RetryModeName::Auto => RetryMode::Auto,
            RetryModeName::Off => RetryMode::Off,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RetryModeName::Always => "always",
            RetryModeName::Auto => "auto",
            RetryModeName::Off => "off",
        }
    }
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            modes: vec![RetryModeName::Always, RetryModeName::Off],
            duration: Duration::from_secs(5),
            concurrency: 16,
            workers: 1,
            io_backend: IoBackend::Auto,
            flood: false,
            flood_source: FloodSource::Pool,
            flood_initials: 20_000,
            flood_sockets: 64,
            flood_wait: Duration::from_millis(IDLE_TIMEOUT_MS) + Duration::from_secs(5),
            progress: true,
        }
    }
}

impl HandshakeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.modes.is_empty() {
            bail!("no Retry mode to run");
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        if self.concurrency == 0 || self.concurrency > 4096 {
            bail!("--concurrency must be between 1 and 4096");
        }
        if self.workers == 0 || self.workers > 255 {
            bail!("--workers must be between 1 and 255");
        }
        if self.flood && (self.flood_sockets == 0 || self.flood_sockets > 4096) {
            bail!("--flood-sockets must be between 1 and 4096");
        }
        if self.flood && self.flood_source == FloodSource::Pool && self.flood_initials == 0 {
            bail!("--flood-initials must be positive");
        }
        Ok(())
    }
}

/// The relay's settings as run (the same for every mode but `retry`).
#[derive(Debug, Clone, Serialize)]
pub struct RelaySettings {
    pub address: String,
    pub workers: usize,
    pub io_backend: String,
    pub steering: bool,
    pub pin_cores: bool,
    pub retry: String,
    pub retry_above_handshakes_per_sec: u32,
    pub max_conns: usize,
    pub max_conns_per_worker: usize,
    pub max_conns_per_ip: u32,
    pub handshakes_per_sec_per_ip: u32,
    pub idle_timeout_ms: u64,
}

/// Handshake phase results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HandshakePhase {
    pub duration_secs: f64,
    pub concurrency: usize,
    /// Client connections started (completed + failed + abandoned + in
    /// flight at the end).
    pub started: u64,
    pub completed: u64,
    pub handshakes_per_sec: f64,
    /// Closed before completing (see `failures`).
    pub failed: u64,
    /// Not complete after 5 s, abandoned.
    pub abandoned: u64,
    /// Client-side close reasons of failed handshakes.
    pub failures: BTreeMap<String, u64>,
    /// Connect to established, at the client.
    pub latency: RttSummary,
    /// Retry packets the clients received.
    pub retries_received: u64,
    /// Completed handshakes whose client received a Retry after another
    /// packet of the relay (the client ignores it). Usually the relay's
    /// Retry for the second Initial datagram of the first flight, sent after
    /// the packets of the connection the first Retry led to; with Retry
    /// auto also a Retry and an accept for the same attempt.
    pub retry_after_server_packet: u64,
    /// Completed handshakes that took at least 100 ms, and of those the
    /// ones with a Retry after a server packet.
    pub slow: u64,
    pub slow_with_retry_after_server_packet: u64,
    pub relay_cpu_secs: f64,
    pub relay_cpu_us_per_handshake: Option<f64>,
    /// This process less the relay's workers: the clients.
    pub client_cpu_secs: Option<f64>,
    pub client_cpu_us_per_handshake: Option<f64>,
    pub retries_sent: u64,
    pub conns_accepted: u64,
    pub handshakes_failed: u64,
    /// Non-zero drop counters (deltas).
    pub drops: BTreeMap<String, u64>,
    /// Other non-zero counters (deltas; conns_active is its end value).
    pub counters: BTreeMap<String, u64>,
}

/// One memory / gauge reading during the flood.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FloodSample {
    pub t_secs: f64,
    pub rss_kib: u64,
    pub conns_active: u64,
    pub sent: u64,
    pub relay_packets_rx: u64,
}

/// Flood phase results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FloodPhase {
    pub source: String,
    pub sockets: usize,
    /// Distinct Initials (distinct DCIDs) sent.
    pub distinct_initials: u64,
    /// Time to generate the pool (Pool), or 0.
    pub generation_secs: f64,
    /// Initials one thread generates per second (a quiche client each).
    pub generation_per_sec: f64,
    /// Bytes of one Initial datagram (all ≥ 1200).
    pub initial_bytes: usize,
    /// Datagrams of a client's whole first flight (the ClientHello may
    /// need more than one Initial); the flood sends only the first.
    pub first_flight_datagrams: usize,
    pub duration_secs: f64,
    pub sent: u64,
    pub sent_per_sec: f64,
    pub send_errors: u64,
    /// Datagrams the relay read during the flood and the wait (the rest
    /// overflowed its socket buffer).
    pub relay_packets_rx: u64,
    pub relay_packets_rx_per_sec: f64,
    /// Kernel UDP receive-buffer overflows (whole host, /proc/net/snmp).
    pub udp_rcvbuf_errors: Option<u64>,
    /// Datagrams and bytes the relay sent back to the flood sockets (what
    /// we read; a reflection measure).
    pub responses_rx: u64,
    pub response_bytes_rx: u64,
    pub relay_cpu_secs: f64,
    /// Relay CPU per Initial it read, microseconds.
    pub relay_cpu_us_per_initial: Option<f64>,
    pub conns_active_peak: u64,
    pub conns_active_end_of_flood: u64,
    pub conns_active_after: u64,
    /// How long we waited after the flood for the relay to settle.
    pub waited_secs: f64,
    pub rss_baseline_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_end_of_flood_kib: u64,
    pub rss_after_kib: u64,
    /// After malloc_trim(0) (glibc keeps freed memory otherwise).
    pub rss_after_trim_kib: Option<u64>,
    /// (peak RSS - baseline) / peak conns_active, bytes.
    pub rss_bytes_per_conn: Option<f64>,
    pub retries_sent: u64,
    pub conns_accepted: u64,
    pub drops: BTreeMap<String, u64>,
    pub counters: BTreeMap<String, u64>,
    pub samples: Vec<FloodSample>,
}

/// One Retry mode: its relay, handshake phase and flood phase.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    pub retry: String,
    pub relay: RelaySettings,
    pub handshake: HandshakePhase,
    pub flood: Option<FloodPhase>,
    pub notes: Vec<String>,
}

/// Everything `ztna-bench handshakes` measured.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    pub config: HandshakeConfig,
    pub runs: Vec<ModeRun>,
    pub notes: Vec<String>,
}

/// A small non-cryptographic generator for client CIDs (control's
/// SplitMix64, seeded from the clock and pid).
pub struct Rng(ztna_control::rng::SplitMix64);

impl Rng {
    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng(ztna_control::rng::SplitMix64::new(t ^ (u64::from(std::process::id()) << 32)))
    }

    pub fn cid(&mut self) -> [u8; 16] {
        let mut c = [0u8; 16];
        self.0.fill(&mut c);
        c
    }
}

/// Resident set size of this process (VmRSS), KiB.
pub fn rss_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/self/status")
}

/// Host-wide UDP receive-buffer errors (/proc/net/snmp, `Udp:` RcvbufErrors).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = s.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Returns freed heap memory to the kernel (glibc only).
fn malloc_trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Starts the in-process dev relay of this benchmark: `retry` as given,
/// per-source-IP limits off, workers not pinned (the clients share the
/// cores).
pub fn start_relay(retry: RetryMode, workers: usize, io_backend: IoBackend) -> Result<RelayHandle> {
    let cfg = relay_config(retry, workers, io_backend);
    relay::start(&cfg)
}

fn relay_config(retry: RetryMode, workers: usize, io_backend: IoBackend) -> RelayConfig {
    RelayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers: Some(workers),
        dev: true,
        io_backend,
        steering: true,
        pin_cores: false,
        shutdown_grace_ms: 500,
        policy_toml: Some(bench_policy(SERVICE)),
        limits: LimitsConfig { retry, max_conns_per_ip: 0, handshakes_per_sec_per_ip: 0, ..LimitsConfig::default() },
        ..RelayConfig::default()
    }
}

fn settings(h: &RelayHandle, cfg: &RelayConfig) -> RelaySettings {
    let l = &cfg.limits;
    RelaySettings {
        address: h.local_addr.to_string(),
        workers: cfg.worker_count(),
        io_backend: format!("{:?}", h.backend).to_lowercase(),
        steering: h.steering,
        pin_cores: cfg.pin_cores,
        retry: format!("{:?}", l.retry).to_lowercase(),
        retry_above_handshakes_per_sec: l.retry_above_handshakes_per_sec,
        max_conns: l.max_conns,
        max_conns_per_worker: l.max_conns_per_worker,
        max_conns_per_ip: l.max_conns_per_ip,
        handshakes_per_sec_per_ip: l.handshakes_per_sec_per_ip,
        idle_timeout_ms: IDLE_TIMEOUT_MS,
    }
}

fn process_cpu() -> Option<Duration> {
    cpu::process_cpu_time(std::process::id()).ok()
}

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

fn fill_counters(
    before: &StatsSnapshot,
    after: &StatsSnapshot,
    retries: &mut u64,
    accepted: &mut u64,
    drops: &mut BTreeMap<String, u64>,
    counters: &mut BTreeMap<String, u64>,
) {
    *retries = after.retries_sent.saturating_sub(before.retries_sent);
    *accepted = after.conns_accepted.saturating_sub(before.conns_accepted);
    let (d, c) = counter_deltas(before, after);
    *drops = d;
    *counters = c;
}

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

/// Runs one Retry mode on a fresh relay (another for the flood).
pub fn run_mode(mode: RetryModeName, cfg: &HandshakeConfig) -> Result<ModeRun> {
    let rcfg = relay_config(mode.mode(), cfg.workers, cfg.io_backend);
    let h = relay::start(&rcfg)?;
    let relay = settings(&h, &rcfg);
    if cfg.progress {
        let _ = writeln!(std::io::stderr(), "retry={}: handshake phase, {:?}", mode.name(), cfg.duration);
    }
    let hs =
        dev_tls(&h).and_then(|(agent, _)| handshake_phase(&h, &agent, cfg.duration, cfg.concurrency, cfg.progress));
    h.shutdown();
    let handshake = hs?;
    let mut notes = Vec::new();
    if handshake.failed + handshake.abandoned > 0 {
        notes.push(format!(
            "{} handshakes failed and {} were abandoned: {:?}",
            handshake.failed, handshake.abandoned, handshake.failures
        ));
    }
    if handshake.completed > 0 && handshake.retries_sent > handshake.completed + handshake.completed / 2 {
        notes.push(format!(
            "{:.2} Retries per completed handshake: the relay answers every tokenless Initial datagram, \
             and the client's ClientHello spans more than one",
            handshake.retries_sent as f64 / handshake.completed as f64
        ));
    }
    if handshake.handshakes_failed > 0 {
        notes.push(format!("the relay counted {} failed handshakes", handshake.handshakes_failed));
    }
    let flood = if cfg.flood {
        if cfg.progress {
            let _ = writeln!(std::io::stderr(), "retry={}: flood phase, {:?}", mode.name(), cfg.duration);
        }
        let h = relay::start(&rcfg)?;
        let f = dev_tls(&h).and_then(|(agent, _)| flood_phase(&h, &agent, cfg));
        h.shutdown();
        let f = f?;
        if f.conns_active_after > 0 {
            notes.push(format!(
                "flood: {} half-open connections still open after waiting {:.1} s",
                f.conns_active_after, f.waited_secs
            ));
        }
        if cfg.flood_source == FloodSource::Pool && f.sent > f.distinct_initials {
            let what = if mode == RetryModeName::Always {
                "each replay gets its own Retry (stateless), so replaying costs the relay as much as new Initials"
            } else {
                "replays of a DCID the relay already holds reach that connection instead of creating one, \
                 so at most that many connections can be created"
            };
            notes.push(format!(
                "flood: {} distinct Initials replayed {:.1} times each; {what}",
                f.distinct_initials,
                f.sent as f64 / f.distinct_initials.max(1) as f64
            ));
        }
        if f.first_flight_datagrams > 1 && mode != RetryModeName::Off {
            notes.push(format!(
                "the client's first flight is {} Initial datagrams (large ClientHello key share); the relay \
                 answers each tokenless one with its own Retry",
                f.first_flight_datagrams
            ));
        }
        Some(f)
    } else {
        None
    };
    Ok(ModeRun { retry: mode.name().into(), relay, handshake, flood, notes })
}

/// Runs every configured mode.
pub fn run(cfg: &HandshakeConfig) -> Result<HandshakeReport> {
    cfg.validate()?;
    let mut runs = Vec::new();
    for &m in &cfg.modes {
        runs.push(run_mode(m, cfg)?);
    }
    let notes = vec![
        "per-source-IP limits off (max_conns_per_ip = 0, handshakes_per_sec_per_ip = 0): every client is 127.0.0.1"
            .to_owned(),
        "relay and clients share this process and its cores; RSS is the whole process".to_owned(),
    ];
    Ok(HandshakeReport { config: cfg.clone(), runs, notes })
}

fn kib(v: u64) -> String {
    format!("{:.1} MiB", v as f64 / 1024.0)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.prec$}"))
}

impl HandshakeReport {
    /// The human summary.
    pub fn print(&self) {
        let c = &self.config;
        println!(
            "handshakes: {} s per phase, concurrency {}, relay workers {}, flood {}",
            c.duration.as_secs_f64(),
            c.concurrency,
            c.workers,
            if c.flood { "on" } else { "off" }
        );
        if let Some(r) = self.runs.first() {
            println!(
                "relay: {} backend {} steering {} max_conns {} (per worker {}), per-IP limits off, idle timeout {} ms",
                r.relay.address,
                r.relay.io_backend,
                r.relay.steering,
                r.relay.max_conns,
                r.relay.max_conns_per_worker,
                r.relay.idle_timeout_ms
            );
        }
        println!();
        println!(
            "{:<8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9} {:>9} {:>7}",
            "retry",
            "completed",
            "hs/s",
            "p50 us",
            "p99 us",
            "max us",
            "relay us/hs",
            "client us/hs",
            "retries",
            "accepted",
            "failed"
        );
        for r in &self.runs {
            let x = &r.handshake;
            println!(
                "{:<8} {:>9} {:>9.0} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9} {:>9} {:>7}",
                r.retry,
                x.completed,
                x.handshakes_per_sec,
                x.latency.p50_us,
                x.latency.p99_us,
                x.latency.max_us,
                opt(x.relay_cpu_us_per_handshake, 1),
                opt(x.client_cpu_us_per_handshake, 1),
                x.retries_sent,
                x.conns_accepted,
                x.failed + x.abandoned
            );
        }
        for r in &self.runs {
            if !r.handshake.drops.is_empty() {
                println!("{:<8} handshake drops: {:?}", r.retry, r.handshake.drops);
            }
        }
        if self.runs.iter().any(|r| r.flood.is_some()) {
            println!();
            println!(
                "{:<8} {:>9} {:>10} {:>10} {:>10} {:>8} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8}",
                "flood",
                "distinct",
                "sent/s",
                "relay rx/s",
                "us/Initial",
                "retries",
                "peak",
                "after",
                "RSS base",
                "RSS peak",
                "RSS after",
                "after trim",
                "B/conn"
            );
            for r in &self.runs {
                let Some(f) = &r.flood else { continue };
                println!(
                    "{:<8} {:>9} {:>10.0} {:>10.0} {:>10} {:>8} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8}",
                    r.retry,
                    f.distinct_initials,
                    f.sent_per_sec,
                    f.relay_packets_rx_per_sec,
                    opt(f.relay_cpu_us_per_initial, 2),
                    f.retries_sent,
                    f.conns_active_peak,
                    f.conns_active_after,
                    kib(f.rss_baseline_kib),
                    kib(f.rss_peak_kib),
                    kib(f.rss_after_kib),
                    f.rss_after_trim_kib.map_or("-".to_owned(), kib),
                    opt(f.rss_bytes_per_conn, 0)
                );
            }
            for r in &self.runs {
                let Some(f) = &r.flood else { continue };
                println!(
                    "{:<8} flood: {} sent in {:.2} s, relay read {} ({} host UDP rcvbuf errors), \
                     generation {:.0} Initials/s (client first flight: {} datagrams, the flood sends the first), {} responses / {} bytes back ({:.2} bytes per Initial byte sent), \
                     accepted {}, waited {:.1} s",
                    r.retry,
                    f.sent,
                    f.duration_secs,
                    f.relay_packets_rx,
                    f.udp_rcvbuf_errors.map_or("?".to_owned(), |v| v.to_string()),
                    f.generation_per_sec,
                    f.first_flight_datagrams,
                    f.responses_rx,
                    f.response_bytes_rx,
                    f.response_bytes_rx as f64 / (f.relay_packets_rx as f64 * f.initial_bytes as f64).max(1.0),
                    f.conns_accepted,
                    f.waited_secs
                );
                if !f.drops.is_empty() {
                    println!("{:<8} flood drops: {:?}", r.retry, f.drops);
                }
            }
        }
        for r in &self.runs {
            for n in &r.notes {
                println!("note: retry={}: {n}", r.retry);
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
