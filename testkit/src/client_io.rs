//! A small UDP driver for [`ClientSession`]: one non-blocking socket per
//! session, pumped from the caller's thread. Used by the benchmark, the
//! integration tests and (later) the connector and Linux agent; the
//! protocol logic stays in the sans-I/O session.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::quic::{self, TlsOptions};

/// A session bound to its own UDP socket.
pub struct UdpClient {
    pub session: ClientSession,
    socket: UdpSocket,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Packets received / sent through this socket.
    pub packets_rx: u64,
    pub packets_tx: u64,
}

/// An unspecified local address of the same family as `relay`.
pub fn any_local_for(relay: SocketAddr) -> SocketAddr {
    if relay.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

impl UdpClient {
    /// Binds `local` (port 0 for ephemeral) and prepares a session per
    /// `cfg` (its `local` field is overwritten with the bound address).
    pub fn new(mut cfg: ClientConfig, tls: &TlsOptions, local: SocketAddr, seed: u64) -> io::Result<Self> {
        let socket = UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        let bound = socket.local_addr()?;
        // quiche wants the address the peer sends to; with an unspecified
        // bind use the loopback of the same family when the relay is local.
        cfg.local = if bound.ip().is_unspecified() && cfg.relay.ip().is_loopback() {
            SocketAddr::new(cfg.relay.ip(), bound.port())
        } else {
            bound
        };
        let qc = quic::client_tls(tls).map_err(|e| io::Error::other(e.to_string()))?;
        let session = ClientSession::new(cfg, qc, seed, Instant::now());
        Ok(UdpClient { session, socket, buf: vec![0u8; 65_536], out: vec![0u8; 2048], packets_rx: 0, packets_tx: 0 })
    }

    /// Convenience: TLS options trusting `ca` (verification on), without
    /// a client certificate (the relay refuses such clients).
    pub fn tls_with_ca(ca: &Path) -> TlsOptions {
        let ca_pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {}: {e}", ca.display()));
        TlsOptions { ca_pem: Some(ca_pem), ..TlsOptions::default() }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Gives the socket the product's large buffers (`ztna_udp::bind`).
    /// The default is the kernel's (about 200 KB): the flood tests are
    /// calibrated to clients with it.
    pub fn with_large_buffers(self) -> Self {
        ztna_udp::enlarge_buffers(&self.socket);
        self
    }

    /// Replaces the socket with a new one on another port, as a NAT
    /// rebinding would: the relay sees the same connection from a new
    /// address.
    pub fn rebind(&mut self) -> io::Result<()> {
        let local = self.socket.local_addr()?;
        let socket = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        socket.set_nonblocking(true)?;
        self.socket = socket;
        Ok(())
    }

    /// Receives what is waiting, runs timers, sends what is due.
    pub fn pump(&mut self) {
        while let Ok((n, from)) = self.socket.recv_from(&mut self.buf) {
            self.packets_rx += 1;
            let now = Instant::now();
            if let Some(b) = self.buf.get_mut(..n) {
                self.session.recv(b, from, now);
            }
        }
        let now = Instant::now();
        if self.session.next_deadline().is_some_and(|d| d <= now) {
            self.session.handle_timeout(now);
        }
        while let Some((n, to)) = self.session.poll_transmit(&mut self.out, now) {
            if let Some(b) = self.out.get(..n) {
                if self.socket.send_to(b, to).is_ok() {
                    self.packets_tx += 1;
                }
            }
        }
    }

    /// Pumps until an event satisfies `pred` (returned) or `timeout`
    /// passes; other events are handed to `other`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
        mut other: impl FnMut(Event),
    ) -> Option<Event> {
        let end = Instant::now() + timeout;
        loop {
            self.pump();
            while let Some(e) = self.session.poll_event() {
                if pred(&e) {
                    return Some(e);
                }
                other(e);
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            let until = self.session.next_deadline().unwrap_or(end).min(end);
            wait_readable(
                &[self.socket.as_raw_fd()],
                until.saturating_duration_since(now).min(Duration::from_millis(50)),
            );
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes.
pub fn wait_readable(fds: &[std::os::fd::RawFd], timeout: Duration) {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is a live, correctly sized array of pollfd.
    unsafe {
        libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms);
    }
}

/// Pumps a set of clients from one thread until `done` returns true or
/// `timeout` passes. Returns whether `done` was reached.
pub fn pump_all(clients: &mut [UdpClient], timeout: Duration, mut done: impl FnMut(&mut [UdpClient]) -> bool) -> bool {
    let end = Instant::now() + timeout;
    let fds: Vec<_> = clients.iter().map(|c| c.socket.as_raw_fd()).collect();
    loop {
        for c in clients.iter_mut() {
            c.pump();
        }
        if done(clients) {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        let next = clients.iter().filter_map(|c| c.session.next_deadline()).min().unwrap_or(end).min(end);
        wait_readable(&fds, next.saturating_duration_since(now).min(Duration::from_millis(20)));
    }
}
