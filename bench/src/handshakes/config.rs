//! What `ztna-bench handshakes` runs: modes, durations, the flood.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use ztna_control::quic::IDLE_TIMEOUT_MS;
use ztna_relay::security::RetryMode;
use ztna_udp::IoBackend;

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
