//! The connector's TCP endpoint end to end: an agent-side smoltcp stack
//! ([`TunnelTcp`]) over a real relay on loopback to an in-process connector
//! and real TCP backends.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use ztna_testkit::fixtures as common;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use ztna_agent::route::Cidr;
use ztna_connector::{BackendRoute, Connector, ConnectorConfig, ConnectorStats, Proto, ServiceConfig};
use ztna_control::identity::Kind;
use ztna_control::packet::{self, Transport};
use ztna_control::rng::SplitMix64;
use ztna_relay::server::RelayHandle;
use ztna_testkit::agent_link::AgentLink;
use ztna_testkit::echo::EchoServer;
use ztna_testkit::tunnel_tcp::{IpLink, TunnelTcp};
use ztna_udp::IoBackend;

const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// Ports of the service: echo, a backend that is down, an endless source, a
/// sink that never reads. 81 is not configured.
const ECHO: u16 = 7;
const DOWN: u16 = 9;
const SOURCE: u16 = 19;
const SINK: u16 = 20;
const UNCONFIGURED: u16 = 81;

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// A TCP server that writes to every connection as fast as it is allowed,
/// counting the bytes its writes accepted.
struct Source {
    addr: SocketAddr,
    written: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Source {
    fn start() -> Source {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (Arc::clone(&written), Arc::clone(&stop));
        std::thread::spawn(move || {
            l.set_nonblocking(true).unwrap();
            while !st.load(Ordering::Acquire) {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
                let chunk = vec![0x5au8; 16 * 1024];
                while !st.load(Ordering::Acquire) {
                    match s.write(&chunk) {
                        Ok(n) => {
                            w.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        Err(_) => break,
                    }
                }
            }
        });
        Source { addr, written, stop }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A TCP server that accepts and never reads (until dropped).
struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        std::thread::spawn(move || {
            l.set_nonblocking(true).unwrap();
            let mut held = Vec::new();
            while !st.load(Ordering::Acquire) {
                if let Ok((s, _)) = l.accept() {
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Sink { addr, stop }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct Setup {
    relay: RelayHandle,
    stats: Arc<ConnectorStats>,
    stop: Arc<AtomicBool>,
    connector: Option<JoinHandle<()>>,
    connector_tid: String,
    echo: EchoServer,
    source: Source,
    _sink: Sink,
}

impl Setup {
    fn start() -> Setup {
        Setup::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut ConnectorConfig)) -> Setup {
        let relay = start_relay(2, IoBackend::Auto, true);
        let echo = EchoServer::start("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let down = {
            // A port nobody listens on: bind, note, close.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let source = Source::start();
        let sink = Sink::start();
        let tcp = |port, target: SocketAddr| BackendRoute { protocol: Proto::Tcp, port, target: target.into() };
        let mut cfg = ConnectorConfig::new(
            vec![relay.local_addr],
            vec![ServiceConfig {
                name: "web".into(),
                icmp: true,
                backend: vec![
                    tcp(ECHO, echo.tcp_addr),
                    tcp(DOWN, down),
                    tcp(SOURCE, source.addr),
                    tcp(SINK, sink.addr),
                    BackendRoute { protocol: Proto::Udp, port: ECHO, target: echo.udp_addr.into() },
                ],
                allow_agents: None,
                path: Default::default(),
            }],
        );
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        connector_tls(&relay, &mut cfg, 0);
        tweak(&mut cfg);
        let mut connector = Connector::new(cfg, 11).unwrap();
        let end = Instant::now() + T;
        while !connector.is_ready() {
            connector.turn(Duration::from_millis(10)).unwrap();
            assert!(Instant::now() < end, "connector did not register");
        }
        let stats = Arc::clone(&connector.stats);
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // "/proc/thread-self" links to "PID/task/TID".
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            tx.send(link.file_name().unwrap().to_string_lossy().into_owned()).unwrap();
            connector.run(&st).unwrap()
        });
        let connector_tid = rx.recv().unwrap();
        Setup { relay, stats, stop, connector: Some(t), connector_tid, echo, source, _sink: sink }
    }

    /// An agent core whose end-to-end session with the connector is up.
    fn agent_link(&self, seed: u64) -> AgentLink {
        let tls = tls_for(&self.relay, Kind::Agent, &format!("agent-{seed}"));
        let routes = vec![(svc("web"), Cidr::new(VIP.into(), 32).unwrap())];
        let mut link = AgentLink::new(self.relay.local_addr, tls, routes, seed).unwrap();
        link.wait_ready(1, T).unwrap();
        link
    }

    fn agent(&self, seed: u64) -> TunnelTcp<AgentLink> {
        TunnelTcp::new(self.agent_link(seed), AGENT_IP, seed)
    }

    /// CPU time the connector's thread has used.
    fn connector_cpu(&self) -> Duration {
        cpu_time(&format!("/proc/self/task/{}/stat", self.connector_tid))
    }

    fn stat(&self, f: impl Fn(&ConnectorStats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::Relaxed)
    }

    /// Waits (pumping `agent`) until `pred` holds on the connector stats.
    fn until(&self, agent: &mut TunnelTcp<AgentLink>, what: &str, pred: impl Fn(&ConnectorStats) -> bool) {
        let end = Instant::now() + T;
        while !pred(&self.stats) {
            assert!(Instant::now() < end, "timed out waiting for {what}: {:?}", self.stats);
            agent.wait(Duration::from_millis(10));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.connector.take() {
            let _ = t.join();
        }
    }
}

/// User + system CPU time from a /proc stat file.
fn cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

#[test]
fn echo_10_mb_intact_and_half_close() {
    let s = Setup::start();
    let mut a = s.agent(1);

    // A short exchange with a half-close: our FIN reaches the echo server,
    // which then closes, and its FIN comes back after the data.
    let c = a.connect(vip(ECHO)).unwrap();
    a.wait_connected(c, T).unwrap();
    a.send_all(c, b"hello through the tunnel", T).unwrap();
    a.close(c);
    assert_eq!(a.recv_to_end(c, T).unwrap(), b"hello through the tunnel");
    a.release(c);

    // 10 MB (or ZTNA_TCP_TEST_MB) both ways at once, compared by SHA-256.
    let mb: usize = std::env::var("ZTNA_TCP_TEST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let len = mb * 1024 * 1024;
    let payload = data(len, 42);
    let c = a.connect(vip(ECHO)).unwrap();
    a.wait_connected(c, T).unwrap();
    let start = Instant::now();
    let (mut sent, mut received) = (0usize, 0usize);
    let mut hash = boring::sha::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = start + Duration::from_secs(60 + mb as u64);
    while received < len {
        assert!(Instant::now() < end, "transfer stalled: sent {sent} received {received} {:?}", s.stats);
        if sent < len {
            sent += a.send(c, &payload[sent..]).unwrap();
        }
        loop {
            match a.recv(c, &mut buf) {
                Ok(0) => panic!("EOF after {received} bytes"),
                Ok(n) => {
                    hash.update(&buf[..n]);
                    received += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e} after {received} bytes"),
            }
        }
        a.wait(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    assert_eq!(hash.finish(), boring::sha::sha256(&payload), "echoed data differs");
    println!(
        "{mb} MiB echoed through the tunnel in {:.2} s ({:.1} MB/s each way); agent packets in {} out {}",
        elapsed.as_secs_f64(),
        len as f64 / 1e6 / elapsed.as_secs_f64(),
        a.stats.packets_in,
        a.stats.packets_out
    );
    a.close(c);
    assert!(a.recv_to_end(c, T).unwrap().is_empty());
    a.release(c);

    let n = (len + 24) as u64;
    s.until(&mut a, "byte counters and cleanup", |st| {
        st.tcp_bytes_to_backend.load(Ordering::Relaxed) == n
            && st.tcp_bytes_from_backend.load(Ordering::Relaxed) == n
            && st.tcp_connections_closed.load(Ordering::Relaxed) == 2
    });
    assert_eq!(s.stat(|st| &st.tcp_connections_opened), 2);
    assert_eq!(s.echo.stats.tcp_bytes.load(Ordering::Relaxed), n);
    assert_eq!(s.stat(|st| &st.tcp_backend_errors), 0);
}

#[test]
fn unconfigured_port_and_down_backend_get_rst() {
    let s = Setup::start();
    let mut a = s.agent(2);

    let t0 = Instant::now();
    let c = a.connect(vip(UNCONFIGURED)).unwrap();
    let e = a.wait_connected(c, T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // Refused by an RST, not by giving up (smoltcp never gives up on its own).
    assert!(t0.elapsed() < Duration::from_secs(3), "refusal took {:?}", t0.elapsed());
    assert!(s.stat(|st| &st.drop_not_allowed) >= 1);
    a.release(c);

    let t0 = Instant::now();
    let c = a.connect(vip(DOWN)).unwrap();
    let e = a.wait_connected(c, T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "refusal took {:?}", t0.elapsed());
    assert_eq!(s.stat(|st| &st.tcp_backend_connect_failed), 1);
    a.release(c);

    assert_eq!(s.stat(|st| &st.tcp_connections_opened), 0);
    s.until(&mut a, "cleanup", |st| st.tcp_connections_closed.load(Ordering::Relaxed) == 1);
}

#[test]
fn flow_control_bounds_buffering_both_ways() {
    let s = Setup::start();
    let mut a = s.agent(3);
    const BUF: u64 = 256 * 1024;

    // Backend → agent with an agent that does not read: the connector takes
    // no more than the agent's window plus its own send buffer, and the
    // backend's writes stall.
    let c = a.connect(vip(SOURCE)).unwrap();
    a.wait_connected(c, T).unwrap();
    let settle = |a: &mut TunnelTcp<AgentLink>, d: Duration| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            a.wait(Duration::from_millis(10));
        }
    };
    settle(&mut a, Duration::from_millis(1500));
    let from1 = s.stat(|st| &st.tcp_bytes_from_backend);
    let written1 = s.source.written.load(Ordering::Relaxed);
    let cpu0 = s.connector_cpu();
    settle(&mut a, Duration::from_millis(1000));
    let cpu = s.connector_cpu() - cpu0;
    println!("connector CPU while stalled: {cpu:?} per second");
    assert!(cpu < Duration::from_millis(300), "connector busy while stalled: {cpu:?} CPU in 1 s");
    let from2 = s.stat(|st| &st.tcp_bytes_from_backend);
    let written2 = s.source.written.load(Ordering::Relaxed);
    println!("not reading: connector took {from2} bytes from the backend, backend wrote {written2}");
    assert_eq!(from1, from2, "connector kept reading from the backend");
    assert_eq!(written1, written2, "backend writes did not stall");
    assert!(from2 <= 2 * BUF + 64 * 1024, "connector took {from2} bytes");
    assert!(a.recv_queue(c) as u64 >= BUF - 16 * 1024, "agent receive buffer should be full: {}", a.recv_queue(c));

    // Reading resumes the flow.
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    let end = Instant::now() + T;
    while read < 4 * 1024 * 1024 {
        assert!(Instant::now() < end, "flow did not resume after {read} bytes");
        match a.recv(c, &mut buf) {
            Ok(n) if n > 0 => {
                assert!(buf[..n].iter().all(|&b| b == 0x5a));
                read += n;
            }
            Ok(_) => panic!("EOF"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => a.wait(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(s.source.written.load(Ordering::Relaxed) > written2);
    a.abort(c);
    a.release(c);

    // Agent → backend with a backend that never reads: the connector keeps
    // at most its receive buffer; the agent's send buffer fills and stays full.
    let c = a.connect(vip(SINK)).unwrap();
    a.wait_connected(c, T).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut accepted = 0u64;
    let mut last_progress = Instant::now();
    let end = Instant::now() + Duration::from_secs(15);
    while last_progress.elapsed() < Duration::from_millis(1500) {
        assert!(Instant::now() < end, "agent sends never stalled ({accepted} bytes)");
        let n = a.send(c, &chunk).unwrap();
        if n > 0 {
            accepted += n as u64;
            last_progress = Instant::now();
        }
        a.wait(Duration::from_millis(10));
    }
    let to1 = s.stat(|st| &st.tcp_bytes_to_backend);
    settle(&mut a, Duration::from_millis(500));
    let to2 = s.stat(|st| &st.tcp_bytes_to_backend);
    println!("backend not reading: agent queued {accepted} bytes, connector wrote {to2} to the backend");
    assert_eq!(to1, to2, "connector kept writing to a backend that does not read");
    assert_eq!(a.send_queue(c), BUF as usize, "agent send buffer should be full");
    assert!(to2 > 0, "nothing reached the backend");
    // Everything the agent sent is in the agent's buffer, the connector's
    // receive buffer (at most BUF) or the backend's kernel socket buffers.
    assert!(accepted - a.send_queue(c) as u64 <= to2 + BUF, "accepted {accepted} to backend {to2}");
    a.abort(c);
    a.release(c);
    s.until(&mut a, "cleanup", |st| st.tcp_connections_closed.load(Ordering::Relaxed) == 2);
}

#[test]
fn too_big_with_df_gets_frag_needed() {
    let s = Setup::start();
    let mut c = s.agent_link(4);
    let agent = SocketAddrV4::new(AGENT_IP, 5000);
    let mut pkt = Vec::new();
    let mut buf = vec![0u8; 2048];
    let mut next_packet = |c: &mut AgentLink, what: &str| {
        let end = Instant::now() + T;
        loop {
            assert!(Instant::now() < end, "no {what}");
            c.pump();
            if let Some(n) = c.recv_packet(&mut buf) {
                break buf[..n].to_vec();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };

    // 1293 bytes with DF (every built packet has DF): the agent refuses it
    // and answers with the tunnel MTU itself; nothing leaves the device.
    packet::build_ipv4_udp(agent, vip(ECHO), &[7u8; 1265], &mut pkt).unwrap();
    assert_eq!(pkt.len(), 1293);
    assert!(c.send_packet(&pkt).is_err());
    let reply = next_packet(&mut c, "ICMP reply");
    let ip = packet::parse_ipv4(&reply).unwrap();
    assert_eq!((ip.src, ip.dst), (VIP, AGENT_IP));
    match packet::parse_transport(&ip).unwrap() {
        Transport::IcmpOther { ty: 3, code: 4 } => {}
        other => panic!("not frag-needed: {other:?}"),
    }
    assert_eq!(u16::from_be_bytes([ip.payload[6], ip.payload[7]]), 1280);
    assert_eq!(c.core.stats().drop_too_large, 1);
    assert_eq!(s.echo.stats.udp_datagrams.load(Ordering::Relaxed), 0);

    // Exactly 1280 bytes passes, end to end.
    packet::build_ipv4_udp(agent, vip(ECHO), &[8u8; 1252], &mut pkt).unwrap();
    assert_eq!(pkt.len(), 1280);
    c.send_packet(&pkt).unwrap();
    assert_eq!(next_packet(&mut c, "UDP echo").len(), 1280);
    assert_eq!(s.stat(|st| &st.drop_too_big), 0);
}

#[test]
fn tcp_config_defaults_and_validation() {
    let cfg = ConnectorConfig::from_toml(
        r#"
        relays = ["127.0.0.1:4433"]
        server_name = "localhost"
        ca = "ca.pem"
        cert = "connector.pem"
        key = "connector.key"
        [[service]]
        name = "web"
        backend = [{ protocol = "tcp", port = 80, target = "127.0.0.1:8080" }]
        allow_agents = ["spiffe://corp/agent/alice"]
        "#,
    )
    .unwrap();
    assert_eq!(cfg.services[0].allow_agents.as_deref(), Some(&["spiffe://corp/agent/alice".to_owned()][..]));
    let no_cert = ConnectorConfig::from_toml("relays = [\"127.0.0.1:4433\"]\n[[service]]\nname = \"web\"\n");
    assert!(no_cert.unwrap_err().to_string().contains("cert and key are required"));
    let no_ca = ConnectorConfig::from_toml(
        "relays = [\"127.0.0.1:4433\"]\ncert = \"c\"\nkey = \"k\"\n[[service]]\nname = \"web\"\n",
    );
    assert!(no_ca.unwrap_err().to_string().contains("ca is required"));
    assert_eq!((cfg.max_e2e_sessions, cfg.max_e2e_sessions_per_identity), (1024, 64));
    assert_eq!((cfg.max_e2e_handshakes, cfg.max_e2e_handshakes_per_identity), (128, 8));
    let bad_allow = ConnectorConfig::from_toml(
        "relays = [\"127.0.0.1:4433\"]\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\n[[service]]\nname = \"web\"\nallow_agents = [\"alice\"]\n",
    );
    assert!(bad_allow.unwrap_err().to_string().contains("not an agent SPIFFE ID"));
    assert_eq!(cfg.max_tcp_flows, 1024);
    assert_eq!(cfg.tcp_buffer_bytes, 256 * 1024);
    // Per-identity shares: a quarter of each table unless set.
    assert_eq!(cfg.udp_flows_per_identity(), 1024);
    assert_eq!(cfg.tcp_connections_per_identity(), 512);
    assert_eq!(cfg.tcp_flows_per_identity(), 256);
    assert_eq!(cfg.max_tcp_queued_packets_per_identity, 4096);
    let with = |extra: &str| {
        ConnectorConfig::from_toml(&format!(
            "relays = [\"127.0.0.1:4433\"]\nserver_name = \"localhost\"\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\n{extra}\n[[service]]\nname = \"web\"\n"
        ))
    };
    let set = with("max_tcp_connections = 512\nmax_udp_flows_per_identity = 10").unwrap();
    assert_eq!((set.udp_flows_per_identity(), set.tcp_connections_per_identity()), (10, 128));
    assert!(with("max_tcp_connections_per_identity = 0").unwrap_err().to_string().contains("must be positive"));
    assert!(with("max_e2e_handshakes_per_identity = 0").unwrap_err().to_string().contains("must be positive"));
    let bad = ConnectorConfig::from_toml(
        r#"
        relays = ["127.0.0.1:4433"]
        tcp_buffer_bytes = 10
        [[service]]
        name = "web"
        "#,
    );
    assert!(bad.is_err());
}

/// Relays and backend targets may be DNS names (Kubernetes Services);
/// the format is checked offline, the names resolved when the connector
/// starts.
#[test]
fn relay_and_backend_names() {
    let text = |relay: &str, target: &str| {
        format!(
            "relays = [\"{relay}\"]\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\n[[service]]\nname = \"web\"\n\
             backend = [{{ protocol = \"tcp\", port = 80, target = \"{target}\" }}]\n"
        )
    };
    let cfg = ConnectorConfig::from_toml(&text("ztna-relay-headless.ztna.svc:4433", "web.default.svc:8080")).unwrap();
    assert_eq!(cfg.relays, vec!["ztna-relay-headless.ztna.svc:4433".to_owned()]);
    assert_eq!(cfg.services[0].backend[0].target.as_str(), "web.default.svc:8080");
    for (relay, target) in [("relay", "web:80"), (":4433", "web:80"), ("r:0", "web:80"), ("r:1", "web"), ("r:1", "w:x")]
    {
        assert!(ConnectorConfig::from_toml(&text(relay, target)).is_err(), "{relay} {target}");
    }
    let t: ztna_connector::Target = "localhost:8080".to_owned().try_into().unwrap();
    assert_eq!(t.resolve().unwrap().port(), 8080);
    assert!(t.resolve().unwrap().ip().is_loopback());
    let unknown: ztna_connector::Target = "no-such-host.invalid:1".to_owned().try_into().unwrap();
    assert!(unknown.resolve().is_err());
}

#[test]
fn connection_limit_and_idle_timeout() {
    let s = Setup::start_with(|c| {
        c.max_tcp_per_flow = 1;
        c.tcp_idle_secs = 1;
    });
    let mut a = s.agent(5);
    let c1 = a.connect(vip(ECHO)).unwrap();
    a.wait_connected(c1, T).unwrap();

    // A second connection on the same flow is over the limit: refused with
    // an RST (as a busy server would), and counted.
    let c2 = a.connect(vip(ECHO)).unwrap();
    let e = a.wait_connected(c2, T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(s.stat(|st| &st.drop_tcp_limit) >= 1);
    a.release(c2);

    // The first one, left idle, is reset on both sides after 1 s.
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let e = loop {
        match a.recv(c1, &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < T, "no idle reset");
                a.wait(Duration::from_millis(20));
            }
            other => break other.unwrap_err(),
        }
    };
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(s.stat(|st| &st.tcp_idle_timeouts), 1);
    s.until(&mut a, "cleanup", |st| st.tcp_connections_closed.load(Ordering::Relaxed) == 1);
    a.release(c1);

    // The flow is free again.
    let c3 = a.connect(vip(ECHO)).unwrap();
    a.wait_connected(c3, T).unwrap();
    a.send_all(c3, b"again", T).unwrap();
    assert_eq!(a.recv_exact(c3, 5, T).unwrap(), b"again");
}
