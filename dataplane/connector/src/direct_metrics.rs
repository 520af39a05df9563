//! Direct-path telemetry the counters cannot carry: the time-to-direct
//! histogram (Prometheus `ztna_connector_time_to_direct_seconds`), from a
//! session's first tunneled packet to its first direct path.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ztna_control::e2e::TimeToDirect;

/// The histogram (shared: the engine observes, `/metrics` renders).
#[derive(Debug, Default)]
pub struct DirectMetrics(Mutex<TimeToDirect>);

impl DirectMetrics {
    pub fn observe(&self, d: Duration) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).observe(d);
    }

    pub fn snapshot(&self) -> TimeToDirect {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.snapshot().render("ztna_connector_time_to_direct_seconds", out);
    }
}
