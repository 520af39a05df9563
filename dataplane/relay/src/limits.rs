//! The relay's limits: one struct, read from the `[limits]` table of the
//! config file (every key optional, defaults below; SECURITY.md lists them
//! with their reasons) and used by the workers as it is. Each limit is
//! counted when hit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::security::RetryMode;

/// Per-relay limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per worker.
    pub max_conns_per_worker: usize,
    /// Registrations (agent flows + connector services) per connection.
    pub max_registrations: usize,
    /// Flow-table entries per connection (connector legs included).
    pub max_flows_per_conn: usize,
    /// Unsent control bytes the relay keeps for a client that does not read.
    pub max_control_backlog: usize,
    /// Register/Unregister operations per second per connection (sustained;
    /// bursts up to `max_registrations`). Beyond it: RegisterError{limit}.
    pub registrations_per_sec: u32,
    /// Cross-worker data queue depth per worker (datagrams).
    pub data_queue_depth: usize,
    /// Cross-worker control queue depth per worker (messages).
    pub ctrl_queue_depth: usize,
    /// Open connections over all workers.
    pub max_conns: usize,
    /// Open connections per source IP (IPv6: per /64). 0 = unlimited.
    pub max_conns_per_ip: u32,
    /// New handshakes per second per source IP. 0 = unlimited.
    pub handshakes_per_sec_per_ip: u32,
    /// When new connections must first prove their address with Retry:
    /// "always", "auto" (above `retry_above_handshakes_per_sec`, or when
    /// the memory budget is half used) or "off".
    pub retry: RetryMode,
    /// `RetryMode::Auto`: new handshakes per second per worker above which
    /// Retry is required.
    pub retry_above_handshakes_per_sec: u32,
    /// Datagrams per second (sustained, one second of burst) a connection
    /// without connector registrations may send. 0 = unlimited.
    pub agent_datagrams_per_sec: u32,
    /// Payload bytes per second for the same.
    pub agent_bytes_per_sec: u64,
    /// Datagrams per second a connector connection may send.
    pub connector_datagrams_per_sec: u32,
    /// Payload bytes per second for the same.
    pub connector_bytes_per_sec: u64,
    /// Stateless resets per second per worker.
    pub stateless_resets_per_sec: u32,
    /// A connection that has not completed its handshake this long after
    /// its first Initial is dropped silently (half-open flood protection;
    /// the QUIC idle timeout alone would keep it 30 s).
    pub handshake_timeout_ms: u64,
    /// Memory budget in MiB over everything peers make the relay hold
    /// (`budget.rs`). 0 = 60 % of the cgroup memory limit when there is
    /// one, else 1024.
    pub memory_budget_mib: u64,
    /// Authenticated connections per client identity, relay-wide. 0 =
    /// unlimited.
    pub max_conns_per_identity: u32,
    /// Bytes a connection's DATAGRAM send queue may hold; a datagram that
    /// would exceed it is dropped (`drop_dgram_queue_full`), so a receiver
    /// that stops acknowledging loses only its own datagrams.
    pub max_dgram_queue_bytes: usize,
    /// Congestion control of the relay's connections: "cubic" (default)
    /// or "bbr2". Only BBR2 paces in quiche (its `SendInfo.at` lies
    /// ahead); the workers hold a connection's sending until then
    /// (`paced_holds`), so forwarded bursts leave spaced over the RTT.
    pub congestion_control: CongestionControl,
}

/// The congestion controllers quiche offers the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CongestionControl {
    Cubic,
    Bbr2,
}

impl CongestionControl {
    pub fn quiche(self) -> quiche::CongestionControlAlgorithm {
        match self {
            CongestionControl::Cubic => quiche::CongestionControlAlgorithm::CUBIC,
            CongestionControl::Bbr2 => quiche::CongestionControlAlgorithm::Bbr2Gcongestion,
        }
    }
}

impl Limits {
    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns_per_worker: 50_000,
            max_registrations: 64,
            max_flows_per_conn: 65_536,
            max_control_backlog: 256 * 1024,
            registrations_per_sec: 10,
            data_queue_depth: 8192,
            ctrl_queue_depth: 65_536,
            max_conns: 100_000,
            max_conns_per_ip: 1000,
            handshakes_per_sec_per_ip: 100,
            retry: RetryMode::Auto,
            retry_above_handshakes_per_sec: 200,
            agent_datagrams_per_sec: 100_000,
            agent_bytes_per_sec: 125_000_000,
            connector_datagrams_per_sec: 1_000_000,
            connector_bytes_per_sec: 1_250_000_000,
            stateless_resets_per_sec: 100,
            handshake_timeout_ms: 10_000,
            memory_budget_mib: 0,
            max_conns_per_identity: crate::security::DEFAULT_MAX_CONNS_PER_IDENTITY,
            max_dgram_queue_bytes: 256 * 1024,
            congestion_control: CongestionControl::Cubic,
        }
    }
}
