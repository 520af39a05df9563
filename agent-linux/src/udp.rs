//! The UDP socket to the relay, connected (so the kernel filters other
//! senders and picks our source address), with batched receive
//! (`recvmmsg`) and send (`sendmmsg`) over buffers allocated once.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;
/// Slot size: QUIC packets are at most 1350 bytes (ztna-control's
/// MAX_UDP_PAYLOAD); a larger datagram is truncated and dropped by quiche.
pub const SLOT: usize = 2048;
/// Socket buffer sizes requested (the kernel caps them at rmem/wmem_max).
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds `listen`, connects to `relay`; returns the socket and the local
/// address the relay will see before any NAT.
pub fn connect(listen: SocketAddr, relay: SocketAddr) -> io::Result<(UdpSocket, SocketAddr)> {
    let s = Socket::new(Domain::for_address(relay), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&listen.into())?;
    s.connect(&relay.into())?;
    s.set_nonblocking(true)?;
    let s: UdpSocket = s.into();
    let local = s.local_addr()?;
    Ok((s, local))
}

/// `BATCH` slots of `SLOT` bytes plus the iovec/mmsghdr arrays that point
/// into them. Boxed so the pointers stay valid when the owner moves.
pub struct Batch {
    bufs: Box<[[u8; SLOT]]>,
    lens: [usize; BATCH],
    iov: Box<[libc::iovec; BATCH]>,
    hdrs: Box<[libc::mmsghdr; BATCH]>,
    /// Send side: slots filled, and how many of them were already sent.
    filled: usize,
    sent: usize,
}

impl Batch {
    pub fn new() -> Batch {
        let mut bufs = vec![[0u8; SLOT]; BATCH].into_boxed_slice();
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero
        // bytes are a valid value (null pointers, zero lengths).
        let mut iov: Box<[libc::iovec; BATCH]> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: as above.
        let mut hdrs: Box<[libc::mmsghdr; BATCH]> = Box::new(unsafe { std::mem::zeroed() });
        for ((b, v), h) in bufs.iter_mut().zip(iov.iter_mut()).zip(hdrs.iter_mut()) {
            v.iov_base = b.as_mut_ptr().cast();
            v.iov_len = SLOT;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        Batch { bufs, lens: [0; BATCH], iov, hdrs, filled: 0, sent: 0 }
    }

    /// Receives up to `BATCH` datagrams; returns how many (0: nothing
    /// waiting). Errors other than "would block" are returned; on a
    /// connected socket ECONNREFUSED reports an ICMP port unreachable from
    /// the relay (it is down) and is harmless.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        for (v, h) in self.iov.iter_mut().zip(self.hdrs.iter_mut()) {
            v.iov_len = SLOT;
            h.msg_len = 0;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: `hdrs` holds BATCH initialised mmsghdr whose single iovec
        // each points into a live SLOT-byte buffer owned by `self`; no
        // addresses or control data are requested (null msg_name/control).
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let n = n as usize;
        for (l, h) in self.lens.iter_mut().zip(self.hdrs.iter()).take(n) {
            // A truncated datagram (MSG_TRUNC) is passed on at slot size;
            // quiche rejects it.
            *l = (h.msg_len as usize).min(SLOT);
        }
        Ok(n)
    }

    /// The `i`-th received datagram.
    pub fn received(&mut self, i: usize) -> Option<&mut [u8]> {
        let len = *self.lens.get(i)?;
        self.bufs.get_mut(i)?.get_mut(..len)
    }

    /// Send side: the next free slot, to be filled and then committed with
    /// [`Batch::commit`]. None when the batch is full.
    pub fn slot(&mut self) -> Option<&mut [u8; SLOT]> {
        self.bufs.get_mut(self.filled)
    }

    pub fn commit(&mut self, len: usize) {
        if let Some(l) = self.lens.get_mut(self.filled) {
            *l = len.min(SLOT);
            self.filled += 1;
        }
    }

    /// Forgets what is filled and not yet sent.
    pub fn clear(&mut self) {
        self.filled = 0;
        self.sent = 0;
    }

    pub fn is_full(&self) -> bool {
        self.filled >= BATCH
    }

    /// True while filled slots wait to be sent.
    pub fn pending(&self) -> bool {
        self.sent < self.filled
    }

    /// Filled slots not yet sent.
    pub fn unsent(&self) -> usize {
        self.filled - self.sent
    }

    /// Sends what is filled. Returns Ok(true) when all went out (the batch
    /// is empty again), Ok(false) when the socket would block (the rest
    /// stays queued: wait for POLLOUT).
    pub fn flush(&mut self, sock: &UdpSocket) -> io::Result<bool> {
        while self.sent < self.filled {
            for i in self.sent..self.filled {
                if let (Some(v), Some(h), Some(l)) = (self.iov.get_mut(i), self.hdrs.get_mut(i), self.lens.get(i)) {
                    v.iov_len = *l;
                    h.msg_len = 0;
                }
            }
            let count = (self.filled - self.sent) as u32;
            let Some(first) = self.hdrs.get_mut(self.sent) else { break };
            // SAFETY: `first` starts a run of `count` initialised mmsghdr
            // (indices sent..filled < BATCH) whose iovecs point into live
            // buffers owned by `self` with lengths ≤ SLOT; the socket is
            // connected, so msg_name stays null.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), first, count, libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    // The relay is unreachable (ICMP error reported on the
                    // connected socket): drop the batch, QUIC retransmits.
                    _ => {
                        self.filled = 0;
                        self.sent = 0;
                        return Err(e);
                    }
                }
            }
            self.sent += n as usize;
        }
        self.filled = 0;
        self.sent = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_send_and_receive_on_loopback() {
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a, a_local) = connect("127.0.0.1:0".parse().unwrap(), b.local_addr().unwrap()).unwrap();
        b.connect(a_local).unwrap();
        let mut tx = Batch::new();
        for i in 0..BATCH + 5 {
            if tx.is_full() {
                assert!(tx.flush(&a).unwrap());
            }
            let s = tx.slot().unwrap();
            s[..4].copy_from_slice(&(i as u32).to_be_bytes());
            tx.commit(100 + i);
        }
        assert!(tx.flush(&a).unwrap());
        assert!(!tx.pending());
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        b.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        for _ in 0..BATCH + 5 {
            let n = b.recv(&mut buf).unwrap();
            got.push((u32::from_be_bytes(buf[..4].try_into().unwrap()), n));
            b.send(&buf[..n]).unwrap();
        }
        assert_eq!(got, (0..BATCH + 5).map(|i| (i as u32, 100 + i)).collect::<Vec<_>>());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rx = Batch::new();
        let mut total = 0;
        loop {
            let n = rx.recv(&a).unwrap();
            if n == 0 {
                break;
            }
            for i in 0..n {
                let d = rx.received(i).unwrap();
                assert_eq!(d.len(), 100 + u32::from_be_bytes(d[..4].try_into().unwrap()) as usize);
            }
            total += n;
        }
        assert_eq!(total, BATCH + 5);
    }
}
