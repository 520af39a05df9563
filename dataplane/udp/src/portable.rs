//! Portable backend: poll(2) on the socket and the mesh eventfd, then
//! recvmmsg/sendmmsg batches.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::SockAddr;

use super::{Backend, BATCH, RX_BUF};
use crate::Transmit;

/// Packets queued before a sendmmsg is forced.
const TX_BATCH: usize = 64;

pub struct Portable {
    socket: UdpSocket,
    eventfd: RawFd,
    rx: Vec<[u8; RX_BUF]>,
    tx: TxQueue,
}

struct TxQueue {
    fd: RawFd,
    bufs: Vec<[u8; RX_BUF]>,
    lens: Vec<usize>,
    addrs: Vec<SockAddr>,
    errors: u64,
}

impl Portable {
    pub fn new(socket: UdpSocket, eventfd: RawFd) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        Ok(Portable {
            socket,
            eventfd,
            rx: vec![[0u8; RX_BUF]; BATCH],
            tx: TxQueue {
                fd,
                bufs: vec![[0u8; RX_BUF]; TX_BATCH],
                lens: Vec::with_capacity(TX_BATCH),
                addrs: Vec::with_capacity(TX_BATCH),
                errors: 0,
            },
        })
    }

    fn recv_batch(&mut self, on_packet: &mut dyn FnMut(&mut [u8], SocketAddr)) -> io::Result<usize> {
        let fd = self.socket.as_raw_fd();
        // SAFETY: zeroed sockaddr_storage/iovec/mmsghdr are valid initial
        // values; every pointer below refers to `self.rx` or the local
        // arrays, all of which outlive the recvmmsg call.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iovs[i] = libc::iovec { iov_base: self.rx[i].as_mut_ptr().cast(), iov_len: RX_BUF };
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds BATCH initialised headers pointing at live
        // buffers; the kernel writes at most iov_len bytes into each.
        let n = unsafe {
            libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let n = n as usize;
        for i in 0..n {
            let len = (msgs[i].msg_len as usize).min(RX_BUF);
            if let Some(from) = super::sockaddr_to_std(&names[i], msgs[i].msg_hdr.msg_namelen) {
                on_packet(&mut self.rx[i][..len], from);
            }
        }
        Ok(n)
    }
}

impl TxQueue {
    fn send_all(&mut self) -> io::Result<()> {
        let mut start = 0;
        while start < self.lens.len() {
            let count = self.lens.len() - start;
            // SAFETY: zeroed iovec/mmsghdr are valid; pointers refer to
            // `self.bufs` and `self.addrs`, alive for the call.
            let mut iovs: [libc::iovec; TX_BATCH] = unsafe { std::mem::zeroed() };
            let mut msgs: [libc::mmsghdr; TX_BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..count {
                let j = start + i;
                iovs[i] = libc::iovec { iov_base: self.bufs[j].as_mut_ptr().cast(), iov_len: self.lens[j] };
                msgs[i].msg_hdr.msg_name = self.addrs[j].as_ptr() as *mut libc::c_void;
                msgs[i].msg_hdr.msg_namelen = self.addrs[j].len();
                msgs[i].msg_hdr.msg_iov = &mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `count` initialised headers with live buffers.
            let n = unsafe { libc::sendmmsg(self.fd, msgs.as_mut_ptr(), count as libc::c_uint, 0) };
            if n <= 0 {
                let e = io::Error::last_os_error();
                // A full socket buffer or an unreachable peer loses these
                // packets; QUIC recovers. Skip one and go on.
                self.errors += 1;
                start += 1;
                if e.kind() != io::ErrorKind::WouldBlock && start >= self.lens.len() {
                    self.lens.clear();
                    self.addrs.clear();
                    return Err(e);
                }
                continue;
            }
            start += n as usize;
        }
        self.lens.clear();
        self.addrs.clear();
        Ok(())
    }
}

impl Transmit for TxQueue {
    fn buf(&mut self) -> &mut [u8] {
        if self.lens.len() == TX_BATCH {
            let _ = self.send_all();
        }
        let i = self.lens.len();
        &mut self.bufs[i]
    }

    fn commit(&mut self, len: usize, to: SocketAddr) {
        self.lens.push(len.min(RX_BUF));
        self.addrs.push(SockAddr::from(to));
    }
}

impl Backend for Portable {
    fn poll(&mut self, timeout: Duration, on_packet: &mut dyn FnMut(&mut [u8], SocketAddr)) -> io::Result<()> {
        // Data may already be waiting from the last turn: try first.
        let mut got = self.recv_batch(on_packet)?;
        if got == 0 {
            let mut fds = [
                libc::pollfd { fd: self.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.eventfd, events: libc::POLLIN, revents: 0 },
            ];
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `fds` is a live array of two pollfd structs.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let mut v: u64 = 0;
                // SAFETY: reads at most 8 bytes into a live u64.
                unsafe { libc::read(self.eventfd, (&mut v as *mut u64).cast(), 8) };
            }
            if fds[0].revents & libc::POLLIN != 0 {
                got = self.recv_batch(on_packet)?;
            }
        }
        // Drain a few more batches while traffic flows, then let the loop
        // send: bounded so transmits are not starved.
        let mut rounds = 0;
        while got == BATCH && rounds < 8 {
            got = self.recv_batch(on_packet)?;
            rounds += 1;
        }
        Ok(())
    }

    fn transmit(&mut self) -> &mut dyn Transmit {
        &mut self.tx
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tx.send_all()
    }

    fn name(&self) -> &'static str {
        "portable"
    }

    fn tx_dropped(&self) -> u64 {
        self.tx.errors
    }
}
