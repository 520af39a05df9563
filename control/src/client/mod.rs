//! The client session: connect, hello, register, keep alive, reconnect,
//! observed address. Written once, sans-I/O, and driven by the agent, the
//! connector and the benchmark alike.
//!
//! The caller owns the UDP socket and the clock. It feeds received packets
//! with [`ClientSession::recv`], drains packets to send with
//! [`ClientSession::poll_transmit`], calls [`ClientSession::handle_timeout`]
//! at [`ClientSession::next_deadline`], and reads [`Event`]s. (quiche itself
//! reads the monotonic clock for loss recovery; every timer of ours uses the
//! `now` passed in.)

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::codes::Code;
use crate::datagram;
use crate::quic::ClientTls;
use crate::rng::SplitMix64;
use crate::tls_report::{HandshakeReport, OncePerCause};
use crate::wire::{self, FrameDecoder, Message, Role, ServiceName};

/// Stream that carries the control channel.
pub const CONTROL_STREAM: u64 = 0;
/// Bound on queued events; beyond it events are dropped and counted.
pub const MAX_EVENTS: usize = 4096;

/// What a session is configured with.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Relay address to connect to first.
    pub relay: SocketAddr,
    /// Other relays (replicas) to fail over to: each reconnect after a lost
    /// connection or a Goodbye moves to the next address of
    /// `[relay, fallbacks...]`, round robin.
    pub fallbacks: Vec<SocketAddr>,
    /// On Goodbye{DRAINING} or Goodbye{SHUTDOWN}: close at once and
    /// reconnect (to the next relay) after a short jitter. Agents want this;
    /// a connector pinned to one relay keeps serving the agents still on a
    /// draining relay and waits for its close instead.
    pub leave_on_goodbye: bool,
    /// Local address of the caller's socket (reported to quiche).
    pub local: SocketAddr,
    /// TLS server name to send and verify.
    pub server_name: String,
    /// Registrations to hold; re-sent after every reconnect.
    pub registrations: Vec<(Role, ServiceName)>,
    /// Send a PING when nothing was sent for this long.
    pub keepalive: Duration,
    /// Give up on an established connection when nothing at all arrived
    /// from the relay for this long (a live relay acknowledges the keepalive
    /// PINGs within a round trip), and move on to the next relay, well
    /// before the 30 s QUIC idle timeout. Must exceed `keepalive`.
    pub silence_timeout: Duration,
    /// Give up on a connection attempt the relay has not answered (QUIC
    /// handshake + HelloAck) within this time, and back off.
    pub handshake_timeout: Duration,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Free-form software name sent in Hello.
    pub software: String,
}

impl ClientConfig {
    pub fn new(relay: SocketAddr, local: SocketAddr, server_name: &str) -> Self {
        ClientConfig {
            relay,
            fallbacks: Vec::new(),
            leave_on_goodbye: true,
            local,
            server_name: server_name.to_owned(),
            registrations: Vec::new(),
            keepalive: Duration::from_secs(10),
            silence_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            software: format!("ztna-control/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Something the session wants its driver to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Handshake done and Hello acknowledged.
    Connected,
    /// The relay's view of our address (first after connect, then on change).
    ObservedAddress(SocketAddr),
    /// A registration succeeded; for agents `flow` tags datagrams.
    Registered { role: Role, service: ServiceName, flow: u32 },
    /// A registration was refused.
    RegisterFailed { role: Role, service: ServiceName, code: Code, reason: String },
    /// Connector side: an agent flow now reaches us.
    FlowOpened { flow: u32, service: u32, agent_addr: SocketAddr, agent_id: String },
    /// Agent side: `flow` is bound to the connector `connector_id` (its
    /// SPIFFE ID); the end-to-end session must prove that identity.
    FlowBound { flow: u32, connector_id: String },
    /// A flow was closed by the relay.
    FlowClosed { flow: u32, code: Code },
    /// The relay announced it is going away.
    Goodbye { code: Code, reason: String },
    /// The connection ended; a new attempt follows after `retry_in`.
    /// `repeated`: the same reason was reported less than a minute ago
    /// (drivers log it at debug level then, so a failing handshake leaves
    /// one warning per cause and minute).
    Disconnected { reason: String, retry_in: Duration, repeated: bool },
}

/// Why a datagram could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No established connection right now.
    NotConnected,
    /// Larger than the path allows.
    TooLarge,
    /// quiche's bounded send queue is full (counted by the caller).
    QueueFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RegState {
    Unsent,
    Pending(u32),
    Registered(u32),
    /// Refused; retried at `retry_at` when the refusal may be temporary
    /// (no connector yet, a limit, the flow closed).
    Failed {
        code: Code,
        retry_at: Option<Instant>,
    },
}

/// Upper bound of the random wait before reconnecting after a Goodbye:
/// spreads a relay's clients over this window when they all move at once.
pub const GOODBYE_JITTER: Duration = Duration::from_millis(250);

/// Delay before a temporarily refused registration is retried.
pub const REGISTER_RETRY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
struct Registration {
    role: Role,
    service: ServiceName,
    state: RegState,
}

enum Phase {
    /// No connection; the next attempt starts at `retry_at`.
    Waiting { retry_at: Instant },
    /// A QUIC connection exists (handshaking or established).
    Live { conn: Box<quiche::Connection>, hello_acked: bool, last_send: Instant, last_recv: Instant, started: Instant },
    /// Closed for good by [`ClientSession::close`].
    Stopped,
}

/// Counters a driver may export.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientStats {
    pub connects: u64,
    pub disconnects: u64,
    pub events_dropped: u64,
    pub datagrams_dropped_queue_full: u64,
    /// Received datagrams larger than the caller's buffer (dropped).
    pub datagrams_dropped_too_large: u64,
}

/// One client's session with a relay (sans-I/O).
pub struct ClientSession {
    cfg: ClientConfig,
    quic: quiche::Config,
    /// Filled by the TLS verification hook: why the relay was refused.
    report: std::sync::Arc<HandshakeReport>,
    reasons: OncePerCause,
    phase: Phase,
    rng: SplitMix64,
    backoff: Backoff,
    regs: Vec<Registration>,
    next_request: u32,
    rx: FrameDecoder,
    tx: Vec<u8>,
    events: VecDeque<Event>,
    observed: Option<SocketAddr>,
    stats: ClientStats,
    scratch: Vec<u8>,
    /// The `now` of the current entry point.
    now: Instant,
    /// [`ClientSession::close`] was called: never reconnect.
    stop_requested: bool,
    /// Index into `[relay, fallbacks...]` of the current/next attempt.
    relay_index: usize,
    /// A Goodbye arrived and we are leaving: the next attempt goes to the
    /// next relay after at most [`GOODBYE_JITTER`].
    leaving: bool,
}

impl ClientSession {
    /// Creates a session that connects at once (on the first
    /// `poll_transmit`). `quic` comes from [`crate::quic::client_tls`]
    /// (a bare `quiche::Config` works too, without the IP-address check
    /// and the reasons a handshake failed).
    pub fn new(cfg: ClientConfig, quic: impl Into<ClientTls>, seed: u64, now: Instant) -> Self {
        let ClientTls { quic, report } = quic.into();
        let regs = cfg
            .registrations
            .iter()
            .map(|(role, service)| Registration { role: *role, service: service.clone(), state: RegState::Unsent })
            .collect();
        let backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
        ClientSession {
            cfg,
            quic,
            report,
            reasons: OncePerCause::new(Duration::from_secs(60)),
            phase: Phase::Waiting { retry_at: now },
            rng: SplitMix64::new(seed),
            backoff,
            regs,
            next_request: 1,
            rx: FrameDecoder::default(),
            tx: Vec::new(),
            events: VecDeque::new(),
            observed: None,
            stats: ClientStats::default(),
            scratch: Vec::with_capacity(2048),
            now,
            stop_requested: false,
            relay_index: 0,
            leaving: false,
        }
    }

    /// Sets the local address reported to quiche for the next connection
    /// attempt (the driver rebound its socket).
    pub fn set_local(&mut self, local: SocketAddr) {
        if self.cfg.local == local {
            return;
        }
        self.cfg.local = local;
        // An attempt that started on the old address would never hear the
        // relay's answers (quiche drops packets on a path it does not
        // know): start it again on the new one. An established connection
        // keeps its path; the address applies from the next connection.
        if matches!(&self.phase, Phase::Live { conn, .. } if !conn.is_established()) {
            let now = self.now;
            self.start_connection(now);
        }
    }

    /// The relay of the current (or next) connection attempt.
    pub fn relay(&self) -> SocketAddr {
        match self.relay_index {
            0 => self.cfg.relay,
            i => self.cfg.fallbacks.get(i - 1).copied().unwrap_or(self.cfg.relay),
        }
    }

    /// Adds a registration (sent now if connected, and after each reconnect).
    pub fn register(&mut self, role: Role, service: ServiceName) {
        if self.regs.iter().any(|r| r.role == role && r.service == service) {
            return;
        }
        self.regs.push(Registration { role, service, state: RegState::Unsent });
        self.queue_registrations();
    }

    /// True once the relay acknowledged our Hello on the current connection.
    /// Refuses a flow the relay opened (a connector's own allow-list):
    /// sends FlowClose{flow, code}; the relay closes the agent's side.
    pub fn refuse_flow(&mut self, flow: u32, code: Code) {
        if self.is_connected() {
            Message::FlowClose { flow, code }.encode(&mut self.tx);
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Live { hello_acked: true, .. })
    }

    /// The last observed address the relay reported.
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// The flow id of an agent registration, once registered.
    pub fn flow_for(&self, service: &ServiceName) -> Option<u32> {
        self.regs.iter().find_map(|r| match r.state {
            RegState::Registered(flow) if r.role == Role::Agent && &r.service == service => Some(flow),
            _ => None,
        })
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// quiche's view of the connection, for benchmarks and diagnostics.
    pub fn quic_stats(&self) -> Option<quiche::Stats> {
        match &self.phase {
            Phase::Live { conn, .. } => Some(conn.stats()),
            _ => None,
        }
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.stats.events_dropped += 1;
        } else {
            self.events.push_back(e);
        }
    }

    /// Feeds one received UDP payload. `buf` is decrypted in place.
    pub fn recv(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        self.now = now;
        let Phase::Live { conn, last_recv, .. } = &mut self.phase else {
            return;
        };
        // Errors here are per-packet (undecryptable, stale): quiche drops the
        // packet and the connection carries on, or reports itself closed.
        if conn.recv(buf, quiche::RecvInfo { from, to: self.cfg.local }).is_ok() {
            *last_recv = now;
        }
        self.after_io(now);
    }

    /// How long nothing arrived from the relay (None while not connected).
    /// End-to-end sessions carried by this relay hold their loss recovery
    /// while it is longer than [`crate::e2e::RELAY_STALL`].
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        match &self.phase {
            Phase::Live { last_recv, .. } => Some(now.saturating_duration_since(*last_recv)),
            _ => None,
        }
    }

    /// Asks the relay for a sign of life: the next packet is ack-eliciting
    /// (a PING if nothing else), so a relay that is there answers within a
    /// round trip. For end-to-end sessions that hold their loss recovery
    /// while the relay is quiet: an idle relay would otherwise never be
    /// heard again and hold them for good.
    pub fn ping_relay(&mut self) {
        if let Phase::Live { conn, hello_acked: true, .. } = &mut self.phase {
            let _ = conn.send_ack_eliciting();
        }
    }

    /// Reads the next received datagram into `out` (flow header included,
    /// see [`datagram::parse`]); returns its length.
    /// Datagrams longer than `out` are dropped and counted
    /// (`datagrams_dropped_too_large`), and the next one is returned.
    pub fn recv_datagram(&mut self, out: &mut [u8]) -> Option<usize> {
        let Phase::Live { conn, .. } = &mut self.phase else {
            return None;
        };
        loop {
            let len = conn.dgram_recv_front_len()?;
            if len <= out.len() {
                return conn.dgram_recv(out).ok();
            }
            // quiche pops the datagram before it reports the short buffer.
            let _ = conn.dgram_recv(&mut []);
            self.stats.datagrams_dropped_too_large += 1;
        }
    }

    /// Queues a datagram for `flow`.
    pub fn send_datagram(&mut self, flow: u32, payload: &[u8]) -> Result<(), SendError> {
        let Phase::Live { conn, hello_acked: true, .. } = &mut self.phase else {
            return Err(SendError::NotConnected);
        };
        let max = conn.dgram_max_writable_len().ok_or(SendError::NotConnected)?;
        if datagram::header_len(flow) + payload.len() > max {
            return Err(SendError::TooLarge);
        }
        datagram::encode_into(flow, payload, &mut self.scratch);
        match conn.dgram_send(&self.scratch) {
            Ok(()) => Ok(()),
            Err(quiche::Error::Done) => {
                self.stats.datagrams_dropped_queue_full += 1;
                Err(SendError::QueueFull)
            }
            Err(quiche::Error::BufferTooShort) => Err(SendError::TooLarge),
            Err(_) => Err(SendError::NotConnected),
        }
    }

    /// Whether [`ClientSession::send_datagram`] has room in the DATAGRAM
    /// queue now. Callers that produce datagrams from another sender's
    /// packets (the end-to-end sessions) check this first and leave the
    /// packets with that sender, so a full queue becomes backpressure
    /// instead of loss inside the inner session.
    pub fn datagram_room(&self) -> bool {
        match &self.phase {
            Phase::Live { conn, hello_acked: true, .. } => conn.dgram_send_queue_len() < crate::quic::DGRAM_QUEUE_LEN,
            _ => false,
        }
    }

    /// Largest datagram payload (after the flow header of `flow`) that fits now.
    pub fn max_datagram_payload(&self, flow: u32) -> Option<usize> {
        match &self.phase {
            Phase::Live { conn, .. } => {
                conn.dgram_max_writable_len().map(|m| m.saturating_sub(datagram::header_len(flow)))
            }
            _ => None,
        }
    }

    /// Writes the next packet to send into `out`: `(len, destination)`.
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        self.now = now;
        if let Phase::Waiting { retry_at } = self.phase {
            if now >= retry_at {
                self.start_connection(now);
            }
        }
        self.flush_control();
        let Phase::Live { conn, last_send, .. } = &mut self.phase else {
            return None;
        };
        match conn.send(out) {
            Ok((n, info)) => {
                *last_send = now;
                Some((n, info.to))
            }
            Err(_) => {
                self.after_io(now);
                None
            }
        }
    }

    /// When [`ClientSession::handle_timeout`] should run next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { retry_at } => Some(*retry_at),
            Phase::Live { conn, hello_acked, last_send, last_recv, started } => {
                let quic = conn.timeout_instant();
                let handshake = (!hello_acked).then(|| *started + self.cfg.handshake_timeout);
                let keep =
                    hello_acked.then(|| (*last_send + self.cfg.keepalive).min(*last_recv + self.cfg.silence_timeout));
                let retry = self
                    .regs
                    .iter()
                    .filter_map(|r| match r.state {
                        RegState::Failed { retry_at, .. } if *hello_acked => retry_at,
                        _ => None,
                    })
                    .min();
                [quic, keep, retry, handshake].into_iter().flatten().min()
            }
            Phase::Stopped => None,
        }
    }

    /// Runs expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        for r in &mut self.regs {
            if let RegState::Failed { retry_at: Some(t), .. } = r.state {
                if t <= now {
                    r.state = RegState::Unsent;
                }
            }
        }
        match &mut self.phase {
            Phase::Waiting { retry_at } if now >= *retry_at => self.start_connection(now),
            Phase::Live { hello_acked: false, started, .. } if now >= *started + self.cfg.handshake_timeout => {
                // The relay did not answer (down, unreachable, filtered):
                // give up on this attempt and back off, rather than wait
                // for the 30 s idle timeout.
                let reason = format!("no answer from relay within {:?}", self.cfg.handshake_timeout);
                self.schedule_reconnect(now, reason);
            }
            Phase::Live { hello_acked: true, last_recv, .. } if now >= *last_recv + self.cfg.silence_timeout => {
                // Nothing from the relay, not even ACKs of our PINGs: it is
                // gone or unreachable. Move on without waiting for the idle
                // timeout (nothing to send it: just drop the connection).
                let reason = format!("relay silent for {:?}", self.cfg.silence_timeout);
                self.schedule_reconnect(now, reason);
            }
            Phase::Live { conn, hello_acked, last_send, .. } => {
                if conn.timeout_instant().is_some_and(|t| t <= now) {
                    conn.on_timeout();
                }
                if *hello_acked && now >= *last_send + self.cfg.keepalive {
                    // A PING keeps NAT bindings and the relay's idle timer
                    // fresh. Re-arm the timer now: if congestion control
                    // holds the PING back, the deadline must not stay in the
                    // past (a busy loop for the driver).
                    let _ = conn.send_ack_eliciting();
                    *last_send = now;
                }
                self.after_io(now);
            }
            _ => {}
        }
    }

    /// Closes the connection for good (no reconnect).
    pub fn close(&mut self) {
        self.stop_requested = true;
        if let Phase::Live { conn, .. } = &mut self.phase {
            let _ = conn.close(true, u64::from(Code::NO_ERROR.0), b"client closing");
            // Keep the connection until quiche emitted the CONNECTION_CLOSE.
        } else {
            self.phase = Phase::Stopped;
        }
    }

    /// True once [`ClientSession::close`] has finished.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    fn start_connection(&mut self, now: Instant) {
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        self.rng.fill(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);
        let relay = self.relay();
        // An IP address is checked by the hook against the IP SANs, and
        // never sent as SNI; a name goes to BoringSSL (SNI and DNS SANs).
        self.report.expect(&self.cfg.server_name);
        let by_ip = self.report.checks_ip() && self.cfg.server_name.parse::<std::net::IpAddr>().is_ok();
        let sni = (!by_ip).then_some(self.cfg.server_name.as_str());
        match quiche::connect(sni, &scid, self.cfg.local, relay, &mut self.quic) {
            Ok(conn) => {
                self.stats.connects += 1;
                self.leaving = false;
                self.rx = FrameDecoder::default();
                self.tx.clear();
                for r in &mut self.regs {
                    r.state = RegState::Unsent;
                }
                Message::Hello { version: wire::VERSION, software: self.cfg.software.clone() }.encode(&mut self.tx);
                self.phase = Phase::Live {
                    conn: Box::new(conn),
                    hello_acked: false,
                    last_send: now,
                    last_recv: now,
                    started: now,
                };
            }
            Err(e) => self.schedule_reconnect(now, format!("connect failed: {e}")),
        }
    }

    fn disconnected(&mut self, reason: String, retry_in: Duration, now: Instant) {
        let repeated = !self.reasons.allow(&reason, now);
        self.push_event(Event::Disconnected { reason, retry_in, repeated });
    }

    fn schedule_reconnect(&mut self, now: Instant, reason: String) {
        if self.stop_requested {
            // Closed for good while the attempt timed out: no new attempt.
            self.phase = Phase::Stopped;
            self.disconnected(reason, Duration::MAX, now);
            return;
        }
        let retry_in = if self.leaving {
            GOODBYE_JITTER.mul_f64(self.rng.next_f64())
        } else {
            self.backoff.next_delay(&mut self.rng)
        };
        // One prompt attempt per Goodbye; failures after it back off.
        self.leaving = false;
        // Every lost connection moves on to the next replica, if any.
        self.relay_index = (self.relay_index + 1) % (self.cfg.fallbacks.len() + 1);
        self.stats.disconnects += 1;
        self.phase = Phase::Waiting { retry_at: now + retry_in };
        self.disconnected(reason, retry_in, now);
    }

    /// Processes what a recv/timeout may have produced: control messages,
    /// closure.
    fn after_io(&mut self, now: Instant) {
        self.read_control();
        self.queue_registrations();
        self.flush_control();
        let Phase::Live { conn, .. } = &self.phase else {
            return;
        };
        // Leaving after a Goodbye: once our CONNECTION_CLOSE is out
        // (draining), nothing more is needed from this connection.
        if !(conn.is_closed() || (self.leaving && conn.is_draining())) {
            return;
        }
        let reason = crate::tls_report::close_reason(conn, self.report.take_failure());
        if self.stop_requested {
            self.phase = Phase::Stopped;
            self.disconnected(reason, Duration::MAX, now);
        } else {
            self.schedule_reconnect(now, reason);
        }
    }

    fn read_control(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            let Phase::Live { conn, .. } = &mut self.phase else {
                return;
            };
            let room = self.rx.room().min(buf.len());
            if room == 0 {
                break;
            }
            match conn.stream_recv(CONTROL_STREAM, &mut buf[..room]) {
                Ok((n, _fin)) if n > 0 => self.rx.push(&buf[..n]),
                _ => break,
            }
            loop {
                match self.rx.next_message() {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(e.code(), "bad control frame from relay");
                        return;
                    }
                }
            }
        }
    }

    fn fail(&mut self, code: Code, reason: &str) {
        if let Phase::Live { conn, .. } = &mut self.phase {
            let _ = conn.close(true, u64::from(code.0), reason.as_bytes());
        }
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::HelloAck { version } if version == wire::VERSION => {
                if let Phase::Live { hello_acked, .. } = &mut self.phase {
                    *hello_acked = true;
                }
                self.backoff.reset();
                self.push_event(Event::Connected);
            }
            Message::ObservedAddress { addr } => {
                self.observed = Some(addr);
                self.push_event(Event::ObservedAddress(addr));
            }
            Message::RegisterOk { request_id, flow } => {
                if let Some(r) = self.regs.iter_mut().find(|r| r.state == RegState::Pending(request_id)) {
                    r.state = RegState::Registered(flow);
                    let e = Event::Registered { role: r.role, service: r.service.clone(), flow };
                    self.push_event(e);
                }
            }
            Message::RegisterError { request_id, code, reason } => {
                if let Some(r) = self.regs.iter_mut().find(|r| r.state == RegState::Pending(request_id)) {
                    let temporary = matches!(code, Code::UNKNOWN_SERVICE | Code::LIMIT);
                    let retry_at = temporary.then(|| self.now + REGISTER_RETRY.mul_f64(1.0 + self.rng.next_f64()));
                    r.state = RegState::Failed { code, retry_at };
                    let e = Event::RegisterFailed { role: r.role, service: r.service.clone(), code, reason };
                    self.push_event(e);
                }
            }
            Message::FlowOpen { flow, service, agent_addr, agent_id } => {
                self.push_event(Event::FlowOpened { flow, service, agent_addr, agent_id });
            }
            Message::FlowClose { flow, code } => {
                // An agent flow whose connector left is re-registered soon;
                // a registration the policy revoked (denied) is not retried
                // on this connection.
                let retry_at = (code != Code::DENIED).then(|| self.now + REGISTER_RETRY);
                for r in &mut self.regs {
                    if r.state == RegState::Registered(flow) && (r.role == Role::Agent || code == Code::DENIED) {
                        r.state = RegState::Failed { code, retry_at };
                    }
                }
                self.push_event(Event::FlowClosed { flow, code });
            }
            Message::Goodbye { code, reason } => {
                // The relay goes away: reconnect promptly rather than with a
                // grown backoff. Leaving at once (to the next relay) keeps
                // the gap to one handshake; otherwise wait for its close.
                self.backoff.reset();
                if self.cfg.leave_on_goodbye && !self.stop_requested {
                    self.leaving = true;
                    if let Phase::Live { conn, .. } = &mut self.phase {
                        let _ = conn.close(true, u64::from(Code::NO_ERROR.0), b"leaving: relay said goodbye");
                    }
                }
                self.push_event(Event::Goodbye { code, reason });
            }
            Message::Error { code, reason } => {
                self.push_event(Event::Goodbye { code, reason });
            }
            Message::FlowBound { flow, connector_id } => {
                self.push_event(Event::FlowBound { flow, connector_id });
            }
            Message::Unknown { .. } => {}
            Message::SessionHello { .. }
            | Message::Candidates { .. }
            | Message::PunchNow { .. }
            | Message::HelloAck { .. }
            | Message::Hello { .. }
            | Message::Register { .. }
            | Message::Unregister { .. } => self.fail(Code::UNEXPECTED_MESSAGE, "unexpected message from relay"),
        }
    }

    fn queue_registrations(&mut self) {
        if !self.is_connected() {
            return;
        }
        for r in &mut self.regs {
            if r.state == RegState::Unsent {
                let request_id = self.next_request;
                self.next_request = self.next_request.wrapping_add(1).max(1);
                Message::Register { request_id, role: r.role, service: r.service.clone() }.encode(&mut self.tx);
                r.state = RegState::Pending(request_id);
            }
        }
    }

    fn flush_control(&mut self) {
        let Phase::Live { conn, .. } = &mut self.phase else {
            return;
        };
        if self.tx.is_empty() {
            return;
        }
        if let Ok(n) = conn.stream_send(CONTROL_STREAM, &self.tx, false) {
            self.tx.drain(..n);
        }
    }
}

#[cfg(test)]
mod tests;
