//! `ztna-bench connector-turns`: what one connector loop turn costs with
//! many end-to-end sessions and many idle UDP flows, against the same
//! connector with one of each.
//!
//! An in-process relay, a UDP echo service and a connector driven turn by
//! turn from this thread; agents (one identity and one end-to-end session
//! each, hand-driven [`RawTunnel`]s) open UDP flows by sending from
//! distinct source ports. Measured, each on this thread's CPU clock:
//!
//! - an idle turn (`turn(0)`, nothing arrived) with 1 session and 1 flow,
//!   with `--sessions` sessions, and with those sessions holding `--flows`
//!   flows;
//! - the turns that set up a batch of new 5-tuples (packet in, backend
//!   socket, echo back), per new flow, with 1 flow and with all of them.
//!
//! Ratios large / small near 1 mean the turn costs what arrived, not what
//! the tables hold.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztna_connector::{BackendRoute, Connector, ConnectorConfig, Proto, ServiceConfig};
use ztna_control::client::ClientConfig;
use ztna_control::identity::Kind;
use ztna_control::{packet, Role, ServiceName};
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_testkit::client_io::UdpClient;
use ztna_testkit::echo::EchoServer;
use ztna_testkit::raw_tunnel::RawTunnel;

const SERVICE: &str = "echo";
const ECHO_PORT: u16 = 7;
/// UDP flows each agent opens at most (the connector's default per agent
/// flow).
const FLOWS_PER_AGENT: usize = 256;
/// New flows per batch of the new-flow measurement.
const BATCH: usize = 64;

/// What `connector-turns` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorTurnsReport {
    pub sessions: usize,
    pub flows: usize,
    pub idle_turns: usize,
    /// CPU microseconds of one idle turn with 1 session and 1 flow, with
    /// `sessions` sessions, and with `sessions` sessions holding `flows`.
    pub idle_turn_us_1: f64,
    pub idle_turn_us_sessions: f64,
    pub idle_turn_us_n: f64,
    pub idle_sessions_ratio: f64,
    pub idle_ratio: f64,
    /// CPU microseconds per new flow (batches of [`BATCH`]) with 1 flow /
    /// with `flows` open.
    pub new_flow_us_1: f64,
    pub new_flow_us_n: f64,
    pub new_flow_ratio: f64,
    /// The connector's `udp_backend_reads` counter over the idle turns with
    /// `flows` open.
    pub backend_reads_idle_n: u64,
}

impl ConnectorTurnsReport {
    pub fn print(&self) {
        println!("connector turn cost, {} idle turns per measurement", self.idle_turns);
        println!(
            "  idle turn:  1 session {:>8.2} us   {} sessions {:>8.2} us   ratio {:.2}",
            self.idle_turn_us_1, self.sessions, self.idle_turn_us_sessions, self.idle_sessions_ratio
        );
        println!(
            "  idle turn:  1 flow    {:>8.2} us   {} flows    {:>8.2} us   ratio {:.2}",
            self.idle_turn_us_1, self.flows, self.idle_turn_us_n, self.idle_ratio
        );
        println!(
            "  new flow:   1 flow    {:>8.2} us   {} flows    {:>8.2} us   ratio {:.2}",
            self.new_flow_us_1, self.flows, self.new_flow_us_n, self.new_flow_ratio
        );
        println!("  backend reads during the idle turns with {} flows: {}", self.flows, self.backend_reads_idle_n);
    }
}

struct Bench {
    connector: Connector,
    agents: Vec<RawTunnel>,
    /// CPU spent in `Connector::turn`.
    connector_cpu: Duration,
    pkt: Vec<u8>,
    buf: Vec<u8>,
}

impl Bench {
    fn turn(&mut self, wait: Duration) -> Result<()> {
        let t0 = crate::cpu::thread_cpu_time();
        self.connector.turn(wait)?;
        self.connector_cpu += crate::cpu::thread_cpu_time().saturating_sub(t0);
        Ok(())
    }

    /// Pumps every agent, discarding the tunneled packets they receive.
    fn pump_agents(&mut self) {
        for a in &mut self.agents {
            a.pump();
            while a.session.recv_ip(&mut self.buf).is_some() {}
        }
    }

    /// Pumps agents and turns the connector until `done` holds.
    fn run_until(&mut self, what: &str, done: impl Fn(&Connector) -> bool) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(30);
        while !done(&self.connector) {
            self.pump_agents();
            self.turn(Duration::from_millis(1))?;
            if Instant::now() > end {
                bail!("timed out waiting for {what}: {:?}", self.connector.stats);
            }
        }
        Ok(())
    }

    /// Sends one datagram from each of `ports` of agent `a` to the service.
    fn open(&mut self, a: usize, ports: std::ops::Range<u16>) -> Result<()> {
        let svc = SocketAddrV4::new([100, 100, 0, 10].into(), ECHO_PORT);
        for p in ports {
            let me = SocketAddrV4::new([10, 9, (a >> 8) as u8, a as u8].into(), p);
            packet::build_ipv4_udp(me, svc, b"bench", &mut self.pkt)?;
            // The session queue is bounded: pump until it takes the datagram.
            let end = Instant::now() + Duration::from_secs(10);
            while self.agents.get_mut(a).context("agent")?.session.send_ip(&self.pkt).is_err() {
                self.pump_agents();
                self.turn(Duration::ZERO)?;
                if Instant::now() > end {
                    bail!("agent {a} cannot send");
                }
            }
        }
        if let Some(agent) = self.agents.get_mut(a) {
            agent.pump();
        }
        Ok(())
    }

    fn opened(&self) -> u64 {
        self.connector.stats.snapshot().udp_flows_opened
    }

    fn replies(&self) -> u64 {
        self.connector.stats.snapshot().udp_from_backend
    }

    /// CPU per idle turn over `turns` turns.
    fn idle_turns(&mut self, turns: usize) -> Result<f64> {
        let c0 = self.connector_cpu;
        for _ in 0..turns {
            self.turn(Duration::ZERO)?;
        }
        Ok((self.connector_cpu - c0).as_secs_f64() * 1e6 / turns.max(1) as f64)
    }

    /// CPU per new flow: agent `a` opens [`BATCH`] flows from `ports`.
    fn new_flows(&mut self, a: usize, first_port: u16) -> Result<f64> {
        let (opened, replies) = (self.opened(), self.replies());
        let c0 = self.connector_cpu;
        self.open(a, first_port..first_port + BATCH as u16)?;
        let want = BATCH as u64;
        self.run_until("new flows", |c| {
            let s = c.stats.snapshot();
            s.udp_flows_opened >= opened + want && s.udp_from_backend >= replies + want
        })?;
        Ok((self.connector_cpu - c0).as_secs_f64() * 1e6 / BATCH as f64)
    }

    /// Brings up agents until there are `n`, each with its own identity and
    /// end-to-end session. The connector runs on a helper thread meanwhile
    /// (each agent's handshake pumps that agent alone); it comes back.
    fn connect_agents(self, relay: &RelayHandle, n: usize) -> Result<Bench> {
        let Bench { connector, mut agents, connector_cpu, pkt, buf } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let helper = std::thread::Builder::new().name("connector".into()).spawn(move || -> Result<Connector> {
            let mut c = connector;
            while !s.load(Ordering::Acquire) {
                c.turn(Duration::from_millis(1))?;
            }
            Ok(c)
        })?;
        let pki = relay.dev_pki.as_ref().context("dev PKI")?;
        let connected = (|| -> Result<()> {
            while agents.len() < n {
                let i = agents.len();
                let tls = pki.client_tls(Kind::Agent, &format!("bench-agent-{i}"))?;
                let mut c = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse()?, "localhost");
                c.registrations = vec![(Role::Agent, ServiceName::new(SERVICE).context("service")?)];
                let client = UdpClient::new(c, &tls, "127.0.0.1:0".parse()?, 100 + i as u64)?;
                let svc = ServiceName::new(SERVICE).context("service")?;
                agents.push(RawTunnel::connect(client, &tls, svc, Duration::from_secs(10))?);
                if i % 32 == 31 {
                    // Keep the earlier ones' relay and inner sessions alive.
                    for a in &mut agents {
                        a.pump();
                    }
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        let connector = helper.join().map_err(|_| anyhow::anyhow!("connector thread panicked"))??;
        connected?;
        Ok(Bench { connector, agents, connector_cpu, pkt, buf })
    }
}

/// Runs the measurement with `sessions` end-to-end sessions (at most the
/// connector's default 1024) holding `flows` idle UDP flows (at most
/// 4096, its default table; 256 per session), `turns` idle turns per
/// figure.
pub fn run(sessions: usize, flows: usize, turns: usize) -> Result<ConnectorTurnsReport> {
    if !(BATCH + 1..=4096).contains(&flows) {
        bail!("--flows must be between {} and 4096", BATCH + 1);
    }
    // The flows' agents plus one with room for the last batch.
    if !(flows.div_ceil(FLOWS_PER_AGENT) + 1..=1024).contains(&sessions) {
        bail!("--sessions must be between {} and 1024 for {flows} flows", flows.div_ceil(FLOWS_PER_AGENT) + 1);
    }
    let relay = server::start(&RelayConfig {
        listen: "127.0.0.1:0".parse()?,
        workers: Some(1),
        dev: true,
        pin_cores: false,
        policy_toml: Some(format!("[services.{SERVICE}]\nconnectors = [\"bench-connector\"]\nagents = [\"*\"]\n")),
        ..RelayConfig::default()
    })?;
    let r = run_with(&relay, sessions, flows, turns);
    relay.shutdown();
    r
}

fn run_with(relay: &RelayHandle, sessions: usize, flows: usize, turns: usize) -> Result<ConnectorTurnsReport> {
    let pki = relay.dev_pki.as_ref().context("dev PKI")?;
    let (cert, key) = pki.issue(Kind::Connector, "bench-connector")?;
    let echo = EchoServer::start("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?)?;
    let mut cfg = ConnectorConfig::new(
        vec![relay.local_addr],
        vec![ServiceConfig {
            name: SERVICE.into(),
            icmp: true,
            backend: vec![BackendRoute { protocol: Proto::Udp, port: ECHO_PORT, target: echo.udp_addr.into() }],
            allow_agents: None,
            path: Default::default(),
        }],
    );
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.ca = Some(pki.ca.clone());
    cfg.cert = Some(cert);
    cfg.key = Some(key);
    // Long enough that no flow expires during the run.
    cfg.udp_idle_secs = 3600;
    // Room for the last batch on top of `flows`.
    cfg.max_udp_flows = flows + BATCH;
    let mut connector = Connector::new(cfg, 17)?;
    let end = Instant::now() + Duration::from_secs(10);
    while !connector.is_ready() {
        connector.turn(Duration::from_millis(10))?;
        if Instant::now() > end {
            bail!("connector did not register");
        }
    }
    let b = Bench { connector, agents: Vec::new(), connector_cpu: Duration::ZERO, pkt: Vec::new(), buf: vec![0; 2048] };

    // One session, one flow.
    let mut b = b.connect_agents(relay, 1)?;
    b.open(0, 1000..1001)?;
    b.run_until("the first flow", |c| c.stats.snapshot().udp_from_backend >= 1)?;
    let idle_1 = b.idle_turns(turns)?;
    let new_1 = b.new_flows(0, 20_000)?;

    // `sessions` sessions, nothing else open.
    let mut b = b.connect_agents(relay, sessions)?;
    b.run_until("the sessions to settle", |c| c.engine().e2e_sessions_up() >= sessions)?;
    let idle_sessions = b.idle_turns(turns)?;

    // `flows` flows: agent a opens ports 1000.. (agent 0 holds 1 + BATCH).
    let mut left = flows - 1 - BATCH;
    let (mut a, mut next_port) = (1usize, 1000u16);
    while left > 0 {
        let room = FLOWS_PER_AGENT - usize::from(next_port - 1000);
        let n = left.min(room).min(BATCH);
        b.open(a, next_port..next_port + n as u16)?;
        let target = b.opened() + n as u64;
        b.run_until("flows to open", |c| c.stats.snapshot().udp_flows_opened >= target)?;
        left -= n;
        next_port += n as u16;
        if usize::from(next_port - 1000) >= FLOWS_PER_AGENT {
            a += 1;
            next_port = 1000;
        }
    }
    let want = flows as u64;
    b.run_until("every echo", |c| c.stats.snapshot().udp_from_backend >= want)?;
    if b.opened() != want {
        bail!("expected {flows} flows, the connector opened {}", b.opened());
    }
    let reads0 = b.connector.stats.snapshot().udp_backend_reads;
    let idle_n = b.idle_turns(turns)?;
    let reads_n = b.connector.stats.snapshot().udp_backend_reads - reads0;
    // The last agent opened at most one batch of its 256: room for one more.
    let new_n = b.new_flows(sessions - 1, 21_000)?;
    Ok(ConnectorTurnsReport {
        sessions,
        flows,
        idle_turns: turns,
        idle_turn_us_1: idle_1,
        idle_turn_us_sessions: idle_sessions,
        idle_turn_us_n: idle_n,
        idle_sessions_ratio: idle_sessions / idle_1.max(1e-9),
        idle_ratio: idle_n / idle_1.max(1e-9),
        new_flow_us_1: new_1,
        new_flow_us_n: new_n,
        new_flow_ratio: new_n / new_1.max(1e-9),
        backend_reads_idle_n: reads_n,
    })
}
