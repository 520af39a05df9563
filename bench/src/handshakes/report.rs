//! The results of both phases and their human summary.

use std::collections::BTreeMap;

use serde::Serialize;

use super::config::HandshakeConfig;
use crate::load::RttSummary;

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
