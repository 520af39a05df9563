//! The backend sockets of a running connector: [`BackendIo`] on real UDP
//! and TCP sockets. UDP sockets sit in one epoll set (one descriptor for
//! the loop's poll, read only when reported readable); TCP sockets are
//! polled for what the engine's interest names.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::backend::{BackendId, BackendIo};

/// epoll events fetched per `epoll_wait` call.
const EVENTS: usize = 256;

/// Real backend sockets.
pub(crate) struct SocketBackends {
    udp: HashMap<BackendId, UdpSocket>,
    tcp: HashMap<BackendId, Socket>,
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl SocketBackends {
    pub(crate) fn new() -> io::Result<SocketBackends> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is
        // checked before it is wrapped.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SocketBackends {
            udp: HashMap::new(),
            tcp: HashMap::new(),
            epoll,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
        })
    }

    /// The descriptor to poll for "some UDP backend socket is readable".
    pub(crate) fn udp_poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The descriptor of TCP backend socket `id`.
    pub(crate) fn tcp_fd(&self, id: BackendId) -> Option<RawFd> {
        self.tcp.get(&id).map(AsRawFd::as_raw_fd)
    }

    /// Appends UDP backend sockets epoll reports readable: at most one
    /// buffer of events per call. The set is level-triggered, so asking
    /// again before reading would return the same sockets forever (more
    /// readable sockets than the buffer holds made this loop without end
    /// and grow `out` until the process ran out of memory); the rest come
    /// at the next turn, whose poll returns at once while the epoll
    /// descriptor is readable.
    pub(crate) fn udp_readable(&mut self, out: &mut Vec<BackendId>) {
        let cap = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
        // SAFETY: `events` is a live buffer of `cap` epoll_event entries
        // that the kernel fills; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), cap, 0) };
        let n = usize::try_from(n).unwrap_or(0);
        out.extend(self.events.iter().take(n).map(|e| BackendId(e.u64)));
    }

    /// Reads one datagram from UDP backend socket `id`.
    pub(crate) fn udp_recv(&self, id: BackendId, buf: &mut [u8]) -> io::Result<usize> {
        match self.udp.get(&id) {
            Some(s) => s.recv(buf),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }
}

fn not_open() -> io::Error {
    io::ErrorKind::NotConnected.into()
}

impl BackendIo for SocketBackends {
    fn udp_open(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()> {
        let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(target)?;
        socket.set_nonblocking(true)?;
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: id.0 };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event
        // that the kernel only reads.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, socket.as_raw_fd(), &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.udp.insert(id, socket);
        Ok(())
    }

    fn udp_send(&mut self, id: BackendId, payload: &[u8]) -> io::Result<()> {
        self.udp.get(&id).ok_or_else(not_open)?.send(payload).map(drop)
    }

    fn udp_close(&mut self, id: BackendId) {
        // Closing the socket takes it out of the epoll set.
        self.udp.remove(&id);
    }

    fn tcp_connect(&mut self, id: BackendId, target: SocketAddr) -> io::Result<()> {
        let s = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        match s.connect(&target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        self.tcp.insert(id, s);
        Ok(())
    }

    fn tcp_connected(&mut self, id: BackendId) -> bool {
        self.tcp.get(&id).is_some_and(|s| matches!(s.take_error(), Ok(None)) && s.peer_addr().is_ok())
    }

    fn tcp_read(&mut self, id: BackendId, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.get(&id).ok_or_else(not_open)?.read(buf)
    }

    fn tcp_write(&mut self, id: BackendId, buf: &[u8]) -> io::Result<usize> {
        self.tcp.get(&id).ok_or_else(not_open)?.write(buf)
    }

    fn tcp_shutdown_write(&mut self, id: BackendId) {
        if let Some(s) = self.tcp.get(&id) {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    fn tcp_close(&mut self, id: BackendId, abort: bool) {
        if let Some(s) = self.tcp.remove(&id) {
            if abort {
                let _ = s.set_linger(Some(Duration::ZERO));
            }
        }
    }
}

/// poll(2) on `fds` for up to `timeout`; fills in `revents`.
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // Round a sub-millisecond wait up so a near deadline does not spin.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd and
    // its length is passed with it.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}
