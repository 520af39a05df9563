//! One end-to-end session, sans I/O: inner QUIC packets (as carried by a
//! relay flow) and `now` in; inner packets, tunneled IP packets and events
//! out.
//!
//! States: `Handshaking` (TLS, both certificates checked by the verify
//! hook) → `Hello` (agent: its SessionHello sent, waiting for the
//! connector's; connector: waiting for the agent's, then for the engine to
//! [`E2eSession::admit`] or [`E2eSession::refuse`]) → `Up` (IP packets flow
//! both ways) → `Closed`. No IP packet is sent before `Up`: the agent's wait
//! in a queue of [`MAX_PENDING`] (the rest are refused and counted by the
//! caller); the connector drops (and counts) DATAGRAMs that arrive before it
//! admitted the session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::codes::Code;
use crate::identity::Identity;
use crate::wire::{self, FrameDecoder, Message, ServiceName};

use super::direct::Via;
use super::paths::{DirectConfig, PathManager};
use super::{CID_LEN, CLOSE_BAD_CERTIFICATE, RELAY_PATH_LOCAL, RELAY_PATH_PEER};

/// Tunneled packets an agent holds while its session comes up.
pub const MAX_PENDING: usize = 32;
/// The inner stream carrying end-to-end control messages.
const CONTROL_STREAM: u64 = 0;
/// An ack-eliciting packet after this much send silence (keeps the relay
/// flow and the peer's idle timer fresh).
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Agent side: nothing authenticated from the connector for this long
/// while a relay flow carries the session: the session is gone (a
/// connector that lost our state answers nothing we can decrypt). Not
/// counted while no flow carries it (a relay failover takes up to the relay
/// session's 15 s silence timeout plus a reconnect); the connector side
/// relies on the QUIC idle timeout alone, as it cannot tell a dead agent
/// from one between relays.
const SILENCE: Duration = Duration::from_secs(25);
/// Handshake and Hello exchange must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Delayed ACKs (once `Up`): quiche acknowledges on every send, so a
/// session that received a packet and has nothing of its own to send
/// would spend a whole inner packet (and an outer DATAGRAM, and a relay
/// forward) on an ACK. It waits instead for its next tunneled packet, which
/// carries the ACK, for at most this long, or until [`ACK_EVERY`] packets
/// are unacknowledged (RFC 9000 §13.2.2 recommends acknowledging every
/// second ack-eliciting packet). Well below the 25 ms max_ack_delay the
/// session advertises, which the peer adds to its probe timeout.
pub const ACK_DELAY: Duration = Duration::from_millis(5);
const ACK_EVERY: u32 = 2;

/// A PunchNow nonce: unpredictable to anyone but this end (BoringSSL's
/// RNG; it fails only when the process has no entropy source at all).
fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    let _ = boring::rand::rand_bytes(&mut b);
    u64::from_le_bytes(b)
}

/// Where a session is (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Handshaking,
    Hello,
    Up,
    Closed,
}

/// What a session reports to its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The TLS handshake completed; the peer proved `peer`.
    Established { peer: Identity },
    /// Connector side: the agent asks for `service`; answer with
    /// [`E2eSession::admit`] or [`E2eSession::refuse`].
    Hello { service: ServiceName },
    /// Both ends accepted the session; IP packets flow.
    Up,
    /// The session ended. `code` is the QUIC close code (application codes
    /// are [`Code`] values; `CLOSE_BAD_CERTIFICATE` is the TLS alert).
    Closed { reason: String, code: Option<u64>, identity_mismatch: bool },
    /// This end issued a connection ID for new paths: packets to it belong
    /// to this session (the engine routes direct packets by it).
    NewCid([u8; CID_LEN]),
    /// The peer retired a connection ID this end had issued.
    RetiredCid([u8; CID_LEN]),
}

/// Why an IP packet was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendIpError {
    /// Larger than the inner session carries.
    TooLarge,
    /// The pending queue (before `Up`) or the DATAGRAM queue is full.
    Full,
    /// The session is closed.
    Closed,
    /// The path policy keeps tunneled packets off the relay and no direct
    /// path is up (`direct-only`).
    NoPath,
}

/// One inner QUIC connection.
pub struct E2eSession {
    pub(super) conn: quiche::Connection,
    pub(super) server: bool,
    state: SessionState,
    trust_domain: String,
    /// Agent: the connector identity the relay named; the certificate
    /// must carry it.
    expect: Option<String>,
    peer: Option<Identity>,
    /// Agent: the service asked for; connector: the service the agent asked for.
    service: Option<ServiceName>,
    scid: [u8; CID_LEN],
    pending: VecDeque<Vec<u8>>,
    pub(super) events: VecDeque<SessionEvent>,
    rx: FrameDecoder,
    pub(super) tx: Vec<u8>,
    /// quiche's count of packets it authenticated, and of DATAGRAMs it
    /// received, at the last look.
    recv_count: usize,
    dgram_recv_count: usize,
    rejected: u64,
    early_dropped: u64,
    pending_lost: u64,
    truncated: u64,
    identity_mismatch: bool,
    /// Agent: the connector answered with a stateless reset.
    reset: bool,
    /// A relay flow carries the session now (agent side).
    carried: bool,
    uncarried_since: Instant,
    /// The relay leg went quiet ([`E2eSession::set_stalled`]).
    stalled: bool,
    started: Instant,
    last_rx: Instant,
    last_tx: Instant,
    /// Authenticated packets with DATAGRAMs since our last send, and when
    /// the ACK for them is due at the latest ([`ACK_DELAY`]).
    unacked: u32,
    ack_due: Option<Instant>,
    /// A timer fired or a keepalive is queued: send without delay.
    pub(super) must_send: bool,
    /// Direct paths (docs/protocol/direct.md).
    pub(super) paths: PathManager,
    /// Connector: what the tokens of the connection IDs it issues derive from.
    pub(super) reset_key: Option<super::ResetKey>,
    /// Agent: the destination CID (sequence number) each probed path took,
    /// retired when its validation fails so quiche can drop the path.
    pub(super) probe_dcids: Vec<(std::net::SocketAddr, u64)>,
    /// The latest `now` the session was given.
    now: Instant,
}

impl E2eSession {
    /// Agent side: opens a session toward the connector the relay named
    /// (`expect`, a SPIFFE URI), for `service`.
    pub fn connect(
        cfg: &mut quiche::Config,
        scid: [u8; CID_LEN],
        trust_domain: &str,
        expect: &str,
        service: ServiceName,
        now: Instant,
    ) -> Result<E2eSession, quiche::Error> {
        let id = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(None, &id, RELAY_PATH_LOCAL, RELAY_PATH_PEER, cfg)?;
        Ok(Self::new(conn, false, scid, trust_domain, Some(expect.to_owned()), Some(service), now))
    }

    /// Connector side: a session for an agent's first Initial packet. It
    /// announces the stateless reset token `reset` gives for `scid`.
    pub fn accept(
        cfg: &mut quiche::Config,
        scid: [u8; CID_LEN],
        trust_domain: &str,
        reset: &super::ResetKey,
        now: Instant,
    ) -> Result<E2eSession, quiche::Error> {
        cfg.set_stateless_reset_token(Some(reset.token(&scid)));
        let id = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::accept(&id, None, RELAY_PATH_LOCAL, RELAY_PATH_PEER, cfg)?;
        let mut s = Self::new(conn, true, scid, trust_domain, None, None, now);
        s.reset_key = Some(reset.clone());
        Ok(s)
    }

    fn new(
        conn: quiche::Connection,
        server: bool,
        scid: [u8; CID_LEN],
        trust_domain: &str,
        expect: Option<String>,
        service: Option<ServiceName>,
        now: Instant,
    ) -> E2eSession {
        E2eSession {
            conn,
            server,
            state: SessionState::Handshaking,
            trust_domain: trust_domain.to_owned(),
            expect,
            peer: None,
            service,
            scid,
            pending: VecDeque::new(),
            events: VecDeque::new(),
            rx: FrameDecoder::default(),
            tx: Vec::new(),
            recv_count: 0,
            dgram_recv_count: 0,
            rejected: 0,
            early_dropped: 0,
            pending_lost: 0,
            truncated: 0,
            identity_mismatch: false,
            reset: false,
            carried: true,
            uncarried_since: now,
            stalled: false,
            started: now,
            last_rx: now,
            last_tx: now,
            unacked: 0,
            ack_due: None,
            must_send: false,
            paths: PathManager::new(DirectConfig::default(), !server, Box::new(random_nonce), now),
            reset_key: None,
            probe_dcids: Vec::new(),
            now,
        }
    }

    /// Timings of direct paths (before the session is up).
    pub fn set_direct_config(&mut self, cfg: DirectConfig) {
        self.paths = PathManager::new(cfg, !self.server, Box::new(random_nonce), self.now);
    }

    pub fn state(&self) -> SessionState {
        self.state
    }

    pub fn is_up(&self) -> bool {
        self.state == SessionState::Up
    }

    pub fn is_closed(&self) -> bool {
        self.state == SessionState::Closed
    }

    /// The inner connection's path: RTT, congestion window, packets sent,
    /// lost and probe timeouts (for status reports).
    pub fn path_stats(&self) -> Option<quiche::PathStats> {
        self.conn.path_stats().next()
    }

    /// The identity the peer proved (after `Established`).
    pub fn peer(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }

    /// The service of the session (agent: asked for; connector: after `Hello`).
    pub fn service(&self) -> Option<&ServiceName> {
        self.service.as_ref()
    }

    /// The connection ID this end issued (what the peer's packets carry).
    pub fn source_id(&self) -> [u8; CID_LEN] {
        self.scid
    }

    /// Packets that failed authentication (forged, altered, or for keys
    /// this session does not have).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Received packets dropped because the caller's buffer was too small.
    pub fn truncated(&self) -> u64 {
        self.truncated
    }

    /// Agent: packets queued before `Up` that the DATAGRAM queue had no
    /// room for when the session came up (dropped).
    pub fn pending_lost(&self) -> u64 {
        self.pending_lost
    }

    /// Connector: DATAGRAMs the agent sent before the session was admitted.
    pub fn early_dropped(&self) -> u64 {
        self.early_dropped
    }

    /// Whether quiche is done with the connection (closing packets sent,
    /// draining over): the engine may forget it.
    pub fn is_finished(&self) -> bool {
        self.conn.is_closed()
    }

    /// Whether the handshake completed (counts a successful handshake).
    pub fn handshake_done(&self) -> bool {
        self.peer.is_some()
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// One inner packet from a relay flow ([`E2eSession::recv_via`]).
    pub fn recv(&mut self, pkt: &mut [u8], now: Instant) -> bool {
        self.recv_via(pkt, Via::Relay, now)
    }

    /// One inner packet that came `via` a relay flow or a direct path.
    /// Returns whether quiche authenticated anything in it; packets it
    /// could not are counted in [`E2eSession::rejected`].
    pub fn recv_via(&mut self, pkt: &mut [u8], via: Via, now: Instant) -> bool {
        self.now = now;
        if self.is_closed() {
            return false;
        }
        let (to, from) = via.quic_addrs();
        let info = quiche::RecvInfo { from, to };
        let _ = self.conn.recv(pkt, info);
        let stats = self.conn.stats();
        let authentic = stats.recv > self.recv_count;
        self.recv_count = stats.recv;
        // Only packets carrying DATAGRAMs (tunneled packets) have their ACK
        // delayed; anything else is acknowledged as quiche sees fit.
        let tunneled = stats.dgram_recv > self.dgram_recv_count;
        self.dgram_recv_count = stats.dgram_recv;
        if !authentic && self.conn.is_closed() && self.conn.local_error().is_none() && self.conn.peer_error().is_none()
        {
            // quiche took it for the stateless reset the connector announced.
            self.reset = true;
        }
        self.path_events(now);
        if authentic && via == Via::Relay && self.state == SessionState::Up && !self.paths.relay_allowed() {
            // A direct-only policy: tunneled packets that came through the
            // relay anyway are dropped (counted as early drops).
            let mut scratch = [0u8; 1];
            while self.conn.dgram_recv_queue_len() > 0 {
                let _ = self.conn.dgram_recv(&mut scratch);
                self.early_dropped += 1;
            }
        }
        if authentic {
            self.path_rx(via, now);
            self.last_rx = now;
            if tunneled && self.state == SessionState::Up {
                self.unacked += 1;
                self.ack_due.get_or_insert(now + ACK_DELAY);
            }
        } else if !self.reset {
            self.rejected += 1;
        }
        self.progress();
        authentic
    }

    /// Handshake completion, control messages, early DATAGRAMs, closure.
    fn progress(&mut self) {
        if self.state == SessionState::Handshaking && self.conn.is_established() {
            self.established();
        }
        if matches!(self.state, SessionState::Hello | SessionState::Up) {
            self.read_control();
        }
        if self.server && self.state != SessionState::Up {
            // quiche pops a DATAGRAM even when the buffer is too short.
            let mut scratch = [0u8; 1];
            while self.conn.dgram_recv_queue_len() > 0 {
                let _ = self.conn.dgram_recv(&mut scratch);
                self.early_dropped += 1;
            }
        }
        let ending = self.conn.is_closed() || self.conn.peer_error().is_some() || self.conn.local_error().is_some();
        if ending && self.state != SessionState::Closed {
            self.state = SessionState::Closed;
            self.pending.clear();
            let (reason, code) = match (self.conn.peer_error(), self.conn.local_error()) {
                (Some(e), _) => (format!("closed by peer: {}", String::from_utf8_lossy(&e.reason)), Some(e.error_code)),
                (None, Some(e)) => (format!("closed: {}", String::from_utf8_lossy(&e.reason)), Some(e.error_code)),
                (None, None) if self.reset => {
                    ("reset by the connector: it holds no state for this session".to_owned(), None)
                }
                (None, None) if self.conn.is_timed_out() => ("idle timeout".to_owned(), None),
                (None, None) => ("closed".to_owned(), None),
            };
            let identity_mismatch = self.identity_mismatch;
            self.events.push_back(SessionEvent::Closed { reason, code, identity_mismatch });
        }
    }

    fn established(&mut self) {
        let peer = self.conn.peer_cert().and_then(|der| crate::cert::peer_identity(der, &self.trust_domain));
        let Some(peer) = peer else {
            // The verify hook accepted the chain, so this does not happen;
            // refuse rather than go on without an identity.
            let _ = self.conn.close(false, CLOSE_BAD_CERTIFICATE, b"no peer identity");
            return;
        };
        if let Some(expect) = &self.expect {
            if peer.uri() != *expect {
                tracing::warn!(expected = %expect, presented = %peer, "connector identity differs from the one the relay named");
                self.identity_mismatch = true;
                let _ = self.conn.close(false, CLOSE_BAD_CERTIFICATE, b"connector identity mismatch");
                self.state = SessionState::Hello;
                return;
            }
        }
        self.peer = Some(peer.clone());
        self.events.push_back(SessionEvent::Established { peer });
        self.state = SessionState::Hello;
        if let (false, Some(service)) = (self.server, self.service.clone()) {
            Message::SessionHello { version: wire::VERSION, service }.encode(&mut self.tx);
            self.flush_control();
        }
    }

    fn read_control(&mut self) {
        let mut buf = [0u8; 512];
        loop {
            let room = self.rx.room().min(buf.len());
            let Some(chunk) = buf.get_mut(..room) else { return };
            if room == 0 {
                return self.fail(Code::CONTROL_BACKLOG, "control backlog");
            }
            match self.conn.stream_recv(CONTROL_STREAM, chunk) {
                Ok((n, _)) => {
                    if let Some(read) = chunk.get(..n) {
                        self.rx.push(read);
                    }
                }
                Err(_) => break,
            }
            loop {
                match self.rx.next_message() {
                    Ok(Some(m)) => self.on_message(m),
                    Ok(None) => break,
                    Err(e) => return self.fail(e.code(), "malformed control message"),
                }
                if self.is_closed() || self.conn.is_closed() {
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::SessionHello { version, service } if version == wire::VERSION => {
                if self.server && self.state == SessionState::Hello && self.service.is_none() {
                    self.service = Some(service.clone());
                    self.events.push_back(SessionEvent::Hello { service });
                } else if !self.server && self.state == SessionState::Hello && self.service.as_ref() == Some(&service) {
                    self.go_up();
                } else {
                    self.fail(Code::UNEXPECTED_MESSAGE, "unexpected SessionHello");
                }
            }
            Message::SessionHello { .. } => self.fail(Code::UNSUPPORTED_VERSION, "unsupported version"),
            Message::Candidates { generation, policy, list } if self.state == SessionState::Up => {
                self.paths.on_candidates(generation, policy, list);
            }
            Message::PunchNow { round, nonce } if self.server && self.state == SessionState::Up => {
                self.paths.on_punch_now(round, nonce, self.now);
            }
            Message::Unknown { .. } => {}
            _ => self.fail(Code::UNEXPECTED_MESSAGE, "unexpected message on the end-to-end stream"),
        }
    }

    fn fail(&mut self, code: Code, reason: &str) {
        let _ = self.conn.close(true, u64::from(code.0), reason.as_bytes());
    }

    fn go_up(&mut self) {
        self.state = SessionState::Up;
        self.paths.set_up();
        self.events.push_back(SessionEvent::Up);
        while let Some(p) = self.pending.pop_front() {
            match self.conn.dgram_send(&p) {
                Ok(()) => {}
                // Too large for the path now: only this one is lost.
                Err(quiche::Error::BufferTooShort) => self.pending_lost += 1,
                Err(_) => {
                    self.pending_lost += 1;
                    break;
                }
            }
        }
        self.pending_lost += self.pending.len() as u64;
        self.pending.clear();
    }

    /// Connector: accept the session for the service the agent asked for.
    pub fn admit(&mut self) {
        if let (true, SessionState::Hello, Some(service)) = (self.server, self.state, self.service.clone()) {
            Message::SessionHello { version: wire::VERSION, service }.encode(&mut self.tx);
            self.flush_control();
            self.go_up();
        }
    }

    /// Connector: refuse the session (the agent sees `code`).
    pub fn refuse(&mut self, code: Code, reason: &str) {
        self.fail(code, reason);
    }

    fn flush_control(&mut self) {
        if self.tx.is_empty() {
            return;
        }
        if let Ok(n) = self.conn.stream_send(CONTROL_STREAM, &self.tx, false) {
            self.tx.drain(..n);
            // Stream data is ours to send: no ACK delay for it.
            self.must_send |= n > 0;
        }
    }

    /// Queues one tunneled IP packet (held until `Up`).
    pub fn send_ip(&mut self, pkt: &[u8]) -> Result<(), SendIpError> {
        if pkt.len() > super::TUNNEL_MTU.max(self.conn.dgram_max_writable_len().unwrap_or(0)) {
            return Err(SendIpError::TooLarge);
        }
        match self.state {
            SessionState::Closed => Err(SendIpError::Closed),
            SessionState::Up if !self.paths.relay_allowed() && self.paths.current().is_none() => {
                Err(SendIpError::NoPath)
            }
            SessionState::Up => match self.conn.dgram_send(pkt) {
                Ok(()) => {
                    self.paths.note_tunneled(self.now);
                    Ok(())
                }
                Err(quiche::Error::BufferTooShort) => Err(SendIpError::TooLarge),
                Err(_) => Err(SendIpError::Full),
            },
            // direct-only: nothing waits to go out over the relay.
            _ if self.paths.own_policy() == crate::candidate::PathPolicy::DirectOnly => Err(SendIpError::NoPath),
            _ if self.server || self.pending.len() >= MAX_PENDING => Err(SendIpError::Full),
            _ => {
                self.pending.push_back(pkt.to_vec());
                Ok(())
            }
        }
    }

    /// Whether [`E2eSession::send_ip`] has room in the DATAGRAM queue now.
    pub fn datagram_room(&self) -> bool {
        self.state == SessionState::Up && self.conn.dgram_send_queue_len() < super::DGRAM_QUEUE_LEN
    }

    /// Copies the next tunneled IP packet into `out` (only once `Up`).
    /// Packets larger than `out` are dropped and counted
    /// ([`E2eSession::truncated`]).
    pub fn recv_ip(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.state != SessionState::Up {
            return None;
        }
        loop {
            match self.conn.dgram_recv(out) {
                Ok(n) => return Some(n),
                Err(quiche::Error::BufferTooShort) => self.truncated += 1,
                Err(_) => return None,
            }
        }
    }

    /// Writes the next packet to send into `out`: its length and the way
    /// it goes (a relay flow, or a direct path). An ACK with nothing else
    /// to send waits ([`ACK_DELAY`]).
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, Via)> {
        self.now = now;
        self.top_up_cids();
        if let Some(punch) = self.path_actions(out) {
            return Some(punch);
        }
        self.flush_control();
        if self.holds_ack(now) {
            return None;
        }
        match self.conn.send(out) {
            Ok((n, info)) => {
                self.last_tx = now;
                (self.unacked, self.ack_due, self.must_send) = (0, None, false);
                Some((n, Via::of_peer(info.to)))
            }
            Err(_) => {
                // Nothing to send: no ACK is waiting any more either.
                (self.unacked, self.ack_due, self.must_send) = (0, None, false);
                self.progress();
                None
            }
        }
    }

    /// Whether all there is to send is an ACK that may still wait: Up, no
    /// timer fired, nothing of our own queued (DATAGRAMs, control stream
    /// data since the last send), fewer than [`ACK_EVERY`]
    /// packets unacknowledged and not yet [`ACK_DELAY`] old.
    fn holds_ack(&self, now: Instant) -> bool {
        self.state == SessionState::Up
            && !self.must_send
            && self.unacked > 0
            && self.unacked < ACK_EVERY
            && self.ack_due.is_some_and(|d| now < d)
            && self.tx.is_empty()
            && self.conn.dgram_send_queue_len() == 0
    }

    /// Whether a relay flow carries the session now. While none does
    /// (between relay legs) the session's timers are frozen: quiche's loss
    /// recovery would otherwise back its probe timeout off exponentially
    /// over an outage of many seconds and then wait that long again before
    /// sending anything once the new leg is up. Back on a flow, an overdue
    /// timer fires at once (one probe, new data follows). An uncarried
    /// session ends after the idle timeout.
    pub fn set_carried(&mut self, carried: bool, now: Instant) {
        if carried && !self.carried {
            self.last_rx = now;
            self.last_tx = now;
            self.carried = true;
            // A flow was just bound: its relay is alive.
            self.stalled = false;
            if self.conn.timeout_instant().is_some_and(|t| t <= now) {
                self.conn.on_timeout();
                self.must_send = true;
            }
            self.progress();
        } else if !carried && self.carried && self.state == SessionState::Up {
            // A handshake in progress keeps its own timeout instead.
            self.carried = false;
            self.uncarried_since = now;
        }
    }

    /// Whether the relay leg carrying the session went quiet (nothing from
    /// the relay for [`super::RELAY_STALL`]; the relay session knows). A
    /// dead relay is noticed only after the relay session's silence
    /// timeout, and all that time quiche's loss recovery would back its
    /// probe timeout off exponentially, then wait as long again before it
    /// sends anything over the next relay. While stalled, that timer (and
    /// the peer-silence check) is held; keepalives go on. When the relay is
    /// heard again, an overdue timer fires at once.
    pub fn set_stalled(&mut self, stalled: bool, now: Instant) {
        if stalled == self.stalled {
            return;
        }
        self.stalled = stalled;
        if !stalled && self.carried && self.conn.timeout_instant().is_some_and(|t| t <= now) {
            self.conn.on_timeout();
            self.must_send = true;
            self.progress();
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.held()
    }

    /// Whether the stalled relay leg holds the session's timers: only
    /// while the relay carries it (a direct path has its own liveness).
    fn held(&self) -> bool {
        self.stalled && self.paths.current().is_none()
    }

    /// Whether something carries the session: a relay flow, or a direct
    /// path (which needs no relay flow).
    fn carried_anyhow(&self) -> bool {
        self.carried || self.paths.current().is_some()
    }

    fn watches_silence(&self) -> bool {
        !self.server && self.carried && self.state == SessionState::Up
    }

    fn uncarried_until(&self) -> Instant {
        self.uncarried_since + Duration::from_millis(super::IDLE_TIMEOUT_MS)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        if self.is_closed() {
            // quiche's closing/draining timer: then the session is finished.
            return self.conn.timeout_instant();
        }
        if !self.carried_anyhow() {
            return Some(self.uncarried_until());
        }
        let quic = self.conn.timeout_instant().filter(|_| !self.held());
        let handshake = (self.state != SessionState::Up).then(|| self.started + HANDSHAKE_TIMEOUT);
        let keepalive = (self.state == SessionState::Up).then(|| self.last_tx + KEEPALIVE);
        let silence = (self.watches_silence() && !self.held()).then(|| self.last_rx + SILENCE);
        let ack = self.ack_due.filter(|_| self.unacked > 0 && self.state == SessionState::Up);
        let paths = self.paths.next_deadline().filter(|_| self.state == SessionState::Up);
        [quic, handshake, keepalive, silence, ack, paths].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.is_closed() {
            if self.conn.timeout_instant().is_some_and(|t| t <= now) {
                self.conn.on_timeout();
            }
            return;
        }
        if !self.carried_anyhow() {
            if now >= self.uncarried_until() {
                let _ = self.conn.close(false, 0, b"no relay flow");
                self.state_closed("no relay flow for the idle timeout");
            }
            return;
        }
        if !self.held() && self.conn.timeout_instant().is_some_and(|t| t <= now) {
            self.conn.on_timeout();
            self.must_send = true;
        }
        if self.ack_due.is_some_and(|d| d <= now) {
            // The delayed ACK is due: it goes with the next send, and its
            // deadline is spent (a full relay queue may hold that send; the
            // deadline must not stay in the past and spin the driver).
            self.ack_due = None;
            self.must_send = true;
        }
        self.progress();
        if self.is_closed() {
            return;
        }
        let late = self.state != SessionState::Up && now >= self.started + HANDSHAKE_TIMEOUT;
        let silent = !self.held() && self.watches_silence() && now >= self.last_rx + SILENCE;
        if late || silent {
            let why = if late { "handshake timeout" } else { "peer silent" };
            // Nothing the peer could still act on: drop the connection.
            let _ = self.conn.close(false, 0, why.as_bytes());
            self.state_closed(why);
            return;
        }
        if self.state == SessionState::Up && now >= self.last_tx + KEEPALIVE {
            let _ = self.conn.send_ack_eliciting();
            self.last_tx = now;
            self.must_send = true;
        }
        if self.state == SessionState::Up {
            self.path_rtts();
            self.path_events(now);
            self.paths.handle_timeout(now);
        }
        self.progress();
    }

    fn state_closed(&mut self, why: &str) {
        if self.state != SessionState::Closed {
            self.state = SessionState::Closed;
            self.pending.clear();
            let identity_mismatch = self.identity_mismatch;
            self.events.push_back(SessionEvent::Closed { reason: why.to_owned(), code: None, identity_mismatch });
        }
    }

    /// Closes the session (the peer is told; send what
    /// [`E2eSession::poll_transmit`] still gives).
    pub fn close(&mut self) {
        let _ = self.conn.close(true, u64::from(Code::NO_ERROR.0), b"closed");
        self.progress();
    }
}
