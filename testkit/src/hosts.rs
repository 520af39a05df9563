//! The engines as [`Host`]s of the in-memory network: relay workers
//! ([`RelayHost`]), protocol clients ([`ClientHost`]), agent cores
//! ([`AgentHost`]) and connector engines over in-memory echo backends
//! ([`ConnectorHost`]). Each keeps what its engine hands out (events,
//! datagrams, IP packets) for the test to look at between steps.

use std::any::Any;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use ztna_agent::agent_core::{AgentCore, AgentEvent};
use ztna_connector::memory_backends::MemoryBackends;
use ztna_connector::{BackendId, ConnectorConfig, Engine, Interest, Target};
use ztna_control::client::{ClientSession, Event};
use ztna_control::quic;
use ztna_control::rng::SplitMix64;
use ztna_relay::cid::{self, Instance};
use ztna_relay::limits::Limits;
use ztna_relay::mesh::Mesh;
use ztna_relay::pki::{DevPki, DEV_TRUST_DOMAIN};
use ztna_relay::policy::Policy;
use ztna_relay::ratelimit::PerIp;
use ztna_relay::security::{Security, Shared};
use ztna_relay::stats::WorkerStats;
use ztna_relay::tls::TlsMaterial;
use ztna_relay::worker::{Worker, WorkerConfig};
use ztna_udp::Transmit;

use crate::net::{Datagram, Host};

/// Largest datagram any engine here writes.
const BUF: usize = 2048;

/// A [`Transmit`] that keeps what it is given.
pub struct Collect {
    buf: Vec<u8>,
    pub out: Vec<(Vec<u8>, SocketAddr)>,
}

impl Default for Collect {
    fn default() -> Collect {
        Collect { buf: vec![0u8; BUF], out: Vec::new() }
    }
}

impl Transmit for Collect {
    fn buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn commit_from(&mut self, len: usize, to: SocketAddr, _from: Option<std::net::IpAddr>) {
        // One address per host in the simulated network: the source is
        // the host's.
        if let Some(b) = self.buf.get(..len) {
            self.out.push((b.to_vec(), to));
        }
    }
}

/// How packets find their worker in a [`RelayHost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// As the BPF program does: by the CID's worker byte.
    ByCid,
    /// As the kernel's reuseport hash without BPF: any worker (seeded);
    /// the workers' hand-off must correct it.
    Random(u64),
}

/// What a relay is built from.
pub struct RelaySpec {
    pub addr: SocketAddr,
    pub workers: usize,
    pub node_id: u16,
    pub limits: Limits,
    pub tls: TlsMaterial,
    pub policy: Policy,
    pub per_ip: PerIp,
    pub steering: Steering,
}

impl RelaySpec {
    /// A relay with the development PKI's certificate and `policy` (TOML).
    pub fn dev(addr: SocketAddr, workers: usize, pki: &DevPki, policy: &str) -> Result<RelaySpec> {
        Ok(RelaySpec {
            addr,
            workers,
            node_id: 0,
            limits: Limits::default(),
            tls: TlsMaterial::load(&pki.cert, &pki.key, &pki.ca, DEV_TRUST_DOMAIN)?,
            policy: Policy::from_toml(policy, DEV_TRUST_DOMAIN)?,
            per_ip: PerIp::new(1024, 0, 0),
            steering: Steering::ByCid,
        })
    }
}

/// A relay's workers sharing one address, as one host.
pub struct RelayHost {
    addr: SocketAddr,
    workers: Vec<Worker>,
    tx: Collect,
    steering: Steering,
    rng: SplitMix64,
}

impl RelayHost {
    pub fn new(spec: RelaySpec, now: Instant) -> Result<RelayHost> {
        let n = spec.workers.max(1);
        let mesh = Arc::new(Mesh::new(n, 1024, 1024)?);
        let security = Security::new(spec.tls, spec.policy, &Instance::configured(spec.node_id))?;
        let shared = Arc::new(Shared::new(security, spec.per_ip, now));
        let workers = (0..n)
            .map(|index| {
                let cfg = WorkerConfig {
                    index,
                    workers: n,
                    node_id: spec.node_id,
                    local_addr: spec.addr,
                    limits: spec.limits.clone(),
                };
                Worker::new(cfg, Arc::clone(&shared), Arc::clone(&mesh), Arc::new(WorkerStats::default()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let seed = match spec.steering {
            Steering::Random(s) => s,
            Steering::ByCid => 0,
        };
        Ok(RelayHost {
            addr: spec.addr,
            workers,
            tx: Collect::default(),
            steering: spec.steering,
            rng: SplitMix64::new(seed),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn workers_mut(&mut self) -> &mut [Worker] {
        &mut self.workers
    }

    /// Hands a packet to the worker steering picks.
    pub fn handle_packet(&mut self, bytes: &mut [u8], from: SocketAddr, now: Instant) {
        let n = self.workers.len();
        let w = match self.steering {
            Steering::ByCid => cid::owner(bytes, n).unwrap_or(0),
            Steering::Random(_) => (self.rng.next_u64() % n as u64) as usize,
        };
        if let Some(w) = self.workers.get_mut(w) {
            w.handle_packet(bytes, from, None, now);
        }
    }

    /// Lets every worker take its hand-offs and write what it sends into
    /// the returned list.
    pub fn flush(&mut self, now: Instant) -> Vec<(Vec<u8>, SocketAddr)> {
        for w in &mut self.workers {
            w.drain_inbox(now);
        }
        for w in &mut self.workers {
            w.flush(&mut self.tx, now);
        }
        std::mem::take(&mut self.tx.out)
    }
}

impl Host for RelayHost {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr == self.addr
    }
    fn receive(&mut self, now: Instant, mut d: Datagram) {
        self.handle_packet(&mut d.bytes, d.from, now);
    }
    fn on_timeout(&mut self, now: Instant) {
        for w in &mut self.workers {
            w.handle_timeouts(now);
        }
    }
    fn timeout(&self) -> Option<Instant> {
        self.workers.iter().filter_map(Worker::next_timeout).min()
    }
    fn transmit(&mut self, now: Instant, send: &mut dyn FnMut(SocketAddr, SocketAddr, &[u8])) {
        for (bytes, to) in self.flush(now) {
            send(self.addr, to, &bytes);
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A protocol client (`ClientSession`) at one address; keeps its events
/// and received datagrams (flow, payload).
pub struct ClientHost {
    pub addr: SocketAddr,
    pub session: ClientSession,
    pub events: Vec<Event>,
    pub datagrams: Vec<(u32, Vec<u8>)>,
}

impl ClientHost {
    pub fn new(addr: SocketAddr, session: ClientSession) -> ClientHost {
        ClientHost { addr, session, events: Vec::new(), datagrams: Vec::new() }
    }

    fn collect(&mut self) {
        while let Some(e) = self.session.poll_event() {
            self.events.push(e);
        }
        let mut buf = [0u8; BUF];
        while let Some(n) = self.session.recv_datagram(&mut buf) {
            if let Some(Ok((flow, payload))) = buf.get(..n).map(ztna_control::datagram::parse) {
                self.datagrams.push((flow, payload.to_vec()));
            }
        }
    }
}

impl Host for ClientHost {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr == self.addr
    }
    fn receive(&mut self, now: Instant, mut d: Datagram) {
        self.session.recv(&mut d.bytes, d.from, now);
        self.collect();
    }
    fn on_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        self.collect();
    }
    fn timeout(&self) -> Option<Instant> {
        self.session.next_deadline()
    }
    fn transmit(&mut self, now: Instant, send: &mut dyn FnMut(SocketAddr, SocketAddr, &[u8])) {
        let mut out = [0u8; BUF];
        while let Some((n, to)) = self.session.poll_transmit(&mut out, now) {
            if let Some(b) = out.get(..n) {
                send(self.addr, to, b);
            }
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// An agent core at one address; keeps its events and the IP packets it
/// delivers (what a TUN device would get).
pub struct AgentHost {
    pub addr: SocketAddr,
    pub core: AgentCore,
    pub events: Vec<AgentEvent>,
    pub ip_packets: Vec<Vec<u8>>,
}

impl AgentHost {
    pub fn new(addr: SocketAddr, core: AgentCore) -> AgentHost {
        AgentHost { addr, core, events: Vec::new(), ip_packets: Vec::new() }
    }

    fn collect(&mut self) {
        while let Some(e) = self.core.poll_event() {
            self.events.push(e);
        }
        let mut buf = [0u8; BUF];
        while let Some(n) = self.core.poll_ip_packet(&mut buf) {
            if let Some(p) = buf.get(..n) {
                self.ip_packets.push(p.to_vec());
            }
        }
    }

    /// Whether the agent holds a flow for every service it routes.
    pub fn registered(&self, services: usize) -> bool {
        self.events.iter().filter(|e| matches!(e, AgentEvent::Registered { .. })).count() >= services
    }
}

impl Host for AgentHost {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr == self.addr
    }
    fn receive(&mut self, now: Instant, mut d: Datagram) {
        self.core.recv_udp(&mut d.bytes, d.from, now);
        self.collect();
    }
    fn on_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.collect();
    }
    fn timeout(&self) -> Option<Instant> {
        self.core.next_deadline()
    }
    fn transmit(&mut self, now: Instant, send: &mut dyn FnMut(SocketAddr, SocketAddr, &[u8])) {
        let mut out = [0u8; BUF];
        while let Some((n, to)) = self.core.poll_udp(&mut out, now) {
            if let Some(b) = out.get(..n) {
                send(self.addr, to, b);
            }
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A connector engine at one address whose backends are
/// [`MemoryBackends`] (echo servers in memory): the whole connector but
/// its sockets.
pub struct ConnectorHost {
    pub addr: SocketAddr,
    pub engine: Engine,
    pub backends: MemoryBackends,
    /// The time of the last call (what [`Host::timeout`] is relative to).
    now: Instant,
    interest: Vec<(BackendId, Interest)>,
}

impl ConnectorHost {
    /// A connector for `cfg` at `addr`, with a session to each of
    /// `relays` (TLS from `cfg`'s files); `targets` gives every backend
    /// target an address (the memory backends answer on any).
    pub fn new(
        addr: SocketAddr,
        cfg: ConnectorConfig,
        targets: HashMap<Target, SocketAddr>,
        relays: &[SocketAddr],
        seed: u64,
        now: Instant,
    ) -> Result<ConnectorHost> {
        let tls = cfg.client_tls()?;
        let mut engine = Engine::new(cfg, targets, addr, &tls, seed, now)?;
        let backends = MemoryBackends::default();
        let mut quic = || quic::client_tls(&tls).map_err(|e| anyhow::anyhow!("TLS configuration: {e}"));
        engine.set_relays(relays, now, &mut quic)?;
        Ok(ConnectorHost { addr, engine, backends, now, interest: Vec::new() })
    }

    /// Runs the engine's timers and hands it what the backends have,
    /// until they are quiet (bounded: an echo backend answers at once).
    fn run(&mut self, now: Instant) {
        self.now = now;
        self.engine.handle_timeout(now, &mut self.backends);
        for _ in 0..64 {
            self.interest.clear();
            self.engine.backend_interest(&mut self.interest);
            let events = self.backends.events(&self.interest);
            if events.is_empty() {
                break;
            }
            for ev in &events {
                self.engine.handle_backend(now, ev.as_event());
            }
            self.engine.handle_timeout(now, &mut self.backends);
        }
    }
}

impl Host for ConnectorHost {
    fn owns(&self, addr: SocketAddr) -> bool {
        addr == self.addr
    }
    fn receive(&mut self, now: Instant, mut d: Datagram) {
        self.engine.handle_datagram(now, d.from, &mut d.bytes, &mut self.backends);
        self.run(now);
    }
    fn on_timeout(&mut self, now: Instant) {
        self.run(now);
    }
    fn timeout(&self) -> Option<Instant> {
        self.engine.next_timeout(self.now)
    }
    fn transmit(&mut self, now: Instant, send: &mut dyn FnMut(SocketAddr, SocketAddr, &[u8])) {
        let mut out = [0u8; BUF];
        while let Some((n, to)) = self.engine.poll_transmit(&mut out, now) {
            if let Some(b) = out.get(..n) {
                send(self.addr, to, b);
            }
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// How long a handshake and registration take at most on a lossy
/// simulated network (virtual time).
pub const SETUP: Duration = Duration::from_secs(10);
