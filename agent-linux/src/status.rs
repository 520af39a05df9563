//! What the agent holds, for an operator: its relay session (address,
//! connected, the address the relay observed, the last failure) and per
//! service its relay flow, the connector the relay bound it to and the
//! end-to-end session's state. Printed as `status {JSON}` on SIGUSR1 and
//! at exit, and served at `GET /status` when `status` is configured.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};
use ztna_agent::agent_core::AgentCore;

/// The latest status document (refreshed by the loop about once a second).
pub type StatusBoard = Arc<Mutex<String>>;

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
                "direct": t.direct.map(|a| a.to_string()),
                "paths": t.paths.map(|c| json!({
                    "rounds": c.rounds,
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

/// Replaces what `/status` serves.
pub fn publish(board: &StatusBoard, doc: String) {
    *board.lock().unwrap_or_else(PoisonError::into_inner) = doc;
}

/// Serves `GET /status` from `board` on `addr`; returns the bound address.
pub fn serve_status(addr: SocketAddr, board: StatusBoard) -> Result<SocketAddr> {
    let handler: Arc<ztna_ops::http::Handler> = Arc::new(move |path: &str| {
        (path == "/status").then(|| {
            let doc = board.lock().unwrap_or_else(PoisonError::into_inner).clone();
            ztna_ops::http::Response::json(doc)
        })
    });
    ztna_ops::http::serve(addr, "agent", handler)
}
