//! An in-memory UDP network with a virtual clock, for running the engines
//! together without sockets (the model is quinn-proto's test `Pair` and
//! smoltcp's loopback examples, for more than two hosts).
//!
//! [`Network`] carries datagrams between addresses with a base delay, a
//! random jitter (so datagrams overtake each other), loss, duplication and
//! an MTU; its clock only moves when [`Sim`] advances it. A [`Host`] is an
//! engine and its addresses: [`Sim::step`] moves the clock to the next
//! arrival or host deadline, delivers what arrived, runs due timers and
//! sends what the hosts want to send. Everything is deterministic for a
//! given seed.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_control::rng::SplitMix64;

/// How the network treats datagrams.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// One-way delay of every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in 0..jitter: datagrams sent close together
    /// arrive out of order.
    pub jitter: Duration,
    /// Fraction of datagrams dropped (0.0–1.0).
    pub loss: f64,
    /// Fraction of datagrams delivered twice (each copy with its own delay).
    pub duplicate: f64,
    /// Largest UDP payload carried; larger datagrams are dropped.
    pub mtu: usize,
    pub seed: u64,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            mtu: 1500,
            seed: 1,
        }
    }
}

/// What the network did, for assertions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub too_big: u64,
    pub delivered: u64,
    /// Delivered to an address no host owns.
    pub unroutable: u64,
    /// Dropped between blocked address pairs ([`Network::block`]).
    pub blocked: u64,
}

/// A datagram in flight or delivered.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Datagrams in flight, ordered by arrival time (then send order).
pub struct Network {
    cfg: NetConfig,
    rng: SplitMix64,
    now: Instant,
    seq: u64,
    inflight: BinaryHeap<Reverse<(Instant, u64)>>,
    payloads: std::collections::HashMap<u64, Datagram>,
    /// IP pairs between which nothing passes (either way).
    blocked: Vec<(std::net::IpAddr, std::net::IpAddr)>,
    pub stats: NetStats,
}

impl Network {
    pub fn new(cfg: NetConfig, start: Instant) -> Network {
        Network {
            rng: SplitMix64::new(cfg.seed),
            cfg,
            now: start,
            seq: 0,
            inflight: BinaryHeap::new(),
            payloads: std::collections::HashMap::new(),
            blocked: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// The virtual clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn config_mut(&mut self) -> &mut NetConfig {
        &mut self.cfg
    }

    /// From now on nothing passes between `a` and `b` (either way), as
    /// when a firewall starts dropping a path; [`Network::unblock`] ends it.
    pub fn block(&mut self, a: std::net::IpAddr, b: std::net::IpAddr) {
        self.blocked.push((a, b));
    }

    pub fn unblock(&mut self, a: std::net::IpAddr, b: std::net::IpAddr) {
        self.blocked.retain(|p| *p != (a, b));
    }

    /// Sends `bytes` from `from` to `to` now.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        self.stats.sent += 1;
        let (f, t) = (from.ip(), to.ip());
        if self.blocked.iter().any(|p| *p == (f, t) || *p == (t, f)) {
            self.stats.blocked += 1;
            return;
        }
        if bytes.len() > self.cfg.mtu {
            self.stats.too_big += 1;
            return;
        }
        if self.rng.next_f64() < self.cfg.loss {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.next_f64() < self.cfg.duplicate { 2 } else { 1 };
        self.stats.duplicated += copies - 1;
        for _ in 0..copies {
            let at = self.now + self.cfg.delay + self.cfg.jitter.mul_f64(self.rng.next_f64());
            self.seq += 1;
            self.inflight.push(Reverse((at, self.seq)));
            self.payloads.insert(self.seq, Datagram { from, to, bytes: bytes.to_vec() });
        }
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.inflight.peek().map(|Reverse((at, _))| *at)
    }

    /// The next datagram due at the current time, if any.
    pub fn pop_due(&mut self) -> Option<Datagram> {
        let Reverse((at, seq)) = *self.inflight.peek()?;
        if at > self.now {
            return None;
        }
        self.inflight.pop();
        self.payloads.remove(&seq)
    }

    /// Moves the clock forward (never back).
    pub fn advance_to(&mut self, t: Instant) {
        self.now = self.now.max(t);
    }
}

/// An engine on the network: its addresses, and how it takes datagrams and
/// timers and hands out what it sends.
pub trait Host: Any {
    /// Whether datagrams to `addr` are for this host.
    fn owns(&self, addr: SocketAddr) -> bool;
    /// A datagram arrived.
    fn receive(&mut self, now: Instant, d: Datagram);
    /// Timers, and whatever work the engine does between datagrams.
    fn on_timeout(&mut self, now: Instant);
    /// The engine's next deadline.
    fn timeout(&self) -> Option<Instant>;
    /// Everything it wants to send now: `send(from, to, bytes)`.
    fn transmit(&mut self, now: Instant, send: &mut dyn FnMut(SocketAddr, SocketAddr, &[u8]));
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Index of a host in a [`Sim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostId(pub usize);

/// A network and the hosts on it.
pub struct Sim {
    pub net: Network,
    hosts: Vec<Box<dyn Host>>,
    /// Longest the clock moves in one step when nothing is due sooner.
    pub max_step: Duration,
}

impl Sim {
    pub fn new(cfg: NetConfig) -> Sim {
        Sim { net: Network::new(cfg, Instant::now()), hosts: Vec::new(), max_step: Duration::from_millis(50) }
    }

    pub fn now(&self) -> Instant {
        self.net.now()
    }

    pub fn add(&mut self, h: impl Host) -> HostId {
        self.hosts.push(Box::new(h));
        HostId(self.hosts.len() - 1)
    }

    /// The host `id` as its concrete type (panics on a wrong type: test code).
    pub fn host<T: Host>(&mut self, id: HostId) -> &mut T {
        match self.hosts.get_mut(id.0).and_then(|h| h.as_any_mut().downcast_mut::<T>()) {
            Some(h) => h,
            None => panic!("host {} is not a {}", id.0, std::any::type_name::<T>()),
        }
    }

    /// One step: the clock moves to the earliest arrival or deadline (at
    /// most `max_step` ahead), arrivals are delivered, timers run, and
    /// every host transmits.
    pub fn step(&mut self) {
        let now = self.net.now();
        let next = self.hosts.iter().filter_map(|h| h.timeout()).chain(self.net.next_arrival()).min();
        let to = next.map_or(now + self.max_step, |t| t.clamp(now, now + self.max_step));
        self.net.advance_to(to);
        let now = self.net.now();
        while let Some(d) = self.net.pop_due() {
            match self.hosts.iter_mut().find(|h| h.owns(d.to)) {
                Some(h) => {
                    self.net.stats.delivered += 1;
                    h.receive(now, d);
                }
                None => self.net.stats.unroutable += 1,
            }
        }
        let net = &mut self.net;
        for h in &mut self.hosts {
            if h.timeout().is_some_and(|t| t <= now) {
                h.on_timeout(now);
            }
            h.transmit(now, &mut |from, to, bytes| net.send(from, to, bytes));
        }
    }

    /// Steps until `done` holds or `limit` of virtual time has passed;
    /// whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let end = self.now() + limit;
        while self.now() < end {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    #[test]
    fn delivers_after_the_delay_and_reorders_with_jitter() {
        let start = Instant::now();
        let cfg =
            NetConfig { delay: Duration::from_millis(10), jitter: Duration::from_millis(20), ..NetConfig::default() };
        let mut n = Network::new(cfg, start);
        for i in 0..100u8 {
            n.send(addr(1), addr(2), &[i]);
        }
        assert!(n.pop_due().is_none(), "nothing arrives before the delay");
        n.advance_to(start + Duration::from_millis(31));
        let order: Vec<u8> = std::iter::from_fn(|| n.pop_due()).map(|d| d.bytes[0]).collect();
        assert_eq!(order.len(), 100);
        assert!(order.windows(2).any(|w| w[0] > w[1]), "jitter reorders: {order:?}");
    }

    #[test]
    fn loss_duplication_and_mtu() {
        let cfg = NetConfig { loss: 0.5, duplicate: 0.5, mtu: 100, ..NetConfig::default() };
        let mut n = Network::new(cfg, Instant::now());
        for _ in 0..1000 {
            n.send(addr(1), addr(2), &[0; 50]);
        }
        n.send(addr(1), addr(2), &[0; 101]);
        assert_eq!(n.stats.too_big, 1);
        assert!((400..600).contains(&n.stats.lost), "{:?}", n.stats);
        assert!(n.stats.duplicated > 100, "{:?}", n.stats);
        n.advance_to(n.now() + Duration::from_secs(1));
        let got = std::iter::from_fn(|| n.pop_due()).count() as u64;
        assert_eq!(got, 1000 - n.stats.lost + n.stats.duplicated);
    }
}
