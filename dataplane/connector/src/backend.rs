//! The engine's boundary to the backends: what it asks of them
//! ([`BackendIo`]) and what it is told about them ([`BackendEvent`]).
//!
//! The engine owns no socket. It names each backend socket it wants with a
//! [`BackendId`] of its own choosing and calls the driver's [`BackendIo`]
//! to open, use and close it; the driver tells it when a socket has
//! something for it ([`BackendEvent`]). TCP reads and writes are calls, not
//! queued actions, on purpose: the proxy moves only as many bytes as the
//! other side takes at that moment (the smoltcp buffers are the only
//! buffers), and that needs the backend's answer on the spot, the way a
//! smoltcp `Device` hands out tokens. The connector's driver implements
//! [`BackendIo`] with real sockets; [`crate::memory_backends`] implements
//! it in memory for tests, the simulator and the fuzzer.

use std::io;
use std::net::SocketAddr;

/// A backend socket, named by the engine (never reused while open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u64);

/// What a TCP backend socket should be watched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// The engine has room for bytes from the backend (or waits for its
    /// connect to finish, see [`Interest::write`]).
    pub read: bool,
    /// A write would have blocked, or a connect is in progress.
    pub write: bool,
}

/// Something a backend socket has for the engine.
#[derive(Debug, Clone, Copy)]
pub enum BackendEvent<'a> {
    /// A datagram arrived on UDP backend socket `id`.
    UdpData { id: BackendId, payload: &'a [u8] },
    /// TCP backend socket `id` became ready for what its [`Interest`]
    /// asked, or failed (the engine then learns more by calling it).
    TcpReady { id: BackendId },
}

/// The backend sockets, as the engine uses them. Every call is
/// non-blocking; `WouldBlock` means "not now".
pub trait BackendIo {
    /// Opens UDP socket `id` connected to `target`.
    fn udp_open(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()>;
    /// Sends one datagram on UDP socket `id`.
    fn udp_send(&mut self, id: BackendId, payload: &[u8]) -> io::Result<()>;
    /// Closes UDP socket `id`.
    fn udp_close(&mut self, id: BackendId);
    /// Starts a TCP connect of socket `id` to `target`; the socket becomes
    /// ready (write) when the connect finished either way.
    fn tcp_connect(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()>;
    /// Whether the connect of TCP socket `id` succeeded (asked once it is
    /// ready).
    fn tcp_connected(&mut self, id: BackendId) -> bool;
    /// Reads into `buf`: `Ok(0)` is the backend's FIN.
    fn tcp_read(&mut self, id: BackendId, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes what the backend takes of `buf` now.
    fn tcp_write(&mut self, id: BackendId, buf: &[u8]) -> io::Result<usize>;
    /// Passes the agent's FIN on (half-close).
    fn tcp_shutdown_write(&mut self, id: BackendId);
    /// Closes TCP socket `id`; `abort` closes with an RST instead of a FIN.
    fn tcp_close(&mut self, id: BackendId, abort: bool);
}
