//! The agent core's public types: its events, drop reasons, errors,
//! counters and status rows.

use std::net::SocketAddr;
use std::time::Duration;

use ztna_control::e2e;
use ztna_control::quic::TlsConfigError;
use ztna_control::{Code, ServiceName};

/// Something the embedding application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Connected,
    ObservedAddress(SocketAddr),
    Registered {
        service: ServiceName,
        flow: u32,
    },
    RegisterFailed {
        service: ServiceName,
        code: Code,
        reason: String,
    },
    /// `reason` in words (for a refused relay certificate: the expected
    /// name, what the certificate holds, the CA); `repeated`: the same
    /// reason was reported less than a minute ago.
    Disconnected {
        reason: String,
        retry_in: Duration,
        repeated: bool,
    },
    /// The relay is going away (drain/shutdown); a reconnect follows.
    Goodbye {
        code: Code,
    },
    /// The end-to-end session of `service` is up: `connector` proved its
    /// identity, packets flow.
    SessionUp {
        service: ServiceName,
        connector: String,
    },
    /// The end-to-end session of `service` ended (or was refused); another
    /// is tried after a backoff.
    SessionClosed {
        service: ServiceName,
        reason: String,
    },
    /// The session of `service` moved to the direct path to `direct`, or
    /// (`None`) to the relay, for the reason `state` gives.
    PathChanged {
        service: ServiceName,
        direct: Option<SocketAddr>,
        state: e2e::PathState,
    },
}

/// Why an outbound packet was not sent (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IPv4/IPv6 packet, or too short to carry a destination.
    Malformed,
    /// No route for the destination: never leaves the device.
    Unmapped,
    /// The service is mapped but not (yet) registered, or its end-to-end
    /// session is not up and its queue is full, or its path policy is
    /// `direct-only` and no direct path is up.
    NoFlow,
    /// The relay bound the service to a connector its pins do not accept.
    NotPinned,
    /// Larger than the path to the relay allows.
    TooLarge,
    /// Not connected, or the send queue is full.
    Backpressure,
}

/// Why [`AgentCore::new`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The TLS material is unusable.
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsConfigError),
}

/// Counters (all monotonically increasing).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub drop_malformed: u64,
    pub drop_unmapped: u64,
    pub drop_no_flow: u64,
    pub drop_too_large: u64,
    pub drop_backpressure: u64,
    /// Inbound datagrams on a flow this agent does not hold.
    pub drop_unknown_flow: u64,
    /// Inbound packets larger than the caller's buffer.
    pub drop_truncated: u64,
    /// Inbound packets whose source address is not in the prefixes of the
    /// service their flow belongs to (a connector speaking for another
    /// service, or for the agent's own host).
    pub drop_spoofed: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub drop_not_pinned: u64,
    /// Datagrams from an address other than the relay's that no session
    /// took (not a punch of a current round, not an inner packet of a
    /// session's connection ID, or an Initial).
    pub drop_direct: u64,
    /// Inner packets authenticated over direct paths, and sent over them.
    pub direct_packets_in: u64,
    pub direct_packets_out: u64,
    /// Punch packets of a session's current round.
    pub direct_punches_in: u64,
    /// UDP payload bytes of the datagrams counted in
    /// `direct_packets_in/_out` (inner QUIC packets; outbound, punch
    /// packets too).
    pub direct_bytes_in: u64,
    pub direct_bytes_out: u64,
    /// Sessions' moves onto a direct path, and back to the relay.
    pub path_to_direct: u64,
    pub path_to_relay: u64,
    /// Punching rounds the sessions ran, those that ended on a direct path
    /// and those that validated none.
    pub punch_rounds: u64,
    pub punch_rounds_direct: u64,
    pub punch_rounds_failed: u64,
    /// End-to-end sessions started, and those that came up.
    pub e2e_handshakes: u64,
    pub e2e_established: u64,
    /// Connector certificates refused in inner handshakes (CA, validity,
    /// identity kind), and connectors whose identity was not the one the
    /// relay named.
    pub e2e_cert_rejected: u64,
    pub e2e_identity_mismatch: u64,
    /// Inner packets that failed authentication (altered on the way).
    pub e2e_packets_rejected: u64,
    /// Packets dropped because the session was not up: its queue was full,
    /// or it came up with no room in the DATAGRAM queue for them.
    pub e2e_pending_dropped: u64,
}

impl AgentStats {
    /// Every counter with its name (for `stats` lines and `/metrics`).
    pub fn fields(&self) -> [(&'static str, u64); 32] {
        [
            ("packets_out", self.packets_out),
            ("bytes_out", self.bytes_out),
            ("packets_in", self.packets_in),
            ("bytes_in", self.bytes_in),
            ("drop_malformed", self.drop_malformed),
            ("drop_unmapped", self.drop_unmapped),
            ("drop_no_flow", self.drop_no_flow),
            ("drop_too_large", self.drop_too_large),
            ("drop_backpressure", self.drop_backpressure),
            ("drop_unknown_flow", self.drop_unknown_flow),
            ("drop_truncated", self.drop_truncated),
            ("drop_spoofed", self.drop_spoofed),
            ("connects", self.connects),
            ("disconnects", self.disconnects),
            ("drop_not_pinned", self.drop_not_pinned),
            ("drop_direct", self.drop_direct),
            ("direct_packets_in", self.direct_packets_in),
            ("direct_packets_out", self.direct_packets_out),
            ("direct_punches_in", self.direct_punches_in),
            ("direct_bytes_in", self.direct_bytes_in),
            ("direct_bytes_out", self.direct_bytes_out),
            ("path_to_direct", self.path_to_direct),
            ("path_to_relay", self.path_to_relay),
            ("punch_rounds", self.punch_rounds),
            ("punch_rounds_direct", self.punch_rounds_direct),
            ("punch_rounds_failed", self.punch_rounds_failed),
            ("e2e_handshakes", self.e2e_handshakes),
            ("e2e_established", self.e2e_established),
            ("e2e_cert_rejected", self.e2e_cert_rejected),
            ("e2e_identity_mismatch", self.e2e_identity_mismatch),
            ("e2e_packets_rejected", self.e2e_packets_rejected),
            ("e2e_pending_dropped", self.e2e_pending_dropped),
        ]
    }

    /// Adds the path counters of one session.
    pub(crate) fn add_paths(&mut self, c: &e2e::PathCounters) {
        self.path_to_direct += c.to_direct;
        self.path_to_relay += c.to_relay;
        self.punch_rounds += c.rounds;
        self.punch_rounds_direct += c.rounds_direct;
        self.punch_rounds_failed += c.rounds_failed;
    }
}

/// The state of a service's end-to-end session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// None yet (no flow bound, or waiting to retry).
    None,
    Handshaking,
    Up,
    Closed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::None => "none",
            SessionState::Handshaking => "handshaking",
            SessionState::Up => "up",
            SessionState::Closed => "closed",
        }
    }
}

/// One service's tunnel, for a status report.
#[derive(Debug, Clone)]
pub struct TunnelStatus {
    pub service: String,
    /// The relay flow carrying it now.
    pub flow: Option<u32>,
    /// The connector identity the relay bound the flow to.
    pub connector: Option<String>,
    pub session: SessionState,
    /// The connector identity the session proved (once up).
    pub proven: Option<String>,
    /// The inner connection's path (RTT, congestion window, losses).
    pub path: Option<quiche::PathStats>,
    /// Its relay leg went quiet: loss recovery is held.
    pub stalled: bool,
    /// The direct path tunneled packets take (`None`: the relay).
    pub direct: Option<SocketAddr>,
    /// Direct-path counters of the session.
    pub paths: Option<e2e::PathCounters>,
    /// Where its packets go and, on the relay, why.
    pub path_state: Option<e2e::PathState>,
}
