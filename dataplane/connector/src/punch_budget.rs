//! A bound on the punch packets agents can make the connector send
//! (docs/protocol/direct.md §11.4): each session's rounds are already
//! spaced by `min_round_gap`, but an identity may hold many sessions, and
//! port prediction multiplies a round's packets. Token buckets per agent
//! identity and in total; what they refuse is dropped and counted
//! (`drop_punch_budget`), the sessions are not otherwise affected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Punch packets per second, and the burst, one agent identity may cause.
pub const PER_IDENTITY_RATE: f64 = 512.0;
pub const PER_IDENTITY_BURST: f64 = 2048.0;
/// The same for all agents together.
pub const TOTAL_RATE: f64 = 4096.0;
pub const TOTAL_BURST: f64 = 8192.0;
/// Identities tracked before full (idle) buckets are forgotten.
const TRACKED: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket { tokens: burst, at: now }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }
}

#[derive(Debug)]
pub struct PunchBudget {
    total: Bucket,
    per_identity: HashMap<Arc<str>, Bucket>,
}

impl PunchBudget {
    pub fn new(now: Instant) -> PunchBudget {
        PunchBudget { total: Bucket::full(TOTAL_BURST, now), per_identity: HashMap::new() }
    }

    /// Whether one more punch packet for `identity` may go now (taken
    /// from both its bucket and the total when it may).
    pub fn allow(&mut self, identity: &Arc<str>, now: Instant) -> bool {
        self.total.refill(TOTAL_RATE, TOTAL_BURST, now);
        if self.per_identity.len() >= TRACKED && !self.per_identity.contains_key(identity) {
            for b in self.per_identity.values_mut() {
                b.refill(PER_IDENTITY_RATE, PER_IDENTITY_BURST, now);
            }
            self.per_identity.retain(|_, b| b.tokens < PER_IDENTITY_BURST);
        }
        let mine =
            self.per_identity.entry(Arc::clone(identity)).or_insert_with(|| Bucket::full(PER_IDENTITY_BURST, now));
        mine.refill(PER_IDENTITY_RATE, PER_IDENTITY_BURST, now);
        if mine.tokens < 1.0 || self.total.tokens < 1.0 {
            return false;
        }
        mine.tokens -= 1.0;
        self.total.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_identity_gets_its_burst_then_its_rate_and_others_are_not_starved() {
        let t0 = Instant::now();
        let mut b = PunchBudget::new(t0);
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("spiffe://x/agent/noisy".into(), "spiffe://x/agent/quiet".into());
        let sent = (0..5000).filter(|_| b.allow(&noisy, t0)).count();
        assert_eq!(sent, PER_IDENTITY_BURST as usize);
        // A second later: the rate's worth more.
        let t1 = t0 + Duration::from_secs(1);
        let more = (0..5000).filter(|_| b.allow(&noisy, t1)).count();
        assert_eq!(more, PER_IDENTITY_RATE as usize);
        // The other identity still has its own burst.
        assert_eq!((0..100).filter(|_| b.allow(&quiet, t1)).count(), 100);
    }

    #[test]
    fn the_total_bounds_many_identities_together() {
        let t0 = Instant::now();
        let mut b = PunchBudget::new(t0);
        let ids: Vec<Arc<str>> = (0..10).map(|i| format!("spiffe://x/agent/a{i}").into()).collect();
        let sent: usize =
            ids.iter().map(|id| (0..PER_IDENTITY_BURST as usize).filter(|_| b.allow(id, t0)).count()).sum();
        assert_eq!(sent, TOTAL_BURST as usize);
    }

    #[test]
    fn idle_identities_are_forgotten_beyond_the_tracked_bound() {
        let t0 = Instant::now();
        let mut b = PunchBudget::new(t0);
        for i in 0..3 * TRACKED {
            let id: Arc<str> = format!("spiffe://x/agent/a{i}").into();
            let now = t0 + Duration::from_secs(10 * i as u64);
            assert!(b.allow(&id, now));
        }
        assert!(b.per_identity.len() <= TRACKED, "{}", b.per_identity.len());
    }
}
