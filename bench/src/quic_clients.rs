//! Protocol-v1 clients for the relay benchmark and the demo: connectors
//! that echo every datagram back on its flow and agents that send the
//! load, all driven from one thread ([`Transport`] for [`crate::load`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use ztna_control::client::{ClientConfig, Event, SendError};
use ztna_control::datagram;
use ztna_control::quic::TlsOptions;
use ztna_control::{Role, ServiceName};
use ztna_testkit::client_io::{self, UdpClient};
use ztna_udp::batch::Batch;

use crate::load::{is_ready, Transport};

/// Bound on echoes a connector holds back while its DATAGRAM queue is full.
const ECHO_BACKLOG: usize = 4096;
/// Socket buffer size asked for on client sockets (the kernel caps it).
const SOCKET_BUF: usize = 4 << 20;
/// UDP packets fed to one session before its datagrams are taken out.
const RX_BATCH: usize = 64;
/// Packets a client queues before a sendmmsg.
const TX_BATCH: usize = 64;
/// Receives per `recvmmsg` with GRO: one (up to 64 datagrams), so a
/// session gets at most RX_BATCH + 64 packets before its datagrams are
/// taken out and quiche's DATAGRAM queue (1024) cannot overflow.
const RX_GRO_BATCH: usize = 1;

/// Where and how the clients connect.
#[derive(Debug, Clone)]
pub struct ClientSetup {
    pub relay: SocketAddr,
    pub server_name: String,
    /// Agents' TLS (certificate of an agent identity).
    pub agent_tls: TlsOptions,
    /// Connectors' TLS (certificate of a connector identity).
    pub connector_tls: TlsOptions,
    pub service: String,
    pub connectors: usize,
    pub agents: usize,
    /// Give up on connecting and registering after this long.
    pub timeout: Duration,
    /// Send each client's packets with UDP GSO (as a modern QUIC client
    /// does).
    pub gso: bool,
    /// Receive with UDP GRO (as a modern QUIC client does): a target's GSO
    /// send then reaches the client whole over loopback, as it leaves a
    /// host whole for a NIC that segments (USO). Off: one datagram per
    /// call, and a target that sends with GSO pays the kernel's software
    /// segmentation.
    pub gro: bool,
}

/// What one client saw while connecting and registering.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientInfo {
    pub role: String,
    pub local_addr: Option<SocketAddr>,
    /// The relay's view of our address (Event::ObservedAddress).
    pub observed_addr: Option<SocketAddr>,
    /// Agent flow id, or the connector's registration handle.
    pub flow: Option<u32>,
    /// Refusals seen before the registration succeeded (retried).
    pub register_failures: Vec<String>,
    pub disconnects: Vec<String>,
    /// Connector only: agent flows opened to it.
    pub flows_opened: u64,
}

/// Connected, registered clients: connectors first, then agents.
pub struct QuicClients {
    clients: Vec<UdpClient>,
    connectors: usize,
    /// Per agent: its flow id.
    flows: Vec<u32>,
    pub info: Vec<ClientInfo>,
    backlog: Vec<VecDeque<(u32, Vec<u8>)>>,
    dirty: Vec<bool>,
    buf: Vec<u8>,
    pkt: Vec<u8>,
    /// Per client: its send batch (GSO when `ClientSetup::gso`).
    tx: Vec<Batch>,
    /// Receives of all clients, one client at a time (GRO on every socket
    /// when `ClientSetup::gro`), or None: one `recv_from` per datagram.
    rx: Option<Batch>,
    echo_drops: u64,
    send_errors: u64,
    udp_send_errors: u64,
}

fn handle_event(info: &mut ClientInfo, e: Event) {
    match e {
        Event::ObservedAddress(a) => info.observed_addr = Some(a),
        Event::Registered { flow, .. } => info.flow = Some(flow),
        Event::RegisterFailed { code, reason, .. } => {
            info.register_failures.push(format!("code {:#x}: {reason}", code.0));
        }
        Event::FlowOpened { .. } => info.flows_opened += 1,
        Event::Disconnected { reason, .. } => info.disconnects.push(reason),
        Event::Connected | Event::FlowClosed { .. } | Event::FlowBound { .. } | Event::Goodbye { .. } => {}
    }
}

impl QuicClients {
    /// Connects the connectors, waits for their registrations, then the
    /// agents and theirs.
    pub fn connect(s: &ClientSetup) -> Result<Self> {
        let service = ServiceName::new(&s.service).with_context(|| format!("invalid service name {:?}", s.service))?;
        let local = if s.relay.ip().is_loopback() {
            SocketAddr::new(s.relay.ip(), 0)
        } else {
            client_io::any_local_for(s.relay)
        };
        let mut clients = Vec::with_capacity(s.connectors + s.agents);
        let mut info = Vec::with_capacity(s.connectors + s.agents);
        let mk = |role: Role, seed: u64| -> Result<UdpClient> {
            let mut cfg = ClientConfig::new(s.relay, local, &s.server_name);
            cfg.registrations = vec![(role, service.clone())];
            cfg.software = format!("ztna-bench/{}", env!("CARGO_PKG_VERSION"));
            let tls = if role == Role::Connector { &s.connector_tls } else { &s.agent_tls };
            let c = UdpClient::new(cfg, tls, local, seed).context("binding a client socket")?;
            let sock = socket2::SockRef::from(c.socket());
            let _ = sock.set_recv_buffer_size(SOCKET_BUF);
            let _ = sock.set_send_buffer_size(SOCKET_BUF);
            Ok(c)
        };
        for i in 0..s.connectors {
            let c = mk(Role::Connector, 0xc0_0000 + i as u64)?;
            info.push(ClientInfo {
                role: "connector".into(),
                local_addr: c.local_addr().ok(),
                ..ClientInfo::default()
            });
            clients.push(c);
        }
        Self::wait_registered(&mut clients, &mut info, 0, s.timeout).context("connectors did not register")?;
        for i in 0..s.agents {
            let c = mk(Role::Agent, 0xa0_0000 + i as u64)?;
            info.push(ClientInfo { role: "agent".into(), local_addr: c.local_addr().ok(), ..ClientInfo::default() });
            clients.push(c);
        }
        Self::wait_registered(&mut clients, &mut info, s.connectors, s.timeout).context("agents did not register")?;
        let flows = info.iter().skip(s.connectors).map(|i| i.flow.unwrap_or(0)).collect();
        let n = clients.len();
        let tx = clients
            .iter()
            .map(|c| {
                let mut b = Batch::new(TX_BATCH);
                if s.gso {
                    b.enable_gso(c.socket());
                }
                b
            })
            .collect();
        let rx = s.gro.then(|| {
            let mut b = Batch::new(RX_GRO_BATCH);
            for c in &clients {
                b.enable_gro(c.socket());
            }
            b
        });
        Ok(QuicClients {
            clients,
            connectors: s.connectors,
            flows,
            info,
            backlog: (0..s.connectors).map(|_| VecDeque::new()).collect(),
            dirty: vec![false; n],
            buf: vec![0u8; 65_536],
            pkt: vec![0u8; 65_536],
            tx,
            rx,
            echo_drops: 0,
            send_errors: 0,
            udp_send_errors: 0,
        })
    }

    /// Pumps all clients until those from `first` on are registered.
    fn wait_registered(
        clients: &mut [UdpClient],
        info: &mut [ClientInfo],
        first: usize,
        timeout: Duration,
    ) -> Result<()> {
        let ok = client_io::pump_all(clients, timeout, |cs| {
            for (c, inf) in cs.iter_mut().zip(info.iter_mut()) {
                while let Some(e) = c.session.poll_event() {
                    handle_event(inf, e);
                }
            }
            info.iter().skip(first).all(|i| i.flow.is_some())
        });
        if !ok {
            let missing: Vec<String> = info
                .iter()
                .enumerate()
                .skip(first)
                .filter(|(_, i)| i.flow.is_none())
                .map(|(n, i)| {
                    format!("#{n} {} (refusals: {:?}, disconnects: {:?})", i.role, i.register_failures, i.disconnects)
                })
                .collect();
            bail!("not registered after {timeout:?}: {}", missing.join("; "));
        }
        Ok(())
    }

    /// Largest datagram payload every agent can send now.
    pub fn max_payload(&self) -> Option<usize> {
        self.clients
            .iter()
            .skip(self.connectors)
            .zip(&self.flows)
            .map(|(c, f)| c.session.max_datagram_payload(*f))
            .min()
            .flatten()
    }

    /// Datagrams the agents' or connectors' sessions could not queue
    /// (other than back-pressure), and UDP sends that failed.
    pub fn send_errors(&self) -> (u64, u64) {
        (self.send_errors, self.udp_send_errors)
    }

    /// QUIC packets the clients' sessions declared lost, and of those the
    /// ones acknowledged later (spurious).
    pub fn quic_lost(&self) -> (u64, u64) {
        self.clients
            .iter()
            .filter_map(|c| c.session.quic_stats())
            .fold((0, 0), |(l, s), st| (l + st.lost as u64, s + st.spurious_lost as u64))
    }

    /// Closes every session and pumps until the closes are sent.
    pub fn close(&mut self) {
        for c in &mut self.clients {
            c.session.close();
        }
        client_io::pump_all(&mut self.clients, Duration::from_millis(200), |cs| {
            cs.iter().all(|c| c.session.is_stopped())
        });
    }

    /// Collects events that arrived since the last call (into `info`).
    pub fn drain_events(&mut self) {
        for (c, inf) in self.clients.iter_mut().zip(self.info.iter_mut()) {
            while let Some(e) = c.session.poll_event() {
                handle_event(inf, e);
            }
        }
    }

    /// Puts what client `i`'s session has to send on the wire, in batches.
    fn flush_one(&mut self, i: usize) {
        let (Some(c), Some(tx)) = (self.clients.get_mut(i), self.tx.get_mut(i)) else { return };
        let now = Instant::now();
        loop {
            let Some(slot) = tx.slot() else {
                Self::send_batch(c, tx, &mut self.udp_send_errors);
                continue;
            };
            let Some((n, to)) = c.session.poll_transmit(slot, now) else { break };
            tx.commit(n, Some(to));
        }
        Self::send_batch(c, tx, &mut self.udp_send_errors);
    }

    /// What the socket does not take now is dropped and counted (QUIC
    /// recovers).
    fn send_batch(c: &UdpClient, tx: &mut Batch, errors: &mut u64) {
        let before = tx.dropped();
        let _ = tx.flush_or_drop(c.socket());
        *errors += tx.dropped() - before;
    }

    fn echo(&mut self, i: usize, flow: u32, payload: &[u8]) {
        let Some(c) = self.clients.get_mut(i) else { return };
        let Some(backlog) = self.backlog.get_mut(i) else { return };
        if !backlog.is_empty() {
            if backlog.len() < ECHO_BACKLOG {
                backlog.push_back((flow, payload.to_vec()));
            } else {
                self.echo_drops += 1;
            }
            return;
        }
        match c.session.send_datagram(flow, payload) {
            Ok(()) => {}
            Err(SendError::QueueFull) => {
                // Put what quiche holds on the wire and try once more.
                self.flush_one(i);
                let (Some(c), Some(backlog)) = (self.clients.get_mut(i), self.backlog.get_mut(i)) else { return };
                if c.session.send_datagram(flow, payload).is_err() {
                    backlog.push_back((flow, payload.to_vec()));
                }
            }
            Err(_) => self.echo_drops += 1,
        }
        if let Some(d) = self.dirty.get_mut(i) {
            *d = true;
        }
    }

    fn retry_backlog(&mut self, i: usize) {
        let (Some(c), Some(backlog)) = (self.clients.get_mut(i), self.backlog.get_mut(i)) else { return };
        while let Some((flow, p)) = backlog.front() {
            match c.session.send_datagram(*flow, p) {
                Ok(()) => {
                    backlog.pop_front();
                }
                Err(SendError::QueueFull) => break,
                Err(_) => {
                    backlog.pop_front();
                    self.echo_drops += 1;
                }
            }
        }
    }
}

impl Transport for QuicClients {
    fn fds(&self) -> Vec<RawFd> {
        self.clients.iter().map(|c| c.socket().as_raw_fd()).collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.clients.iter().filter_map(|c| c.session.next_deadline()).min()
    }

    fn receive(&mut self, ready: Option<&[libc::pollfd]>, on_echo: &mut dyn FnMut(usize, &[u8])) {
        let mut dgram = std::mem::take(&mut self.buf);
        for i in 0..self.clients.len() {
            let connector = i < self.connectors;
            if connector {
                self.retry_backlog(i);
            }
            // Feed the session a bounded batch of packets, then take its
            // datagrams out, so quiche's DATAGRAM receive queue (which
            // drops the oldest when full) never overflows under load.
            while is_ready(ready, i) {
                let Some(c) = self.clients.get_mut(i) else { break };
                let mut got = 0;
                let now = Instant::now();
                while got < RX_BATCH {
                    if let Some(rx) = self.rx.as_mut() {
                        let Ok(n) = rx.recv(c.socket()) else { break };
                        if n == 0 {
                            break;
                        }
                        for k in 0..n {
                            let Some((datagrams, Some(from))) = rx.received(k) else { continue };
                            for d in datagrams {
                                got += 1;
                                c.session.recv(d, from, now);
                            }
                        }
                        continue;
                    }
                    let Ok((n, from)) = c.socket().recv_from(&mut self.pkt) else { break };
                    got += 1;
                    if let Some(b) = self.pkt.get_mut(..n) {
                        c.session.recv(b, from, now);
                    }
                }
                if got == 0 {
                    break;
                }
                if let Some(d) = self.dirty.get_mut(i) {
                    *d = true;
                }
                if connector {
                    while let Some(c) = self.clients.get_mut(i) {
                        let Some(n) = c.session.recv_datagram(&mut dgram) else { break };
                        if let Some(Ok((flow, payload))) = dgram.get(..n).map(datagram::parse) {
                            self.echo(i, flow, payload);
                        }
                    }
                    // Put the echoes on the wire before reading more.
                    self.flush_one(i);
                } else {
                    let a = i - self.connectors;
                    while let Some(n) = c.session.recv_datagram(&mut dgram) {
                        match dgram.get(..n).map(datagram::parse) {
                            Some(Ok((flow, payload))) if Some(&flow) == self.flows.get(a) => on_echo(a, payload),
                            // Wrong flow: counted as misrouted by the generator.
                            _ => on_echo(a, &[]),
                        }
                    }
                }
                if got < RX_BATCH {
                    break;
                }
            }
            let now = Instant::now();
            if let Some(c) = self.clients.get_mut(i) {
                if c.session.next_deadline().is_some_and(|d| d <= now) {
                    c.session.handle_timeout(now);
                    if let Some(d) = self.dirty.get_mut(i) {
                        *d = true;
                    }
                }
            }
        }
        self.buf = dgram;
    }

    fn send(&mut self, agent: usize, payload: &[u8]) -> bool {
        let i = self.connectors + agent;
        let (Some(c), Some(&flow)) = (self.clients.get_mut(i), self.flows.get(agent)) else { return false };
        match c.session.send_datagram(flow, payload) {
            Ok(()) => {
                if let Some(d) = self.dirty.get_mut(i) {
                    *d = true;
                }
                true
            }
            Err(SendError::QueueFull) => false,
            Err(_) => {
                self.send_errors += 1;
                false
            }
        }
    }

    fn flush(&mut self) {
        for i in 0..self.clients.len() {
            if self.dirty.get_mut(i).is_some_and(std::mem::take) {
                self.flush_one(i);
            }
        }
    }

    fn echo_drops(&self) -> u64 {
        self.echo_drops + self.backlog.iter().map(|b| b.len() as u64).sum::<u64>()
    }
}
