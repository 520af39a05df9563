//! io_uring backend on the `io-uring` crate.
//!
//! Receives use one multishot RecvMsg with a ring of provided buffers
//! (Linux 6.0): one armed request yields a completion per datagram, with no
//! re-arming and no herd of armed requests woken per packet. Kernels
//! without provided-buffer rings fall back to a few single-shot RecvMsg
//! with their own buffers. A Read on the mesh eventfd wakes the loop for
//! cross-worker messages; sends are SendMsg operations from a fixed pool,
//! submitted together at the end of each loop turn. (tokio-uring was considered and
//! rejected: unmaintained since 2024 and its recvmsg returns no control
//! messages; see ARCHITECTURE.md.)

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use socket2::SockAddr;

use super::{Backend, OnPacket, RX_BUF};
use crate::cmsg::{self, RecvCmsgBuf, SendCmsgs};
use crate::offload::{self, OffloadSnapshot, OffloadStats};
use crate::Transmit;

const KIND_SHIFT: u64 = 32;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_EVENTFD: u64 = 3;
const KIND_MULTI: u64 = 4;
/// Single-shot receives kept in flight (fallback mode). Every armed
/// receive on a socket is woken for each arriving packet, so more is not
/// better.
const RECV_SLOTS: usize = 4;
/// Provided buffers for multishot receive (power of two).
const RING_BUFS: u16 = 512;
/// With GRO each buffer holds a whole coalesced receive, so fewer.
const RING_BUFS_GRO: u16 = 64;
/// Room for control messages (the GRO segment size) in a buffer.
const CONTROL_LEN: usize = std::mem::size_of::<RecvCmsgBuf>();
/// The recvmsg_out header at the start of every provided buffer.
const RECVMSG_OUT: usize = 16;
/// Buffer group id of the provided-buffer ring.
const BGID: u16 = 7;
/// Send buffers in the pool (packets in flight to the kernel at once).
const SEND_SLOTS: usize = 256;

/// A receive slot. Boxed so the kernel-visible pointers stay put.
struct RecvSlot {
    buf: [u8; RX_BUF],
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    msg: libc::msghdr,
}

struct SendSlot {
    buf: [u8; RX_BUF],
    len: usize,
    to: SocketAddr,
    /// The source address to send from (PKTINFO), if any.
    from: Option<IpAddr>,
    name: libc::sockaddr_storage,
    namelen: libc::socklen_t,
    /// As the leader of a send: one iovec per datagram of the group.
    iovs: [libc::iovec; offload::MAX_SEGMENTS],
    cmsgs: SendCmsgs,
    msg: libc::msghdr,
    /// As the leader: the other slots of its group, freed with it.
    members: Vec<usize>,
    /// Refused as part of a GSO send: goes out alone.
    single: bool,
}

fn zeroed_slot<T>() -> Box<T> {
    // SAFETY: only used for RecvSlot, plain C data (bytes, iovec,
    // sockaddr_storage, msghdr) for which all-zero is a valid value.
    Box::new(unsafe { std::mem::zeroed() })
}

fn send_slot() -> Box<SendSlot> {
    Box::new(SendSlot {
        buf: [0; RX_BUF],
        len: 0,
        to: SocketAddr::from(([0, 0, 0, 0], 0)),
        from: None,
        // SAFETY: sockaddr_storage, iovec and msghdr are plain C structs
        // for which all-zero is a valid value.
        name: unsafe { std::mem::zeroed() },
        namelen: 0,
        // SAFETY: as above.
        iovs: unsafe { std::mem::zeroed() },
        cmsgs: SendCmsgs::default(),
        // SAFETY: as above.
        msg: unsafe { std::mem::zeroed() },
        members: Vec::with_capacity(offload::MAX_SEGMENTS),
        single: false,
    })
}

pub struct Uring {
    ring: IoUring,
    socket: UdpSocket,
    eventfd: RawFd,
    eventfd_buf: Box<u64>,
    // The kernel holds pointers into every slot while an operation is in
    // flight; boxing pins each slot regardless of what happens to the Vec.
    #[allow(clippy::vec_box)]
    recv: Vec<Box<RecvSlot>>,
    /// Multishot receive state, when the kernel supports it.
    multi: Option<MultiRecv>,
    send: SendPool,
    /// Completions seen while reclaiming send slots, handled next poll.
    deferred: Vec<(u64, i32, u32)>,
    offload: Arc<OffloadStats>,
}

/// A provided-buffer ring shared with the kernel plus the msghdr template
/// of the multishot RecvMsg.
struct MultiRecv {
    /// `count` entries, page aligned, registered with the kernel.
    ring: *mut types::BufRingEntry,
    count: u16,
    /// Bytes per buffer: header, address, control, payload.
    buf_size: usize,
    bufs: Box<[u8]>,
    tail: u16,
    msg: Box<libc::msghdr>,
}

impl MultiRecv {
    /// `gro`: buffers for whole coalesced receives; `control`: room for
    /// control messages (their segment size, the local address).
    fn new(ring: &IoUring, gro: bool, control: bool) -> io::Result<MultiRecv> {
        let (count, payload) = if gro { (RING_BUFS_GRO, offload::GRO_BUF) } else { (RING_BUFS, RX_BUF) };
        let control = if gro || control { CONTROL_LEN } else { 0 };
        let buf_size = RECVMSG_OUT + std::mem::size_of::<libc::sockaddr_storage>() + control + payload;
        let layout =
            std::alloc::Layout::from_size_align(usize::from(count) * std::mem::size_of::<types::BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        // SAFETY: non-zero size; zeroed memory is a valid (empty) ring.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // SAFETY: `mem` is a page-aligned array of `count` entries that
        // stays allocated (leaked on drop) for as long as the ring exists.
        if let Err(e) = unsafe { ring.submitter().register_buf_ring_with_flags(mem as u64, count, BGID, 0) } {
            // SAFETY: allocated above with `layout`, never shared.
            unsafe { std::alloc::dealloc(mem.cast(), layout) };
            return Err(e);
        }
        // SAFETY: a zeroed msghdr is valid; only the lengths matter here.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_controllen = control;
        let mut m = MultiRecv {
            ring: mem,
            count,
            buf_size,
            bufs: vec![0u8; usize::from(count) * buf_size].into_boxed_slice(),
            tail: 0,
            msg,
        };
        for bid in 0..count {
            m.provide(bid);
        }
        Ok(m)
    }

    /// Hands buffer `bid` (back) to the kernel.
    fn provide(&mut self, bid: u16) {
        let mask = self.count - 1;
        let addr = self.bufs.as_mut_ptr() as u64 + u64::from(bid) * self.buf_size as u64;
        // SAFETY: `tail & mask` < count indexes the registered array;
        // the kernel reads an entry only after the tail store below
        // publishes it, and never writes entries.
        unsafe {
            let e = &mut *self.ring.add(usize::from(self.tail & mask));
            e.set_addr(addr);
            e.set_len(self.buf_size as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in entry 0 of the registered ring,
        // is 2-byte aligned, and the kernel reads it with acquire ordering.
        unsafe {
            let tail = types::BufRingEntry::tail(self.ring).cast::<std::sync::atomic::AtomicU16>();
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// The buffer the kernel filled for completion `bid`.
    fn buffer(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        let start = usize::from(bid) * self.buf_size;
        self.bufs.get_mut(start..start + len.min(self.buf_size))
    }
}

struct SendPool {
    #[allow(clippy::vec_box)] // pinned slots, as for `Uring::recv`
    slots: Vec<Box<SendSlot>>,
    free: Vec<usize>,
    /// Slot handed out by `buf()` and not yet committed.
    current: Option<usize>,
    /// Filled slots not yet pushed to the submission queue.
    ready: Vec<usize>,
    /// Packets that could not get a slot (counted, dropped).
    dropped: u64,
    overflow: [u8; RX_BUF],
    /// Group equal-size sends to one destination into GSO sends.
    gso: bool,
    refusals: offload::RefusalTracker,
    /// Sends name their source address (PKTINFO); the socket's family.
    pktinfo: bool,
    v6_socket: bool,
}

impl Uring {
    pub fn new(socket: UdpSocket, eventfd: RawFd) -> io::Result<Self> {
        Self::with_receive_mode(socket, eventfd, true)
    }

    /// `multishot = false` forces the single-shot receive fallback (tests).
    pub fn with_receive_mode(socket: UdpSocket, eventfd: RawFd, multishot: bool) -> io::Result<Self> {
        let entries = (RECV_SLOTS + SEND_SLOTS + 8).next_power_of_two() as u32;
        // One thread submits and reaps (the worker that created the ring):
        // let the kernel run completion work only when we enter the ring
        // (DEFER_TASKRUN, Linux 6.1) instead of interrupting the worker.
        // Older kernels get the plain ring.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
            .or_else(|_| IoUring::new(entries))?;
        let mut u = Uring {
            ring,
            socket,
            eventfd,
            eventfd_buf: Box::new(0),
            recv: Vec::new(),
            multi: None,
            send: SendPool::new(SEND_SLOTS),
            deferred: Vec::new(),
            offload: Arc::default(),
        };
        u.send.gso = offload::probe_gso(u.socket.as_raw_fd());
        // GRO needs receive buffers for whole coalesced datagrams: only
        // with provided buffers (the single-shot slots are small).
        let gro = multishot && offload::enable_gro(u.socket.as_raw_fd());
        // PKTINFO for a socket bound to a wildcard address (also only
        // with provided buffers, which have a control area).
        let local = u.socket.local_addr()?;
        u.send.v6_socket = local.is_ipv6();
        u.send.pktinfo =
            multishot && local.ip().is_unspecified() && cmsg::enable_pktinfo(u.socket.as_raw_fd(), local.is_ipv6());
        let multi =
            if multishot { MultiRecv::new(&u.ring, gro, u.send.pktinfo) } else { Err(io::Error::other("disabled")) };
        match multi {
            Ok(m) => {
                u.multi = Some(m);
                u.offload.set_gro(gro);
                u.arm_multi()?;
            }
            Err(e) => {
                // Single-shot receives have small buffers and no control
                // area: no GRO (a coalesced receive would be cut) and no
                // PKTINFO.
                if gro {
                    offload::disable_gro(u.socket.as_raw_fd());
                }
                u.send.pktinfo = false;
                tracing::info!(error = %e, "no provided-buffer rings; using single-shot receives");
                u.recv = (0..RECV_SLOTS).map(|_| zeroed_slot()).collect();
                for i in 0..RECV_SLOTS {
                    u.arm_recv(i)?;
                }
            }
        }
        u.offload.set_gso(u.send.gso);
        u.arm_eventfd()?;
        u.ring.submit()?;
        Ok(u)
    }

    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we build points into boxed slots (or the
            // boxed eventfd buffer) owned by `self`, which stay allocated
            // and untouched until the matching completion is reaped.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_recv(&mut self, i: usize) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        let Some(slot) = self.recv.get_mut(i) else { return Ok(()) };
        let s = &mut **slot;
        s.iov = libc::iovec { iov_base: s.buf.as_mut_ptr().cast(), iov_len: RX_BUF };
        s.msg.msg_name = (&mut s.name as *mut libc::sockaddr_storage).cast();
        s.msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        s.msg.msg_iov = &mut s.iov;
        s.msg.msg_iovlen = 1;
        s.msg.msg_control = std::ptr::null_mut();
        s.msg.msg_controllen = 0;
        let e = opcode::RecvMsg::new(types::Fd(fd), &mut s.msg).build().user_data(KIND_RECV << KIND_SHIFT | i as u64);
        self.push(&e)
    }

    fn arm_multi(&mut self) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        let Some(m) = &self.multi else { return Ok(()) };
        let e = opcode::RecvMsgMulti::new(types::Fd(fd), &*m.msg, BGID).build().user_data(KIND_MULTI << KIND_SHIFT);
        self.push(&e)
    }

    /// Handles one multishot completion; returns whether to re-arm.
    fn on_multi(&mut self, res: i32, flags: u32, on_packet: &mut OnPacket<'_>) -> bool {
        let rearm = !io_uring::cqueue::more(flags);
        let Some(m) = &mut self.multi else { return false };
        let Some(bid) = io_uring::cqueue::buffer_select(flags) else {
            // No buffer: an error such as ENOBUFS (all buffers in use)
            // ended the multishot request.
            return rearm;
        };
        if res > 0 {
            let msg = *m.msg;
            if let Some(buf) = m.buffer(bid, res as usize) {
                let parsed = types::RecvMsgOut::parse(buf, &msg).ok().map(|out| {
                    let mut storage: libc::sockaddr_storage =
                        // SAFETY: all-zero is a valid sockaddr_storage.
                        unsafe { std::mem::zeroed() };
                    let name = out.name_data();
                    let n = name.len().min(std::mem::size_of::<libc::sockaddr_storage>());
                    // SAFETY: copies `n` bytes into a sockaddr_storage of
                    // at least that size.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            name.as_ptr(),
                            (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
                            n,
                        )
                    };
                    let from = super::sockaddr_to_std(&storage, out.incoming_name_len() as libc::socklen_t);
                    let truncated = out.is_payload_truncated() || out.is_name_data_truncated();
                    let meta = cmsg::parse(out.control_data());
                    (from, out.payload_data().len(), truncated, meta)
                });
                if let Some((Some(from), payload_len, false, meta)) = parsed {
                    let segment = meta.segment;
                    // Payload follows the header, the name and the control
                    // areas.
                    let off = RECVMSG_OUT + msg.msg_namelen as usize + msg.msg_controllen;
                    if let Some(p) = buf.get_mut(off..off + payload_len) {
                        self.offload.received(payload_len, segment);
                        for d in offload::segments(p, segment) {
                            on_packet(d, from, meta.dst);
                        }
                    }
                }
            }
        }
        m.provide(bid);
        rearm
    }

    fn arm_eventfd(&mut self) -> io::Result<()> {
        let e = opcode::Read::new(types::Fd(self.eventfd), (&mut *self.eventfd_buf as *mut u64).cast(), 8)
            .build()
            .user_data(KIND_EVENTFD << KIND_SHIFT);
        self.push(&e)
    }

    fn reap(&mut self) -> Vec<(u64, i32, u32)> {
        let mut out = std::mem::take(&mut self.deferred);
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        out
    }

    /// Puts the committed sends on the submission queue, consecutive
    /// datagrams of one size to one destination as one GSO send.
    fn push_ready_sends(&mut self) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        let ready = std::mem::take(&mut self.send.ready);
        let max_segments = if self.send.gso { offload::MAX_SEGMENTS } else { 1 };
        let (mut lens, mut addrs) = (Vec::with_capacity(ready.len()), Vec::with_capacity(ready.len()));
        for i in &ready {
            let s = self.send.slots.get(*i);
            lens.push(s.map_or(0, |s| s.len));
            // A slot refused in a GSO send shares its key with no other.
            addrs.push(s.map(|s| (s.to, s.from, s.single.then_some(*i))));
        }
        let mut first = 0;
        while first < ready.len() {
            let n = offload::group_len(
                lens.get(first..).unwrap_or_default(),
                addrs.get(first..).unwrap_or_default(),
                max_segments,
            )
            .max(1);
            let group = ready.get(first..first + n).unwrap_or_default();
            first += n;
            let Some((&leader, members)) = group.split_first() else { continue };
            let mut iovs = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; offload::MAX_SEGMENTS];
            for (v, i) in iovs.iter_mut().zip(group) {
                if let Some(s) = self.send.slots.get_mut(*i) {
                    *v = libc::iovec { iov_base: s.buf.as_mut_ptr().cast(), iov_len: s.len };
                }
            }
            let Some(slot) = self.send.slots.get_mut(leader) else { continue };
            let s = &mut **slot;
            s.iovs = iovs;
            s.members.clear();
            s.members.extend_from_slice(members);
            s.msg.msg_name = (&mut s.name as *mut libc::sockaddr_storage).cast();
            s.msg.msg_namelen = s.namelen;
            s.msg.msg_iov = s.iovs.as_mut_ptr();
            s.msg.msg_iovlen = group.len();
            s.cmsgs.clear();
            if group.len() > 1 {
                s.cmsgs.segment(s.len as u16);
            }
            if let Some(src) = s.from {
                s.cmsgs.source(src, self.send.v6_socket);
            }
            let (control, len) = s.cmsgs.bytes();
            s.msg.msg_control = if len > 0 { control.as_mut_ptr().cast() } else { std::ptr::null_mut() };
            s.msg.msg_controllen = len;
            let e =
                opcode::SendMsg::new(types::Fd(fd), &s.msg).build().user_data(KIND_SEND << KIND_SHIFT | leader as u64);
            self.push(&e)?;
        }
        self.send.ready = ready;
        self.send.ready.clear();
        Ok(())
    }

    /// A send completed: its slots are free again, or, when the kernel
    /// refused GSO, they are sent again one by one.
    fn send_done(&mut self, leader: usize, res: i32) {
        let Some(slot) = self.send.slots.get_mut(leader) else { return };
        let segments = 1 + slot.members.len();
        let err = io::Error::from_raw_os_error(res.saturating_neg());
        if let Some(refusal) = offload::gso_refusal(&err).filter(|_| res < 0 && segments > 1) {
            // Sent again one by one; the device (or a run of refusals)
            // may turn GSO off for good.
            if self.send.refusals.refused(refusal, &self.offload) {
                tracing::warn!(error = %err, "UDP GSO refused; sending datagrams one by one on this socket");
                self.send.gso = false;
            }
            let members = std::mem::take(&mut slot.members);
            slot.single = true;
            self.send.ready.push(leader);
            for m in members {
                if let Some(s) = self.send.slots.get_mut(m) {
                    s.single = true;
                }
                self.send.ready.push(m);
            }
            return;
        }
        if res >= 0 && segments > 1 {
            self.send.refusals.sent();
        }
        if res >= 0 {
            self.offload.sent_group(segments);
        }
        self.send.free.push(leader);
        self.send.free.append(&mut slot.members);
    }
}

impl Uring {
    /// Waits for in-flight sends to complete until a slot is free. Called
    /// only when all slots are in flight, so a completion is due.
    fn reclaim_send_slot(&mut self) -> io::Result<()> {
        loop {
            // Sends handed back after a GSO refusal go out again too.
            self.push_ready_sends()?;
            for (ud, res, flags) in
                self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())).collect::<Vec<_>>()
            {
                if ud >> KIND_SHIFT == KIND_SEND {
                    self.send_done((ud & 0xffff_ffff) as usize, res);
                } else {
                    self.deferred.push((ud, res, flags));
                }
            }
            if !self.send.free.is_empty() {
                return Ok(());
            }
            self.ring.submit_and_wait(1)?;
        }
    }
}

impl Transmit for Uring {
    fn commit_from(&mut self, len: usize, to: SocketAddr, from: Option<IpAddr>) {
        let from = from.filter(|_| self.send.pktinfo);
        let queued = self.send.ready.len();
        self.send.commit(len, to);
        if self.send.ready.len() > queued {
            if let Some(s) = self.send.ready.last().and_then(|i| self.send.slots.get_mut(*i)) {
                s.from = from;
            }
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        if self.send.current.is_none() && self.send.free.is_empty() {
            // More packets this turn than slots: flush and wait for the
            // kernel to hand slots back rather than dropping packets.
            let _ = self.reclaim_send_slot();
        }
        self.send.buf()
    }
}

impl SendPool {
    fn new(n: usize) -> SendPool {
        SendPool {
            slots: (0..n).map(|_| send_slot()).collect(),
            free: (0..n).rev().collect(),
            current: None,
            ready: Vec::with_capacity(n),
            dropped: 0,
            overflow: [0u8; RX_BUF],
            gso: false,
            refusals: offload::RefusalTracker::default(),
            pktinfo: false,
            v6_socket: false,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        // A slot handed out but not committed (the caller had nothing to
        // send) is reused, not leaked.
        let next = self.current.or_else(|| self.free.pop());
        match next {
            Some(i) => {
                self.current = Some(i);
                match self.slots.get_mut(i) {
                    Some(s) => &mut s.buf,
                    None => &mut self.overflow,
                }
            }
            None => {
                // Pool exhausted within one turn: the packet is lost and
                // counted; QUIC retransmits.
                self.current = None;
                &mut self.overflow
            }
        }
    }

    fn commit(&mut self, len: usize, to: SocketAddr) {
        let Some(i) = self.current.take() else {
            self.dropped += 1;
            return;
        };
        let Some(slot) = self.slots.get_mut(i) else { return };
        let s = &mut **slot;
        let addr = SockAddr::from(to);
        let n = (addr.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: copies `n` bytes of a valid sockaddr into the slot's
        // sockaddr_storage, which is at least that large.
        unsafe {
            std::ptr::copy_nonoverlapping(
                addr.as_ptr().cast::<u8>(),
                (&mut s.name as *mut libc::sockaddr_storage).cast::<u8>(),
                n,
            );
        }
        s.namelen = n as libc::socklen_t;
        s.len = len.min(RX_BUF);
        s.to = to;
        s.from = None;
        s.single = false;
        self.ready.push(i);
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Receives (and maybe sends) are still armed. Closing the ring
        // cancels them asynchronously, so the kernel may still write into
        // their buffers after this point: leak the buffers instead of
        // freeing memory the kernel might touch (a few hundred KiB, once,
        // when a worker exits).
        std::mem::forget(std::mem::take(&mut self.recv));
        std::mem::forget(std::mem::take(&mut self.send.slots));
        std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(0)));
        // The provided-buffer ring and its buffers too.
        std::mem::forget(self.multi.take());
    }
}

impl Backend for Uring {
    fn poll(&mut self, timeout: Duration, on_packet: &mut OnPacket<'_>) -> io::Result<()> {
        // Submits what was queued since (re-armed receives) and waits.
        let ready = !self.deferred.is_empty() || !self.ring.completion().is_empty();
        let r = if ready {
            self.ring.submit()
        } else {
            let ts = types::Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        match r {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        let mut rearm_error = None;
        for (ud, res, flags) in self.reap() {
            let idx = (ud & 0xffff_ffff) as usize;
            match ud >> KIND_SHIFT {
                KIND_MULTI if self.on_multi(res, flags, on_packet) => {
                    if let Err(e) = self.arm_multi() {
                        rearm_error = Some(e);
                    }
                }
                KIND_MULTI => {}
                KIND_RECV => {
                    if res > 0 {
                        if let Some(slot) = self.recv.get_mut(idx) {
                            let len = (res as usize).min(RX_BUF);
                            if let Some(from) = super::sockaddr_to_std(&slot.name, slot.msg.msg_namelen) {
                                on_packet(&mut slot.buf[..len], from, None);
                            }
                        }
                    }
                    // Keep going on error: the other completions of this
                    // batch still need handling (and their slots re-arming).
                    if let Err(e) = self.arm_recv(idx) {
                        rearm_error = Some(e);
                    }
                }
                KIND_SEND => self.send_done(idx, res),
                KIND_EVENTFD => {
                    if let Err(e) = self.arm_eventfd() {
                        rearm_error = Some(e);
                    }
                }
                _ => {}
            }
        }
        rearm_error.map_or(Ok(()), Err)
    }

    fn transmit(&mut self) -> &mut dyn Transmit {
        self
    }

    fn flush(&mut self) -> io::Result<()> {
        self.push_ready_sends()?;
        self.ring.submit()?;
        // Reclaim completed sends now so the pool stays full for the next
        // turn; other completions wait for the next poll.
        let done = self.reap();
        for (ud, res, flags) in done {
            if ud >> KIND_SHIFT == KIND_SEND {
                self.send_done((ud & 0xffff_ffff) as usize, res);
            } else {
                self.deferred.push((ud, res, flags));
            }
        }
        Ok(())
    }

    fn queue_sends(&mut self) -> io::Result<()> {
        // The next poll's io_uring_enter submits them (and reaps their
        // completions with the receives).
        self.push_ready_sends()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn tx_dropped(&self) -> u64 {
        self.send.dropped
    }

    fn offload(&self) -> OffloadSnapshot {
        self.offload.snapshot()
    }
}

#[cfg(test)]
mod tests;
