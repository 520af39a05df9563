//! The references `compare` measures the relay against: stock quiche used
//! the obvious way, as a user would write a server after quiche's
//! examples. One thread, one `recv_from` and one `send_to` per packet, a
//! `HashMap` of connections by connection ID, every connection flushed
//! after each batch of received packets; no GSO/GRO, no batching of
//! syscalls, no io_uring, no steering. Nothing here is tuned on purpose:
//! the point is to show what our relay saves over this.
//!
//! Two modes, one loop:
//! - [`NaiveMode::Relay`] (N): forwards DATAGRAMs between two QUIC
//!   connections, agent flow → connector leg and back, speaking just
//!   enough of protocol v2 (Hello, Register, FlowOpen/FlowBound) for the
//!   bench's clients; the same QUIC work per datagram as our relay.
//! - [`NaiveMode::Echo`] (E): sends every DATAGRAM back on the connection
//!   it came from (one receive, one send: the same QUIC work as one
//!   forward).
//!
//! Both do mutual TLS with the same development PKI as the relay.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ztna_control::codes::Code;
use ztna_control::datagram;
use ztna_control::identity::Kind;
use ztna_control::wire::{FrameDecoder, Message, Role};
use ztna_relay::pki::{self, DevPki};

use crate::load::{self, LoadConfig, Sample};
use crate::quic_clients::{ClientSetup, QuicClients};
use crate::relay_bench::{BENCH_AGENT, BENCH_CONNECTOR, SERVICE};
use crate::report::{Report, TargetInfo};

/// Which reference to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaiveMode {
    Relay,
    Echo,
}

/// Length of the connection IDs the server picks.
const CID_LEN: usize = quiche::MAX_CONN_ID_LEN;
/// Identity the echo reference names in FlowBound (it has no connector).
const ECHO_CONNECTOR_ID: &str = "spiffe://dev.ztna/connector/naive-echo";

/// A running reference server.
pub struct NaiveHandle {
    pub local_addr: SocketAddr,
    pub pki: DevPki,
    forwarded: Arc<AtomicU64>,
    tid: Arc<AtomicI32>,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NaiveHandle {
    /// Datagrams forwarded (relay) or echoed (echo) so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// CPU time of the server thread so far.
    pub fn cpu_time(&self) -> Duration {
        crate::cpu::task_cpu_time(self.tid.load(Ordering::Relaxed))
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NaiveHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a reference server on 127.0.0.1 (ephemeral port) with a fresh
/// development PKI.
pub fn start(mode: NaiveMode) -> Result<NaiveHandle> {
    let pki = pki::generate(&std::env::temp_dir()).context("development PKI")?;
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).ok_or_else(|| anyhow!("non-UTF-8 path"));
    config.load_cert_chain_from_pem_file(&path(&pki.cert)?)?;
    config.load_priv_key_from_pem_file(&path(&pki.key)?)?;
    config.load_verify_locations_from_file(&path(&pki.ca)?)?;
    config.verify_peer(true);
    ztna_control::quic::apply_transport(&mut config)?;
    config.set_initial_max_streams_bidi(1);
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let local_addr = socket.local_addr()?;
    let forwarded = Arc::new(AtomicU64::new(0));
    let tid = Arc::new(AtomicI32::new(0));
    let shutdown = Arc::new(AtomicBool::new(false));
    let thread = {
        let (forwarded, tid, shutdown) = (Arc::clone(&forwarded), Arc::clone(&tid), Arc::clone(&shutdown));
        std::thread::Builder::new().name("naive-quiche".into()).spawn(move || {
            tid.store(crate::cpu::current_tid(), Ordering::Relaxed);
            let seed =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
            let mut server =
                Server { mode, config, socket, local_addr, conns: HashMap::new(), next_flow: 1, cid_key: seed };
            server.run(&forwarded, &shutdown);
        })?
    };
    Ok(NaiveHandle { local_addr, pki, forwarded, tid, shutdown, thread: Some(thread) })
}

/// One client connection.
struct Client {
    conn: quiche::Connection,
    peer: SocketAddr,
    control: FrameDecoder,
    /// Control frames not yet taken by the stream.
    out: Vec<u8>,
    /// Relay mode, agent flow id or connector leg id → (peer's CID, its id).
    routes: HashMap<u32, (Vec<u8>, u32)>,
    /// Connector: its service handle, once registered.
    handle: Option<u32>,
}

struct Server {
    mode: NaiveMode,
    config: quiche::Config,
    socket: UdpSocket,
    local_addr: SocketAddr,
    conns: HashMap<Vec<u8>, Client>,
    next_flow: u32,
    /// Secret of [`Server::derive_cid`].
    cid_key: u64,
}

impl Server {
    fn run(&mut self, forwarded: &AtomicU64, shutdown: &AtomicBool) {
        let mut buf = vec![0u8; 65_535];
        let mut out = vec![0u8; 1500];
        let mut dgram = vec![0u8; 65_535];
        while !shutdown.load(Ordering::Acquire) {
            let timeout = self.conns.values().filter_map(|c| c.conn.timeout()).min();
            let ms = timeout.map_or(100, |t| t.as_millis().min(100) as i32);
            let mut fds = [libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: `fds` is a live array of one pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            for c in self.conns.values_mut() {
                if c.conn.timeout().is_some_and(|t| t.is_zero()) {
                    c.conn.on_timeout();
                }
            }
            // Read everything waiting, one packet per syscall.
            while let Ok((len, from)) = self.socket.recv_from(&mut buf) {
                let Some(pkt) = buf.get_mut(..len) else { continue };
                let Some(cid) = self.route_packet(pkt, from) else { continue };
                let Some(c) = self.conns.get_mut(&cid) else { continue };
                let info = quiche::RecvInfo { from, to: self.local_addr };
                if c.conn.recv(pkt, info).is_err() {
                    continue;
                }
                c.peer = from;
                if c.conn.is_established() {
                    self.handle_control(&cid);
                    self.handle_datagrams(&cid, &mut dgram, forwarded);
                }
            }
            // Write what every connection has, one packet per syscall.
            for c in self.conns.values_mut() {
                if !c.out.is_empty() {
                    if let Ok(n) = c.conn.stream_send(0, &c.out, false) {
                        c.out.drain(..n);
                    }
                }
                while let Ok((n, info)) = c.conn.send(&mut out) {
                    let _ = self.socket.send_to(&out[..n], info.to);
                }
            }
            self.conns.retain(|_, c| !c.conn.is_closed());
        }
    }

    /// The connection a packet belongs to, accepting a new one for an
    /// Initial.
    fn route_packet(&mut self, pkt: &mut [u8], from: SocketAddr) -> Option<Vec<u8>> {
        let hdr = quiche::Header::from_slice(pkt, CID_LEN).ok()?;
        let dcid = hdr.dcid.to_vec();
        if self.conns.contains_key(&dcid) {
            return Some(dcid);
        }
        // As in quiche's example server: our connection ID is derived
        // from the client's first DCID, so every Initial of one handshake
        // (a ClientHello may span two) finds the same connection.
        let scid = self.derive_cid(&dcid);
        if self.conns.contains_key(&scid[..]) {
            return Some(scid.to_vec());
        }
        if hdr.ty != quiche::Type::Initial {
            return None;
        }
        let scid_ref = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::accept(&scid_ref, None, self.local_addr, from, &mut self.config).ok()?;
        let client = Client {
            conn,
            peer: from,
            control: FrameDecoder::default(),
            out: Vec::new(),
            routes: HashMap::new(),
            handle: None,
        };
        self.conns.insert(scid.to_vec(), client);
        Some(scid.to_vec())
    }

    /// A keyed hash of the client's first DCID.
    fn derive_cid(&self, dcid: &[u8]) -> [u8; CID_LEN] {
        let h = dcid.iter().fold(self.cid_key, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        let mut cid = [0u8; CID_LEN];
        ztna_control::rng::SplitMix64::new(h).fill(&mut cid);
        cid
    }

    fn handle_control(&mut self, cid: &[u8]) {
        let mut msgs = Vec::new();
        if let Some(c) = self.conns.get_mut(cid) {
            let mut buf = [0u8; 4096];
            while let Ok((n, _)) = c.conn.stream_recv(0, &mut buf) {
                c.control.push(&buf[..n]);
            }
            while let Ok(Some(m)) = c.control.next_message() {
                msgs.push(m);
            }
        }
        for m in msgs {
            self.on_message(cid, m);
        }
    }

    fn on_message(&mut self, cid: &[u8], m: Message) {
        let Some(peer) = self.conns.get(cid).map(|c| c.peer) else { return };
        match m {
            Message::Hello { .. } => {
                self.say(cid, Message::HelloAck { version: 2 });
                self.say(cid, Message::ObservedAddress { addr: peer });
            }
            Message::Register { request_id, role: Role::Connector, .. } => {
                let handle = self.new_flow();
                if let Some(c) = self.conns.get_mut(cid) {
                    c.handle = Some(handle);
                }
                self.say(cid, Message::RegisterOk { request_id, flow: handle });
            }
            Message::Register { request_id, role: Role::Agent, .. } => {
                let flow = self.new_flow();
                let connector_id = match self.mode {
                    NaiveMode::Echo => ECHO_CONNECTOR_ID.to_owned(),
                    NaiveMode::Relay => match self.bind_flow(cid, flow, peer) {
                        Some(id) => id,
                        None => {
                            let e = Message::RegisterError {
                                request_id,
                                code: Code::UNKNOWN_SERVICE,
                                reason: "no connector".into(),
                            };
                            return self.say(cid, e);
                        }
                    },
                };
                self.say(cid, Message::FlowBound { flow, connector_id });
                self.say(cid, Message::RegisterOk { request_id, flow });
            }
            _ => {}
        }
    }

    /// Relay mode: opens a connector leg for agent flow `flow` on the
    /// first registered connector; returns that connector's identity.
    fn bind_flow(&mut self, agent: &[u8], flow: u32, agent_addr: SocketAddr) -> Option<String> {
        let (ccid, handle) = self.conns.iter().find_map(|(k, c)| c.handle.map(|h| (k.clone(), h)))?;
        let leg = self.new_flow();
        let agent_id = peer_identity(self.conns.get(agent)?);
        let connector_id = peer_identity(self.conns.get(&ccid)?);
        self.say(&ccid, Message::FlowOpen { flow: leg, service: handle, agent_addr, agent_id });
        self.conns.get_mut(&ccid)?.routes.insert(leg, (agent.to_vec(), flow));
        self.conns.get_mut(agent)?.routes.insert(flow, (ccid, leg));
        Some(connector_id)
    }

    fn new_flow(&mut self) -> u32 {
        let f = self.next_flow;
        self.next_flow += 1;
        f
    }

    fn say(&mut self, cid: &[u8], m: Message) {
        if let Some(c) = self.conns.get_mut(cid) {
            m.encode(&mut c.out);
        }
    }

    fn handle_datagrams(&mut self, cid: &[u8], dgram: &mut [u8], forwarded: &AtomicU64) {
        let mut fwd = Vec::new();
        loop {
            let Some(c) = self.conns.get_mut(cid) else { return };
            let Ok(n) = c.conn.dgram_recv(dgram) else { break };
            let Some(d) = dgram.get(..n) else { break };
            match self.mode {
                NaiveMode::Echo => {
                    if c.conn.dgram_send(d).is_ok() {
                        forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                NaiveMode::Relay => {
                    let Ok((flow, payload)) = datagram::parse(d) else { continue };
                    let Some((to, id)) = c.routes.get(&flow).cloned() else { continue };
                    datagram::encode_into(id, payload, &mut fwd);
                    if let Some(peer) = self.conns.get_mut(&to) {
                        if peer.conn.dgram_send(&fwd).is_ok() {
                            forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// The SPIFFE ID in a client's certificate (empty if none parses).
fn peer_identity(c: &Client) -> String {
    c.conn
        .peer_cert()
        .and_then(ztna_control::cert::uri_of)
        .unwrap_or_else(|| "spiffe://dev.ztna/unknown/unknown".to_owned())
}

/// Runs the load against a reference server started here.
pub fn run(mode: NaiveMode, load: &LoadConfig) -> Result<Report> {
    load.validate()?;
    let h = start(mode)?;
    let agent_tls = h.pki.client_tls(Kind::Agent, BENCH_AGENT)?;
    let connector_tls = h.pki.client_tls(Kind::Connector, BENCH_CONNECTOR)?;
    let setup = ClientSetup {
        relay: h.local_addr,
        server_name: "localhost".into(),
        agent_tls,
        connector_tls,
        service: SERVICE.into(),
        connectors: load.connectors,
        agents: load.agents,
        timeout: Duration::from_secs(15),
        gso: load.client_gso,
        gro: load.client_gro,
    };
    let mut clients = QuicClients::connect(&setup)?;
    let mut probe = || Sample::in_process(h.forwarded(), h.cpu_time());
    let (result, samples) = load::run_load(&mut clients, load, &mut probe)?;
    let kind = match mode {
        NaiveMode::Relay => "naive-quiche-relay",
        NaiveMode::Echo => "naive-quiche-echo",
    };
    let target = TargetInfo {
        kind: kind.into(),
        address: h.local_addr.to_string(),
        in_process: true,
        io_backend: "recv_from/send_to".into(),
        workers: Some(1),
    };
    let report = Report::new(target, load, result, &samples);
    clients.close();
    h.shutdown();
    Ok(report)
}
