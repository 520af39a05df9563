//! Fixtures of the integration tests (relay, connector, agent, bench): a
//! real relay on 127.0.0.1 with development certificates, protocol-v1
//! clients on real UDP sockets, connector configurations, raw QUIC first
//! flights. Test code: a failure panics with what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::client_io::UdpClient;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::identity::Kind;
use ztna_control::quic::TlsOptions;
use ztna_control::{Role, ServiceName};
use ztna_relay::server::{self, RelayConfig, RelayHandle};
use ztna_udp::IoBackend;

pub const T: Duration = Duration::from_secs(10);

/// Services the functional tests use; [`test_policy`] opens them to every
/// agent and to the connectors [`client`] names.
pub const TEST_SERVICES: &[&str] =
    &["echo", "web", "db", "stuck", "healthy", "nothing", "nobody-serves-this", "x", "good", "c"];
/// Connector identities `c0`..`c{N-1}` (a connector client with seed `s`
/// is `c{s % N}`).
pub const TEST_CONNECTORS: u64 = 64;

/// The policy of the functional tests: [`TEST_SERVICES`] served by the
/// test connectors, reachable by every agent. (The zero-trust tests use
/// their own, narrower policies.)
pub fn test_policy() -> String {
    let connectors: Vec<String> = (0..TEST_CONNECTORS).map(|i| format!("\"c{i}\"")).collect();
    let numbered: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    TEST_SERVICES
        .iter()
        .copied()
        .chain(numbered.iter().map(String::as_str))
        .map(|s| format!("[services.{s}]\nconnectors = [{}]\nagents = [\"*\"]\n", connectors.join(", ")))
        .collect()
}

pub fn relay_config(workers: usize, backend: IoBackend, steering: bool) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(workers),
        dev: true,
        io_backend: backend,
        steering,
        pin_cores: false,
        shutdown_grace_ms: 1000,
        policy_toml: Some(test_policy()),
        ..RelayConfig::default()
    }
}

pub fn start_relay(workers: usize, backend: IoBackend, steering: bool) -> RelayHandle {
    server::start(&relay_config(workers, backend, steering)).expect("relay starts")
}

/// Mutual TLS from PEM files: verify the relay against `ca`, present
/// `cert`/`key` (panics if a file cannot be read: test code).
pub fn mutual_tls(
    ca: impl AsRef<std::path::Path>,
    cert: impl AsRef<std::path::Path>,
    key: impl AsRef<std::path::Path>,
) -> TlsOptions {
    let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    TlsOptions::mutual(read(ca.as_ref()), read(cert.as_ref()), read(key.as_ref()))
}

/// Client TLS for identity `kind`/`name`, issued by the relay's dev CA.
pub fn tls_for(relay: &RelayHandle, kind: Kind, name: &str) -> TlsOptions {
    relay.dev_pki.as_ref().unwrap().client_tls(kind, name).unwrap()
}

/// Points a connector config at the relay's dev CA with the identity of
/// test connector `c{n}`.
pub fn connector_tls(relay: &RelayHandle, cfg: &mut ztna_connector::ConnectorConfig, n: u64) {
    let pki = relay.dev_pki.as_ref().unwrap();
    let (cert, key) = pki.issue(Kind::Connector, &format!("c{}", n % TEST_CONNECTORS)).unwrap();
    cfg.ca = Some(pki.ca.clone());
    cfg.cert = Some(cert);
    cfg.key = Some(key);
}

/// A client with its own UDP socket.
pub fn client_as(relay: &RelayHandle, tls: &TlsOptions, regs: &[(Role, &str)], seed: u64) -> UdpClient {
    let mut cfg = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "localhost");
    cfg.registrations = regs.iter().map(|(r, s)| (*r, svc(s))).collect();
    UdpClient::new(cfg, tls, "127.0.0.1:0".parse::<SocketAddr>().unwrap(), seed).unwrap()
}

pub fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// A client whose identity follows its role: connector `c{seed % 64}` if
/// it registers any service as a connector, else agent `a{seed}`.
pub fn client(relay: &RelayHandle, regs: &[(Role, &str)], seed: u64) -> UdpClient {
    let tls = if regs.iter().any(|(r, _)| *r == Role::Connector) {
        tls_for(relay, Kind::Connector, &format!("c{}", seed % TEST_CONNECTORS))
    } else {
        tls_for(relay, Kind::Agent, &format!("a{seed}"))
    };
    client_as(relay, &tls, regs, seed)
}

/// Pumps `c` until it is registered for every registration it holds;
/// returns the flow ids (agent flows / connector handles) in order.
pub fn until_registered(c: &mut UdpClient, n: usize) -> Vec<u32> {
    let mut flows = Vec::new();
    while flows.len() < n {
        match c.wait_for(T, |e| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. }), |_| {}) {
            Some(Event::Registered { flow, .. }) => flows.push(flow),
            other => panic!("registration failed: {other:?} stats {:?}", c.session.stats()),
        }
    }
    flows
}

/// Echoes every datagram a connector receives back on the same flow.
pub fn echo_all(c: &mut UdpClient) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    c.pump();
    while let Some(len) = c.session.recv_datagram(&mut buf) {
        if let Ok((flow, payload)) = ztna_control::datagram::parse(&buf[..len]) {
            let payload = payload.to_vec();
            if c.session.send_datagram(flow, &payload).is_ok() {
                n += 1;
            }
        }
    }
    c.pump();
    n
}

/// Pumps agents and connectors (connectors echo) until `pred` holds.
pub fn run_until(
    agents: &mut [UdpClient],
    connectors: &mut [UdpClient],
    timeout: Duration,
    mut pred: impl FnMut(&mut [UdpClient]) -> bool,
) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        for c in connectors.iter_mut() {
            echo_all(c);
        }
        for a in agents.iter_mut() {
            a.pump();
        }
        if pred(agents) {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `payload` on `flow` and waits for the echo.
pub fn round_trip(agent: &mut UdpClient, connectors: &mut [UdpClient], flow: u32, payload: &[u8]) -> Option<Vec<u8>> {
    agent.session.send_datagram(flow, payload).ok()?;
    let mut got = None;
    let mut buf = [0u8; 2048];
    run_until(std::slice::from_mut(agent), connectors, T, |a| {
        if let Some(n) = a[0].session.recv_datagram(&mut buf) {
            if let Ok((f, p)) = ztna_control::datagram::parse(&buf[..n]) {
                if f == flow && p == payload {
                    got = Some(p.to_vec());
                    return true;
                }
            }
        }
        false
    });
    got
}

/// Collects events of a client into a Vec while pumping for `d`.
pub fn events_for(c: &mut UdpClient, d: Duration) -> Vec<Event> {
    let mut v = Vec::new();
    c.wait_for(d, |_| false, |e| v.push(e));
    v
}

/// Resident set size of this process in bytes.
/// A child process killed and reaped when dropped, even if an assertion
/// fails first.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A bare quiche client that can send arbitrary bytes on the control
/// stream: for malformed-input tests that the real session never produces.
pub struct RawClient {
    pub conn: quiche::Connection,
    sock: std::net::UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
    pub stream_rx: Vec<u8>,
}

impl RawClient {
    pub fn connect(relay: &RelayHandle) -> RawClient {
        RawClient::connect_as(relay, &tls_for(relay, Kind::Connector, "c0"))
    }

    /// Connects with `tls`; panics unless the handshake completes.
    pub fn connect_as(relay: &RelayHandle, tls: &TlsOptions) -> RawClient {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let local = sock.local_addr().unwrap();
        let mut cfg = ztna_control::quic::client_config(tls).unwrap();
        let mut scid = [0u8; 16];
        boring::rand::rand_bytes(&mut scid).unwrap();
        let conn = quiche::connect(
            Some("localhost"),
            &quiche::ConnectionId::from_ref(&scid),
            local,
            relay.local_addr,
            &mut cfg,
        )
        .unwrap();
        let mut c = RawClient { conn, sock, local, buf: vec![0; 65536], stream_rx: Vec::new() };
        let end = std::time::Instant::now() + T;
        while !c.conn.is_established() {
            assert!(std::time::Instant::now() < end, "handshake timed out");
            c.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
        c
    }

    pub fn pump(&mut self) {
        let mut out = [0u8; 1500];
        while let Ok((n, info)) = self.conn.send(&mut out) {
            let _ = self.sock.send_to(&out[..n], info.to);
        }
        while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
            let _ = self.conn.recv(&mut self.buf[..n], quiche::RecvInfo { from, to: self.local });
        }
        if self.conn.timeout().is_some_and(|t| t.is_zero()) {
            self.conn.on_timeout();
        }
        let mut b = [0u8; 4096];
        while let Ok((n, _)) = self.conn.stream_recv(0, &mut b) {
            self.stream_rx.extend_from_slice(&b[..n]);
        }
    }

    /// Moves packets without reading the control stream (a client that
    /// never reads what the relay sends it).
    pub fn pump_unread(&mut self) {
        let mut out = [0u8; 1500];
        while let Ok((n, info)) = self.conn.send(&mut out) {
            let _ = self.sock.send_to(&out[..n], info.to);
        }
        while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
            let _ = self.conn.recv(&mut self.buf[..n], quiche::RecvInfo { from, to: self.local });
        }
        if self.conn.timeout().is_some_and(|t| t.is_zero()) {
            self.conn.on_timeout();
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.conn.stream_send(0, bytes, false).unwrap();
        self.pump();
    }

    pub fn send_msg(&mut self, m: &ztna_control::Message) {
        let mut v = Vec::new();
        m.encode(&mut v);
        self.send(&v);
    }

    /// Pumps for up to `d` or until the connection closes.
    pub fn pump_for(&mut self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end && !self.conn.is_closed() {
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Control messages received so far.
    pub fn messages(&self) -> Vec<ztna_control::Message> {
        let mut d = ztna_control::wire::FrameDecoder::default();
        d.push(&self.stream_rx);
        let mut v = Vec::new();
        while let Ok(Some(m)) = d.next_message() {
            v.push(m);
        }
        v
    }

    /// The application close code the relay sent, if closed.
    pub fn close_code(&self) -> Option<u64> {
        self.conn.peer_error().filter(|e| e.is_app).map(|e| e.error_code)
    }
}

/// A connector config for `relay` (listening on 127.0.0.1, identity
/// `c{n}`) with one service `name` whose backends are `backends`.
pub fn connector_config(
    relay: &RelayHandle,
    n: u64,
    name: &str,
    backends: Vec<ztna_connector::BackendRoute>,
) -> ztna_connector::ConnectorConfig {
    use ztna_connector::{ConnectorConfig, ServiceConfig};
    let service = ServiceConfig {
        name: name.into(),
        icmp: true,
        backend: backends,
        allow_agents: None,
        path: Default::default(),
    };
    let mut cfg = ConnectorConfig::new(vec![relay.local_addr], vec![service]);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    connector_tls(relay, &mut cfg, n);
    cfg
}

/// A quiche client config that verifies nothing and presents no
/// certificate: enough to produce first flights of handshakes that are
/// never finished.
pub fn silent_client_config() -> quiche::Config {
    ztna_control::quic::client_config(&TlsOptions { verify_peer: false, ..TlsOptions::default() }).unwrap()
}

/// The first flight of a real quiche client from `local` to `relay` (its
/// ClientHello in padded 1200-byte Initials; BoringSSL's post-quantum key
/// share takes two), with a source CID derived from `seed`.
pub fn first_flight(cfg: &mut quiche::Config, local: SocketAddr, relay: SocketAddr, seed: u64) -> Vec<Vec<u8>> {
    let mut scid = [0x5a; 16];
    scid[..8].copy_from_slice(&seed.to_be_bytes());
    let mut conn =
        quiche::connect(Some("localhost"), &quiche::ConnectionId::from_ref(&scid), local, relay, cfg).unwrap();
    let mut flight = Vec::new();
    let mut out = vec![0u8; 2048];
    while let Ok((n, _)) = conn.send(&mut out) {
        flight.push(out[..n].to_vec());
    }
    flight
}
