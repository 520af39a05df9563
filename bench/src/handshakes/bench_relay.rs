//! The in-process relay of this benchmark: its config, its settings as
//! run, and counter deltas.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Result;
use ztna_control::quic::IDLE_TIMEOUT_MS;
use ztna_relay::limits::Limits;
use ztna_relay::security::RetryMode;
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_relay::stats::StatsSnapshot;
use ztna_udp::IoBackend;

use super::report::RelaySettings;
use crate::relay_bench::{bench_policy, counter_deltas, SERVICE};

/// Starts the in-process dev relay of this benchmark: `retry` as given,
/// per-source-IP limits off, workers not pinned (the clients share the
/// cores).
pub fn start_relay(retry: RetryMode, workers: usize, io_backend: IoBackend) -> Result<RelayHandle> {
    let cfg = relay_config(retry, workers, io_backend);
    server::start(&cfg)
}

pub(super) fn relay_config(retry: RetryMode, workers: usize, io_backend: IoBackend) -> RelayConfig {
    RelayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers: Some(workers),
        dev: true,
        io_backend,
        steering: true,
        pin_cores: false,
        shutdown_grace_ms: 500,
        policy_toml: Some(bench_policy(SERVICE)),
        limits: Limits { retry, max_conns_per_ip: 0, handshakes_per_sec_per_ip: 0, ..Limits::default() },
        ..RelayConfig::default()
    }
}

pub(super) fn settings(h: &RelayHandle, cfg: &RelayConfig) -> RelaySettings {
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

pub(super) fn fill_counters(
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
