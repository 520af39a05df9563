//! The event loop: one thread, poll(2) over the TUN device, the UDP socket
//! to the relay and a signal self-pipe, driving the sans-I/O `AgentCore`.
//!
//! Each turn reads up to `TUN_BUDGET` packets from the device and up to
//! `UDP_BATCHES` × `BATCH` datagrams from the relay (`recvmmsg`), runs
//! timers, writes inbound packets to the device and sends what the core
//! has (`sendmmsg`). All buffers are allocated once, at start-up; the
//! packet path does not allocate (quiche's own datagram queues aside).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{debug, info, warn};
use tun_rs::SyncDevice;
use ztna_agent::agent_core::{AgentCore, AgentEvent};
use ztna_control::e2e::PathState;
use ztna_control::ServiceName;

use ztna_udp::batch::Batch;
use ztna_udp::BATCH;

pub use crate::status::serve_status;
use crate::status::{self, StatusBoard};

/// Packets read from the TUN device per loop turn.
const TUN_BUDGET: usize = 64;
/// `recvmmsg` calls per loop turn.
const UDP_BATCHES: usize = 4;
/// Longest poll(2) sleep, so a lost wake-up costs at most this.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Largest IP packet the device can hand us (MTU is at most 9000).
const PKT_BUF: usize = 65_536;
/// How often the host's interface addresses are read again.
const HOSTS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// How often the loop refreshes what `/status` serves.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Signals the loop reacts to: SIGTERM/SIGINT set `stop`, SIGUSR1 sets
/// `dump`; each also writes to `wake` so poll(2) returns.
pub struct Signals {
    pub stop: Arc<AtomicBool>,
    pub dump: Arc<AtomicBool>,
    wake: UnixStream,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let dump = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&stop))?;
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        signal_hook::flag::register(SIGUSR1, Arc::clone(&dump))?;
        signal_hook::low_level::pipe::register(SIGUSR1, notify)?;
        Ok(Signals { stop, dump, wake })
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
    }
}

/// I/O counters of the loop (the core counts the rest).
#[derive(Debug, Default, Clone, Copy)]
pub struct IoStats {
    pub udp_rx: u64,
    pub udp_tx: u64,
    pub udp_send_errors: u64,
    pub udp_recv_errors: u64,
    pub tun_rx: u64,
    pub tun_tx: u64,
    pub tun_write_errors: u64,
}

impl IoStats {
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("udp_rx", self.udp_rx),
            ("udp_tx", self.udp_tx),
            ("udp_send_errors", self.udp_send_errors),
            ("udp_recv_errors", self.udp_recv_errors),
            ("tun_rx", self.tun_rx),
            ("tun_tx", self.tun_tx),
            ("tun_write_errors", self.tun_write_errors),
        ]
    }
}

pub struct Agent {
    core: AgentCore,
    tun: SyncDevice,
    sock: UdpSocket,
    relay: SocketAddr,
    /// Where the UDP socket binds (a new socket after a Goodbye).
    listen: SocketAddr,
    /// A Goodbye arrived: take a new socket once the old connection is over.
    rebind: bool,
    mtu: usize,
    rx: Batch,
    tx: Batch,
    tun_buf: Box<[u8]>,
    in_buf: Box<[u8]>,
    io: IoStats,
    started: Instant,
    /// What `/status` serves, when it is served.
    status: Option<StatusBoard>,
    status_at: Instant,
    /// Host candidates: the TUN device left out, read again now and then.
    tun_name: Option<String>,
    hosts_at: Instant,
}

fn out(line: std::fmt::Arguments<'_>) {
    // Machine-readable progress on stdout (tests and scripts read it).
    let mut o = io::stdout().lock();
    let _ = o.write_fmt(line);
    let _ = o.write_all(b"\n");
    let _ = o.flush();
}

impl Agent {
    pub fn new(
        core: AgentCore,
        tun: SyncDevice,
        sock: UdpSocket,
        relay: SocketAddr,
        listen: SocketAddr,
        mtu: u16,
    ) -> Agent {
        let (rx, tx) = Batch::offloaded_pair(&sock, BATCH);
        let o = rx.offload_stats().snapshot();
        info!(gso = o.gso, gro = o.gro, "UDP socket ready");
        Agent {
            core,
            tun,
            sock,
            relay,
            listen,
            rebind: false,
            mtu: usize::from(mtu),
            rx,
            tx,
            tun_buf: vec![0u8; PKT_BUF].into_boxed_slice(),
            in_buf: vec![0u8; PKT_BUF].into_boxed_slice(),
            io: IoStats::default(),
            started: Instant::now(),
            status: None,
            status_at: Instant::now(),
            tun_name: None,
            hosts_at: Instant::now(),
        }
    }

    /// What `/status` serves (see [`serve_status`]); from now on the loop
    /// refreshes it.
    pub fn status_board(&mut self) -> StatusBoard {
        let board = StatusBoard::default();
        status::publish(&board, self.published(Instant::now()));
        Arc::clone(self.status.insert(board))
    }

    fn published(&self, now: Instant) -> status::Published {
        status::Published {
            status: status::status_json(&self.core, self.started, now),
            metrics: status::metrics_text(&self.core, &self.io, &self.rx.offload_stats().snapshot()),
        }
    }

    /// Advertises the host's interface addresses (all but the TUN device
    /// `tun_name`) as direct-path candidates, now and every
    /// [`HOSTS_EVERY`].
    pub fn advertise_host_addresses(&mut self, tun_name: &str) {
        self.tun_name = Some(tun_name.to_owned());
        self.core.set_host_addresses(ztna_udp::ifaddrs::host_addresses(&[tun_name]));
        self.hosts_at = Instant::now() + HOSTS_EVERY;
    }

    /// Prints the `path` line of a move:
    /// `path service=S via=direct addr=A time_to_direct_ms=T` or
    /// `path service=S via=relay state=W` (W says why: docs/protocol/direct.md §11.8).
    fn report_path(&self, service: &ServiceName, direct: Option<SocketAddr>, state: PathState) {
        match direct {
            Some(a) => {
                let status = self.core.tunnel_status();
                let t = status.iter().find(|t| t.service == service.as_str());
                let ttd = t.and_then(|t| t.paths.as_ref()).and_then(|c| c.time_to_direct).map(|d| d.as_millis());
                info!(%service, addr = %a, time_to_direct_ms = ?ttd, "direct path");
                out(format_args!("path service={service} via=direct addr={a} time_to_direct_ms={}", ttd.unwrap_or(0)));
            }
            None => {
                info!(%service, state = state.as_str(), "relay path");
                out(format_args!("path service={service} via=relay state={}", state.as_str()));
            }
        }
    }

    /// Runs until SIGTERM/SIGINT, then closes the session.
    pub fn run(&mut self, sig: &Signals) -> Result<()> {
        // Initial handshake packets.
        self.transmit(Instant::now());
        while !sig.stop.load(Ordering::Acquire) {
            if sig.dump.swap(false, Ordering::AcqRel) {
                self.print_stats();
            }
            let (udp_in, tun_in) = self.wait(sig);
            let now = Instant::now();
            if udp_in {
                self.read_udp(now);
            }
            if tun_in {
                self.read_tun()?;
            }
            // Events first: a Disconnected after a Goodbye takes a new socket
            // before the timer starts the next connection attempt.
            self.events();
            if self.core.next_deadline().is_some_and(|d| d <= now) {
                self.core.handle_timeout(now);
            }
            self.events();
            self.deliver();
            self.transmit(now);
            if now >= self.hosts_at {
                if let Some(name) = self.tun_name.clone() {
                    self.advertise_host_addresses(&name);
                }
            }
            if let Some(board) =
                self.status.as_ref().filter(|_| now.saturating_duration_since(self.status_at) >= STATUS_EVERY)
            {
                self.status_at = now;
                status::publish(board, self.published(now));
            }
        }
        self.shutdown();
        Ok(())
    }

    /// poll(2) until something is readable or the core's deadline.
    fn wait(&mut self, sig: &Signals) -> (bool, bool) {
        let now = Instant::now();
        let wait = match self.core.next_deadline() {
            // Round up: a sub-millisecond deadline must not spin at 0 ms.
            Some(d) => d.saturating_duration_since(now).min(MAX_WAIT),
            None => MAX_WAIT,
        };
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        let udp_events = if self.tx.pending() { libc::POLLIN | libc::POLLOUT } else { libc::POLLIN };
        let mut fds = [
            libc::pollfd { fd: self.sock.as_raw_fd(), events: udp_events, revents: 0 },
            libc::pollfd { fd: self.tun.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sig.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of 3 initialised pollfd for the
        // duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            // Timeout, or EINTR from a signal: the caller re-checks flags.
            return (false, false);
        }
        let [u, t, w] = fds;
        if w.revents != 0 {
            sig.drain();
        }
        let ready = libc::POLLIN | libc::POLLERR | libc::POLLHUP;
        (u.revents & ready != 0, t.revents & ready != 0)
    }

    fn read_udp(&mut self, now: Instant) {
        for _ in 0..UDP_BATCHES {
            let n = match self.rx.recv(&self.sock) {
                Ok(n) => n,
                Err(e) => {
                    // ECONNREFUSED: an ICMP port unreachable from the relay
                    // host (relay down); QUIC's timers handle it.
                    self.io.udp_recv_errors += 1;
                    debug!(error = %e, "UDP receive");
                    continue;
                }
            };
            for i in 0..n {
                if let Some((datagrams, Some(from))) = self.rx.received(i) {
                    for d in datagrams {
                        self.core.recv_udp(d, from, now);
                        self.io.udp_rx += 1;
                    }
                }
            }
            // Hand what arrived to the device before reading more, so the
            // core's inbound queue stays short.
            self.deliver();
            if n < BATCH {
                break;
            }
        }
    }

    /// Reads the TUN device; an error other than WouldBlock/Interrupted
    /// (device deleted, EBADFD) is fatal instead of a busy loop.
    fn read_tun(&mut self) -> Result<()> {
        for _ in 0..TUN_BUDGET {
            match self.tun.recv(&mut self.tun_buf) {
                Ok(n) => {
                    self.io.tun_rx += 1;
                    if let Some(p) = self.tun_buf.get(..n) {
                        // Drops are counted by the core (unmapped, no flow, …).
                        let _ = self.core.send_ip_packet(p);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "TUN read failed; stopping");
                    return Err(anyhow::anyhow!("reading the TUN device: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Inbound IP packets from the relay → the device.
    fn deliver(&mut self) {
        while let Some(n) = self.core.poll_ip_packet(&mut self.in_buf) {
            let Some(p) = self.in_buf.get(..n) else { continue };
            match self.tun.send(p) {
                Ok(_) => self.io.tun_tx += 1,
                Err(e) => {
                    self.io.tun_write_errors += 1;
                    debug!(error = %e, "TUN write");
                }
            }
        }
    }

    /// QUIC packets from the core → the relay, in `sendmmsg` batches.
    fn transmit(&mut self, now: Instant) {
        let target = self.core.relay();
        if target != self.relay {
            self.switch_relay(target);
        }
        loop {
            if self.tx.pending() && !self.flush() {
                return; // socket full: POLLOUT next turn
            }
            while !self.tx.is_full() {
                let Some(slot) = self.tx.slot() else { break };
                match self.core.poll_udp(slot, now) {
                    // The relay, or a connector over a direct path.
                    Some((n, to)) => self.tx.commit(n, Some(to)),
                    None => break,
                }
            }
            if !self.tx.pending() {
                return; // nothing produced
            }
            let full = self.tx.is_full();
            if !self.flush() || !full {
                return; // would block, or the core has no more
            }
        }
    }

    /// The core moved to another relay (drain or failover). The socket is
    /// not connected (direct paths share it), so only the address changes.
    fn switch_relay(&mut self, to: SocketAddr) {
        info!(from = %self.relay, %to, "switching relay");
        self.relay = to;
    }

    /// After a Goodbye: a new UDP socket (a new source port unless `listen`
    /// fixes one) for the next attempt, so a load balancer that keys on the
    /// 5-tuple picks a ready relay instead of following a stale conntrack
    /// entry to the one that is draining.
    fn new_socket(&mut self) {
        let to = self.core.relay();
        match ztna_udp::bind(self.listen).and_then(|s| Ok((s.local_addr()?, s))).map(|(l, s)| (s, l)) {
            Ok((sock, local)) => {
                self.tx.clear();
                self.rx.enable_gro(&sock);
                self.tx.enable_gso(&sock);
                self.sock = sock;
                self.relay = to;
                self.core.set_local(local);
                info!(%local, relay = %to, "new UDP socket for the next relay connection");
            }
            Err(e) => warn!(error = %e, "cannot open a new UDP socket; keeping the old one"),
        }
    }

    /// Sends the batch; false when the socket would block.
    fn flush(&mut self) -> bool {
        let (before, dropped) = (self.tx.unsent(), self.tx.dropped());
        let r = self.tx.flush(&self.sock);
        let lost = (self.tx.dropped() - dropped) as usize;
        self.io.udp_tx += (before - self.tx.unsent() - lost) as u64;
        match r {
            Ok(done) => done,
            Err(e) => {
                // Those datagrams are dropped (QUIC retransmits what
                // mattered); the rest went out.
                self.io.udp_send_errors += 1;
                debug!(error = %e, "UDP send");
                true
            }
        }
    }

    fn events(&mut self) {
        while let Some(e) = self.core.poll_event() {
            match e {
                AgentEvent::Connected => {
                    info!(relay = %self.relay, "connected");
                    out(format_args!("connected"));
                    if let Some(max) = self.core.max_packet_size() {
                        if max < self.mtu {
                            warn!(max, mtu = self.mtu, "the tunnel carries smaller packets than the device MTU");
                        }
                    }
                }
                AgentEvent::ObservedAddress(a) => {
                    info!(observed = %a, "observed address");
                    out(format_args!("observed address {a}"));
                }
                AgentEvent::Registered { service, flow } => {
                    info!(%service, flow, "registered");
                    out(format_args!("registered {service} flow {flow}"));
                }
                AgentEvent::RegisterFailed { service, code, reason } => {
                    warn!(%service, %code, reason, "registration refused");
                    out(format_args!("register failed {service} {code}"));
                }
                AgentEvent::Disconnected { reason, retry_in, repeated } => {
                    if self.rebind && retry_in != Duration::MAX {
                        self.rebind = false;
                        self.new_socket();
                    }
                    if retry_in == Duration::MAX {
                        info!(reason, "disconnected");
                    } else if repeated {
                        debug!(reason, retry_in_ms = retry_in.as_millis() as u64, "disconnected again; reconnecting");
                        out(format_args!("disconnected retry_in_ms={}", retry_in.as_millis()));
                    } else {
                        warn!(reason, retry_in_ms = retry_in.as_millis() as u64, "disconnected; reconnecting");
                        out(format_args!("disconnected retry_in_ms={}", retry_in.as_millis()));
                    }
                }
                AgentEvent::Goodbye { code } => {
                    self.rebind = true;
                    info!(%code, "relay says goodbye");
                    out(format_args!("goodbye {code}"));
                }
                AgentEvent::SessionUp { service, connector } => {
                    out(format_args!("session up {service} {connector}"));
                }
                AgentEvent::SessionClosed { service, reason } => {
                    out(format_args!("session closed {service} {reason}"));
                }
                AgentEvent::PathChanged { service, direct, state } => self.report_path(&service, direct, state),
            }
        }
    }

    fn print_stats(&self) {
        let s = self.core.stats();
        let io = self.io;
        let o = self.rx.offload_stats().snapshot();
        info!(?s, ?io, ?o, "stats");
        let offload = [
            ("udp_gso", u64::from(o.gso)),
            ("udp_gro", u64::from(o.gro)),
            ("udp_gso_sends", o.gso_sends),
            ("udp_gso_errors", o.gso_errors),
            ("udp_gro_receives", o.gro_receives),
        ];
        let mut line = String::from("stats");
        for (k, v) in s.fields().into_iter().chain(io.fields()).chain(offload) {
            line.push_str(&format!(" {k}={v}"));
        }
        out(format_args!("{line}"));
        out(format_args!("status {}", status::status_json(&self.core, self.started, Instant::now())));
    }

    /// CONNECTION_CLOSE to the relay (best effort, ~100 ms), final stats.
    fn shutdown(&mut self) {
        info!("shutting down");
        self.core.close();
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            self.transmit(Instant::now());
            self.events();
            std::thread::sleep(Duration::from_millis(10));
        }
        self.print_stats();
    }
}
