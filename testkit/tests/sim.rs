#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The sans-I/O cores without sockets: two relay `Worker`s and client
//! `ClientSession`s exchange packets through an in-memory network that
//! delays, reorders and drops them. No socket is opened; the same engine
//! runs under io_uring in production.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::identity::Kind;
use ztna_control::quic;
use ztna_control::rng::SplitMix64;
use ztna_control::{Role, ServiceName};
use ztna_relay::cid::Instance;
use ztna_relay::mesh::Mesh;
use ztna_relay::policy::Policy;
use ztna_relay::ratelimit::PerIp;
use ztna_relay::security::{Security, Shared};
use ztna_relay::stats::WorkerStats;
use ztna_relay::tls::TlsMaterial;
use ztna_relay::worker::{Limits, Worker, WorkerConfig};
use ztna_udp::Transmit;

struct Packet {
    at: Instant,
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

/// Delays each packet by 0–`jitter`, so packets overtake each other, and
/// drops `loss` of them.
struct SimNet {
    inflight: Vec<Packet>,
    rng: SplitMix64,
    jitter: Duration,
    loss: f64,
    sent: u64,
    dropped: u64,
}

impl SimNet {
    fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8], now: Instant) {
        self.sent += 1;
        if self.rng.next_f64() < self.loss {
            self.dropped += 1;
            return;
        }
        let at = now + self.jitter.mul_f64(self.rng.next_f64());
        self.inflight.push(Packet { at, from, to, bytes: bytes.to_vec() });
    }

    fn due(&mut self, now: Instant) -> Vec<Packet> {
        let (due, rest) = std::mem::take(&mut self.inflight).into_iter().partition(|p| p.at <= now);
        self.inflight = rest;
        due
    }
}

/// Collects a worker's transmits.
struct Collect {
    buf: Vec<u8>,
    out: Vec<(Vec<u8>, SocketAddr)>,
}

impl Transmit for Collect {
    fn buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn commit(&mut self, len: usize, to: SocketAddr) {
        self.out.push((self.buf[..len].to_vec(), to));
    }
}

/// An echo crosses four lossy hops (agent→relay→connector→relay→agent) at
/// 5 % loss each: about 81 % come back on average; 65 % leaves room for
/// the variance of 200 samples without hiding a real loss in the relay
/// (whose drop counters are printed on failure).
const MIN_ECHOES: u32 = 130;

#[test]
fn registration_and_echo_survive_delay_reordering_and_loss() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let mesh = Arc::new(Mesh::new(2, 1024, 1024).unwrap());
    let td = ztna_relay::pki::DEV_TRUST_DOMAIN;
    let material = TlsMaterial::load(&pki.cert, &pki.key, &pki.ca, td).unwrap();
    let policy = Policy::from_toml("[services.echo]\nconnectors = [\"c\"]\nagents = [\"*\"]\n", td).unwrap();
    let shared = Arc::new(Shared::new(
        Security::new(material, policy, &Instance::configured(0)).unwrap(),
        PerIp::new(1024, 0, 0),
        Instant::now(),
    ));
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| {
            let cfg = WorkerConfig { index: i, workers: 2, node_id: 0, local_addr: relay, limits: Limits::default() };
            Worker::new(cfg, Arc::clone(&shared), Arc::clone(&mesh), Arc::new(WorkerStats::default())).unwrap()
        })
        .collect();

    let mk = |port: u16, role: Role, seed: u64| {
        let local: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let mut cfg = ClientConfig::new(relay, local, "localhost");
        cfg.registrations = vec![(role, ServiceName::new("echo").unwrap())];
        let tls = match role {
            Role::Connector => pki.client_tls(Kind::Connector, "c").unwrap(),
            Role::Agent => pki.client_tls(Kind::Agent, &format!("a{seed}")).unwrap(),
        };
        (local, ClientSession::new(cfg, quic::client_config(&tls).unwrap(), seed, Instant::now()))
    };
    let mut clients: HashMap<SocketAddr, (ClientSession, Role)> = HashMap::new();
    for (i, role) in [Role::Connector, Role::Agent, Role::Agent, Role::Agent].into_iter().enumerate() {
        let (addr, s) = mk(5000 + i as u16, role, i as u64 + 1);
        clients.insert(addr, (s, role));
    }

    let mut net = SimNet {
        inflight: Vec::new(),
        rng: SplitMix64::new(42),
        jitter: Duration::from_millis(15),
        loss: 0.05,
        sent: 0,
        dropped: 0,
    };
    let mut tx = Collect { buf: vec![0u8; 2048], out: Vec::new() };
    let mut out = vec![0u8; 2048];
    let mut flows: HashMap<SocketAddr, u32> = HashMap::new();
    let mut sent_by: HashMap<SocketAddr, u32> = HashMap::new();
    let mut echoed_to: HashMap<SocketAddr, u32> = HashMap::new();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        let now = Instant::now();
        // Deliver what is due, in arrival order, wherever it goes.
        for p in net.due(now) {
            let mut bytes = p.bytes;
            if p.to == relay {
                // The kernel's reuseport hash: any worker; steering or
                // hand-off must cope.
                let w = (net.rng.next_u64() % 2) as usize;
                workers[w].handle_packet(&mut bytes, p.from, now);
            } else if let Some((s, _)) = clients.get_mut(&p.to) {
                s.recv(&mut bytes, p.from, now);
            }
        }
        for w in workers.iter_mut() {
            w.drain_inbox(now);
            w.handle_timeouts(now);
            w.flush(&mut tx, now);
        }
        for (bytes, to) in tx.out.drain(..) {
            net.send(relay, to, &bytes, now);
        }
        for (addr, (s, role)) in clients.iter_mut() {
            if s.next_deadline().is_some_and(|d| d <= now) {
                s.handle_timeout(now);
            }
            while let Some(e) = s.poll_event() {
                if let Event::Registered { flow, .. } = e {
                    flows.insert(*addr, flow);
                }
            }
            while let Some(n) = s.recv_datagram(&mut buf) {
                let (flow, payload) = ztna_control::datagram::parse(&buf[..n]).unwrap();
                let payload = payload.to_vec();
                match role {
                    Role::Connector => {
                        let _ = s.send_datagram(flow, &payload);
                    }
                    Role::Agent => {
                        assert_eq!(&payload[..2], &addr.port().to_be_bytes(), "echo reached the wrong agent");
                        *echoed_to.entry(*addr).or_default() += 1;
                    }
                }
            }
            if *role == Role::Agent {
                if let Some(flow) = flows.get(addr) {
                    let n = sent_by.entry(*addr).or_default();
                    if *n < 200 && s.send_datagram(*flow, &addr.port().to_be_bytes()).is_ok() {
                        *n += 1;
                    }
                }
            }
            while let Some((n, to)) = s.poll_transmit(&mut out, now) {
                net.send(*addr, to, &out[..n], now);
            }
        }
        if echoed_to.len() == 3 && echoed_to.values().all(|&n| n >= MIN_ECHOES) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(flows.len(), 4, "every client registered despite loss: {flows:?}");
    assert!(net.dropped > 0, "the network did drop packets");
    for (a, n) in &echoed_to {
        // Datagrams are unreliable: with 5% loss each way most, not all,
        // come back.
        let stats: Vec<_> = workers.iter().map(|w| w.stats().snapshot()).collect();
        assert!(*n >= MIN_ECHOES, "agent {a} got {n} of 200 echoes; workers {stats:?}");
    }
    assert_eq!(echoed_to.len(), 3);
    let handoffs: u64 = workers.iter().map(|w| w.stats().handoff_out.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(handoffs > 0, "packets that reached the wrong worker were handed over");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
