//! A virtual IP device for smoltcp: the "wire" is two bounded queues of
//! whole IPv4 packets. The connector feeds it the agent's tunneled TCP
//! packets and sends what smoltcp transmits back through the relay; the
//! agent side (`ztna_testkit::tunnel_tcp`) does the same from the other end.
//!
//! The MTU is [`TUNNEL_MTU`] (1280): a 1280-byte inner IP packet always
//! fits the end-to-end session's DATAGRAMs on every leg (docs/PROTOCOL.md §8.4), so TCP over this
//! device announces and uses an MSS of 1240.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};

/// Largest IP packet the tunnel carries safely.
pub const TUNNEL_MTU: usize = 1280;
/// TCP MSS over the tunnel: MTU minus IPv4 and TCP headers.
pub const TUNNEL_MSS: usize = TUNNEL_MTU - 40;

/// smoltcp's clock from a std `Instant` and an epoch.
pub fn smol_instant(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    let us = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(us).unwrap_or(i64::MAX))
}

/// A std `Instant` from smoltcp's clock and the same epoch.
pub fn std_instant(epoch: Instant, t: smoltcp::time::Instant) -> Instant {
    let us = u64::try_from(t.total_micros()).unwrap_or(0);
    epoch + std::time::Duration::from_micros(us)
}

/// A budget of queued packets shared by several devices (the connector
/// gives every agent identity one over all its flows' queues). Packets
/// queued by [`QueueDevice::push_rx`] and by smoltcp count against it;
/// packets pushed with [`QueueDevice::push_tx`] (RSTs, at most one per
/// received packet) are counted but never refused.
#[derive(Debug)]
pub struct QueueBudget {
    used: AtomicUsize,
    limit: usize,
}

impl QueueBudget {
    pub fn new(limit: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget { used: AtomicUsize::new(0), limit })
    }

    /// Packets queued under this budget now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.used() < self.limit
    }

    fn take(&self) {
        self.used.fetch_add(1, Ordering::Relaxed);
    }

    fn give_back(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

/// The device: bounded receive and transmit queues of IP packets.
pub struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    rx_cap: usize,
    tx_cap: usize,
    verify_rx_checksums: bool,
    budget: Option<Arc<QueueBudget>>,
}

impl Drop for QueueDevice {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(self.rx.len() + self.tx.len());
        }
    }
}

impl QueueDevice {
    /// `rx_cap` and `tx_cap` bound the queues in packets. With
    /// `verify_rx_checksums` false, smoltcp trusts received checksums (the
    /// connector has verified them already while parsing).
    pub fn new(rx_cap: usize, tx_cap: usize, verify_rx_checksums: bool) -> QueueDevice {
        QueueDevice { rx: VecDeque::new(), tx: VecDeque::new(), rx_cap, tx_cap, verify_rx_checksums, budget: None }
    }

    /// The same, with both queues also counted against `budget`.
    pub fn with_budget(
        rx_cap: usize,
        tx_cap: usize,
        verify_rx_checksums: bool,
        budget: Arc<QueueBudget>,
    ) -> QueueDevice {
        let mut d = QueueDevice::new(rx_cap, tx_cap, verify_rx_checksums);
        d.budget = Some(budget);
        d
    }

    fn budget_has_room(&self) -> bool {
        self.budget.as_ref().is_none_or(|b| b.has_room())
    }

    /// Queues a received packet; false (packet dropped) when the queue or
    /// its budget is full.
    pub fn push_rx(&mut self, pkt: &[u8]) -> bool {
        if self.rx.len() >= self.rx_cap || !self.budget_has_room() {
            return false;
        }
        if let Some(b) = &self.budget {
            b.take();
        }
        self.rx.push_back(pkt.to_vec());
        true
    }

    /// Whether received packets wait for smoltcp.
    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Queues a packet built outside smoltcp for transmission (an RST, say).
    /// It may exceed `tx_cap` by the packets pushed this way; callers push
    /// at most one per received packet.
    pub fn push_tx(&mut self, pkt: Vec<u8>) {
        if let Some(b) = &self.budget {
            b.take();
        }
        self.tx.push_back(pkt);
    }

    /// The next packet to transmit.
    pub fn pop_tx(&mut self) -> Option<Vec<u8>> {
        let p = self.tx.pop_front()?;
        if let Some(b) = &self.budget {
            b.give_back(1);
        }
        Some(p)
    }

    /// Puts back a packet that could not be sent yet (it goes first again).
    pub fn unpop_tx(&mut self, pkt: Vec<u8>) {
        if let Some(b) = &self.budget {
            b.take();
        }
        self.tx.push_front(pkt);
    }

    /// Packets waiting to be transmitted.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }

    /// Whether smoltcp may transmit now.
    pub fn tx_has_room(&self) -> bool {
        self.tx.len() < self.tx_cap && self.budget_has_room()
    }
}

/// Receive token: owns the packet.
pub struct RxToken(Vec<u8>);

/// Transmit token: appends to the transmit queue (and counts the packet
/// against the device's budget, if any).
pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>, Option<&'a QueueBudget>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut pkt = vec![0u8; len];
        let r = f(&mut pkt);
        if let Some(b) = self.1 {
            b.take();
        }
        self.0.push_back(pkt);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        // No room for a reply: leave the packet in the (bounded, counted)
        // receive queue until the transmit side drains. (Not the budget: a
        // reply takes the place the received packet gives back, and a
        // budget full of received packets must still drain.)
        if self.tx.len() >= self.tx_cap {
            return None;
        }
        let pkt = self.rx.pop_front()?;
        let budget = self.budget.as_deref();
        if let Some(b) = budget {
            b.give_back(1);
        }
        Some((RxToken(pkt), TxToken(&mut self.tx, budget)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        if !self.tx_has_room() {
            return None;
        }
        Some(TxToken(&mut self.tx, self.budget.as_deref()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = TUNNEL_MTU;
        if !self.verify_rx_checksums {
            let mut c = ChecksumCapabilities::default();
            c.ipv4 = Checksum::Tx;
            c.tcp = Checksum::Tx;
            c.udp = Checksum::Tx;
            c.icmpv4 = Checksum::Tx;
            caps.checksum = c;
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    #[test]
    fn a_shared_budget_bounds_every_device_under_it() {
        let budget = QueueBudget::new(3);
        let mut a = QueueDevice::with_budget(10, 10, false, Arc::clone(&budget));
        let mut b = QueueDevice::with_budget(10, 10, false, Arc::clone(&budget));
        assert!(a.push_rx(b"1") && a.push_rx(b"2") && b.push_rx(b"3"));
        // Each queue has room, the budget has not.
        assert!(!b.push_rx(b"4") && !a.push_rx(b"4"));
        assert!(!a.tx_has_room());
        assert_eq!(budget.used(), 3);
        // smoltcp taking a packet gives its place back (and a reply takes one).
        let (rx, _tx) = phy::Device::receive(&mut a, smoltcp::time::Instant::ZERO).unwrap();
        drop(rx);
        assert_eq!(budget.used(), 2);
        assert!(b.push_rx(b"4"));
        // A dropped device returns what it held.
        drop(b);
        assert_eq!(budget.used(), 1);
        a.push_tx(vec![0]);
        assert_eq!(budget.used(), 2);
        assert!(a.pop_tx().is_some());
        assert_eq!(budget.used(), 1);
    }
}
