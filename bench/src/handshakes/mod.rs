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

mod bench_relay;
mod config;
mod flood;
mod handshake;
mod host;
mod report;

pub use bench_relay::start_relay;
pub use config::{FloodSource, HandshakeConfig, RetryModeName};
pub use flood::flood_phase;
pub use handshake::handshake_phase;
pub use host::{rss_kib, udp_rcvbuf_errors};
pub use report::{FloodPhase, FloodSample, HandshakePhase, HandshakeReport, ModeRun, RelaySettings};

use std::io::Write;

use anyhow::Result;
use ztna_relay::server;

use crate::relay_bench::dev_tls;
use bench_relay::{relay_config, settings};

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

/// Runs one Retry mode on a fresh relay (another for the flood).
pub fn run_mode(mode: RetryModeName, cfg: &HandshakeConfig) -> Result<ModeRun> {
    let rcfg = relay_config(mode.mode(), cfg.workers, cfg.io_backend);
    let h = server::start(&rcfg)?;
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
        let h = server::start(&rcfg)?;
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
