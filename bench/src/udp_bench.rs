//! `ztna-bench udp-forwarder`: the same load through a plain UDP forwarder
//! ([`crate::forwarder`]) on the same I/O backend: no QUIC, no
//! crypto, the floor of the relay's I/O path.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::forwarder::{self, ForwarderHandle, HEADER_LEN, HELLO_FLOW};
use anyhow::{bail, Context, Result};
use ztna_udp::batch::Batch;
use ztna_udp::IoBackend;

use crate::load::{self, is_ready, LoadConfig, Sample, Transport};
use crate::report::{Report, TargetInfo};

/// Socket buffer size asked for on bench sockets (the kernel caps it).
const SOCKET_BUF: usize = 4 << 20;
/// Packets one socket handles per receive turn (fairness between sockets).
const RX_PER_TURN: usize = 256;

/// Plain UDP agents and echo peers of a forwarder.
pub struct UdpClients {
    forwarder: SocketAddr,
    agents: Vec<UdpSocket>,
    peers: Vec<UdpSocket>,
    buf: Vec<u8>,
    tx: Vec<u8>,
    /// With GRO (`LoadConfig::client_gro`): receives of every socket, one
    /// socket at a time; None: one `recv` per datagram.
    rx: Option<Batch>,
    echo_drops: u64,
}

/// Receives per `recvmmsg` with GRO (each up to 64 datagrams).
const RX_GRO_BATCH: usize = 4;

/// Takes up to `max` datagrams from `s` (through `rx` when it does GRO)
/// and hands each to `f`.
fn receive_from(s: &UdpSocket, mut rx: Option<&mut Batch>, buf: &mut [u8], max: usize, f: &mut dyn FnMut(&[u8])) {
    let mut got = 0;
    while got < max {
        if let Some(rx) = rx.as_mut() {
            let n = rx.recv(s).unwrap_or(0);
            if n == 0 {
                return;
            }
            for k in 0..n {
                let Some((datagrams, _)) = rx.received(k) else { continue };
                for d in datagrams {
                    got += 1;
                    f(d);
                }
            }
        } else {
            let Ok(n) = s.recv(buf) else { return };
            got += 1;
            if let Some(p) = buf.get(..n) {
                f(p);
            }
        }
    }
}

fn bench_socket() -> Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    let r = socket2::SockRef::from(&s);
    let _ = r.set_recv_buffer_size(SOCKET_BUF);
    let _ = r.set_send_buffer_size(SOCKET_BUF);
    Ok(s)
}

/// Flow id of agent `a` (never the hello flow).
pub fn agent_flow(a: usize) -> u32 {
    a as u32 + 1
}

impl UdpClients {
    /// Registers `peers` echo peers (hello until acknowledged) and binds
    /// `agents` agent sockets.
    pub fn connect(forwarder: SocketAddr, agents: usize, peers: usize, gro: bool) -> Result<Self> {
        let mut ps = Vec::with_capacity(peers);
        for i in 0..peers {
            let s = bench_socket()?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let end = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 64];
            loop {
                if Instant::now() >= end {
                    bail!("echo peer {i}: no hello acknowledgement from {forwarder}");
                }
                s.send_to(&HELLO_FLOW.to_be_bytes(), forwarder)?;
                match s.recv_from(&mut buf) {
                    Ok((n, from)) if from == forwarder && buf.get(..n) == Some(&HELLO_FLOW.to_be_bytes()[..]) => break,
                    _ => continue,
                }
            }
            s.set_nonblocking(true)?;
            ps.push(s);
        }
        let mut ags = Vec::with_capacity(agents);
        for _ in 0..agents {
            let s = bench_socket()?;
            s.set_nonblocking(true)?;
            ags.push(s);
        }
        let rx = gro.then(|| {
            let mut b = Batch::new(RX_GRO_BATCH);
            for s in ps.iter().chain(&ags) {
                b.enable_gro(s);
            }
            b
        });
        Ok(UdpClients {
            rx,
            forwarder,
            agents: ags,
            peers: ps,
            buf: vec![0u8; 65_536],
            tx: Vec::with_capacity(2048),
            echo_drops: 0,
        })
    }
}

impl Transport for UdpClients {
    fn fds(&self) -> Vec<RawFd> {
        self.peers.iter().chain(&self.agents).map(|s| s.as_raw_fd()).collect()
    }

    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    fn receive(&mut self, ready: Option<&[libc::pollfd]>, on_echo: &mut dyn FnMut(usize, &[u8])) {
        let forwarder = self.forwarder;
        for (i, s) in self.peers.iter().enumerate() {
            if !is_ready(ready, i) {
                continue;
            }
            let drops = &mut self.echo_drops;
            receive_from(s, self.rx.as_mut(), &mut self.buf, RX_PER_TURN, &mut |p| {
                if p.len() >= HEADER_LEN && s.send_to(p, forwarder).is_err() {
                    *drops += 1;
                }
            });
        }
        for (a, s) in self.agents.iter().enumerate() {
            if !is_ready(ready, self.peers.len() + a) {
                continue;
            }
            receive_from(s, self.rx.as_mut(), &mut self.buf, RX_PER_TURN, &mut |p| {
                match p.split_first_chunk::<HEADER_LEN>() {
                    Some((h, payload)) if u32::from_be_bytes(*h) == agent_flow(a) => on_echo(a, payload),
                    // Another agent's flow: the generator counts it as misrouted.
                    _ => on_echo(a, &[]),
                }
            });
        }
    }

    fn send(&mut self, agent: usize, payload: &[u8]) -> bool {
        let Some(s) = self.agents.get(agent) else { return false };
        self.tx.clear();
        self.tx.extend_from_slice(&agent_flow(agent).to_be_bytes());
        self.tx.extend_from_slice(payload);
        match s.send_to(&self.tx, self.forwarder) {
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(_) => false,
        }
    }

    fn flush(&mut self) {}

    fn echo_drops(&self) -> u64 {
        self.echo_drops
    }
}

/// Runs the load against a forwarder started here on `io_backend`.
pub fn run(io_backend: IoBackend, load: &LoadConfig) -> Result<Report> {
    load.validate()?;
    let fwd = forwarder::start(SocketAddr::from(([127, 0, 0, 1], 0)), io_backend).context("starting the forwarder")?;
    let r = run_with(&fwd, load);
    fwd.shutdown();
    r
}

/// Runs the load against a running forwarder.
pub fn run_with(fwd: &ForwarderHandle, load: &LoadConfig) -> Result<Report> {
    let mut clients = UdpClients::connect(fwd.local_addr, load.agents, load.connectors, load.client_gro)?;
    let before = fwd.stats();
    let mut probe = || Sample::in_process(fwd.forwarded(), fwd.cpu_time());
    let (result, samples) = load::run_load(&mut clients, load, &mut probe)?;
    let after = fwd.stats();
    let target = TargetInfo {
        kind: "udp-forwarder".into(),
        address: fwd.local_addr.to_string(),
        in_process: true,
        io_backend: format!("{:?}", fwd.backend).to_lowercase(),
        workers: Some(1),
    };
    let mut report = Report::new(target, load, result, &samples);
    for (k, a, b) in [
        ("drop_short", before.drop_short, after.drop_short),
        ("drop_no_peer", before.drop_no_peer, after.drop_no_peer),
        ("drop_unknown_flow", before.drop_unknown_flow, after.drop_unknown_flow),
    ] {
        if b > a {
            report.drops.insert(k.to_owned(), b - a);
        }
    }
    report.counters.insert("packets_rx".into(), after.packets_rx.saturating_sub(before.packets_rx));
    report.counters.insert("forwarded".into(), after.forwarded.saturating_sub(before.forwarded));
    Ok(report)
}
