//! What an operator is told about a session's paths: where it is and why
//! ([`PathState`]), and the time-to-direct histogram both ends export
//! ([`TimeToDirect`]: the connector's `/metrics`, the Linux agent's, the C
//! API's `ZtnaPathStats`).

use std::fmt::Write;
use std::time::Duration;

/// Where a session's tunneled packets go, and if through the relay, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathState {
    /// On a validated direct path.
    Direct,
    /// Relay: the session is not up, or the peer's candidates have not
    /// arrived yet.
    Pending,
    /// Relay: an end's policy is `relay-only`.
    RelayOnly,
    /// Relay: the peer advertised no candidate this end may probe.
    NoCandidates,
    /// Relay: the first punching round is running.
    Punching,
    /// Relay: the last round validated no path (the NATs between the two
    /// ends do not let a direct path open; the next round is an upgrade
    /// attempt).
    NoAnswer,
    /// Relay: the direct path in use went silent or failed (fell back; a
    /// new round may be running).
    Lost,
}

impl PathState {
    /// Every state, in the order metrics list them.
    pub const ALL: [PathState; 7] = [
        PathState::Direct,
        PathState::Pending,
        PathState::RelayOnly,
        PathState::NoCandidates,
        PathState::Punching,
        PathState::NoAnswer,
        PathState::Lost,
    ];

    /// The name in status documents, event lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Direct => "direct",
            PathState::Pending => "pending",
            PathState::RelayOnly => "relay_only",
            PathState::NoCandidates => "no_candidates",
            PathState::Punching => "punching",
            PathState::NoAnswer => "no_answer",
            PathState::Lost => "lost",
        }
    }
}

/// Upper bounds of the time-to-direct buckets, in milliseconds (a last
/// bucket, +Inf, follows).
pub const TIME_TO_DIRECT_BUCKETS_MS: [u64; 9] = [50, 100, 250, 500, 1000, 2000, 3000, 10_000, 60_000];

/// Time from a session's first tunneled packet to its first direct path,
/// as a cumulative histogram (Prometheus' `le` buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeToDirect {
    /// Sessions that went direct within each bound of
    /// [`TIME_TO_DIRECT_BUCKETS_MS`] (cumulative).
    pub buckets: [u64; TIME_TO_DIRECT_BUCKETS_MS.len()],
    pub count: u64,
    pub sum_ms: u64,
}

impl TimeToDirect {
    pub fn observe(&mut self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        for (b, le) in self.buckets.iter_mut().zip(TIME_TO_DIRECT_BUCKETS_MS) {
            if ms <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    /// Appends the histogram `name` (ending in `_seconds`) in the
    /// Prometheus text format.
    pub fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(TIME_TO_DIRECT_BUCKETS_MS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {b}", le as f64 / 1000.0);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_ms as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Appends the gauge `name` with one series per [`PathState`]: `count`
/// of it (sessions in that state).
pub fn render_path_states(name: &str, count: impl Fn(PathState) -> u64, out: &mut String) {
    let _ = writeln!(out, "# TYPE {name} gauge");
    for s in PathState::ALL {
        let _ = writeln!(out, "{name}{{state=\"{}\"}} {}", s.as_str(), count(s));
    }
}

/// How many of `states` are `s`.
pub fn count_state(states: &[PathState], s: PathState) -> u64 {
    states.iter().filter(|&&x| x == s).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_rendered_for_prometheus() {
        let mut m = TimeToDirect::default();
        m.observe(Duration::from_millis(40));
        m.observe(Duration::from_millis(700));
        m.observe(Duration::from_secs(100));
        let mut out = String::new();
        m.render("x_seconds", &mut out);
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 100.74\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
    }

    #[test]
    fn every_state_is_a_series_even_when_empty() {
        let mut out = String::new();
        let states = [PathState::Direct, PathState::Lost, PathState::Direct];
        render_path_states("s", |s| count_state(&states, s), &mut out);
        assert!(out.contains("s{state=\"direct\"} 2\n"), "{out}");
        assert!(out.contains("s{state=\"lost\"} 1\n"), "{out}");
        assert!(out.contains("s{state=\"no_answer\"} 0\n"), "{out}");
        assert_eq!(out.lines().count(), 1 + PathState::ALL.len());
    }
}
