//! The UDP I/O layer that every event loop drives: the [`Backend`] trait
//! and its two implementations, `uring` (io_uring via the `io-uring` crate,
//! several RecvMsg in flight and SendMsg batches) and `portable` (poll +
//! recvmmsg/sendmmsg); SO_REUSEPORT socket groups ([`bind_group`]) and the
//! BPF program that steers a group's packets by connection ID
//! ([`steering`]). `Auto` picks io_uring when the kernel lets us create a
//! ring and falls back otherwise (disabled by `kernel.io_uring_disabled`,
//! blocked by a container seccomp profile). [`batch`] is batched
//! recvmmsg/sendmmsg on a socket the caller polls itself (the portable
//! backend, the connector and the Linux agent use it).
//!
//! It knows nothing of QUIC or of the relay: an engine writes packets into
//! a [`Transmit`], and gets received packets through [`Backend::poll`].

pub mod batch;
pub mod cmsg;
pub mod ifaddrs;
pub mod offload;
pub mod portable;
pub mod steering;
pub mod uring;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::time::Duration;

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

/// Where an engine writes packets to send (a backend's send queue).
pub trait Transmit {
    /// A buffer for the next packet (at least the max UDP payload).
    fn buf(&mut self) -> &mut [u8];
    /// Sends the first `len` bytes of the last [`Transmit::buf`] to `to`,
    /// from the local address `from` when given and the socket reports
    /// local addresses (PKTINFO on a wildcard-bound socket).
    fn commit_from(&mut self, len: usize, to: SocketAddr, from: Option<IpAddr>);
    /// [`Transmit::commit_from`] from whatever address the kernel picks.
    fn commit(&mut self, len: usize, to: SocketAddr) {
        self.commit_from(len, to, None);
    }
}

/// What a backend hands each received datagram to: the datagram, its
/// source, and the local address it was sent to (when the socket is bound
/// to a wildcard address and the kernel reports it).
pub type OnPacket<'a> = dyn FnMut(&mut [u8], SocketAddr, Option<IpAddr>) + 'a;

/// What an event loop needs from a backend.
pub trait Backend {
    /// Waits up to `timeout` for packets or a mesh wake-up and hands each
    /// received packet to `on_packet`.
    fn poll(&mut self, timeout: Duration, on_packet: &mut OnPacket<'_>) -> io::Result<()>;
    /// Where the worker writes packets to send.
    fn transmit(&mut self) -> &mut dyn Transmit;
    /// Submits queued sends.
    fn flush(&mut self) -> io::Result<()>;
    /// Hands queued sends to the kernel no later than the start of the
    /// next [`Backend::poll`]: io_uring submits them with that poll's wait,
    /// one syscall per loop turn instead of two. A loop that stops polling
    /// calls [`Backend::flush`] once more.
    fn queue_sends(&mut self) -> io::Result<()> {
        self.flush()
    }
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Packets the socket refused or no send slot could take, so far.
    fn tx_dropped(&self) -> u64 {
        0
    }
    /// Whether GSO/GRO are in use on the socket, and what they did.
    fn offload(&self) -> offload::OffloadSnapshot {
        offload::OffloadSnapshot::default()
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

/// A UDP socket for `family_of` with large buffers: a burst from the
/// relay must not overflow the kernel's default (about 200 KB, some 90
/// full-size datagrams), which loses packets long before the CPU is busy.
/// The kernel caps the sizes at rmem_max / wmem_max.
fn socket_with_buffers(family_of: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(family_of), Type::DGRAM, Some(Protocol::UDP))?;
    large_buffers(&socket2::SockRef::from(&s));
    Ok(s)
}

fn large_buffers(s: &socket2::SockRef<'_>) {
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
}

/// Gives an existing socket the same large buffers as [`bind`].
pub fn enlarge_buffers(s: &UdpSocket) {
    large_buffers(&socket2::SockRef::from(s));
}

/// A non-blocking UDP socket bound to `listen`, with large buffers (the
/// connector's and the test agents' one socket).
pub fn bind(listen: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket_with_buffers(listen)?;
    s.bind(&listen.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A non-blocking UDP socket bound to `listen` and connected to `peer`
/// (the kernel then filters other senders and picks the source address),
/// with large buffers; returns it and its local address.
pub fn bind_connected(listen: SocketAddr, peer: SocketAddr) -> io::Result<(UdpSocket, SocketAddr)> {
    let s = socket_with_buffers(peer)?;
    s.bind(&listen.into())?;
    s.connect(&peer.into())?;
    s.set_nonblocking(true)?;
    let s: UdpSocket = s.into();
    let local = s.local_addr()?;
    Ok((s, local))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A backend bound to 0.0.0.0 answers from the address the peer sent
    /// to (127.0.0.2 here), not from the one the route would pick
    /// (127.0.0.1), on both backends.
    #[test]
    fn a_wildcard_socket_answers_from_the_address_the_peer_used() {
        for kind in [IoBackend::Uring, IoBackend::Portable] {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            let port = sock.local_addr().unwrap().port();
            // SAFETY: test-only eventfd, closed when the test ends.
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
            let mut be = make_backend(kind, sock, efd).unwrap();
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let second = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), port));
            peer.send_to(b"ping", second).unwrap();
            let mut got = None;
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while got.is_none() && std::time::Instant::now() < end {
                be.poll(Duration::from_millis(50), &mut |b, from, dst| got = Some((b.to_vec(), from, dst))).unwrap();
            }
            let (data, from, dst) = got.unwrap();
            assert_eq!((data.as_slice(), from), (&b"ping"[..], peer.local_addr().unwrap()), "{kind:?}");
            assert_eq!(dst, Some(second.ip()), "{kind:?}: the local address of the receive");
            let t = be.transmit();
            t.buf()[..4].copy_from_slice(b"pong");
            t.commit_from(4, from, dst);
            be.flush().unwrap();
            let mut buf = [0u8; 16];
            let (n, src) = peer.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], src), (&b"pong"[..], second), "{kind:?}: answered from 127.0.0.2");
        }
    }
}
