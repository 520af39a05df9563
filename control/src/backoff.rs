//! Jittered exponential backoff for reconnects.

use std::time::Duration;

use crate::rng::SplitMix64;

/// Doubles from `min` to `max`; each delay is drawn uniformly from
/// `[d/2, d]` ("equal jitter") so that clients cut off together do not
/// reconnect in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), current: min }
    }
    /// The next delay; advances the exponent.
    pub fn next_delay(&mut self, rng: &mut SplitMix64) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * rng.next_f64())
    }
    /// Back to `min` (after a successful session).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_with_jitter() {
        let mut rng = SplitMix64::new(7);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let ds: Vec<_> = (0..8).map(|_| b.next_delay(&mut rng)).collect();
        let nominal = [1u64, 2, 4, 8, 16, 30, 30, 30];
        for (d, n) in ds.iter().zip(nominal) {
            let n = Duration::from_secs(n);
            assert!(*d >= n / 2 && *d <= n, "{d:?} not within [{:?}, {n:?}]", n / 2);
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
    }
}
