//! Relay-wide state the workers share: the reloadable security settings
//! (TLS material and policy), Retry keys and per-source-IP limits.
//!
//! Reload protocol: the control thread builds a complete [`Security`] from
//! files (refusing broken ones), then [`SecurityCell::replace`] swaps it in
//! and bumps the generation. Each worker compares the generation (one
//! atomic load per loop turn) and only then takes the lock to clone the
//! `Arc`. The packet path never locks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::budget::MemoryBudget;
use crate::cid::Instance;
use crate::policy::Policy;
use crate::ratelimit::{ConnCounts, PerIp};
use crate::retry::{ResetKey, RetryKeys};
use crate::tls::TlsMaterial;

/// Everything a SIGHUP reloads, as one consistent snapshot.
#[derive(Debug)]
pub struct Security {
    pub tls: TlsMaterial,
    pub policy: Policy,
    /// Derived from the private key and the relay's instance (stable across
    /// restarts only with a configured node id; see [`Instance`]).
    pub reset: ResetKey,
}

impl Security {
    pub fn new(tls: TlsMaterial, policy: Policy, instance: &Instance) -> anyhow::Result<Security> {
        let secret = tls.key.private_key_to_der()?;
        Ok(Security { reset: ResetKey::derive(&secret, instance), tls, policy })
    }
}

/// The current [`Security`] and a generation counter.
#[derive(Debug)]
pub struct SecurityCell {
    generation: AtomicU64,
    current: Mutex<Arc<Security>>,
}

impl SecurityCell {
    pub fn new(s: Security) -> SecurityCell {
        SecurityCell { generation: AtomicU64::new(1), current: Mutex::new(Arc::new(s)) }
    }

    /// Cheap check for a new snapshot.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current snapshot and its generation.
    pub fn current(&self) -> (u64, Arc<Security>) {
        let guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (self.generation(), Arc::clone(&guard))
    }

    /// Installs a new snapshot; workers pick it up on their next turn.
    pub fn replace(&self, s: Security) {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(s);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// How the relay uses Retry (stateless address validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// Every new connection first proves its address.
    Always,
    /// Only when a worker sees more new handshakes per second than
    /// `retry_above_handshakes_per_sec`.
    Auto,
    /// Never (a flood of spoofed Initials then costs handshakes).
    Off,
}

/// Slots of the per-identity connection table (fixed memory: 4 bytes each).
pub const PER_IDENTITY_SLOTS: usize = 1 << 16;
/// Default `limits.max_conns_per_identity`.
pub const DEFAULT_MAX_CONNS_PER_IDENTITY: u32 = 64;

/// Shared by all workers of one relay.
#[derive(Debug)]
pub struct Shared {
    pub security: SecurityCell,
    pub retry_keys: RetryKeys,
    pub per_ip: PerIp,
    /// Authenticated connections per client identity (SPIFFE ID).
    pub per_identity: ConnCounts,
    /// Everything peers can make the relay hold, relay-wide.
    pub budget: MemoryBudget,
    /// Open connections over all workers.
    pub conns: AtomicUsize,
    /// Authenticated agent connections over all workers: a drain ends early
    /// once they have all moved to another relay.
    pub agents: AtomicUsize,
    /// The relay's start (Retry token clock, per-IP rate windows).
    pub started: Instant,
    /// Who is connected, per worker (`/status`, gauges per service).
    pub status: Arc<crate::status::StatusBoard>,
}

impl Shared {
    pub fn new(security: Security, per_ip: PerIp, start: Instant) -> Shared {
        Shared {
            security: SecurityCell::new(security),
            retry_keys: RetryKeys::new(start),
            per_ip,
            per_identity: ConnCounts::new(PER_IDENTITY_SLOTS, DEFAULT_MAX_CONNS_PER_IDENTITY),
            budget: MemoryBudget::new(crate::budget::DEFAULT_BUDGET),
            conns: AtomicUsize::new(0),
            agents: AtomicUsize::new(0),
            started: start,
            // Workers are at most 255 (`RelayConfig::worker_count`).
            status: Arc::new(crate::status::StatusBoard::new(256, start)),
        }
    }
}
