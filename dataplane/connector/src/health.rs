//! Liveness, readiness and metrics of a running connector, served over
//! HTTP (`/healthz`, `/readyz`, `/metrics`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use super::ConnectorStats;
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
}

impl ConnectorHealth {
    pub(super) fn new() -> ConnectorHealth {
        ConnectorHealth {
            heartbeat: Heartbeat::new(),
            serving: AtomicBool::new(false),
            relays: AtomicU64::new(0),
            relays_connected: AtomicU64::new(0),
        }
    }

    /// The loop turned within [`ztna_ops::heartbeat::HEARTBEAT_STALE`].
    pub fn alive(&self, now: Instant) -> bool {
        self.heartbeat.fresh(now)
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` of a connector on `addr`.
pub fn serve_health(addr: SocketAddr, health: Arc<ConnectorHealth>, stats: Arc<ConnectorStats>) -> Result<SocketAddr> {
    let http_stats = Arc::new(ztna_ops::http::HttpStats::default());
    let counted = Arc::clone(&http_stats);
    let handler: Arc<ztna_ops::http::Handler> = Arc::new(move |path: &str| {
        if path == "/metrics" {
            let mut body = render_metrics(&health, &stats);
            body.push_str(&counted.render_prometheus("ztna_connector_http_events_total"));
            return Some(ztna_ops::http::Response { status: 200, content_type: "text/plain; version=0.0.4", body });
        }
        ztna_ops::http::probe(path, health.alive(Instant::now()), health.serving())
    });
    ztna_ops::http::serve_counted(addr, "connector", handler, http_stats)
}

fn render_metrics(h: &ConnectorHealth, s: &ConnectorStats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let gauges = [
        ("ztna_connector_relays", h.relays.load(Ordering::Relaxed)),
        ("ztna_connector_relays_connected", h.relays_connected.load(Ordering::Relaxed)),
        ("ztna_connector_ready", u64::from(h.serving())),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
    }
    for (field, v) in s.snapshot().fields() {
        let _ = writeln!(out, "# TYPE ztna_connector_{field}_total counter\nztna_connector_{field}_total {v}");
    }
    out
}
