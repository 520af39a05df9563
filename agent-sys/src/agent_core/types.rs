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
}

/// Why an outbound packet was not sent (each is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IPv4/IPv6 packet, or too short to carry a destination.
    Malformed,
    /// No route for the destination: never leaves the device.
    Unmapped,
    /// The service is mapped but not (yet) registered, or its end-to-end
    /// session is not up and its queue is full.
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
    /// Sessions' moves onto a direct path, and back to the relay.
    pub path_to_direct: u64,
    pub path_to_relay: u64,
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
}
