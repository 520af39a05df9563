//! Traffic through the whole tunnel: the agent core (in-process, as the
//! packet-tunnel extension would run it) → relay → connector → echo
//! service, for UDP and TCP. Used by `ztna-bench demo` and
//! `ztna-bench tunnel`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ztna_agent::direct::PathSettings;
use ztna_control::candidate::PathPolicy;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use ztna_connector::{
    BackendRoute, Connector, ConnectorConfig, ConnectorStats, DrivenEngine, Engine, EngineInputs, Proto, ServiceConfig,
};
use ztna_control::identity::Kind;
use ztna_control::packet::{self, Transport};
use ztna_control::quic::TlsOptions;
use ztna_control::ServiceName;
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_testkit::agent_link::AgentLink;
use ztna_testkit::echo::EchoServer;
use ztna_testkit::tunnel_tcp::{IpLink, TunnelTcp};
use ztna_udp::IoBackend;

/// The service, its address as agents see it, and the echo port.
pub const SERVICE: &str = "echo";
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(100, 100, 0, 10);
pub const ECHO_PORT: u16 = 7;
/// The agent's own tunnel address (source of its inner packets).
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

/// An agent routing [`SERVICE_IP`] to [`SERVICE`], as an [`IpLink`], with
/// path policy `policy` (`RelayOnly` for what measures the relay path).
pub fn agent_link(relay: SocketAddr, tls: TlsOptions, seed: u64, policy: PathPolicy) -> Result<AgentLink> {
    let routes = vec![(
        ServiceName::new(SERVICE).context("service name")?,
        ztna_agent::route::Cidr::new(SERVICE_IP.into(), 32).context("cidr")?,
    )];
    let paths = PathSettings { default_policy: policy, ..PathSettings::default() };
    Ok(AgentLink::with_paths(relay, tls, routes, seed, paths)?)
}

/// Relay, echo service and connector, all in-process on loopback.
pub struct TunnelEnv {
    pub relay: RelayHandle,
    pub echo: EchoServer,
    stop: Arc<AtomicBool>,
    connector: Option<JoinHandle<Result<()>>>,
    /// The connector thread's id (for its CPU time), and its counters.
    pub connector_tid: i32,
    pub connector_stats: Arc<ConnectorStats>,
}

impl TunnelEnv {
    /// With the product's connector engine.
    pub fn start(workers: usize, io_backend: IoBackend) -> Result<TunnelEnv> {
        TunnelEnv::start_with(workers, io_backend, |i| Engine::new(i.cfg, i.targets, i.local, &i.tls, i.seed, i.now))
    }

    /// With the connector engine `build` makes (the product's, or the
    /// bench's cleartext baseline) on the product's driver.
    pub fn start_with<E: DrivenEngine + Send + 'static>(
        workers: usize,
        io_backend: IoBackend,
        build: impl FnOnce(EngineInputs) -> Result<E>,
    ) -> Result<TunnelEnv> {
        let relay = server::start(&RelayConfig {
            listen: "127.0.0.1:0".parse()?,
            workers: Some(workers),
            dev: true,
            io_backend,
            pin_cores: false,
            policy_toml: Some(format!("[services.{SERVICE}]\nconnectors = [\"tunnel-connector\"]\nagents = [\"*\"]\n")),
            ..RelayConfig::default()
        })?;
        let pki = relay.dev_pki.as_ref().context("dev PKI")?;
        let ca = pki.ca.clone();
        let (cert, key) = pki.issue(Kind::Connector, "tunnel-connector")?;
        let echo = EchoServer::start("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?)?;
        let mut cfg = ConnectorConfig::new(
            vec![relay.local_addr],
            vec![ServiceConfig {
                name: SERVICE.into(),
                icmp: true,
                backend: vec![
                    BackendRoute { protocol: Proto::Udp, port: ECHO_PORT, target: echo.udp_addr.into() },
                    BackendRoute { protocol: Proto::Tcp, port: ECHO_PORT, target: echo.tcp_addr.into() },
                ],
                allow_agents: None,
                path: Default::default(),
            }],
        );
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.ca = Some(ca);
        cfg.cert = Some(cert);
        cfg.key = Some(key);
        let mut connector = Connector::with_engine(cfg, 11, build)?;
        let end = Instant::now() + Duration::from_secs(10);
        while !connector.is_ready() {
            connector.turn(Duration::from_millis(10))?;
            if Instant::now() > end {
                bail!("connector did not register");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let connector_stats = Arc::clone(&connector.stats);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let t = std::thread::Builder::new().name("connector".into()).spawn(move || {
            let _ = tid_tx.send(crate::cpu::current_tid());
            connector.run(&s)
        })?;
        let connector_tid = tid_rx.recv().context("connector thread")?;
        Ok(TunnelEnv { relay, echo, stop, connector: Some(t), connector_tid, connector_stats })
    }

    /// TLS options for an agent called `name` (dev trust domain).
    pub fn agent_tls(&self, name: &str) -> Result<TlsOptions> {
        self.relay.dev_pki.as_ref().context("dev PKI")?.client_tls(Kind::Agent, name)
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.connector.take() {
            let _ = t.join();
        }
        self.relay.shutdown();
    }
}

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rtt {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// What a tunnel run measured.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelReport {
    pub observed_address: SocketAddr,
    pub relay_addr: SocketAddr,
    pub relay_workers: usize,
    pub io_backend: String,
    pub services: Vec<String>,
    /// UDP datagrams sent through the tunnel and echoes received.
    pub sent: u64,
    pub received: u64,
    pub rtt_us: Rtt,
    pub udp_seconds: f64,
    pub udp_echoes_per_sec: f64,
    /// TCP bytes sent and echoed back intact.
    pub tcp_bytes_echoed: u64,
    pub tcp_seconds: f64,
    pub tcp_goodput_mbit_s: f64,
    /// CPU time of the thread running the agent core (and the generator)
    /// per IP packet through the core.
    pub agent_cpu_us_per_packet: f64,
    pub agent_packets: u64,
    pub agent_drops: u64,
    pub relay_forwarded: u64,
    pub relay_cross_worker: u64,
    /// Every tunneled packet went through an end-to-end session with the
    /// connector (the relay carried ciphertext only).
    pub end_to_end: bool,
    /// The connector identity the agent verified in that session.
    pub connector_identity: Option<String>,
    pub e2e_handshakes: u64,
}

/// UDP echoes (`udp_count` datagrams, at most `window` in flight) then a
/// TCP echo of `tcp_bytes`, both through the agent core.
pub fn run(
    workers: usize,
    io_backend: IoBackend,
    udp_count: u64,
    window: u64,
    tcp_bytes: usize,
) -> Result<TunnelReport> {
    let env = TunnelEnv::start(workers, io_backend)?;
    let r = run_in(&env, workers, udp_count, window, tcp_bytes);
    env.stop();
    r
}

fn run_in(env: &TunnelEnv, workers: usize, udp_count: u64, window: u64, tcp_bytes: usize) -> Result<TunnelReport> {
    // The relay path: what `tunnel` and `demo` measure (e2e-system has a
    // direct variant).
    let mut link = agent_link(env.relay.local_addr, env.agent_tls("tunnel-agent")?, 5, PathPolicy::RelayOnly)?;
    let observed = link.wait_ready(1, Duration::from_secs(10))?;
    let relay_before = env.relay.totals();
    let cpu0 = crate::cpu::thread_cpu_time();

    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let Echoes { sent, received, secs: udp_seconds } = udp_echoes(&mut link, (udp_count, window, 64), &mut hist);
    let (link, tcp_bytes_echoed, tcp_seconds) = tcp_echo(link, tcp_bytes)?;
    let cpu = crate::cpu::thread_cpu_time().saturating_sub(cpu0);
    let st = link.core.stats();
    let connector_identity = ServiceName::new(SERVICE).and_then(|s| link.core.session_peer(&s));
    let agent_packets = st.packets_out + st.packets_in;
    let relay_after = env.relay.totals();
    let q = |p: f64| hist.value_at_quantile(p);
    Ok(TunnelReport {
        observed_address: observed,
        relay_addr: env.relay.local_addr,
        relay_workers: workers,
        io_backend: format!("{:?}", env.relay.backend).to_lowercase(),
        services: vec![SERVICE.into()],
        sent,
        received,
        rtt_us: Rtt { p50: q(0.5), p90: q(0.9), p99: q(0.99), max: hist.max() },
        udp_seconds,
        udp_echoes_per_sec: received as f64 / udp_seconds.max(1e-9),
        tcp_bytes_echoed,
        tcp_seconds,
        tcp_goodput_mbit_s: tcp_bytes_echoed as f64 * 8.0 / 1e6 / tcp_seconds.max(1e-9),
        agent_cpu_us_per_packet: cpu.as_secs_f64() * 1e6 / (agent_packets.max(1) as f64),
        agent_packets,
        agent_drops: st.drop_malformed + st.drop_unmapped + st.drop_no_flow + st.drop_too_large,
        relay_forwarded: relay_after.datagrams_forwarded - relay_before.datagrams_forwarded,
        relay_cross_worker: relay_after.datagrams_cross_worker - relay_before.datagrams_cross_worker,
        end_to_end: link.core.sessions_up() == 1 && connector_identity.is_some(),
        connector_identity,
        e2e_handshakes: st.e2e_handshakes,
    })
}

/// What [`udp_echoes`] did: datagrams sent, their echoes received, and
/// the seconds from the start to the last echo.
#[derive(Debug, Clone, Copy)]
pub struct Echoes {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
}

/// Echoes `count` UDP datagrams of `payload` bytes (at least 24) to the
/// [`ECHO_PORT`] service through `link`, at most `window` in flight, each
/// carrying its sequence number, send time and this call's nonce (echoes
/// of an earlier call do not count); records each round trip (µs) in
/// `hist`. Lost datagrams shrink the window for good, so it stops 1 s
/// after the last echo when they stop coming, and after 30 s at most.
pub fn udp_echoes<L: IpLink>(
    link: &mut L,
    (count, window, payload): (u64, u64, usize),
    hist: &mut Histogram<u64>,
) -> Echoes {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nonce = CALLS.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let epoch = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut pkt = Vec::with_capacity(2048);
    let mut buf = vec![0u8; 2048];
    let mut data = vec![0u8; payload.max(24)];
    data[16..24].copy_from_slice(&nonce);
    let me = SocketAddrV4::new(AGENT_IP, 40_000);
    let svc = SocketAddrV4::new(SERVICE_IP, ECHO_PORT);
    let end = epoch + Duration::from_secs(30);
    let mut last_echo = epoch;
    while received < count && Instant::now() < end && last_echo.elapsed() < Duration::from_secs(1) {
        while sent < count && sent.saturating_sub(received) < window {
            data[..8].copy_from_slice(&sent.to_be_bytes());
            let at = epoch.elapsed().as_nanos() as u64;
            data[8..16].copy_from_slice(&at.to_be_bytes());
            if packet::build_ipv4_udp(me, svc, &data, &mut pkt).is_err() || link.send_packet(&pkt).is_err() {
                break;
            }
            sent += 1;
        }
        link.pump();
        while let Some(n) = link.recv_packet(&mut buf) {
            let Some(b) = buf.get(..n) else { continue };
            let Ok(ip) = packet::parse_ipv4(b) else { continue };
            let Ok(Transport::Udp { payload, .. }) = packet::parse_transport(&ip) else { continue };
            if payload.get(16..24) != Some(&nonce[..]) {
                continue;
            }
            if let Some(t) = payload.get(8..16).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                let rtt = (epoch.elapsed().as_nanos() as u64).saturating_sub(u64::from_be_bytes(t));
                let _ = hist.record((rtt / 1000).max(1));
                received += 1;
                last_echo = Instant::now();
            }
        }
        if sent.saturating_sub(received) >= window || sent == count {
            ztna_testkit::client_io::wait_readable(&[link.fd()], Duration::from_millis(2));
        }
    }
    Echoes { sent, received, secs: last_echo.duration_since(epoch).as_secs_f64() }
}

/// Echoes `bytes` over one TCP connection (smoltcp on the agent side)
/// through `link` and checks them byte for byte. Returns the link back,
/// the bytes echoed and the seconds it took.
pub fn tcp_echo<L: IpLink>(link: L, bytes: usize) -> Result<(L, u64, f64)> {
    let mut tcp = TunnelTcp::new(link, AGENT_IP, 9);
    let t_tcp = Instant::now();
    if bytes == 0 {
        return Ok((tcp.link, 0, 0.0));
    }
    let svc = SocketAddrV4::new(SERVICE_IP, ECHO_PORT);
    let c = tcp.connect(svc)?;
    tcp.wait_connected(c, Duration::from_secs(10))?;
    let data: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let (mut off, mut back) = (0usize, Vec::with_capacity(bytes));
    let end = Instant::now() + Duration::from_secs(60);
    let mut chunk = vec![0u8; 65_536];
    while back.len() < bytes {
        if off < bytes {
            off += tcp.send(c, data.get(off..).unwrap_or_default())?;
        }
        match tcp.recv(c, &mut chunk) {
            Ok(0) => bail!("TCP echo closed early at {} of {bytes} bytes", back.len()),
            Ok(n) => back.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tcp.wait(Duration::from_millis(5)),
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > end {
            bail!("TCP echo stalled at {} of {bytes} bytes", back.len());
        }
    }
    if back != data {
        bail!("TCP echo corrupted");
    }
    tcp.close(c);
    let secs = t_tcp.elapsed().as_secs_f64();
    Ok((tcp.link, back.len() as u64, secs))
}

/// The human summary of a run.
pub fn print_summary(r: &TunnelReport) {
    println!("relay      {} ({} workers, io {})", r.relay_addr, r.relay_workers, r.io_backend);
    println!("agent      observed address {} (QUIC address discovery)", r.observed_address);
    println!("service    \"{SERVICE}\" at {SERVICE_IP}:{ECHO_PORT} via the connector's echo backend");
    println!(
        "udp        {} sent, {} echoed, rtt p50 {} us p99 {} us ({:.0} echoes/s)",
        r.sent, r.received, r.rtt_us.p50, r.rtt_us.p99, r.udp_echoes_per_sec
    );
    println!(
        "tcp        {} bytes echoed intact in {:.2} s ({:.1} Mbit/s)",
        r.tcp_bytes_echoed, r.tcp_seconds, r.tcp_goodput_mbit_s
    );
    println!(
        "agent      {:.1} us CPU per packet through the core ({} packets)",
        r.agent_cpu_us_per_packet, r.agent_packets
    );
    println!(
        "e2e        {} (connector {}, {} inner handshake(s)); the relay carried ciphertext only",
        if r.end_to_end { "up" } else { "NOT UP" },
        r.connector_identity.as_deref().unwrap_or("-"),
        r.e2e_handshakes
    );
    println!("relay      forwarded {} datagrams, {} across workers", r.relay_forwarded, r.relay_cross_worker);
    println!("metrics    run `ztna-relay --dev --metrics 127.0.0.1:9090` and open http://127.0.0.1:9090/metrics");
}
