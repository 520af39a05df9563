//! Agent-side TCP through the tunnel, without a TUN device: a smoltcp
//! interface whose "wire" is an [`IpLink`] that carries IP packets: one
//! agent flow of a [`UdpClient`] ([`FlowLink`]), or the agent core (in the
//! bench crate). Used by the tests, and by the demo and benchmark for TCP
//! traffic to a service behind a connector.
//!
//! Everything runs on the caller's thread: [`TunnelTcp::pump`] moves packets
//! between the QUIC session and smoltcp; the blocking-ish helpers
//! ([`TunnelTcp::wait_connected`], [`TunnelTcp::send_all`],
//! [`TunnelTcp::recv_exact`], …) pump until done or a timeout.
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn demo(client: ztna_testkit::client_io::UdpClient, flow: u32) -> std::io::Result<()> {
//! use ztna_testkit::tunnel_tcp::{FlowLink, TunnelTcp};
//! let mut t = TunnelTcp::new(FlowLink::new(client, flow), "10.0.0.2".parse().unwrap(), 1);
//! let c = t.connect("100.64.0.1:7".parse().unwrap())?;
//! t.wait_connected(c, Duration::from_secs(5))?;
//! t.send_all(c, b"hello", Duration::from_secs(5))?;
//! let echoed = t.recv_exact(c, 5, Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, CongestionControl, RecvError, State};
use smoltcp::wire::{HardwareAddress, IpCidr};
use ztna_control::client::SendError;
use ztna_control::datagram;

use crate::client_io::{wait_readable, UdpClient};
use ztna_connector::vdev::{smol_instant, QueueDevice};

/// Default size of each socket buffer (receive and send).
pub const DEFAULT_BUFFER: usize = 256 * 1024;
/// Packets queued towards smoltcp or the session before they wait.
const QUEUE: usize = 1024;
/// Datagrams read per smoltcp run inside one pump.
const BATCH: usize = 128;

/// Why an [`IpLink`] did not take a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefused {
    /// Queue full: keep the packet and retry later.
    Full,
    /// Refused for good (too large, not connected, no route).
    Dropped,
}

/// Something that carries IP packets to and from the tunnel.
pub trait IpLink {
    /// Moves traffic between the link's socket and its protocol state.
    fn pump(&mut self);
    /// The next inbound IP packet, copied into `buf`.
    fn recv_packet(&mut self, buf: &mut [u8]) -> Option<usize>;
    /// Sends one outbound IP packet.
    fn send_packet(&mut self, pkt: &[u8]) -> Result<(), LinkRefused>;
    /// Descriptor to wait on for inbound traffic.
    fn fd(&self) -> RawFd;
    /// The link's next timer.
    fn next_deadline(&self) -> Option<Instant>;
}

/// One agent flow of a [`UdpClient`] as an [`IpLink`].
pub struct FlowLink {
    pub client: UdpClient,
    flow: u32,
    buf: Vec<u8>,
    /// Datagrams of another flow or malformed.
    pub foreign: u64,
}

impl FlowLink {
    pub fn new(client: UdpClient, flow: u32) -> FlowLink {
        FlowLink { client, flow, buf: vec![0u8; 65_536], foreign: 0 }
    }

    pub fn flow(&self) -> u32 {
        self.flow
    }
}

impl IpLink for FlowLink {
    fn pump(&mut self) {
        self.client.pump();
    }

    fn recv_packet(&mut self, out: &mut [u8]) -> Option<usize> {
        loop {
            let len = self.client.session.recv_datagram(&mut self.buf)?;
            match self.buf.get(..len).map(datagram::parse) {
                Some(Ok((flow, ip))) if flow == self.flow => {
                    let dst = out.get_mut(..ip.len())?;
                    dst.copy_from_slice(ip);
                    return Some(ip.len());
                }
                _ => self.foreign += 1,
            }
        }
    }

    fn send_packet(&mut self, pkt: &[u8]) -> Result<(), LinkRefused> {
        match self.client.session.send_datagram(self.flow, pkt) {
            Ok(()) => Ok(()),
            Err(SendError::QueueFull) => Err(LinkRefused::Full),
            Err(_) => Err(LinkRefused::Dropped),
        }
    }

    fn fd(&self) -> RawFd {
        self.client.socket().as_raw_fd()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.client.session.next_deadline()
    }
}

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

/// smoltcp TCP over an [`IpLink`].
pub struct TunnelTcp<L: IpLink> {
    pub link: L,
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

impl<L: IpLink> TunnelTcp<L> {
    /// TCP over `link`, with inner source address `local` (the agent's
    /// tunnel address). `seed` seeds initial sequence numbers.
    pub fn new(link: L, local: Ipv4Addr, seed: u64) -> TunnelTcp<L> {
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
            link,
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
        self.link.pump();
        loop {
            let mut n = 0;
            while n < BATCH {
                let Some(len) = self.link.recv_packet(&mut self.buf) else { break };
                n += 1;
                match self.buf.get(..len) {
                    Some(ip) if self.dev.push_rx(ip) => self.stats.packets_in += 1,
                    _ => self.stats.dropped_in += 1,
                }
            }
            self.poll_iface();
            if n < BATCH {
                break;
            }
        }
        self.link.pump();
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
            match self.link.send_packet(&p) {
                Ok(()) => self.stats.packets_out += 1,
                Err(LinkRefused::Full) => {
                    self.dev.unpop_tx(p);
                    break;
                }
                Err(LinkRefused::Dropped) => self.stats.dropped_out += 1,
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
        if let Some(t) = self.link.next_deadline() {
            d = d.min(t.saturating_duration_since(now));
        }
        if !d.is_zero() {
            wait_readable(&[self.link.fd()], d);
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
