//! When an event loop last turned, for health endpoints and the systemd
//! watchdog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An event loop turns at least every 500 ms; one silent for this long is
/// stuck or gone.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(5);

/// When an event loop last turned, readable from other threads (health
/// endpoints, the systemd watchdog).
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// Milliseconds since `epoch` at the last beat.
    ms: AtomicU64,
}

impl Heartbeat {
    /// Counts as a beat now.
    pub fn new() -> Heartbeat {
        Heartbeat { epoch: Instant::now(), ms: AtomicU64::new(0) }
    }

    pub fn beat(&self, now: Instant) {
        self.ms.store(now.saturating_duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
    }

    /// The loop turned within [`HEARTBEAT_STALE`].
    pub fn fresh(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        now_ms.saturating_sub(self.ms.load(Ordering::Relaxed)) < HEARTBEAT_STALE.as_millis() as u64
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}
