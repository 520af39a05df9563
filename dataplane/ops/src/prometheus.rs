//! The process-wide Prometheus recorder and its `/metrics` route.

use anyhow::Result;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::http::Response;

/// Histogram buckets for forwarding latency (seconds): 1 µs … 100 ms.
const LATENCY_BUCKETS: &[f64] =
    &[1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1];

/// Installs the process-wide Prometheus recorder.
pub fn install_recorder() -> Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?)
}

/// `GET /metrics` from a recorder handle.
pub fn metrics_route(prom: &PrometheusHandle, path: &str) -> Option<Response> {
    (path == "/metrics").then(|| {
        prom.run_upkeep();
        Response { status: 200, content_type: "text/plain; version=0.0.4", body: prom.render() }
    })
}
