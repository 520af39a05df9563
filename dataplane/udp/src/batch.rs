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
//!
//! With [`Batch::enable_gso`] a flush sends consecutive datagrams of one
//! size to one destination as one GSO message (one `mmsghdr` whose iovecs
//! are the slots, plus the `UDP_SEGMENT` control message); with
//! [`Batch::enable_gro`] each slot holds a whole coalesced receive and
//! [`Batch::received`] yields its datagrams one by one. See
//! [`crate::offload`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use std::sync::Arc;

use socket2::SockAddr;

use crate::cmsg::{self, RecvCmsgBuf, SendCmsgs};
use crate::offload::{self, OffloadStats};
use crate::RX_BUF;
use std::net::IpAddr;

/// Bytes per slot: larger than any QUIC packet we send or accept; a longer
/// datagram is truncated to this (and then rejected by quiche).
pub const SLOT: usize = RX_BUF;

/// Most slots a batch has (the per-call header arrays are this long).
pub const MAX_BATCH: usize = 64;

/// Datagram slots for one direction of one socket.
pub struct Batch {
    /// Slots of [`SLOT`] bytes ([`offload::GRO_BUF`] with GRO).
    bufs: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    /// Receive with GRO: each slot's segment size (None: one datagram).
    segs: Vec<Option<usize>>,
    /// Receive with GRO or PKTINFO: each slot's control buffer.
    cmsgs: Vec<RecvCmsgBuf>,
    /// Receive with PKTINFO: the local address each datagram was sent to.
    /// Send: the source address of each datagram (None: the kernel's
    /// choice).
    locals: Vec<Option<IpAddr>>,
    gro: bool,
    gso: bool,
    refusals: offload::RefusalTracker,
    /// PKTINFO is on (receive), and the socket's family (send).
    pktinfo: bool,
    v6_socket: bool,
    offload: Arc<OffloadStats>,
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
    /// Send: what a GSO run must share, destination and source (reused).
    keys: Vec<(Option<SocketAddr>, Option<IpAddr>)>,
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
            bufs: (0..n).map(|_| vec![0u8; SLOT].into_boxed_slice()).collect(),
            lens: vec![0; n],
            segs: vec![None; n],
            cmsgs: Vec::new(),
            locals: vec![None; n],
            gro: false,
            gso: false,
            refusals: offload::RefusalTracker::default(),
            pktinfo: false,
            v6_socket: false,
            offload: Arc::default(),
            addrs: vec![None; n],
            filled: 0,
            sent: 0,
            dropped: 0,
            names: vec![zeroed_name(); n],
            to: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
        }
    }

    /// Receive side: asks the kernel to coalesce datagrams on `sock`
    /// (GRO) and makes every slot large enough for a coalesced receive.
    /// Returns whether GRO is on.
    /// Call again for a new socket.
    pub fn enable_gro(&mut self, sock: &impl AsRawFd) -> bool {
        let was = self.gro;
        self.gro = offload::enable_gro(sock.as_raw_fd());
        if self.gro && !was {
            self.bufs = (0..self.bufs.len()).map(|_| vec![0u8; offload::GRO_BUF].into_boxed_slice()).collect();
        }
        if self.gro && self.cmsgs.is_empty() {
            self.cmsgs = vec![RecvCmsgBuf::default(); self.bufs.len()];
        }
        self.offload.set_gro(self.gro);
        self.gro
    }

    /// Receive side: reports the local address each datagram was sent to
    /// ([`Batch::received_local`]); send side: honours the source of
    /// [`Batch::commit_from`]. For a socket bound to a wildcard address on
    /// a host with several. Returns whether the kernel does it.
    pub fn enable_pktinfo(&mut self, sock: &impl std::os::fd::AsFd) -> bool {
        let local = socket2::SockRef::from(sock).local_addr().ok().and_then(|a| a.as_socket());
        self.v6_socket = local.is_some_and(|a| a.is_ipv6());
        self.pktinfo = cmsg::enable_pktinfo(sock.as_fd().as_raw_fd(), self.v6_socket);
        if self.pktinfo && self.cmsgs.is_empty() {
            self.cmsgs = vec![RecvCmsgBuf::default(); self.bufs.len()];
        }
        self.pktinfo
    }

    /// A receive batch with GRO and a send batch with GSO on `sock`, as far
    /// as the kernel supports them, counting into one [`OffloadStats`].
    pub fn offloaded_pair(sock: &impl AsRawFd, capacity: usize) -> (Batch, Batch) {
        let (mut rx, mut tx) = (Batch::new(capacity), Batch::new(capacity));
        tx.share_offload_stats(rx.offload_stats());
        rx.enable_gro(sock);
        tx.enable_gso(sock);
        (rx, tx)
    }

    /// Send side: sends runs of equal-size datagrams to one destination as
    /// one GSO message when the kernel supports it on `sock`. Returns
    /// whether GSO is on. Call again for a new socket.
    pub fn enable_gso(&mut self, sock: &impl AsRawFd) -> bool {
        self.gso = offload::probe_gso(sock.as_raw_fd());
        self.offload.set_gso(self.gso);
        self.gso
    }

    /// Turns GSO off (as after a refusal); for tests of the fallback.
    pub fn disable_gso(&mut self) {
        self.gso = false;
        self.offload.set_gso(false);
    }

    /// What offload this batch uses and did, shared for `/metrics`.
    pub fn offload_stats(&self) -> Arc<OffloadStats> {
        Arc::clone(&self.offload)
    }

    /// Makes this batch count into `stats` (one set for a socket's two
    /// batches); call before enabling offload.
    pub fn share_offload_stats(&mut self, stats: Arc<OffloadStats>) {
        self.offload = stats;
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
        let mut cmsgs = self.cmsgs.iter_mut();
        for (((b, name), v), h) in self.bufs.iter_mut().zip(self.names.iter_mut()).zip(&mut iovs).zip(&mut hdrs) {
            *v = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() };
            h.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(c) = cmsgs.next() {
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = c.0.len();
            }
            count += 1;
        }
        // SAFETY: the first `count` headers are initialised, each with one
        // iovec into a live slot buffer of iov_len bytes, a name buffer of
        // sockaddr_storage size and (GRO) a control buffer of
        // msg_controllen bytes, all owned by `self` or this frame and
        // untouched until the call returns; the kernel writes at most
        // those lengths.
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
        for (i, (((h, name), (len, from)), (seg, b))) in hdrs
            .iter()
            .zip(&self.names)
            .zip(self.lens.iter_mut().zip(self.addrs.iter_mut()))
            .zip(self.segs.iter_mut().zip(&self.bufs))
            .take(n)
            .enumerate()
        {
            *len = (h.msg_len as usize).min(b.len());
            *from = crate::sockaddr_to_std(name, h.msg_hdr.msg_namelen);
            let meta = self.cmsgs.get(i).and_then(|c| c.0.get(..h.msg_hdr.msg_controllen)).map(cmsg::parse);
            *seg = meta.and_then(|m| m.segment).filter(|_| self.gro);
            if let Some(l) = self.locals.get_mut(i) {
                *l = meta.and_then(|m| m.dst);
            }
            self.offload.received(*len, *seg);
        }
        Ok(n)
    }

    /// The local address the `i`-th receive was sent to (with
    /// [`Batch::enable_pktinfo`]).
    pub fn received_local(&self, i: usize) -> Option<IpAddr> {
        self.locals.get(i).copied().flatten()
    }

    /// The datagrams of the `i`-th receive of the last [`Batch::recv`]
    /// (one, or with GRO several of one sender) and their source.
    pub fn received(&mut self, i: usize) -> Option<(std::slice::ChunksMut<'_, u8>, Option<SocketAddr>)> {
        let len = *self.lens.get(i)?;
        let from = *self.addrs.get(i)?;
        let seg = *self.segs.get(i)?;
        Some((offload::segments(self.bufs.get_mut(i)?.get_mut(..len)?, seg), from))
    }

    /// Send side: the next free slot, to be filled and then committed with
    /// [`Batch::commit`]. None when the batch is full.
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        self.bufs.get_mut(self.filled).and_then(|b| b.get_mut(..SLOT))
    }

    /// Queues the first `len` bytes of the last [`Batch::slot`] for `to`
    /// (None: the connected peer).
    pub fn commit(&mut self, len: usize, to: Option<SocketAddr>) {
        self.commit_from(len, to, None);
    }

    /// [`Batch::commit`], sent from the local address `from` (with
    /// [`Batch::enable_pktinfo`]; None: the kernel picks).
    pub fn commit_from(&mut self, len: usize, to: Option<SocketAddr>, from: Option<IpAddr>) {
        let i = self.filled;
        if let (Some(l), Some(a), Some(f)) = (self.lens.get_mut(i), self.addrs.get_mut(i), self.locals.get_mut(i)) {
            *l = len.min(SLOT);
            *a = to;
            *f = from.filter(|_| self.pktinfo);
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
        // Slots before this index were refused as one GSO send (EINVAL)
        // and go out one by one.
        let mut split_until = 0;
        while self.sent < self.filled {
            let run = self.sent..self.filled;
            self.to.clear();
            self.to.extend(self.addrs.get(run.clone()).unwrap_or_default().iter().map(|a| a.map(SockAddr::from)));
            let (mut iovs, mut hdrs) = (zeroed_iovs(), zeroed_hdrs());
            let mut cmsgs = [SendCmsgs::default(); MAX_BATCH];
            // Datagrams in each message (more than one: a GSO message).
            let mut groups = [0usize; MAX_BATCH];
            let lens = self.lens.get(run.clone()).unwrap_or_default();
            let addrs = self.addrs.get(run.clone()).unwrap_or_default();
            let locals = self.locals.get(run.clone()).unwrap_or_default();
            self.keys.clear();
            self.keys.extend(addrs.iter().copied().zip(locals.iter().copied()));
            for ((b, len), v) in self.bufs.get_mut(run).unwrap_or_default().iter_mut().zip(lens).zip(&mut iovs) {
                *v = libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: *len };
            }
            let max_segments = if self.gso { offload::MAX_SEGMENTS } else { 1 };
            let (mut first, mut count) = (0, 0);
            for ((h, g), c) in hdrs.iter_mut().zip(&mut groups).zip(&mut cmsgs) {
                // After an EINVAL refusal the refused run goes one by one.
                let max = if self.sent + first < split_until { 1 } else { max_segments };
                let n = offload::group_len(
                    lens.get(first..).unwrap_or_default(),
                    self.keys.get(first..).unwrap_or_default(),
                    max,
                );
                if n == 0 {
                    break;
                }
                if let Some(Some(to)) = self.to.get(first) {
                    h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                    h.msg_hdr.msg_namelen = to.len();
                }
                h.msg_hdr.msg_iov = iovs.get_mut(first..).map_or(std::ptr::null_mut(), |v| v.as_mut_ptr());
                h.msg_hdr.msg_iovlen = n;
                if n > 1 {
                    c.segment(lens.get(first).copied().unwrap_or(0) as u16);
                }
                if let Some(Some(src)) = locals.get(first) {
                    c.source(*src, self.v6_socket);
                }
                let (control, len) = c.bytes();
                if len > 0 {
                    h.msg_hdr.msg_control = control.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = len;
                }
                *g = n;
                first += n;
                count += 1;
            }
            // SAFETY: the first `count` headers are initialised, one per
            // message, each with `msg_iovlen` iovecs (within `iovs`) into
            // live buffers of `self` (length ≤ SLOT), a destination owned
            // by `self.to` (or none: the connected peer) and maybe control
            // messages (GSO size, source) in `cmsgs` of this frame; nothing
            // is touched until the call returns.
            let n = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), count as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                let head = groups.first().copied().unwrap_or(1);
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ if head > 1 && offload::gso_refusal(&e).is_some() => {
                        // Send this run one by one; the device (or a run of
                        // refusals) may turn GSO off for good.
                        let refusal = offload::gso_refusal(&e).unwrap_or(offload::GsoRefusal::Unsupported);
                        split_until = self.sent + head;
                        if self.refusals.refused(refusal, &self.offload) {
                            tracing::warn!(error = %e, "UDP GSO refused; sending datagrams one by one on this socket");
                            self.gso = false;
                        }
                        continue;
                    }
                    _ => {
                        // The first message of the run failed: drop it.
                        self.dropped += head as u64;
                        self.sent += head;
                        failed = Some(e);
                        continue;
                    }
                }
            }
            for g in groups.iter().take(n as usize) {
                if *g > 1 {
                    self.refusals.sent();
                }
                self.offload.sent_group(*g);
                self.sent += g;
            }
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
                let (datagrams, from) = rx.received(i).unwrap();
                for d in datagrams {
                    got.push((d.to_vec(), from));
                }
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

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Queues `lens` (each datagram filled with its index) for `to`.
    fn queue(tx: &mut Batch, lens: &[usize], to: SocketAddr) {
        for (i, len) in lens.iter().enumerate() {
            tx.slot().unwrap()[..*len].fill(i as u8);
            tx.commit(*len, Some(to));
        }
    }

    fn expect_datagrams(got: &[(Vec<u8>, Option<SocketAddr>)], lens: &[usize]) {
        assert_eq!(got.iter().map(|(d, _)| d.len()).collect::<Vec<_>>(), lens, "every datagram, its length, in order");
        for (i, (d, _)) in got.iter().enumerate() {
            assert!(d.iter().all(|b| *b == i as u8), "datagram {i} intact");
        }
    }

    #[test]
    fn gso_sends_reach_a_gro_receiver_and_a_plain_one_datagram_by_datagram() {
        if !offload::allowed() {
            // ZTNA_UDP_OFFLOAD=off: the switch holds.
            let (a, b) = pair();
            assert!(!Batch::new(4).enable_gso(&a) && !Batch::new(4).enable_gro(&b));
            return;
        }
        let lens: Vec<usize> = [1200; 20].into_iter().chain([700, 1200, 1200, 1300]).collect();
        for gro in [true, false] {
            let (a, b) = pair();
            let mut tx = Batch::new(MAX_BATCH);
            assert!(tx.enable_gso(&a), "this kernel has UDP GSO");
            let mut rx = Batch::new(8);
            if gro {
                assert!(rx.enable_gro(&b), "this kernel has UDP GRO");
            }
            queue(&mut tx, &lens, b.local_addr().unwrap());
            assert!(tx.flush(&a).unwrap());
            let sent = tx.offload_stats().snapshot();
            assert_eq!(sent.gso_sends, 2, "1200 x 20 + 700, then 1200 x 2, then 1300 alone: {sent:?}");
            assert_eq!(sent.gso_segments, 23);
            let got = recv_all(&mut rx, &b, lens.len());
            expect_datagrams(&got, &lens);
            assert!(got.iter().all(|(_, from)| *from == Some(a.local_addr().unwrap())));
            let seen = rx.offload_stats().snapshot();
            if gro {
                assert!(seen.gro && seen.gro_receives >= 1, "coalesced on loopback: {seen:?}");
            } else {
                assert_eq!(seen.gro_receives, 0);
            }
        }
    }

    #[test]
    fn gso_groups_end_where_the_destination_changes() {
        if !offload::allowed() {
            // ZTNA_UDP_OFFLOAD=off: the switch holds.
            let (a, b) = pair();
            assert!(!Batch::new(4).enable_gso(&a) && !Batch::new(4).enable_gro(&b));
            return;
        }
        let (a, b) = pair();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_nonblocking(true).unwrap();
        let mut tx = Batch::new(MAX_BATCH);
        assert!(tx.enable_gso(&a));
        queue(&mut tx, &[1000; 5], b.local_addr().unwrap());
        queue(&mut tx, &[1000; 5], c.local_addr().unwrap());
        assert!(tx.flush(&a).unwrap());
        assert_eq!(tx.offload_stats().snapshot().gso_sends, 2);
        let (mut rb, mut rc) = (Batch::new(8), Batch::new(8));
        expect_datagrams(&recv_all(&mut rb, &b, 5), &[1000; 5]);
        expect_datagrams(&recv_all(&mut rc, &c, 5), &[1000; 5]);
    }

    #[test]
    fn a_refused_gso_send_falls_back_to_single_datagrams_without_loss() {
        if !offload::allowed() {
            // ZTNA_UDP_OFFLOAD=off: the switch holds.
            let (a, b) = pair();
            assert!(!Batch::new(4).enable_gso(&a) && !Batch::new(4).enable_gro(&b));
            return;
        }
        let (a, b) = pair();
        // A socket without UDP checksums cannot do GSO: the kernel refuses
        // the segmented send at run time (EINVAL), as a device without
        // checksum offload does (EIO).
        assert!(crate::offload::setsockopt_int(a.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1));
        let mut tx = Batch::new(MAX_BATCH);
        assert!(tx.enable_gso(&a));
        let lens = [1100; 12];
        let mut rx = Batch::new(16);
        // Each refused run goes out one by one; EINVAL turns GSO off after
        // a few refusals in a row.
        for round in 1..=offload::GSO_EINVAL_LIMIT {
            queue(&mut tx, &lens, b.local_addr().unwrap());
            assert!(tx.flush(&a).unwrap());
            let st = tx.offload_stats().snapshot();
            let on = round < offload::GSO_EINVAL_LIMIT;
            assert_eq!((st.gso, st.gso_errors, st.gso_sends), (on, u64::from(round), 0), "round {round}: {st:?}");
            assert_eq!(tx.dropped(), 0);
            expect_datagrams(&recv_all(&mut rx, &b, lens.len()), &lens);
        }
        queue(&mut tx, &lens, b.local_addr().unwrap());
        assert!(tx.flush(&a).unwrap());
        assert_eq!(tx.offload_stats().snapshot().gso_errors, u64::from(offload::GSO_EINVAL_LIMIT), "no more tries");
        expect_datagrams(&recv_all(&mut rx, &b, lens.len()), &lens);
    }

    #[test]
    fn gso_runs_keep_each_datagrams_source_address() {
        let a = UdpSocket::bind("0.0.0.0:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut tx = Batch::new(MAX_BATCH);
        tx.enable_gso(&a);
        assert!(tx.enable_pktinfo(&a));
        let to = Some(b.local_addr().unwrap());
        let port = a.local_addr().unwrap().port();
        let sources = [[127, 0, 0, 1], [127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 2], [127, 0, 0, 1]];
        for (i, ip) in sources.iter().enumerate() {
            tx.slot().unwrap()[..1000].fill(i as u8);
            tx.commit_from(1000, to, Some(IpAddr::from(*ip)));
        }
        assert!(tx.flush(&a).unwrap());
        let mut rx = Batch::new(8);
        let got = recv_all(&mut rx, &b, sources.len());
        expect_datagrams(&got, &[1000; 5]);
        let seen: Vec<_> = got.iter().map(|(_, f)| f.unwrap()).collect();
        let want: Vec<_> = sources.iter().map(|ip| SocketAddr::from((*ip, port))).collect();
        assert_eq!(seen, want, "one GSO run never mixes sources");
    }
}
