//! UDP I/O backends and the per-worker event loop.
//!
//! Two backends drive the same [`Worker`]: `uring` (io_uring via the
//! `io-uring` crate, several RecvMsg in flight and SendMsg batches) and
//! `portable` (poll + recvmmsg/sendmmsg). `Auto` picks io_uring when the
//! kernel lets us create a ring and falls back otherwise (disabled by
//! `kernel.io_uring_disabled`, blocked by a container seccomp profile).

pub mod portable;
pub mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ztna_control::Code;

use crate::worker::{Transmit, Worker};

/// Which I/O backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    Auto,
    Uring,
    Portable,
}

/// Packets received per batch and receive slots in flight.
pub const BATCH: usize = 32;
/// Receive buffer size (larger than any QUIC packet we accept).
pub const RX_BUF: usize = 2048;

/// What an event loop needs from a backend.
pub trait Backend {
    /// Waits up to `timeout` for packets or a mesh wake-up and hands each
    /// received packet to `on_packet`.
    fn poll(&mut self, timeout: Duration, on_packet: &mut dyn FnMut(&mut [u8], SocketAddr)) -> io::Result<()>;
    /// Where the worker writes packets to send.
    fn transmit(&mut self) -> &mut dyn Transmit;
    /// Submits queued sends.
    fn flush(&mut self) -> io::Result<()>;
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Packets the socket refused or no send slot could take, so far.
    fn tx_dropped(&self) -> u64 {
        0
    }
}

/// True if this process may create an io_uring that supports what the
/// backend uses: timeouts on submit (EXT_ARG, Linux 5.11) and the
/// RecvMsg, SendMsg and Read operations.
pub fn uring_available() -> bool {
    let Ok(ring) = io_uring::IoUring::new(4) else { return false };
    if !ring.params().is_feature_ext_arg() {
        return false;
    }
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    [io_uring::opcode::RecvMsg::CODE, io_uring::opcode::SendMsg::CODE, io_uring::opcode::Read::CODE]
        .iter()
        .all(|op| probe.is_supported(*op))
}

/// Resolves `Auto` to a concrete backend.
pub fn resolve(requested: IoBackend) -> IoBackend {
    match requested {
        IoBackend::Auto if uring_available() => IoBackend::Uring,
        IoBackend::Auto => IoBackend::Portable,
        other => other,
    }
}

/// Builds the backend for one worker socket.
pub fn make_backend(kind: IoBackend, socket: UdpSocket, eventfd: RawFd) -> io::Result<Box<dyn Backend>> {
    match resolve(kind) {
        IoBackend::Uring => Ok(Box::new(uring::Uring::new(socket, eventfd)?)),
        _ => Ok(Box::new(portable::Portable::new(socket, eventfd)?)),
    }
}

/// Binds `n` UDP sockets to `addr` in one SO_REUSEPORT group (index order =
/// bind order, which the BPF steering relies on). Port 0 binds the first
/// socket to an ephemeral port and the rest to the same one.
pub fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            // Dual stack: one socket serves IPv4 (as mapped) and IPv6.
            s.set_only_v6(false)?;
        }
        // Large buffers absorb bursts; the kernel caps them at rmem_max.
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        if addr.port() == 0 {
            if let Some(a) = s.local_addr()?.as_socket() {
                addr.set_port(a.port());
            }
        }
        out.push(s.into());
    }
    Ok(out)
}

/// What the relay handle asks of its workers, and their heartbeats.
#[derive(Debug)]
pub struct Lifecycle {
    /// Shut down now: Goodbye{SHUTDOWN}, close a quarter of the grace
    /// period later, exit when closed or after the grace period.
    pub shutdown: AtomicBool,
    /// Drain: Goodbye{DRAINING}, keep serving until every agent has left
    /// (relay-wide) or the grace period nearly ends, then shut down.
    pub drain: AtomicBool,
    /// One per worker.
    heartbeats: Vec<Heartbeat>,
}

/// An event loop turns at least every 500 ms; one silent for this long is
/// stuck or gone.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(5);

/// When an event loop last turned, readable from other threads (health
/// endpoints, the systemd watchdog).
#[derive(Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// Milliseconds since `epoch` at the last beat.
    ms: AtomicU64,
}

impl Heartbeat {
    /// Counts as a beat now.
    pub fn new() -> Heartbeat {
        Heartbeat { epoch: Instant::now(), ms: AtomicU64::new(0) }
    }

    pub fn beat(&self, now: Instant) {
        self.ms.store(now.saturating_duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
    }

    /// The loop turned within [`HEARTBEAT_STALE`].
    pub fn fresh(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        now_ms.saturating_sub(self.ms.load(Ordering::Relaxed)) < HEARTBEAT_STALE.as_millis() as u64
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

impl Lifecycle {
    pub fn new(workers: usize) -> Lifecycle {
        Lifecycle {
            shutdown: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            heartbeats: (0..workers).map(|_| Heartbeat::new()).collect(),
        }
    }

    fn beat(&self, worker: usize, now: Instant) {
        if let Some(h) = self.heartbeats.get(worker) {
            h.beat(now);
        }
    }

    /// True while every worker loop has turned within [`HEARTBEAT_STALE`].
    pub fn all_alive(&self, now: Instant) -> bool {
        self.heartbeats.iter().all(|h| h.fresh(now))
    }

    /// True once a drain or a shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Acquire) || self.shutdown.load(Ordering::Acquire)
    }
}

/// Runs one worker until it is shut down (directly, or at the end of a
/// drain) and its connections are closed, bounded by `grace`.
pub fn run_worker(worker: &mut Worker, backend: &mut dyn Backend, life: &Lifecycle, grace: Duration) {
    // Final phase of a drain: close the connectors and stragglers.
    let linger = (grace / 4).min(Duration::from_millis(500));
    let mut drain_end: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        life.beat(worker.index(), now);
        if deadline.is_none() {
            if drain_end.is_none() && life.drain.load(Ordering::Acquire) {
                worker.begin_drain(now);
                drain_end = Some(now + grace.saturating_sub(linger * 2));
            }
            if life.shutdown.load(Ordering::Acquire) {
                worker.begin_shutdown(Code::SHUTDOWN, "relay shutting down", grace / 4, now);
                deadline = Some(now + grace);
            } else if let Some(end) = drain_end {
                if now >= end || worker.agents_relay_wide() == 0 {
                    worker.begin_shutdown(Code::SHUTDOWN, "relay shutting down", linger, now);
                    deadline = Some(now + linger * 2);
                }
            }
        }
        if let Some(d) = deadline {
            if worker.conn_count() == 0 || now >= d {
                break;
            }
        }
        let mut timeout =
            worker.next_timeout().map_or(Duration::from_millis(500), |t| t.saturating_duration_since(now));
        timeout = timeout.min(Duration::from_millis(if drain_end.is_some() { 50 } else { 500 }));
        if worker.has_backlog() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        let r = backend.poll(timeout, &mut |buf, from| worker.handle_packet(buf, from, Instant::now()));
        if let Err(e) = r {
            tracing::warn!(worker = worker.index(), error = %e, "poll failed");
        }
        let now = Instant::now();
        worker.drain_inbox(now);
        worker.handle_timeouts(now);
        worker.flush(backend.transmit(), now);
        if let Err(e) = backend.flush() {
            tracing::debug!(worker = worker.index(), error = %e, "send failed");
        }
        worker.stats().drop_tx.store(backend.tx_dropped(), Ordering::Relaxed);
    }
}

/// Converts a kernel-filled socket address to a std one.
pub fn sockaddr_to_std(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    let len = len as usize;
    match i32::from(name.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say the storage holds a sockaddr_in;
            // sockaddr_storage is aligned for every sockaddr type.
            let a = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}
