//! Cross-worker message passing: per destination worker, two bounded
//! lock-free queues (crossbeam `ArrayQueue`) and an eventfd wake-up.
//!
//! - `data`: forwarded datagrams and misrouted QUIC packets. A full queue is
//!   a counted drop, never a block.
//! - `ctrl`: registry messages. These must not be lost, so a sender that
//!   finds the queue full keeps the message in its own outbox and retries on
//!   its next loop turn. The outbox is bounded by what produces registry
//!   messages: registrations per connection (limit) times the per-connection
//!   registration rate (token bucket) times connections.
//!
//! Wake-ups are coalesced: a sender writes the eventfd only when it flips the
//! destination's `notified` flag from false to true; the destination clears
//! the flag before it drains.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use ztna_control::{Code, ServiceName};

use crate::routing::ConnKey;

/// Buffers kept for reuse per worker (bounded: after a burst the pool must
/// not pin a queue's worth of memory; about 1.5 MiB of datagrams).
const RECYCLE_DEPTH: usize = 1024;

/// Data-plane message.
#[derive(Debug)]
pub enum Data {
    /// A datagram whose flow id is already rewritten for `to`, with the
    /// length of its payload (so the receiver need not parse it again).
    /// `bytes` goes back to the sender's recycle queue after delivery.
    Datagram { to: ConnKey, bytes: Vec<u8>, payload_len: usize, received: Instant, sender: u16 },
    /// A QUIC packet that arrived at the wrong worker (`local`: the relay
    /// address it was sent to).
    Packet { from: SocketAddr, local: SocketAddr, bytes: Vec<u8>, sender: u16 },
}

/// Registry message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ctrl {
    /// Broadcast: `conn` now serves `service` under `handle`.
    ConnectorUp { service: ServiceName, conn: ConnKey, handle: u32 },
    /// Broadcast: `conn` no longer serves `service`.
    ConnectorDown { service: ServiceName, conn: ConnKey },
    /// To the connector's worker: open a connector-leg flow for an agent.
    /// `attempt` counts connectors tried for this flow (bounds retries).
    /// `agent_id` is the agent's SPIFFE ID, told to the connector in FlowOpen.
    Bind {
        connector: ConnKey,
        handle: u32,
        agent: ConnKey,
        agent_flow: u32,
        agent_addr: SocketAddr,
        agent_id: Arc<str>,
        attempt: u8,
    },
    /// To the agent's worker: the bind succeeded.
    /// `connector_id` is the connector's SPIFFE ID, told to the agent in
    /// FlowBound (its end-to-end session must prove it).
    Bound { agent: ConnKey, agent_flow: u32, connector: ConnKey, connector_flow: u32, connector_id: Arc<str> },
    /// To the agent's worker: the connector is gone or full.
    BindFailed { agent: ConnKey, agent_flow: u32, connector: ConnKey, attempt: u8 },
    /// To the connector's worker: the agent's flow ended.
    Unbind { connector: ConnKey, connector_flow: u32 },
    /// To the agent's worker: the connector refused the flow (its own
    /// allow-list); close the agent's flow with `code`.
    Refused { agent: ConnKey, agent_flow: u32, connector: ConnKey, connector_flow: u32, code: Code },
}

/// One worker's inbox.
pub struct Inbox {
    pub data: ArrayQueue<Data>,
    pub ctrl: ArrayQueue<Ctrl>,
    /// Buffers this worker sent that their receivers are done with. Reusing
    /// them keeps malloc/free (and glibc's cross-thread arena locks) off the
    /// per-datagram path.
    pub recycle: ArrayQueue<Vec<u8>>,
    notified: AtomicBool,
    eventfd: OwnedFd,
}

impl Inbox {
    fn new(data_depth: usize, ctrl_depth: usize) -> io::Result<Self> {
        // SAFETY: plain syscall; the returned descriptor is checked and then
        // owned by `OwnedFd`.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Inbox {
            data: ArrayQueue::new(data_depth.max(1)),
            ctrl: ArrayQueue::new(ctrl_depth.max(1)),
            recycle: ArrayQueue::new(data_depth.clamp(1, RECYCLE_DEPTH)),
            notified: AtomicBool::new(false),
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The descriptor the owning worker waits on.
    pub fn eventfd(&self) -> &OwnedFd {
        &self.eventfd
    }

    /// Wakes the owner unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            // EAGAIN (counter saturated) still leaves the fd readable.
            unsafe {
                libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
            }
        }
    }

    /// Called by the owner before draining: later pushes wake it again.
    pub fn clear_notified(&self) {
        self.notified.store(false, Ordering::Release);
    }

    /// Resets the eventfd counter (portable backend; io_uring reads it).
    pub fn consume_eventfd(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; non-blocking fd.
        unsafe {
            libc::read(self.eventfd.as_raw_fd(), (&mut v as *mut u64).cast(), 8);
        }
    }
}

/// All workers' inboxes.
pub struct Mesh {
    pub inboxes: Vec<Inbox>,
}

impl Mesh {
    pub fn new(workers: usize, data_depth: usize, ctrl_depth: usize) -> io::Result<Self> {
        let inboxes = (0..workers).map(|_| Inbox::new(data_depth, ctrl_depth)).collect::<io::Result<_>>()?;
        Ok(Mesh { inboxes })
    }

    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// A buffer holding a copy of `bytes`, reused from `worker`'s recycle
    /// queue when one is there.
    pub fn buffer(&self, worker: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = self.inboxes.get(worker).and_then(|i| i.recycle.pop()).unwrap_or_default();
        v.clear();
        v.extend_from_slice(bytes);
        v
    }

    /// Returns a buffer to the worker that allocated it (freed if its
    /// recycle queue is full).
    pub fn recycle(&self, worker: usize, buf: Vec<u8>) {
        if let Some(i) = self.inboxes.get(worker) {
            let _ = i.recycle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_queue_and_coalesced_wake() {
        let mesh = Mesh::new(2, 2, 2).unwrap();
        let inbox = &mesh.inboxes[1];
        let d = || Data::Packet {
            from: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:2".parse().unwrap(),
            bytes: vec![1],
            sender: 0,
        };
        assert!(inbox.data.push(d()).is_ok());
        assert!(inbox.data.push(d()).is_ok());
        assert!(inbox.data.push(d()).is_err(), "full queue refuses, never blocks");
        inbox.wake();
        inbox.wake();
        let mut v: u64 = 0;
        // SAFETY: test reads the eventfd counter into a live u64.
        let n = unsafe { libc::read(inbox.eventfd().as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1), "two wakes, one eventfd write");
        inbox.clear_notified();
        inbox.wake();
        inbox.consume_eventfd();
    }
}
