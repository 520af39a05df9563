//! Error and reason codes shared by control messages and QUIC
//! CONNECTION_CLOSE application codes. See docs/PROTOCOL.md §7, "Error codes" (the table is in
//! docs/protocol/error-codes.md).

/// A 16-bit protocol code. Unknown values are preserved, not rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u16);

impl Code {
    pub const NO_ERROR: Code = Code(0x0000);
    /// A message that does not follow its documented layout.
    pub const MALFORMED: Code = Code(0x0001);
    /// Hello carried a version the relay does not speak.
    pub const UNSUPPORTED_VERSION: Code = Code(0x0002);
    /// A valid message at the wrong time (e.g. Register before Hello).
    pub const UNEXPECTED_MESSAGE: Code = Code(0x0003);
    /// A control frame longer than the negotiated maximum.
    pub const FRAME_TOO_LARGE: Code = Code(0x0004);
    /// The peer left too many unread control bytes buffered.
    pub const CONTROL_BACKLOG: Code = Code(0x0005);
    /// Internal error in the sender.
    pub const INTERNAL: Code = Code(0x0006);
    /// Register for a service nobody serves.
    pub const UNKNOWN_SERVICE: Code = Code(0x0010);
    /// Register for a (role, service) this connection already holds.
    pub const DUPLICATE: Code = Code(0x0011);
    /// A registration or flow limit was reached.
    pub const LIMIT: Code = Code(0x0012);
    /// Policy forbids this registration (zero-trust issue).
    pub const DENIED: Code = Code(0x0013);
    /// Goodbye: the relay shuts down.
    pub const SHUTDOWN: Code = Code(0x0100);
    /// Goodbye: the relay drains; reconnect (to another replica if any).
    pub const DRAINING: Code = Code(0x0101);
    /// FlowClose: the agent unregistered or disconnected.
    pub const AGENT_GONE: Code = Code(0x0200);
    /// FlowClose: the serving connector went away.
    pub const CONNECTOR_GONE: Code = Code(0x0201);

    /// Stable lower-case name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::NO_ERROR => "no_error",
            Self::MALFORMED => "malformed",
            Self::UNSUPPORTED_VERSION => "unsupported_version",
            Self::UNEXPECTED_MESSAGE => "unexpected_message",
            Self::FRAME_TOO_LARGE => "frame_too_large",
            Self::CONTROL_BACKLOG => "control_backlog",
            Self::INTERNAL => "internal",
            Self::UNKNOWN_SERVICE => "unknown_service",
            Self::DUPLICATE => "duplicate",
            Self::LIMIT => "limit",
            Self::DENIED => "denied",
            Self::SHUTDOWN => "shutdown",
            Self::DRAINING => "draining",
            Self::AGENT_GONE => "agent_gone",
            Self::CONNECTOR_GONE => "connector_gone",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(0x{:04x})", self.name(), self.0)
    }
}
