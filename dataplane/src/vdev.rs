//! A virtual IP device for smoltcp: the "wire" is two bounded queues of
//! whole IPv4 packets. The connector feeds it the agent's tunneled TCP
//! packets and sends what smoltcp transmits back through the relay; the
//! agent side ([`crate::tunnel_tcp`]) does the same from the other end.
//!
//! The MTU is [`TUNNEL_MTU`] (1280): a 1280-byte inner IP packet always
//! fits a DATAGRAM on every leg (docs/PROTOCOL.md §5.4), so TCP over this
//! device announces and uses an MSS of 1240.

use std::collections::VecDeque;
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

/// The device: bounded receive and transmit queues of IP packets.
pub struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    rx_cap: usize,
    tx_cap: usize,
    verify_rx_checksums: bool,
}

impl QueueDevice {
    /// `rx_cap` and `tx_cap` bound the queues in packets. With
    /// `verify_rx_checksums` false, smoltcp trusts received checksums (the
    /// connector has verified them already while parsing).
    pub fn new(rx_cap: usize, tx_cap: usize, verify_rx_checksums: bool) -> QueueDevice {
        QueueDevice { rx: VecDeque::new(), tx: VecDeque::new(), rx_cap, tx_cap, verify_rx_checksums }
    }

    /// Queues a received packet; false (packet dropped) when the queue is full.
    pub fn push_rx(&mut self, pkt: &[u8]) -> bool {
        if self.rx.len() >= self.rx_cap {
            return false;
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
        self.tx.push_back(pkt);
    }

    /// The next packet to transmit.
    pub fn pop_tx(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// Puts back a packet that could not be sent yet (it goes first again).
    pub fn unpop_tx(&mut self, pkt: Vec<u8>) {
        self.tx.push_front(pkt);
    }

    /// Packets waiting to be transmitted.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }

    /// Whether smoltcp may transmit now.
    pub fn tx_has_room(&self) -> bool {
        self.tx.len() < self.tx_cap
    }
}

/// Receive token: owns the packet.
pub struct RxToken(Vec<u8>);

/// Transmit token: appends to the transmit queue.
pub struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

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
        self.0.push_back(pkt);
        r
    }
}

impl phy::Device for QueueDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        // No room for a reply: leave the packet in the (bounded, counted)
        // receive queue until the transmit side drains.
        if self.tx.len() >= self.tx_cap {
            return None;
        }
        let pkt = self.rx.pop_front()?;
        Some((RxToken(pkt), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= self.tx_cap {
            return None;
        }
        Some(TxToken(&mut self.tx))
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
