//! Bounds on what agents can make the connector send unasked, per agent
//! identity and in total (token buckets), so that one identity cannot use
//! up what the others need:
//! - punch packets ([`PUNCHES`], docs/protocol/direct.md §11.4): each
//!   session's rounds are spaced by `min_round_gap`, but an identity may
//!   hold many sessions and port prediction multiplies a round's packets;
//!   refused ones are counted as `drop_punch_budget`;
//! - stateless resets for inner packets of sessions the connector does not
//!   hold ([`RESETS`], PROTOCOL.md §8): besides one per relay flow per
//!   second; refused ones as `e2e_resets_suppressed`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Rates (per second) and bursts of one budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub per_identity_rate: f64,
    pub per_identity_burst: f64,
    pub total_rate: f64,
    pub total_burst: f64,
}

/// Punch packets.
pub const PUNCHES: Limits =
    Limits { per_identity_rate: 1024.0, per_identity_burst: 4096.0, total_rate: 8192.0, total_burst: 16384.0 };
/// Stateless resets.
pub const RESETS: Limits =
    Limits { per_identity_rate: 16.0, per_identity_burst: 32.0, total_rate: 256.0, total_burst: 256.0 };
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

/// One budget: a bucket per agent identity and one for all.
#[derive(Debug)]
pub struct IdentityBudget {
    limits: Limits,
    total: Bucket,
    per_identity: HashMap<Arc<str>, Bucket>,
}

impl IdentityBudget {
    pub fn new(limits: Limits, now: Instant) -> IdentityBudget {
        IdentityBudget { limits, total: Bucket::full(limits.total_burst, now), per_identity: HashMap::new() }
    }

    /// Whether one more packet for `identity` may go now (taken from both
    /// its bucket and the total when it may).
    pub fn allow(&mut self, identity: &Arc<str>, now: Instant) -> bool {
        let l = self.limits;
        self.total.refill(l.total_rate, l.total_burst, now);
        if self.per_identity.len() >= TRACKED && !self.per_identity.contains_key(identity) {
            for b in self.per_identity.values_mut() {
                b.refill(l.per_identity_rate, l.per_identity_burst, now);
            }
            self.per_identity.retain(|_, b| b.tokens < l.per_identity_burst);
        }
        let mine =
            self.per_identity.entry(Arc::clone(identity)).or_insert_with(|| Bucket::full(l.per_identity_burst, now));
        mine.refill(l.per_identity_rate, l.per_identity_burst, now);
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
        let mut b = IdentityBudget::new(PUNCHES, t0);
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("spiffe://x/agent/noisy".into(), "spiffe://x/agent/quiet".into());
        let sent = (0..5000).filter(|_| b.allow(&noisy, t0)).count();
        assert_eq!(sent, PUNCHES.per_identity_burst as usize);
        // A second later: the rate's worth more.
        let t1 = t0 + Duration::from_secs(1);
        let more = (0..5000).filter(|_| b.allow(&noisy, t1)).count();
        assert_eq!(more, PUNCHES.per_identity_rate as usize);
        // The other identity still has its own burst.
        assert_eq!((0..100).filter(|_| b.allow(&quiet, t1)).count(), 100);
    }

    #[test]
    fn resets_have_a_smaller_budget_per_identity() {
        let t0 = Instant::now();
        let mut b = IdentityBudget::new(RESETS, t0);
        let (a, c): (Arc<str>, Arc<str>) = ("spiffe://x/agent/a".into(), "spiffe://x/agent/c".into());
        assert_eq!((0..100).filter(|_| b.allow(&a, t0)).count(), 32);
        assert_eq!((0..100).filter(|_| b.allow(&c, t0)).count(), 32, "the other identity is not starved");
    }

    #[test]
    fn the_total_bounds_many_identities_together() {
        let t0 = Instant::now();
        let mut b = IdentityBudget::new(PUNCHES, t0);
        let ids: Vec<Arc<str>> = (0..10).map(|i| format!("spiffe://x/agent/a{i}").into()).collect();
        let sent: usize =
            ids.iter().map(|id| (0..PUNCHES.per_identity_burst as usize).filter(|_| b.allow(id, t0)).count()).sum();
        assert_eq!(sent, PUNCHES.total_burst as usize);
    }

    #[test]
    fn idle_identities_are_forgotten_beyond_the_tracked_bound() {
        let t0 = Instant::now();
        let mut b = IdentityBudget::new(PUNCHES, t0);
        for i in 0..3 * TRACKED {
            let id: Arc<str> = format!("spiffe://x/agent/a{i}").into();
            let now = t0 + Duration::from_secs(10 * i as u64);
            assert!(b.allow(&id, now));
        }
        assert!(b.per_identity.len() <= TRACKED, "{}", b.per_identity.len());
    }
}
