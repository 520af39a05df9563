//! Direct-path telemetry the counters cannot carry: the time-to-direct
//! histogram (Prometheus `ztna_connector_time_to_direct_seconds`), from a
//! session's first tunneled packet to its first direct path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in milliseconds (the last is +Inf).
const BUCKETS_MS: [u64; 9] = [50, 100, 250, 500, 1000, 2000, 3000, 10_000, 60_000];

/// The histogram (shared: the engine observes, `/metrics` renders).
#[derive(Debug, Default)]
pub struct DirectMetrics {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
}

impl DirectMetrics {
    pub fn observe(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        for (b, le) in self.buckets.iter().zip(BUCKETS_MS) {
            if ms <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "ztna_connector_time_to_direct_seconds";
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS_MS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {}", le as f64 / 1000.0, b.load(Ordering::Relaxed));
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_rendered_for_prometheus() {
        let m = DirectMetrics::default();
        m.observe(Duration::from_millis(40));
        m.observe(Duration::from_millis(700));
        m.observe(Duration::from_secs(100));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("ztna_connector_time_to_direct_seconds_bucket{le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("_sum 100.74\n"), "{out}");
        assert!(out.contains("_count 3\n"), "{out}");
    }
}
