//! Portable backend: poll(2) on the socket and the mesh eventfd, then
//! recvmmsg/sendmmsg batches.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use super::{Backend, OnPacket, BATCH};
use crate::batch::Batch;
use crate::offload::OffloadSnapshot;
use crate::Transmit;

/// Packets queued before a sendmmsg is forced.
const TX_BATCH: usize = 64;

pub struct Portable {
    socket: UdpSocket,
    eventfd: RawFd,
    rx: Batch,
    tx: TxQueue,
}

/// The send batch, as the worker's [`Transmit`].
struct TxQueue {
    socket: RawFd,
    batch: Batch,
}

impl Portable {
    pub fn new(socket: UdpSocket, eventfd: RawFd) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        let (mut rx, mut tx) = (Batch::new(BATCH), Batch::new(TX_BATCH));
        tx.share_offload_stats(rx.offload_stats());
        rx.enable_gro(&socket);
        tx.enable_gso(&socket);
        // The local address of each receive, for a wildcard-bound socket.
        if socket.local_addr()?.ip().is_unspecified() {
            rx.enable_pktinfo(&socket);
            tx.enable_pktinfo(&socket);
        }
        Ok(Portable { socket, eventfd, rx, tx: TxQueue { socket: fd, batch: tx } })
    }

    fn recv_batch(&mut self, on_packet: &mut OnPacket<'_>) -> io::Result<usize> {
        let n = self.rx.recv(&self.socket)?;
        for i in 0..n {
            let local = self.rx.received_local(i);
            if let Some((datagrams, Some(from))) = self.rx.received(i) {
                for d in datagrams {
                    on_packet(d, from, local);
                }
            }
        }
        Ok(n)
    }
}

impl Transmit for TxQueue {
    fn buf(&mut self) -> &mut [u8] {
        if self.batch.is_full() {
            // The worker never waits: what the socket does not take now is
            // dropped (QUIC recovers; counted in `tx_dropped`).
            let _ = self.batch.flush_or_drop(&self.socket);
        }
        self.batch.slot().unwrap_or_default()
    }

    fn commit_from(&mut self, len: usize, to: SocketAddr, from: Option<IpAddr>) {
        self.batch.commit_from(len, Some(to), from);
    }
}

impl Backend for Portable {
    fn poll(&mut self, timeout: Duration, on_packet: &mut OnPacket<'_>) -> io::Result<()> {
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
        self.tx.batch.flush_or_drop(&self.tx.socket)
    }

    fn name(&self) -> &'static str {
        "portable"
    }

    fn tx_dropped(&self) -> u64 {
        self.tx.batch.dropped()
    }

    fn offload(&self) -> OffloadSnapshot {
        self.rx.offload_stats().snapshot()
    }
}
