//! The per-worker event loop: drives one [`Worker`] with one UDP
//! [`Backend`] until the relay shuts it down, and the [`Lifecycle`] the
//! relay handle uses to ask for a drain or a shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ztna_control::Code;
use ztna_ops::heartbeat::Heartbeat;
use ztna_udp::Backend;

use crate::stats::WorkerStats;
use crate::worker::Worker;

/// What the relay handle asks of its workers, and their heartbeats.
#[derive(Debug)]
pub struct Lifecycle {
    /// Shut down now: Goodbye{SHUTDOWN}, close a quarter of the grace
    /// period later, exit when closed or after the grace period.
    pub shutdown: AtomicBool,
    /// Drain: Goodbye{DRAINING}, keep serving until every agent has left
    /// (relay-wide) or the grace period nearly ends, then shut down.
    pub drain: AtomicBool,
    /// One per worker.
    heartbeats: Vec<Heartbeat>,
}

impl Lifecycle {
    pub fn new(workers: usize) -> Lifecycle {
        Lifecycle {
            shutdown: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            heartbeats: (0..workers).map(|_| Heartbeat::new()).collect(),
        }
    }

    fn beat(&self, worker: usize, now: Instant) {
        if let Some(h) = self.heartbeats.get(worker) {
            h.beat(now);
        }
    }

    /// True while every worker loop has turned within [`ztna_ops::heartbeat::HEARTBEAT_STALE`].
    pub fn all_alive(&self, now: Instant) -> bool {
        self.heartbeats.iter().all(|h| h.fresh(now))
    }

    /// True once a drain or a shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire)
    }
}

/// Runs one worker until it is shut down (directly, or at the end of a
/// drain) and its connections are closed, bounded by `grace`.
pub fn run_worker(worker: &mut Worker, backend: &mut dyn Backend, life: &Lifecycle, grace: Duration) {
    // Final phase of a drain: close the connectors and stragglers.
    let linger = (grace / 4).min(Duration::from_millis(500));
    let mut drain_end: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    record_io(worker.stats(), backend);
    loop {
        let now = Instant::now();
        life.beat(worker.index(), now);
        if deadline.is_none() {
            if drain_end.is_none() && life.drain.load(Ordering::Acquire) {
                worker.begin_drain(now);
                drain_end = Some(now + grace.saturating_sub(linger * 2));
            }
            if life.shutdown.load(Ordering::Acquire) {
                worker.begin_shutdown(Code::SHUTDOWN, "relay shutting down", grace / 4, now);
                deadline = Some(now + grace);
            } else if let Some(end) = drain_end {
                if now >= end || worker.agents_relay_wide() == 0 {
                    worker.begin_shutdown(Code::SHUTDOWN, "relay shutting down", linger, now);
                    deadline = Some(now + linger * 2);
                }
            }
        }
        if let Some(d) = deadline {
            if worker.conn_count() == 0 || now >= d {
                break;
            }
        }
        let mut timeout =
            worker.next_timeout().map_or(Duration::from_millis(500), |t| t.saturating_duration_since(now));
        timeout = timeout.min(Duration::from_millis(if drain_end.is_some() { 50 } else { 500 }));
        if worker.has_backlog() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        // One clock read per receive batch, not per packet (a batch is
        // microseconds long; quiche reads its own clock as well).
        let mut batch_now = None;
        let r = backend.poll(timeout, &mut |buf, from, dst| {
            let now = *batch_now.get_or_insert_with(Instant::now);
            worker.handle_packet(buf, from, dst, now)
        });
        if let Err(e) = r {
            tracing::warn!(worker = worker.index(), error = %e, "poll failed");
        }
        let now = Instant::now();
        worker.drain_inbox(now);
        worker.handle_timeouts(now);
        worker.flush(backend.transmit(), now);
        if let Err(e) = backend.queue_sends() {
            tracing::debug!(worker = worker.index(), error = %e, "send failed");
        }
        record_io(worker.stats(), backend);
    }
    // The last turn's sends (closes) were only queued.
    if let Err(e) = backend.flush() {
        tracing::debug!(worker = worker.index(), error = %e, "send failed");
    }
}

/// Copies the backend's own counters (send drops, UDP offload) into the
/// worker's stats.
fn record_io(st: &WorkerStats, backend: &dyn Backend) {
    st.drop_tx.store(backend.tx_dropped(), Ordering::Relaxed);
    let o = backend.offload();
    st.udp_gso.store(u64::from(o.gso), Ordering::Relaxed);
    st.udp_gro.store(u64::from(o.gro), Ordering::Relaxed);
    st.udp_gso_sends.store(o.gso_sends, Ordering::Relaxed);
    st.udp_gso_segments.store(o.gso_segments, Ordering::Relaxed);
    st.udp_gso_errors.store(o.gso_errors, Ordering::Relaxed);
    st.udp_gro_receives.store(o.gro_receives, Ordering::Relaxed);
    st.udp_gro_segments.store(o.gro_segments, Ordering::Relaxed);
}
