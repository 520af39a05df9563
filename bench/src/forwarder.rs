//! A plain UDP forwarder with no QUIC: the floor of the relay's I/O path.
//!
//! It runs one thread on the same [`Backend`]s as a relay worker and
//! forwards `[flow: u32 big-endian][payload]` packets between agents and
//! echo peers:
//!
//! - A packet with flow 0 is a *hello*: its sender becomes an echo peer and
//!   gets the hello back as an acknowledgement.
//! - A packet from an echo peer goes to the agent address learned for its
//!   flow.
//! - Any other packet teaches `flow -> sender` and goes to the echo peer
//!   `flow % peers`.
//!
//! The benchmark (`ztna-bench udp-forwarder`) compares its CPU time per
//! forwarded packet with the relay's per forwarded datagram.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use ztna_relay::mesh::Mesh;
use ztna_udp::{Backend, IoBackend};

/// Flow id of a hello (echo-peer registration) packet.
pub const HELLO_FLOW: u32 = 0;
/// Bytes of the flow header.
pub const HEADER_LEN: usize = 4;

/// Counters of the forwarder thread (relaxed atomics, written by it only).
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// Packets received.
    pub packets_rx: AtomicU64,
    /// Packets forwarded (handed to the socket).
    pub forwarded: AtomicU64,
    /// Hellos received (including repeats).
    pub hellos: AtomicU64,
    /// Packets shorter than the flow header.
    pub drop_short: AtomicU64,
    /// Agent packets while no echo peer is registered.
    pub drop_no_peer: AtomicU64,
    /// Echo-peer packets for a flow no agent was learned for.
    pub drop_unknown_flow: AtomicU64,
}

/// A plain copy of [`ForwarderStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ForwarderSnapshot {
    pub packets_rx: u64,
    pub forwarded: u64,
    pub hellos: u64,
    pub drop_short: u64,
    pub drop_no_peer: u64,
    pub drop_unknown_flow: u64,
}

impl ForwarderStats {
    pub fn snapshot(&self) -> ForwarderSnapshot {
        ForwarderSnapshot {
            packets_rx: self.packets_rx.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            hellos: self.hellos.load(Ordering::Relaxed),
            drop_short: self.drop_short.load(Ordering::Relaxed),
            drop_no_peer: self.drop_no_peer.load(Ordering::Relaxed),
            drop_unknown_flow: self.drop_unknown_flow.load(Ordering::Relaxed),
        }
    }
}

/// A running forwarder.
pub struct ForwarderHandle {
    pub local_addr: SocketAddr,
    /// The backend actually in use (`Auto` resolved).
    pub backend: IoBackend,
    stats: Arc<ForwarderStats>,
    tid: Arc<AtomicI32>,
    mesh: Arc<Mesh>,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Routing state: echo peers and the agent address of each flow.
#[derive(Debug, Default)]
struct Table {
    peers: Vec<SocketAddr>,
    agents: HashMap<u32, SocketAddr>,
}

impl Table {
    /// Where a packet with `flow` from `from` goes (`None`: drop). Hellos
    /// are answered to their sender.
    fn route(&mut self, flow: u32, from: SocketAddr, stats: &ForwarderStats) -> Option<SocketAddr> {
        if flow == HELLO_FLOW {
            stats.hellos.fetch_add(1, Ordering::Relaxed);
            if !self.peers.contains(&from) {
                self.peers.push(from);
            }
            return Some(from);
        }
        if self.peers.contains(&from) {
            let to = self.agents.get(&flow).copied();
            if to.is_none() {
                stats.drop_unknown_flow.fetch_add(1, Ordering::Relaxed);
            }
            return to;
        }
        if self.peers.is_empty() {
            stats.drop_no_peer.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.agents.get(&flow) != Some(&from) {
            self.agents.insert(flow, from);
        }
        self.peers.get(flow as usize % self.peers.len()).copied()
    }
}

/// Packets received in one poll, waiting to be written to the transmit
/// queue (the backend is borrowed while it hands packets out).
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    packets: Vec<(usize, usize, SocketAddr)>,
}

impl Outbox {
    fn push(&mut self, b: &[u8], to: SocketAddr) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        self.packets.push((start, b.len(), to));
    }

    fn drain_into(&mut self, be: &mut dyn Backend) -> u64 {
        let tx = be.transmit();
        let mut n = 0;
        for &(start, len, to) in &self.packets {
            let Some(src) = self.bytes.get(start..start + len) else { continue };
            let buf = tx.buf();
            let len = len.min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..len), src.get(..len)) {
                dst.copy_from_slice(src);
                tx.commit(len, to);
                n += 1;
            }
        }
        self.bytes.clear();
        self.packets.clear();
        n
    }
}

/// Binds `addr` and starts the forwarder thread on `kind`. Returns once the
/// thread is polling.
pub fn start(addr: SocketAddr, kind: IoBackend) -> Result<ForwarderHandle> {
    let socket = ztna_udp::bind_group(addr, 1)
        .with_context(|| format!("binding {addr}"))?
        .pop()
        .context("bind_group returned no socket")?;
    let local_addr = socket.local_addr()?;
    let backend = ztna_udp::resolve(kind);
    // The mesh provides the eventfd the backends wait on besides the
    // socket; here it only wakes the thread for shutdown.
    let mesh = Arc::new(Mesh::new(1, 1, 1)?);
    let stats = Arc::new(ForwarderStats::default());
    let tid = Arc::new(AtomicI32::new(0));
    let shutdown = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let thread = {
        let (mesh, stats, tid, shutdown) =
            (Arc::clone(&mesh), Arc::clone(&stats), Arc::clone(&tid), Arc::clone(&shutdown));
        std::thread::Builder::new().name("udp-forwarder".into()).spawn(move || {
            tid.store(crate::cpu::current_tid(), Ordering::Relaxed);
            let be = match mesh.inboxes.first() {
                Some(inbox) => {
                    ztna_udp::make_backend(backend, socket, inbox.eventfd().as_raw_fd()).map_err(|e| e.to_string())
                }
                None => Err("no inbox".to_owned()),
            };
            let mut be = match be {
                Ok(be) => {
                    let _ = ready_tx.send(Ok(()));
                    be
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            run(be.as_mut(), &stats, &shutdown, &mesh);
        })?
    };
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            bail!("forwarder failed to start: {e}");
        }
        Err(_) => {
            let _ = thread.join();
            return Err(anyhow!("forwarder thread exited during start-up"));
        }
    }
    Ok(ForwarderHandle { local_addr, backend, stats, tid, mesh, shutdown, thread: Some(thread) })
}

fn run(be: &mut dyn Backend, stats: &ForwarderStats, shutdown: &AtomicBool, mesh: &Mesh) {
    let mut table = Table::default();
    let mut outbox = Outbox::default();
    while !shutdown.load(Ordering::Acquire) {
        let r = be.poll(Duration::from_millis(100), &mut |buf, from, _| {
            stats.packets_rx.fetch_add(1, Ordering::Relaxed);
            let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
                stats.drop_short.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let flow = u32::from_be_bytes(*head);
            if let Some(to) = table.route(flow, from, stats) {
                outbox.push(buf, to);
            }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "forwarder poll failed");
        }
        if let Some(inbox) = mesh.inboxes.first() {
            inbox.clear_notified();
        }
        let n = outbox.drain_into(be);
        stats.forwarded.fetch_add(n, Ordering::Relaxed);
        if let Err(e) = be.flush() {
            tracing::warn!(error = %e, "forwarder send failed");
        }
    }
}

impl ForwarderHandle {
    pub fn stats(&self) -> ForwarderSnapshot {
        self.stats.snapshot()
    }

    /// Packets forwarded so far (hello acknowledgements included).
    pub fn forwarded(&self) -> u64 {
        self.stats.forwarded.load(Ordering::Relaxed)
    }

    /// CPU time of the forwarder thread so far (from
    /// /proc/self/task/TID/schedstat).
    pub fn cpu_time(&self) -> Duration {
        crate::cpu::task_cpu_time(self.tid.load(Ordering::Relaxed))
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(inbox) = self.mesh.inboxes.first() {
            inbox.wake();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ForwarderHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn table_routes() {
        let st = ForwarderStats::default();
        let mut t = Table::default();
        assert_eq!(t.route(5, addr(10), &st), None, "no peer yet");
        assert_eq!(t.route(HELLO_FLOW, addr(1), &st), Some(addr(1)));
        assert_eq!(t.route(HELLO_FLOW, addr(2), &st), Some(addr(2)));
        assert_eq!(t.route(5, addr(10), &st), Some(addr(2)), "5 % 2 peers");
        assert_eq!(t.route(6, addr(11), &st), Some(addr(1)));
        assert_eq!(t.route(5, addr(2), &st), Some(addr(10)), "reply to the agent of flow 5");
        assert_eq!(t.route(7, addr(1), &st), None, "unknown flow from a peer");
        let s = st.snapshot();
        assert_eq!((s.hellos, s.drop_no_peer, s.drop_unknown_flow), (2, 1, 1));
    }

    fn roundtrip(kind: IoBackend) {
        let fwd = start("127.0.0.1:0".parse().unwrap(), kind).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let agent = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&peer, &agent] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut buf = [0u8; 64];
        peer.send_to(&0u32.to_be_bytes(), fwd.local_addr).unwrap();
        assert_eq!(peer.recv_from(&mut buf).unwrap().0, 4, "hello acknowledged");
        let mut pkt = 9u32.to_be_bytes().to_vec();
        pkt.extend_from_slice(b"ping");
        agent.send_to(&pkt, fwd.local_addr).unwrap();
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pkt[..]);
        peer.send_to(&pkt, fwd.local_addr).unwrap();
        let (n, _) = agent.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pkt[..]);
        assert_eq!(fwd.forwarded(), 3);
        assert!(fwd.cpu_time() > Duration::ZERO);
        fwd.shutdown();
    }

    #[test]
    fn roundtrip_portable() {
        roundtrip(IoBackend::Portable);
    }

    #[test]
    fn roundtrip_auto() {
        roundtrip(IoBackend::Auto);
    }
}
