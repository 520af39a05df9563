//! Liveness, readiness, metrics and status of a running connector, served
//! over HTTP (`/healthz`, `/readyz`, `/metrics`, `/status`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Result;

use super::{ConnectorStats, ConnectorStatus};
use ztna_control::e2e::path_telemetry::render_path_states;
use ztna_control::e2e::PathState;
use ztna_ops::heartbeat::Heartbeat;

/// Liveness and readiness of a running connector, shared with its HTTP
/// endpoint.
#[derive(Debug)]
pub struct ConnectorHealth {
    /// The connector loop's.
    pub(super) heartbeat: Heartbeat,
    /// Every service registered at one relay or more.
    pub(super) serving: AtomicBool,
    pub(super) relays: AtomicU64,
    pub(super) relays_connected: AtomicU64,
    /// UDP GSO/GRO on the relay socket.
    pub(super) offload: Arc<ztna_udp::offload::OffloadStats>,
    /// The engine's time-to-direct histogram (engines without direct
    /// paths have none).
    direct: Option<Arc<crate::direct_metrics::DirectMetrics>>,
    started: Instant,
    /// The loop's latest [`ConnectorStatus`] (refreshed about once a second).
    status: Mutex<Option<ConnectorStatus>>,
}

#[derive(serde::Serialize)]
struct StatusDoc<'a> {
    uptime_secs: u64,
    #[serde(flatten)]
    status: &'a ConnectorStatus,
}

impl ConnectorHealth {
    pub(super) fn new(
        offload: Arc<ztna_udp::offload::OffloadStats>,
        direct: Option<Arc<crate::direct_metrics::DirectMetrics>>,
    ) -> ConnectorHealth {
        ConnectorHealth {
            direct,
            heartbeat: Heartbeat::new(),
            serving: AtomicBool::new(false),
            relays: AtomicU64::new(0),
            relays_connected: AtomicU64::new(0),
            offload,
            started: Instant::now(),
            status: Mutex::new(None),
        }
    }

    pub(super) fn set_status(&self, s: ConnectorStatus) {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
    }

    /// The `/status` document (JSON); `{}` before the loop's first turn.
    pub fn status_json(&self, now: Instant) -> String {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(status) = status.as_ref() else { return "{}".into() };
        let doc = StatusDoc { uptime_secs: now.saturating_duration_since(self.started).as_secs(), status };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The loop turned within [`ztna_ops::heartbeat::HEARTBEAT_STALE`].
    pub fn alive(&self, now: Instant) -> bool {
        self.heartbeat.fresh(now)
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// Serves `/healthz`, `/readyz`, `/metrics` and `/status` of a connector
/// on `addr` (as private as that address: `/status` names agents).
pub fn serve_health(addr: SocketAddr, health: Arc<ConnectorHealth>, stats: Arc<ConnectorStats>) -> Result<SocketAddr> {
    let http_stats = Arc::new(ztna_ops::http::HttpStats::default());
    let counted = Arc::clone(&http_stats);
    let handler: Arc<ztna_ops::http::Handler> = Arc::new(move |path: &str| {
        if path == "/metrics" {
            let mut body = render_metrics(&health, &stats);
            body.push_str(&counted.render_prometheus("ztna_connector_http_events_total"));
            return Some(ztna_ops::http::Response { status: 200, content_type: "text/plain; version=0.0.4", body });
        }
        if path == "/status" {
            return Some(ztna_ops::http::Response::json(health.status_json(Instant::now())));
        }
        ztna_ops::http::probe(path, health.alive(Instant::now()), health.serving())
    });
    ztna_ops::http::serve_counted(addr, "connector", handler, http_stats)
}

fn render_metrics(h: &ConnectorHealth, s: &ConnectorStats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let by_path = h.status.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|s| s.sessions_by_path.clone());
    let by_path = by_path.unwrap_or_default();
    let sessions_direct = by_path.get(PathState::Direct.as_str()).copied().unwrap_or(0);
    let gauges = [
        ("ztna_connector_sessions_direct", sessions_direct as u64),
        ("ztna_connector_relays", h.relays.load(Ordering::Relaxed)),
        ("ztna_connector_relays_connected", h.relays_connected.load(Ordering::Relaxed)),
        ("ztna_connector_ready", u64::from(h.serving())),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
    }
    let o = h.offload.snapshot();
    let _ = writeln!(out, "# TYPE ztna_connector_udp_offload gauge");
    let _ = writeln!(out, "ztna_connector_udp_offload{{kind=\"gso\"}} {}", u64::from(o.gso));
    let _ = writeln!(out, "ztna_connector_udp_offload{{kind=\"gro\"}} {}", u64::from(o.gro));
    let offload_counters = [
        ("gso_sends", o.gso_sends),
        ("gso_segments", o.gso_segments),
        ("gso_errors", o.gso_errors),
        ("gro_receives", o.gro_receives),
        ("gro_segments", o.gro_segments),
    ];
    for (field, v) in offload_counters {
        let _ = writeln!(out, "# TYPE ztna_connector_udp_{field}_total counter\nztna_connector_udp_{field}_total {v}");
    }
    for (field, v) in s.snapshot().fields() {
        let _ = writeln!(out, "# TYPE ztna_connector_{field}_total counter\nztna_connector_{field}_total {v}");
    }
    if let Some(d) = &h.direct {
        d.render(&mut out);
    }
    let count = |s: PathState| by_path.get(s.as_str()).copied().unwrap_or(0) as u64;
    render_path_states("ztna_connector_sessions_by_path", count, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connector family the dashboard relies on (listed in
    /// deploy/observability/metrics.txt) is exported, with its type.
    #[test]
    fn metrics_export_every_connector_family_of_metrics_txt() {
        let h = ConnectorHealth::new(Arc::default(), Some(Arc::default()));
        h.set_status(ConnectorStatus {
            relays: Vec::new(),
            sessions_total: 0,
            sessions_up: 0,
            sessions_direct: 1,
            sessions_by_path: [("direct", 1), ("no_answer", 2)].into(),
            sessions: Vec::new(),
            sessions_omitted: 0,
            udp_flows: 0,
            tcp_connections: 0,
        });
        let out = render_metrics(&h, &ConnectorStats::default());
        let listed = include_str!("../../../deploy/observability/metrics.txt");
        let families: Vec<(&str, &str)> =
            listed.lines().filter(|l| l.starts_with("ztna_connector_")).filter_map(|l| l.split_once(' ')).collect();
        assert!(families.len() >= 6, "{families:?}");
        for (name, kind) in families {
            assert!(out.contains(&format!("# TYPE {name} {kind}\n")), "{name} {kind} not exported:\n{out}");
        }
        assert!(out.contains("ztna_connector_time_to_direct_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(out.contains("ztna_connector_sessions_direct 1\n"), "{out}");
        assert!(out.contains("ztna_connector_sessions_by_path{state=\"no_answer\"} 2\n"), "{out}");
        assert!(out.contains("ztna_connector_sessions_by_path{state=\"lost\"} 0\n"), "{out}");
    }
}
