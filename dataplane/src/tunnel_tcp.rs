//! Agent-side TCP through the tunnel, without a TUN device: a smoltcp
//! interface whose "wire" is one agent flow of a [`UdpClient`] (each
//! DATAGRAM payload is one IP packet). Used by the tests, and by the demo and
//! benchmark for TCP traffic to a service behind a connector.
//!
//! Everything runs on the caller's thread: [`TunnelTcp::pump`] moves packets
//! between the QUIC session and smoltcp; the blocking-ish helpers
//! ([`TunnelTcp::wait_connected`], [`TunnelTcp::send_all`],
//! [`TunnelTcp::recv_exact`], …) pump until done or a timeout.
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn demo(client: ztna_dataplane::client_io::UdpClient, flow: u32) -> std::io::Result<()> {
//! use ztna_dataplane::tunnel_tcp::TunnelTcp;
//! let mut t = TunnelTcp::new(client, flow, "10.0.0.2".parse().unwrap(), 1);
//! let c = t.connect("100.64.0.1:7".parse().unwrap())?;
//! t.wait_connected(c, Duration::from_secs(5))?;
//! t.send_all(c, b"hello", Duration::from_secs(5))?;
//! let echoed = t.recv_exact(c, 5, Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, CongestionControl, RecvError, State};
use smoltcp::wire::{HardwareAddress, IpCidr};
use ztna_control::client::SendError;
use ztna_control::datagram;

use crate::client_io::{wait_readable, UdpClient};
use crate::vdev::{smol_instant, QueueDevice};

/// Default size of each socket buffer (receive and send).
pub const DEFAULT_BUFFER: usize = 256 * 1024;
/// Packets queued towards smoltcp or the session before they wait.
const QUEUE: usize = 1024;
/// Datagrams read per smoltcp run inside one pump.
const BATCH: usize = 128;

/// A TCP connection through the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpConn(SocketHandle);

/// Counters of a [`TunnelTcp`].
#[derive(Debug, Default, Clone, Copy)]
pub struct TunnelTcpStats {
    /// IP packets from the tunnel handed to smoltcp.
    pub packets_in: u64,
    /// IP packets smoltcp sent into the tunnel.
    pub packets_out: u64,
    /// Datagrams of another flow, malformed ones, or over the queue bound.
    pub dropped_in: u64,
    /// Packets the session refused for good (too large, not connected).
    pub dropped_out: u64,
}

/// smoltcp TCP over one agent flow.
pub struct TunnelTcp {
    pub client: UdpClient,
    flow: u32,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
    epoch: Instant,
    next_port: u16,
    buffer: usize,
    buf: Vec<u8>,
    pub stats: TunnelTcpStats,
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")
}

impl TunnelTcp {
    /// TCP over agent flow `flow` of `client`, with inner source address
    /// `local` (the agent's tunnel address). `seed` seeds initial sequence
    /// numbers.
    pub fn new(client: UdpClient, flow: u32, local: Ipv4Addr, seed: u64) -> TunnelTcp {
        let epoch = Instant::now();
        let mut dev = QueueDevice::new(QUEUE, QUEUE, true);
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let mut iface = Interface::new(cfg, &mut dev, smol_instant(epoch, epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(local.into(), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(local);
        TunnelTcp {
            client,
            flow,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            epoch,
            next_port: 49152 + (seed % 16384) as u16,
            buffer: DEFAULT_BUFFER,
            buf: vec![0u8; 65_536],
            stats: TunnelTcpStats::default(),
        }
    }

    /// Sets the socket buffer size of connections opened from now on.
    pub fn set_buffer(&mut self, bytes: usize) {
        self.buffer = bytes;
    }

    /// The agent flow id.
    pub fn flow(&self) -> u32 {
        self.flow
    }

    /// Starts connecting to `dst` (a service address behind the connector).
    pub fn connect(&mut self, dst: SocketAddrV4) -> io::Result<TcpConn> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.buffer]),
        );
        s.set_congestion_control(CongestionControl::Reno);
        s.set_nagle_enabled(false);
        let in_use: Vec<u16> = self
            .sockets
            .iter()
            .filter_map(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => t.local_endpoint().map(|e| e.port),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .collect();
        let mut port = self.next_port;
        while in_use.contains(&port) {
            port = if port == u16::MAX { 49152 } else { port + 1 };
        }
        self.next_port = if port == u16::MAX { 49152 } else { port + 1 };
        s.connect(self.iface.context(), dst, port).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let h = self.sockets.add(s);
        self.pump();
        Ok(TcpConn(h))
    }

    fn socket(&self, c: TcpConn) -> &tcp::Socket<'static> {
        self.sockets.get::<tcp::Socket>(c.0)
    }

    fn socket_mut(&mut self, c: TcpConn) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(c.0)
    }

    /// The connection's TCP state.
    pub fn state(&self, c: TcpConn) -> State {
        self.socket(c).state()
    }

    /// Bytes accepted by [`TunnelTcp::send`] and not yet acknowledged.
    pub fn send_queue(&self, c: TcpConn) -> usize {
        self.socket(c).send_queue()
    }

    /// Bytes received and not yet read.
    pub fn recv_queue(&self, c: TcpConn) -> usize {
        self.socket(c).recv_queue()
    }

    /// Moves packets both ways: reads the UDP socket, feeds this flow's
    /// datagrams to smoltcp, runs it, and sends what it produced.
    pub fn pump(&mut self) {
        self.client.pump();
        loop {
            let mut n = 0;
            while n < BATCH {
                let Some(len) = self.client.session.recv_datagram(&mut self.buf) else { break };
                n += 1;
                match self.buf.get(..len).map(datagram::parse) {
                    Some(Ok((flow, ip))) if flow == self.flow && self.dev.push_rx(ip) => self.stats.packets_in += 1,
                    _ => self.stats.dropped_in += 1,
                }
            }
            self.poll_iface();
            if n < BATCH {
                break;
            }
        }
        self.client.pump();
    }

    fn poll_iface(&mut self) {
        let now = smol_instant(self.epoch, Instant::now());
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.flush();
        // Room in the device may let smoltcp send more.
        if self.dev.tx_len() == 0 {
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.flush();
        }
    }

    fn flush(&mut self) {
        while let Some(p) = self.dev.pop_tx() {
            match self.client.session.send_datagram(self.flow, &p) {
                Ok(()) => self.stats.packets_out += 1,
                Err(SendError::QueueFull) => {
                    self.dev.unpop_tx(p);
                    break;
                }
                Err(_) => self.stats.dropped_out += 1,
            }
        }
    }

    /// Waits up to `max` for the UDP socket or the next smoltcp or session
    /// timer, then pumps.
    pub fn wait(&mut self, max: Duration) {
        let now = Instant::now();
        let mut d = max;
        if let Some(t) = self.iface.poll_delay(smol_instant(self.epoch, now), &self.sockets) {
            d = d.min(Duration::from_micros(t.total_micros()));
        }
        if self.dev.tx_len() > 0 {
            // The session's queue was full: retry soon.
            d = d.min(Duration::from_millis(2));
        }
        if let Some(t) = self.client.session.next_deadline() {
            d = d.min(t.saturating_duration_since(now));
        }
        if !d.is_zero() {
            wait_readable(&[self.client.socket().as_raw_fd()], d);
        }
        self.pump();
    }

    /// Queues bytes to send; returns how many were taken (0 when the send
    /// buffer is full).
    pub fn send(&mut self, c: TcpConn, data: &[u8]) -> io::Result<usize> {
        let s = self.socket_mut(c);
        if !s.may_send() {
            return match s.state() {
                State::SynSent | State::SynReceived => Ok(0),
                State::Closed => Err(reset()),
                _ => Err(io::Error::new(io::ErrorKind::BrokenPipe, "send side closed")),
            };
        }
        s.send_slice(data).map_err(|_| reset())
    }

    /// Reads received bytes: `Ok(0)` at end of stream (FIN), `WouldBlock`
    /// when nothing is there yet, `ConnectionReset` after an RST.
    pub fn recv(&mut self, c: TcpConn, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.socket_mut(c);
        match s.recv_slice(buf) {
            Ok(0) => match s.state() {
                State::Closed => Err(reset()),
                _ => Err(io::ErrorKind::WouldBlock.into()),
            },
            Ok(n) => Ok(n),
            Err(RecvError::Finished) => Ok(0),
            Err(RecvError::InvalidState) => match s.state() {
                State::SynSent | State::SynReceived => Err(io::ErrorKind::WouldBlock.into()),
                _ => Err(reset()),
            },
        }
    }

    /// Closes the send half (FIN after queued data).
    pub fn close(&mut self, c: TcpConn) {
        self.socket_mut(c).close();
        self.pump();
    }

    /// Resets the connection.
    pub fn abort(&mut self, c: TcpConn) {
        self.socket_mut(c).abort();
        self.pump();
    }

    /// Forgets a connection (after it closed, or to drop it silently).
    pub fn release(&mut self, c: TcpConn) {
        self.sockets.remove(c.0);
    }

    /// Pumps until the connection is established: `ConnectionRefused` if it
    /// was reset, `TimedOut` after `timeout`.
    pub fn wait_connected(&mut self, c: TcpConn, timeout: Duration) -> io::Result<()> {
        let end = Instant::now() + timeout;
        loop {
            match self.state(c) {
                State::Established | State::CloseWait => return Ok(()),
                State::Closed => return Err(io::ErrorKind::ConnectionRefused.into()),
                _ => {}
            }
            if Instant::now() >= end {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.wait(Duration::from_millis(20));
        }
    }

    /// Pumps until every byte of `data` is in the send buffer.
    pub fn send_all(&mut self, c: TcpConn, mut data: &[u8], timeout: Duration) -> io::Result<()> {
        let end = Instant::now() + timeout;
        while !data.is_empty() {
            let n = self.send(c, data)?;
            data = data.get(n..).unwrap_or_default();
            if data.is_empty() {
                break;
            }
            if Instant::now() >= end {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.wait(Duration::from_millis(20));
        }
        self.pump();
        Ok(())
    }

    /// Pumps until `n` bytes have been read (`UnexpectedEof` if the stream
    /// ends first).
    pub fn recv_exact(&mut self, c: TcpConn, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.recv(c, out.get_mut(got..).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= end {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    self.wait(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Pumps until the peer's FIN, returning everything read.
    pub fn recv_to_end(&mut self, c: TcpConn, timeout: Duration) -> io::Result<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.recv(c, &mut buf) {
                Ok(0) => return Ok(out),
                Ok(k) => out.extend_from_slice(buf.get(..k).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= end {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    self.wait(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
}
