//! Prometheus export. Workers count in their own atomics
//! ([`crate::stats::WorkerStats`]); a publisher copies them into the
//! `metrics` recorder once a second, so the per-packet path does no label
//! lookups. The forwarding-latency histogram is recorded by the workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use metrics_exporter_prometheus::PrometheusHandle;
use ztna_ops::prometheus::metrics_route;

use crate::event_loop::Lifecycle;
use crate::stats::StatsSnapshot;
use ztna_ops::http::{self, Handler};

/// Serves `/metrics` (from `prom`), `/healthz` (every worker loop turned
/// within 5 s) and `/readyz` (healthy and not draining) on `addr`. Returns
/// the bound address. Install the recorder before starting the relay: the
/// workers register their histograms when they start.
pub fn serve_relay(
    addr: SocketAddr,
    prom: PrometheusHandle,
    life: Arc<Lifecycle>,
    status: Arc<crate::status::StatusBoard>,
) -> Result<SocketAddr> {
    // Histogram samples are buffered until upkeep drains them: do it once a
    // second, not only when someone scrapes (or memory grows with traffic).
    let upkeep = prom.clone();
    std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        upkeep.run_upkeep();
    })?;
    // The listener's own counters (connections closed to make room, head
    // timeouts) are appended to the recorder's output.
    let http_stats = Arc::new(http::HttpStats::default());
    let counted = Arc::clone(&http_stats);
    let handler: Arc<Handler> = Arc::new(move |path: &str| match metrics_route(&prom, path) {
        Some(mut resp) => {
            resp.body.push_str(&counted.render_prometheus("ztna_relay_http_events_total"));
            Some(resp)
        }
        None if path == "/status" => Some(http::Response::json(status.render_json(Instant::now()))),
        None => http::probe(path, life.all_alive(Instant::now()), !life.is_draining()),
    });
    http::serve_counted(addr, "relay", handler, http_stats)
}

/// Gauges of who is connected: clients per role, and per service its
/// agents, connectors and flows. A service nobody holds any more is set
/// to zero (its series stays, as Prometheus gauges do); `seen` holds the
/// services published so far (the caller keeps it between calls).
pub fn publish_status(rows: &[crate::status::ConnStatus], seen: &mut Vec<String>) {
    for role in ["agent", "connector"] {
        let n = rows.iter().filter(|r| r.role.contains(role)).count();
        metrics::gauge!("ztna_relay_clients", "role" => role).set(n as f64);
    }
    let services = crate::status::StatusBoard::services(rows);
    for name in seen.iter().filter(|s| !services.contains_key(s.as_str())) {
        for role in ["agent", "connector"] {
            metrics::gauge!("ztna_relay_service_clients", "service" => name.clone(), "role" => role).set(0.0);
        }
        metrics::gauge!("ztna_relay_service_flows", "service" => name.clone()).set(0.0);
    }
    for (name, s) in &services {
        let name = name.to_string();
        metrics::gauge!("ztna_relay_service_clients", "service" => name.clone(), "role" => "agent")
            .set(s.agents as f64);
        metrics::gauge!("ztna_relay_service_clients", "service" => name.clone(), "role" => "connector")
            .set(s.connectors as f64);
        metrics::gauge!("ztna_relay_service_flows", "service" => name.clone()).set(s.flows as f64);
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
}

/// Copies one worker's counters into the recorder.
pub fn publish(worker: usize, s: &StatsSnapshot) {
    let w = worker.to_string();
    for (field, value) in s.fields() {
        if let Some(reason) = field.strip_prefix("drop_") {
            metrics::counter!("ztna_relay_drops_total", "worker" => w.clone(), "reason" => reason).absolute(value);
            continue;
        }
        if let Some(reason) = field.strip_prefix("auth_rejected_") {
            metrics::counter!("ztna_relay_auth_rejected_total", "worker" => w.clone(), "reason" => reason)
                .absolute(value);
            continue;
        }
        match field {
            "conns_active" => metrics::gauge!("ztna_relay_connections", "worker" => w.clone()).set(value as f64),
            "udp_gso" | "udp_gro" => {
                let kind = field.trim_start_matches("udp_");
                metrics::gauge!("ztna_relay_udp_offload", "worker" => w.clone(), "kind" => kind).set(value as f64)
            }
            "packets_rx" => {
                metrics::counter!("ztna_relay_packets_received_total", "worker" => w.clone()).absolute(value)
            }
            "packets_tx" => metrics::counter!("ztna_relay_packets_sent_total", "worker" => w.clone()).absolute(value),
            "bytes_forwarded" => {
                metrics::counter!("ztna_relay_forwarded_bytes_total", "worker" => w.clone()).absolute(value)
            }
            "registrations_ok" => {
                metrics::counter!("ztna_relay_registrations_total", "worker" => w.clone(), "result" => "ok")
                    .absolute(value)
            }
            "registrations_failed" => {
                metrics::counter!("ztna_relay_registrations_total", "worker" => w.clone(), "result" => "error")
                    .absolute(value)
            }
            other => metrics::counter!(format!("ztna_relay_{other}_total"), "worker" => w.clone()).absolute(value),
        }
    }
}
