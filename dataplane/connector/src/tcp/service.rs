//! One service pass over a flow of the TCP endpoint: backend connects,
//! smoltcp, and the byte proxy between smoltcp sockets and backends.

use std::io;
use std::time::Instant;

use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::wire::IpListenEndpoint;
use ztna_control::packet::TcpHeader;

use super::{build_rst, Conn, Flow, Phase, TcpLimits};
use crate::backend::{BackendId, BackendIo};
use crate::vdev::{smol_instant, std_instant};
use crate::{add, inc, ConnectorStats};

/// Whether smoltcp has seen the agent's FIN.
fn fin_received(state: State) -> bool {
    matches!(state, State::CloseWait | State::LastAck | State::Closing | State::TimeWait)
}

/// One service pass over a flow: finish backend connects, run smoltcp,
/// move bytes, run smoltcp again to send what moved, clean up. The backend
/// sockets of the connections it removed (and closed) go to `closed`.
#[allow(clippy::too_many_arguments)]
pub(super) fn service_flow(
    flow: &mut Flow,
    now: Instant,
    epoch: Instant,
    limits: &TcpLimits,
    stats: &ConnectorStats,
    scratch: &mut Vec<u8>,
    io: &mut dyn BackendIo,
    closed: &mut Vec<BackendId>,
) {
    let Flow { iface, dev, sockets, conns, dirty, deadline, .. } = flow;
    let snow = smol_instant(epoch, now);

    // Backend connects that finished or timed out.
    for (t, c) in conns.iter_mut() {
        let Phase::Connecting { since, .. } = &c.phase else { continue };
        if c.dead {
            continue;
        }
        let timed_out = now.saturating_duration_since(*since) >= limits.connect_timeout;
        if !c.ready && !timed_out {
            continue;
        }
        let connected = c.ready && io.tcp_connected(c.backend);
        c.ready = false;
        let placeholder = Phase::Connecting { syn: Vec::new(), syn_header: TcpHeader::default(), since: now };
        let Phase::Connecting { syn, syn_header, .. } = std::mem::replace(&mut c.phase, placeholder) else {
            continue;
        };
        if connected && dev.push_rx(&syn) {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; limits.buffer]),
                tcp::SocketBuffer::new(vec![0u8; limits.buffer]),
            );
            s.set_nagle_enabled(false);
            s.set_congestion_control(CongestionControl::Reno);
            if s.listen(IpListenEndpoint::from(t.service)).is_ok() {
                c.phase = Phase::Open { handle: sockets.add(s) };
                c.last = now;
                inc(&stats.tcp_connections_opened);
                continue;
            }
        }
        // Refused, unreachable or timed out: the agent sees a closed port.
        tracing::debug!(agent = %t.agent, service = %t.service, timed_out, "backend connect failed");
        inc(&stats.tcp_backend_connect_failed);
        if build_rst(t, &syn_header, 0, scratch) {
            dev.push_tx(scratch.clone());
        }
        c.dead = true;
    }

    iface.poll(snow, dev, sockets);

    for c in conns.values_mut() {
        let Phase::Open { handle } = c.phase else { continue };
        let s = sockets.get_mut::<tcp::Socket>(handle);
        if !c.dead {
            proxy(c, s, now, stats, io);
        }
        // A handshake the agent never completes ends like a connect timeout.
        let limit = if s.state() == State::SynReceived { limits.connect_timeout } else { limits.idle };
        if !c.dead && now.saturating_duration_since(c.last) >= limit {
            inc(&stats.tcp_idle_timeouts);
            s.abort();
            c.dead = true;
        }
        c.ready = false;
    }

    iface.poll(snow, dev, sockets);

    // Cleanup: aborted connections (their RST is out), closed ones whose
    // data all reached the backend, and listeners that did not take the SYN.
    conns.retain(|_, c| {
        let finished = match c.phase {
            Phase::Connecting { .. } => c.dead,
            Phase::Open { handle } => {
                let s = sockets.get::<tcp::Socket>(handle);
                let state = s.state();
                // Closed without the agent's FIN: reset by the agent (what
                // smoltcp still holds must not reach the backend).
                let reset = state == State::Closed && !c.agent_fin;
                // Closed after the agent's FIN: done once its data is out.
                let done = matches!(state, State::Closed | State::TimeWait) && c.agent_fin && s.recv_queue() == 0;
                // A listener that did not take the SYN.
                let unused = state == State::Listen;
                c.dead || reset || done || unused
            }
        };
        if finished {
            if let Phase::Open { handle } = c.phase {
                sockets.remove(handle);
            }
            c.close_backend(io);
            closed.push(c.backend);
            inc(&stats.tcp_connections_closed);
        }
        !finished
    });

    *dirty = dev.has_rx();
    let mut next = iface.poll_at(snow, sockets).map(|t| std_instant(epoch, t));
    for c in conns.values() {
        let d = match &c.phase {
            Phase::Connecting { since, .. } => *since + limits.connect_timeout,
            Phase::Open { .. } => c.last + limits.idle,
        };
        next = Some(next.map_or(d, |n| n.min(d)));
    }
    *deadline = next;
}

enum ReadResult {
    Data(usize),
    Eof,
    Err(io::Error),
}

/// Moves bytes between a smoltcp socket and its backend, within what both
/// sides accept right now; passes FINs on.
fn proxy(c: &mut Conn, s: &mut tcp::Socket<'_>, now: Instant, stats: &ConnectorStats, io: &mut dyn BackendIo) {
    let backend = c.backend;
    // Agent → backend: only what the backend's write takes leaves smoltcp.
    while s.can_recv() {
        let r = s.recv(|buf| match io.tcp_write(backend, buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                add(&stats.tcp_bytes_to_backend, n as u64);
                c.last = now;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                c.want_write = true;
                break;
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                inc(&stats.tcp_backend_errors);
                s.abort();
                c.dead = true;
                return;
            }
            Err(_) => break,
        }
    }
    if s.recv_queue() == 0 {
        c.want_write = false;
    }
    if fin_received(s.state()) {
        c.agent_fin = true;
    }
    if c.agent_fin && !c.backend_shut && s.recv_queue() == 0 {
        io.tcp_shutdown_write(backend);
        c.backend_shut = true;
    }

    // Backend → agent: read only into free space of the send buffer.
    while !c.backend_eof && s.can_send() {
        let r = s.send(|buf| match io.tcp_read(backend, buf) {
            Ok(0) => (0, ReadResult::Eof),
            Ok(n) => (n, ReadResult::Data(n)),
            Err(e) => (0, ReadResult::Err(e)),
        });
        match r {
            Ok(ReadResult::Data(n)) => {
                add(&stats.tcp_bytes_from_backend, n as u64);
                c.last = now;
            }
            Ok(ReadResult::Eof) => {
                c.backend_eof = true;
                s.close();
            }
            Ok(ReadResult::Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(ReadResult::Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(ReadResult::Err(_)) => {
                inc(&stats.tcp_backend_errors);
                s.abort();
                c.dead = true;
                return;
            }
            Err(_) => break,
        }
    }
}
