//! Per-identity shares of a bounded table (UDP flows, TCP connections, TCP
//! agent flows): who holds how many entries, and whether one more entry of
//! an identity is admitted, refused, or admitted by reclaiming one entry of
//! the identity holding the most.
//!
//! The rule is max-min fair: an identity below its share always gets in,
//! unless every identity holds no more than one entry more than it would.
//! An identity is reclaimed from only while it holds at least two entries
//! more than the newcomer, so two identities never take entries back and
//! forth.

use std::collections::HashMap;
use std::sync::Arc;

/// What to do with one more entry of an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// There is room.
    Admit,
    /// The identity holds its share already: refuse (and count).
    OverShare,
    /// The table is full: take the least recently used entry of this
    /// identity (the one holding the most), then admit.
    Reclaim(Arc<str>),
    /// The table is full and nobody holds more than a fair part: refuse.
    Full,
}

/// Occupancy of one table by identity.
#[derive(Debug)]
pub(crate) struct Shares {
    held: HashMap<Arc<str>, usize>,
    total: usize,
    capacity: usize,
    per_identity: usize,
}

impl Shares {
    pub(crate) fn new(capacity: usize, per_identity: usize) -> Shares {
        Shares { held: HashMap::new(), total: 0, capacity, per_identity }
    }

    /// Entries `who` holds.
    pub(crate) fn held(&self, who: &str) -> usize {
        self.held.get(who).copied().unwrap_or(0)
    }

    /// Entries in the table.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Whether one more entry of `who` fits, and how.
    pub(crate) fn admit(&self, who: &str) -> Admission {
        let mine = self.held(who);
        if mine >= self.per_identity {
            return Admission::OverShare;
        }
        if self.total < self.capacity {
            return Admission::Admit;
        }
        // O(identities), only when the table is full.
        match self.held.iter().max_by_key(|(_, n)| **n) {
            Some((top, n)) if *n >= mine + 2 => Admission::Reclaim(Arc::clone(top)),
            _ => Admission::Full,
        }
    }

    pub(crate) fn add(&mut self, who: &Arc<str>) {
        *self.held.entry(Arc::clone(who)).or_insert(0) += 1;
        self.total += 1;
    }

    pub(crate) fn remove(&mut self, who: &str) {
        if let Some(n) = self.held.get_mut(who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(who);
            }
            self.total = self.total.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    #[test]
    fn shares_refuse_over_share_and_reclaim_from_the_top() {
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let mut s = Shares::new(4, 3);
        for _ in 0..3 {
            assert_eq!(s.admit(&a), Admission::Admit);
            s.add(&a);
        }
        assert_eq!(s.admit(&a), Admission::OverShare);
        assert_eq!(s.admit(&b), Admission::Admit);
        s.add(&b);
        // Full: b (1) may take from a (3), c (0) too.
        assert_eq!(s.admit(&b), Admission::Reclaim(Arc::clone(&a)));
        assert_eq!(s.admit(&c), Admission::Reclaim(Arc::clone(&a)));
        s.remove(&a);
        s.add(&b);
        // a 2, b 2: nobody holds two more than b, nor than c would... c (0)
        // may still take from either.
        assert_eq!(s.admit(&b), Admission::Full);
        assert!(matches!(s.admit(&c), Admission::Reclaim(_)));
        s.remove(&a);
        s.remove(&a);
        s.remove(&a); // not held: ignored
        assert_eq!((s.held("a"), s.total()), (0, 2));
    }
}
