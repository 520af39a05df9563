//! Rate and count limits: a token bucket (one owner, no atomics) and
//! relay-wide, lock-free tables of connection counts per source IP (with
//! handshake rates) and per client identity.
//!
//! The per-IP table is a fixed array of counters indexed by a keyed hash of
//! the address (IPv4, or the /64 of an IPv6 address, since one IPv6 host
//! usually owns a whole /64). Memory is fixed whatever the number of
//! sources; two addresses that share a slot share its limit, and the random
//! hash key keeps an attacker from choosing whom they collide with.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A `rate` of 0 means unlimited.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// Takes `cost` tokens if there are enough.
    pub fn take(&mut self, cost: f64, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// A fixed table of connection counts per key (hashed into slots with a
/// random key; colliding keys share a slot and its limit). Lock-free.
pub struct ConnCounts {
    counts: Box<[AtomicU32]>,
    hasher: std::collections::hash_map::RandomState,
    /// 0 = unlimited.
    max: u32,
}

impl std::fmt::Debug for ConnCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCounts").field("slots", &self.counts.len()).field("max", &self.max).finish()
    }
}

impl ConnCounts {
    /// `slots` counters (rounded up to a power of two).
    pub fn new(slots: usize, max: u32) -> ConnCounts {
        let n = slots.max(1).next_power_of_two();
        ConnCounts {
            counts: (0..n).map(|_| AtomicU32::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            max,
        }
    }

    fn slot(&self, key: impl Hash) -> Option<&AtomicU32> {
        self.counts.get((self.hasher.hash_one(key) as usize) & (self.counts.len() - 1))
    }

    /// Counts one more connection for `key` unless it has the maximum.
    pub fn try_open(&self, key: impl Hash) -> bool {
        let Some(c) = self.slot(key) else { return false };
        let max = if self.max == 0 { u32::MAX } else { self.max };
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Releases a connection counted by [`ConnCounts::try_open`] (never
    /// below zero).
    pub fn close(&self, key: impl Hash) {
        if let Some(c) = self.slot(key) {
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// Connections counted in `key`'s slot.
    pub fn count(&self, key: impl Hash) -> u32 {
        self.slot(key).map_or(0, |c| c.load(Ordering::Acquire))
    }
}

/// Relay-wide per-source-IP limits, shared by every worker.
pub struct PerIp {
    conns: ConnCounts,
    /// (second << 32) | handshakes in that second.
    handshakes: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    max_handshakes_per_sec: u32,
}

impl std::fmt::Debug for PerIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerIp")
            .field("conns", &self.conns)
            .field("max_handshakes_per_sec", &self.max_handshakes_per_sec)
            .finish()
    }
}

/// The part of an address a limit applies to.
fn source_key(ip: IpAddr) -> [u8; 8] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [4, 0, 0, 0, o[0], o[1], o[2], o[3]]
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]]
        }
    }
}

impl PerIp {
    /// `slots` counters (rounded up to a power of two). A limit of 0 means
    /// unlimited.
    pub fn new(slots: usize, max_conns: u32, max_handshakes_per_sec: u32) -> PerIp {
        let n = slots.max(1).next_power_of_two();
        PerIp {
            conns: ConnCounts::new(n, max_conns),
            handshakes: (0..n).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            max_handshakes_per_sec,
        }
    }

    fn slot(&self, ip: IpAddr) -> usize {
        (self.hasher.hash_one(source_key(ip)) as usize) & (self.handshakes.len() - 1)
    }

    /// Counts a new connection from `ip` unless it already has the maximum.
    pub fn try_open(&self, ip: IpAddr) -> bool {
        self.conns.try_open(source_key(ip))
    }

    /// Releases a connection counted by [`PerIp::try_open`].
    pub fn close(&self, ip: IpAddr) {
        self.conns.close(source_key(ip));
    }

    /// Connections counted for `ip`'s slot.
    pub fn open_count(&self, ip: IpAddr) -> u32 {
        self.conns.count(source_key(ip))
    }

    /// Counts a handshake from `ip` in second `now_sec` unless the source
    /// already started the maximum in that second.
    pub fn allow_handshake(&self, ip: IpAddr, now_sec: u32) -> bool {
        if self.max_handshakes_per_sec == 0 {
            return true;
        }
        let Some(h) = self.handshakes.get(self.slot(ip)) else { return false };
        let max = self.max_handshakes_per_sec;
        h.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (sec, n) = ((v >> 32) as u32, v as u32);
            if sec != now_sec {
                Some((u64::from(now_sec) << 32) | 1)
            } else {
                (n < max).then(|| (u64::from(sec) << 32) | u64::from(n + 1))
            }
        })
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert_eq!((0..8).filter(|_| b.take(1.0, t0)).count(), 5, "burst");
        assert!(!b.take(1.0, t0));
        assert!(b.take(1.0, t0 + Duration::from_millis(110)), "one token after 1/rate");
        let mut big = TokenBucket::new(100.0, 100.0, t0);
        assert!(!big.take(101.0, t0 + Duration::from_secs(10)), "never more than the burst");
        let mut free = TokenBucket::new(0.0, 0.0, t0);
        assert!((0..1000).all(|_| free.take(1e9, t0)), "rate 0 = unlimited");
    }

    #[test]
    fn connections_per_ip_are_capped_and_released() {
        let t = PerIp::new(1024, 3, 0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(t.try_open(a) && t.try_open(a) && t.try_open(mapped));
        assert!(!t.try_open(a), "fourth refused (mapped address is the same source)");
        t.close(a);
        assert!(t.try_open(a));
        // One IPv6 /64 is one source.
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(t.try_open(v6a) && t.try_open(v6b) && t.try_open(v6a));
        assert!(!t.try_open(v6b));
        // Closing more than was opened never underflows.
        let c: IpAddr = "198.51.100.7".parse().unwrap();
        t.close(c);
        assert_eq!(t.open_count(c), 0);
    }

    #[test]
    fn connections_per_identity_are_capped_and_released() {
        let t = ConnCounts::new(1 << 16, 2);
        let (a, b) = ("spiffe://td/agent/a", "spiffe://td/agent/b");
        assert!(t.try_open(a) && t.try_open(a));
        assert!(!t.try_open(a), "third connection of one identity refused");
        assert!(t.try_open(b), "another identity has its own count");
        t.close(a);
        assert!(t.try_open(a));
        assert_eq!(t.count(a), 2);
    }

    #[test]
    fn handshakes_per_ip_per_second() {
        let t = PerIp::new(64, 0, 5);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..20).filter(|_| t.allow_handshake(a, 7)).count(), 5);
        assert_eq!((0..20).filter(|_| t.allow_handshake(a, 8)).count(), 5, "new second, new allowance");
        assert!((0..100).all(|_| t.try_open(a)), "no connection cap configured");
    }
}
