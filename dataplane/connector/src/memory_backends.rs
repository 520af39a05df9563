//! Backends in memory: a [`BackendIo`] whose every target is an echo
//! server (UDP: each datagram comes back; TCP: every byte comes back, over
//! a window of `tcp_window` bytes the backend holds until they are read),
//! except the targets in `refused`, which refuse TCP connects. For engine
//! tests, the simulator and the fuzzer: no sockets, no clock.
//!
//! Drive it with [`MemoryBackends::events`]: what the backends have for the
//! engine given its current interest, to hand to
//! [`crate::Engine::handle_backend`] or [`crate::Gateway::handle_backend`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;

use crate::backend::{BackendEvent, BackendId, BackendIo, Interest};

/// One UDP backend socket.
#[derive(Debug)]
struct UdpBackend {
    target: SocketAddr,
}

/// One TCP backend connection.
#[derive(Debug, Default)]
struct TcpBackend {
    target: Option<SocketAddr>,
    refused: bool,
    /// The connect result was reported ready once.
    connect_reported: bool,
    /// Echoed bytes not read yet.
    echo: VecDeque<u8>,
    /// The engine passed the agent's FIN on: after the echo, EOF.
    shut: bool,
    received: usize,
}

/// What [`MemoryBackends::events`] hands out (owned [`BackendEvent`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryEvent {
    UdpData(BackendId, Vec<u8>),
    TcpReady(BackendId),
}

impl MemoryEvent {
    /// The event as the engine takes it.
    pub fn as_event(&self) -> BackendEvent<'_> {
        match self {
            MemoryEvent::UdpData(id, payload) => BackendEvent::UdpData { id: *id, payload },
            MemoryEvent::TcpReady(id) => BackendEvent::TcpReady { id: *id },
        }
    }
}

/// How a TCP backend connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpClosed {
    pub target: Option<SocketAddr>,
    /// Closed with an RST (not a FIN).
    pub aborted: bool,
    /// Bytes it received.
    pub received: usize,
}

/// Echo backends in memory.
#[derive(Debug)]
pub struct MemoryBackends {
    /// Targets that refuse TCP connects.
    pub refused: HashSet<SocketAddr>,
    /// Bytes a TCP backend holds before it stops taking more (until the
    /// engine reads the echo).
    pub tcp_window: usize,
    /// UDP sockets that fail to open (to test the error path).
    pub fail_udp_open: bool,
    udp: BTreeMap<BackendId, UdpBackend>,
    tcp: BTreeMap<BackendId, TcpBackend>,
    replies: VecDeque<(BackendId, Vec<u8>)>,
    /// Every datagram a UDP backend received: (target, payload).
    pub udp_received: Vec<(SocketAddr, Vec<u8>)>,
    /// TCP connections closed, in order.
    pub tcp_closed: Vec<TcpClosed>,
    pub udp_opened: usize,
    pub udp_closed: usize,
}

impl Default for MemoryBackends {
    fn default() -> Self {
        MemoryBackends {
            refused: HashSet::new(),
            tcp_window: 64 * 1024,
            fail_udp_open: false,
            udp: BTreeMap::new(),
            tcp: BTreeMap::new(),
            replies: VecDeque::new(),
            udp_received: Vec::new(),
            tcp_closed: Vec::new(),
            udp_opened: 0,
            udp_closed: 0,
        }
    }
}

impl MemoryBackends {
    /// UDP backend sockets open.
    pub fn udp_open(&self) -> usize {
        self.udp.len()
    }

    /// TCP backend connections open (connecting ones included).
    pub fn tcp_open(&self) -> usize {
        self.tcp.len()
    }

    /// Bytes the open TCP connections received, per connection in id order.
    pub fn tcp_received(&self) -> Vec<usize> {
        self.tcp.values().map(|c| c.received).collect()
    }

    fn ready(&self, id: BackendId, i: Interest) -> bool {
        let Some(c) = self.tcp.get(&id) else { return false };
        if !c.connect_reported {
            return i.write;
        }
        let readable = !c.echo.is_empty() || c.shut;
        let writable = c.echo.len() < self.tcp_window;
        (i.read && readable) || (i.write && writable)
    }

    /// What the backends have for the engine, given its `interest`: every
    /// UDP reply, and the TCP sockets ready for what they wait for (a
    /// connect finishes at the first call after it started).
    pub fn events(&mut self, interest: &[(BackendId, Interest)]) -> Vec<MemoryEvent> {
        let mut out: Vec<MemoryEvent> = self.replies.drain(..).map(|(id, p)| MemoryEvent::UdpData(id, p)).collect();
        for (id, i) in interest {
            if self.ready(*id, *i) {
                if let Some(c) = self.tcp.get_mut(id) {
                    c.connect_reported = true;
                }
                out.push(MemoryEvent::TcpReady(*id));
            }
        }
        out
    }
}

fn not_open() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl BackendIo for MemoryBackends {
    fn udp_open(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()> {
        if self.fail_udp_open {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        self.udp.insert(id, UdpBackend { target });
        self.udp_opened += 1;
        Ok(())
    }

    fn udp_send(&mut self, id: BackendId, payload: &[u8]) -> io::Result<()> {
        let b = self.udp.get(&id).ok_or_else(not_open)?;
        self.udp_received.push((b.target, payload.to_vec()));
        self.replies.push_back((id, payload.to_vec()));
        Ok(())
    }

    fn udp_close(&mut self, id: BackendId) {
        if self.udp.remove(&id).is_some() {
            self.udp_closed += 1;
        }
        self.replies.retain(|(r, _)| *r != id);
    }

    fn tcp_connect(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()> {
        let refused = self.refused.contains(&target);
        self.tcp.insert(id, TcpBackend { target: Some(target), refused, ..TcpBackend::default() });
        Ok(())
    }

    fn tcp_connected(&mut self, id: BackendId) -> bool {
        self.tcp.get(&id).is_some_and(|c| c.connect_reported && !c.refused)
    }

    fn tcp_read(&mut self, id: BackendId, buf: &mut [u8]) -> io::Result<usize> {
        let c = self.tcp.get_mut(&id).ok_or_else(not_open)?;
        if c.echo.is_empty() {
            return if c.shut { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
        }
        let n = buf.len().min(c.echo.len());
        for (dst, src) in buf.iter_mut().zip(c.echo.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }

    fn tcp_write(&mut self, id: BackendId, buf: &[u8]) -> io::Result<usize> {
        let window = self.tcp_window;
        let c = self.tcp.get_mut(&id).ok_or_else(not_open)?;
        let n = buf.len().min(window.saturating_sub(c.echo.len()));
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        c.echo.extend(buf.iter().take(n));
        c.received += n;
        Ok(n)
    }

    fn tcp_shutdown_write(&mut self, id: BackendId) {
        if let Some(c) = self.tcp.get_mut(&id) {
            c.shut = true;
        }
    }

    fn tcp_close(&mut self, id: BackendId, abort: bool) {
        if let Some(c) = self.tcp.remove(&id) {
            self.tcp_closed.push(TcpClosed { target: c.target, aborted: abort, received: c.received });
        }
    }
}
