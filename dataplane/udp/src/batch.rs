//! Batched datagram I/O on a non-blocking UDP socket whose readiness the
//! caller watches itself (in its own `poll(2)` with other descriptors):
//! `recvmmsg` into up to `capacity` slots, each datagram with its source,
//! and `sendmmsg` of the queued datagrams, each to its address or, on a
//! connected socket, to the peer. The one implementation of both calls:
//! the portable backend, the connector's relay socket and the Linux
//! agent's socket all use it.
//!
//! The slots are allocated once; the `iovec`/`mmsghdr` arrays that point
//! into them live on the stack of each call, so a `Batch` may move and be
//! sent to another thread.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockAddr;

use crate::RX_BUF;

/// Bytes per slot: larger than any QUIC packet we send or accept; a longer
/// datagram is truncated to this (and then rejected by quiche).
pub const SLOT: usize = RX_BUF;

/// Most slots a batch has (the per-call header arrays are this long).
pub const MAX_BATCH: usize = 64;

/// Datagram slots for one direction of one socket.
pub struct Batch {
    bufs: Vec<[u8; SLOT]>,
    lens: Vec<usize>,
    /// Receive: each datagram's source (None if the kernel gave none).
    /// Send: each datagram's destination (None: the connected peer).
    addrs: Vec<Option<SocketAddr>>,
    /// Send side: slots filled, and how many of them were sent already.
    filled: usize,
    sent: usize,
    /// Datagrams the socket refused with an error other than "would
    /// block" (dropped; QUIC recovers).
    dropped: u64,
    /// Receive: the source addresses as the kernel wrote them.
    names: Vec<libc::sockaddr_storage>,
    /// Send: the destinations of the run being sent (reused).
    to: Vec<Option<SockAddr>>,
}

fn zeroed_hdrs() -> [libc::mmsghdr; MAX_BATCH] {
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a
    // valid value (null pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}

fn zeroed_iovs() -> [libc::iovec; MAX_BATCH] {
    // SAFETY: as above, for iovec.
    unsafe { std::mem::zeroed() }
}

fn zeroed_name() -> libc::sockaddr_storage {
    // SAFETY: as above, for sockaddr_storage.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    /// A batch of `capacity` slots (1 to [`MAX_BATCH`]).
    pub fn new(capacity: usize) -> Batch {
        let n = capacity.clamp(1, MAX_BATCH);
        Batch {
            bufs: vec![[0u8; SLOT]; n],
            lens: vec![0; n],
            addrs: vec![None; n],
            filled: 0,
            sent: 0,
            dropped: 0,
            names: vec![zeroed_name(); n],
            to: Vec::with_capacity(n),
        }
    }

    /// Slots in this batch.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Receives up to [`Batch::capacity`] datagrams without blocking;
    /// returns how many (0: nothing waiting). Errors other than "would
    /// block" are returned (on a connected socket ECONNREFUSED reports an
    /// ICMP port unreachable from the peer).
    pub fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        let (mut iovs, mut hdrs) = (zeroed_iovs(), zeroed_hdrs());
        let mut count = 0;
        for (((b, name), v), h) in self.bufs.iter_mut().zip(self.names.iter_mut()).zip(&mut iovs).zip(&mut hdrs) {
            *v = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: SLOT };
            h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
            count += 1;
        }
        // SAFETY: the first `count` headers are initialised, each with one
        // iovec into a live SLOT-byte buffer and a name buffer of
        // sockaddr_storage size, all owned by `self` or this frame and
        // untouched until the call returns; the kernel writes at most
        // iov_len bytes.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let n = n as usize;
        for ((h, name), (len, from)) in
            hdrs.iter().zip(&self.names).zip(self.lens.iter_mut().zip(self.addrs.iter_mut())).take(n)
        {
            *len = (h.msg_len as usize).min(SLOT);
            *from = crate::sockaddr_to_std(name, h.msg_hdr.msg_namelen);
        }
        Ok(n)
    }

    /// The `i`-th datagram of the last [`Batch::recv`] and its source.
    pub fn received(&mut self, i: usize) -> Option<(&mut [u8], Option<SocketAddr>)> {
        let len = *self.lens.get(i)?;
        let from = *self.addrs.get(i)?;
        Some((self.bufs.get_mut(i)?.get_mut(..len)?, from))
    }

    /// Send side: the next free slot, to be filled and then committed with
    /// [`Batch::commit`]. None when the batch is full.
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        self.bufs.get_mut(self.filled).map(|b| &mut b[..])
    }

    /// Queues the first `len` bytes of the last [`Batch::slot`] for `to`
    /// (None: the connected peer).
    pub fn commit(&mut self, len: usize, to: Option<SocketAddr>) {
        if let (Some(l), Some(a)) = (self.lens.get_mut(self.filled), self.addrs.get_mut(self.filled)) {
            *l = len.min(SLOT);
            *a = to;
            self.filled += 1;
        }
    }

    /// Forgets what is queued and not yet sent.
    pub fn clear(&mut self) {
        self.filled = 0;
        self.sent = 0;
    }

    pub fn is_full(&self) -> bool {
        self.filled >= self.bufs.len()
    }

    /// True while queued datagrams wait to be sent.
    pub fn pending(&self) -> bool {
        self.sent < self.filled
    }

    /// Queued datagrams not yet sent.
    pub fn unsent(&self) -> usize {
        self.filled - self.sent
    }

    /// Datagrams dropped so far: refused by the socket, or (with
    /// [`Batch::flush_or_drop`]) not taken by a full socket buffer.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Sends what is queued. Ok(true): all went out and the batch is empty
    /// again; Ok(false): the socket would block and the rest stays queued
    /// (wait for POLLOUT). A datagram the socket refuses otherwise (an
    /// unreachable peer, a too-large datagram) is dropped and counted, the
    /// rest is still sent, and the last such error is returned once all
    /// were tried.
    pub fn flush(&mut self, sock: &impl AsRawFd) -> io::Result<bool> {
        let mut failed = None;
        while self.sent < self.filled {
            let run = self.sent..self.filled;
            self.to.clear();
            self.to.extend(self.addrs.get(run.clone()).unwrap_or_default().iter().map(|a| a.map(SockAddr::from)));
            let (mut iovs, mut hdrs) = (zeroed_iovs(), zeroed_hdrs());
            let bufs = self.bufs.get_mut(run.clone()).unwrap_or_default();
            let mut count = 0;
            for ((((b, len), to), v), h) in
                bufs.iter_mut().zip(self.lens.get(run).unwrap_or_default()).zip(&self.to).zip(&mut iovs).zip(&mut hdrs)
            {
                *v = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: *len };
                if let Some(to) = to {
                    h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                    h.msg_hdr.msg_namelen = to.len();
                }
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                count += 1;
            }
            // SAFETY: the first `count` headers are initialised, one per
            // queued datagram, each with one iovec into a live buffer of
            // `self` (length ≤ SLOT) and a destination owned by `self.to` (or
            // none: the connected peer); nothing is touched until the call
            // returns.
            let n = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), count as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        // The first datagram of the run failed: drop it.
                        self.dropped += 1;
                        self.sent += 1;
                        failed = Some(e);
                        continue;
                    }
                }
            }
            self.sent += n as usize;
        }
        self.clear();
        failed.map_or(Ok(true), Err)
    }

    /// [`Batch::flush`] for a loop that never waits for POLLOUT: what a
    /// full socket buffer would not take is dropped and counted too (QUIC
    /// recovers), so the batch is always empty afterwards.
    pub fn flush_or_drop(&mut self, sock: &impl AsRawFd) -> io::Result<()> {
        let r = self.flush(sock);
        if matches!(r, Ok(false)) {
            self.dropped += self.unsent() as u64;
            self.clear();
        }
        r.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn recv_all(rx: &mut Batch, sock: &UdpSocket, want: usize) -> Vec<(Vec<u8>, Option<SocketAddr>)> {
        let mut got = Vec::new();
        for _ in 0..200 {
            let n = rx.recv(sock).unwrap();
            for i in 0..n {
                let (d, from) = rx.received(i).unwrap();
                got.push((d.to_vec(), from));
            }
            if got.len() >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn addressed_batches_round_trip_on_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut tx = Batch::new(8);
        let mut sent = 0;
        for i in 0..20u32 {
            if tx.is_full() {
                assert!(tx.flush(&a).unwrap());
            }
            let s = tx.slot().unwrap();
            s[..4].copy_from_slice(&i.to_be_bytes());
            tx.commit(100 + i as usize, Some(b_addr));
            sent += 1;
        }
        assert_eq!(tx.unsent(), 4);
        assert!(tx.flush(&a).unwrap());
        assert!(!tx.pending());
        let mut rx = Batch::new(8);
        let got = recv_all(&mut rx, &b, sent);
        assert_eq!(got.len(), 20);
        for (i, (d, from)) in got.iter().enumerate() {
            assert_eq!(d.len(), 100 + i, "lengths kept, order kept on loopback");
            assert_eq!(d[..4], (i as u32).to_be_bytes());
            assert_eq!(*from, Some(a_addr), "the source of each datagram");
        }
    }

    #[test]
    fn connected_socket_sends_without_addresses_and_counts_refusals() {
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut tx = Batch::new(4);
        for _ in 0..3 {
            tx.slot().unwrap()[..2].copy_from_slice(b"hi");
            tx.commit(2, None);
        }
        assert!(tx.flush(&a).unwrap());
        let mut rx = Batch::new(4);
        let got = recv_all(&mut rx, &b, 3);
        assert_eq!(got.iter().map(|(d, _)| d.as_slice()).collect::<Vec<_>>(), vec![b"hi"; 3]);

        // The peer is gone: the kernel reports ICMP port unreachable on the
        // connected socket; the datagram that meets it is dropped, counted
        // and its error returned, and the batch is empty afterwards.
        drop(b);
        drop(rx);
        let mut errors = 0;
        for _ in 0..20 {
            tx.slot().unwrap()[..1].copy_from_slice(b"x");
            tx.commit(1, None);
            if tx.flush(&a).is_err() {
                errors += 1;
            }
            assert!(!tx.pending());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(errors > 0 && tx.dropped() == errors, "errors {errors}, dropped {}", tx.dropped());
    }
}
