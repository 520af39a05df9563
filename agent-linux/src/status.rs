//! What the agent holds, for an operator: its relay session (address,
//! connected, the address the relay observed, the last failure) and per
//! service its relay flow, the connector the relay bound it to, the
//! end-to-end session's state and its path. Printed as `status {JSON}` on
//! SIGUSR1 and at exit, and served at `GET /status` when `status` is
//! configured, with the counters at `GET /metrics` (Prometheus).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};
use ztna_agent::agent_core::AgentCore;
use ztna_control::e2e::path_telemetry::{count_state, render_path_states};
use ztna_udp::offload::OffloadSnapshot;

use crate::agent::IoStats;

/// What the HTTP listener serves: the latest status document and metrics
/// (refreshed by the loop about once a second).
#[derive(Debug, Default)]
pub struct Published {
    pub status: String,
    pub metrics: String,
}

pub type StatusBoard = Arc<Mutex<Published>>;

/// The status document of `core` (one line of JSON).
pub fn status_json(core: &AgentCore, started: Instant, now: Instant) -> String {
    let services: Vec<Value> = core
        .tunnel_status()
        .into_iter()
        .map(|t| {
            json!({
                "service": t.service,
                "flow": t.flow,
                "connector": t.connector,
                "session": t.session.as_str(),
                "proven": t.proven,
                "stalled": t.stalled,
                "via": if t.direct.is_some() { "direct" } else { "relay" },
                "path_state": t.path_state.map(|p| p.as_str()),
                "direct": t.direct.map(|a| a.to_string()),
                "paths": t.paths.map(|c| json!({
                    "rounds": c.rounds,
                    "rounds_direct": c.rounds_direct,
                    "rounds_failed": c.rounds_failed,
                    "probes": c.probes,
                    "to_direct": c.to_direct,
                    "to_relay": c.to_relay,
                    "direct_timeouts": c.direct_timeouts,
                    "time_to_direct_ms": c.time_to_direct.map(|d| d.as_secs_f64() * 1e3),
                })),
                "path": t.path.map(|p| json!({
                    "rtt_ms": p.rtt.as_secs_f64() * 1e3,
                    "cwnd": p.cwnd,
                    "sent": p.sent,
                    "lost": p.lost,
                    "pto_count": p.total_pto_count,
                    "dgram_sent": p.dgram_sent,
                    "dgram_lost": p.dgram_lost,
                })),
            })
        })
        .collect();
    let failure = core.last_failure();
    json!({
        "uptime_secs": now.saturating_duration_since(started).as_secs(),
        "relay": core.relay().to_string(),
        "connected": core.is_connected(),
        "observed": core.observed_address().map(|a| a.to_string()),
        "last_failure": (!failure.is_empty()).then_some(failure),
        "sessions_up": core.sessions_up(),
        "services": services,
    })
    .to_string()
}

/// The agent's counters in the Prometheus text format: every core and
/// loop counter as `ztna_agent_<name>_total`, gauges for the relay
/// session, sessions up and direct, UDP offload and sessions per path
/// state, and the time-to-direct histogram.
pub fn metrics_text(core: &AgentCore, io: &IoStats, offload: &OffloadSnapshot) -> String {
    let mut out = String::new();
    let o = offload;
    let offload_counters = [
        ("udp_gso_sends", o.gso_sends),
        ("udp_gso_segments", o.gso_segments),
        ("udp_gso_errors", o.gso_errors),
        ("udp_gro_receives", o.gro_receives),
        ("udp_gro_segments", o.gro_segments),
    ];
    let counters = core.stats().fields().into_iter().chain(io.fields()).chain(offload_counters);
    for (name, v) in counters {
        let _ = writeln!(out, "# TYPE ztna_agent_{name}_total counter\nztna_agent_{name}_total {v}");
    }
    let gauges = [
        ("connected", u64::from(core.is_connected())),
        ("sessions_up", core.sessions_up() as u64),
        ("sessions_direct", core.sessions_direct() as u64),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE ztna_agent_{name} gauge\nztna_agent_{name} {v}");
    }
    let _ = writeln!(out, "# TYPE ztna_agent_udp_offload gauge");
    let _ = writeln!(out, "ztna_agent_udp_offload{{kind=\"gso\"}} {}", u64::from(o.gso));
    let _ = writeln!(out, "ztna_agent_udp_offload{{kind=\"gro\"}} {}", u64::from(o.gro));
    let states = core.path_states();
    render_path_states("ztna_agent_sessions_by_path", |s| count_state(&states, s), &mut out);
    core.time_to_direct().render("ztna_agent_time_to_direct_seconds", &mut out);
    out
}

/// Replaces what `/status` and `/metrics` serve.
pub fn publish(board: &StatusBoard, doc: Published) {
    *board.lock().unwrap_or_else(PoisonError::into_inner) = doc;
}

/// Serves `GET /status` and `GET /metrics` from `board` on `addr`;
/// returns the bound address.
pub fn serve_status(addr: SocketAddr, board: StatusBoard) -> Result<SocketAddr> {
    let handler: Arc<ztna_ops::http::Handler> = Arc::new(move |path: &str| {
        let b = board.lock().unwrap_or_else(PoisonError::into_inner);
        match path {
            "/status" => Some(ztna_ops::http::Response::json(b.status.clone())),
            "/metrics" => Some(ztna_ops::http::Response {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: b.metrics.clone(),
            }),
            _ => None,
        }
    });
    ztna_ops::http::serve(addr, "agent", handler)
}
