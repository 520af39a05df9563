//! Control-channel messages (protocol v2) and their binary encoding.
//!
//! Every message travels in a frame `[type: u8][length: u16 BE][body]` on the
//! client's first bidirectional QUIC stream (stream id 0). Integers are
//! big-endian. Strings are `[len: u8][UTF-8 bytes]`. Addresses are
//! `[family: u8 = 4|6][4 or 16 address bytes][port: u16]`.
//! docs/PROTOCOL.md is the normative description; this module implements it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::candidate::{Candidate, CandidateKind, PathPolicy, MAX_CANDIDATES};
use crate::codes::Code;

/// The protocol version this crate speaks.
pub const VERSION: u16 = 2;
/// ALPN identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"ztna/1";
/// Largest body a frame may carry.
pub const MAX_BODY: usize = 1024;
/// Frame header: type (1) + length (2).
pub const HEADER_LEN: usize = 3;
/// Longest service name, in bytes.
pub const MAX_SERVICE_NAME: usize = 64;

/// Message type codes. Ranges: 0x00–0x0f session, 0x10–0x1f registration,
/// 0x20–0x2f addressing, 0x30–0x3f flows, 0x40–0x5f reserved for hole-punch
/// signalling, 0x60–0x7f reserved for flow control, 0x80–0xff extensions.
pub mod ty {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const ERROR: u8 = 0x0e;
    pub const GOODBYE: u8 = 0x0f;
    pub const REGISTER: u8 = 0x10;
    pub const REGISTER_OK: u8 = 0x11;
    pub const REGISTER_ERROR: u8 = 0x12;
    pub const UNREGISTER: u8 = 0x13;
    pub const OBSERVED_ADDRESS: u8 = 0x20;
    pub const FLOW_OPEN: u8 = 0x30;
    pub const FLOW_CLOSE: u8 = 0x31;
    pub const FLOW_BOUND: u8 = 0x32;
    /// End-to-end control stream (inner session), not the relay's.
    pub const SESSION_HELLO: u8 = 0x38;
    /// Direct paths, inner stream 0 (docs/protocol/direct.md).
    pub const CANDIDATES: u8 = 0x40;
    pub const PUNCH_NOW: u8 = 0x41;
    /// First type reserved for hole-punch signalling.
    pub const RESERVED_P2P_FIRST: u8 = 0x40;
    /// First type reserved for flow control.
    pub const RESERVED_FLOW_CONTROL_FIRST: u8 = 0x60;
    /// First extension type (ignored when unknown).
    pub const EXTENSION_FIRST: u8 = 0x80;
}

/// Which side of a service a registration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Connector,
}

impl Role {
    pub fn to_u8(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Connector => 2,
        }
    }
    pub fn from_u8(v: u8) -> Option<Role> {
        match v {
            1 => Some(Role::Agent),
            2 => Some(Role::Connector),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
}

/// A validated service name: 1–64 bytes of `[a-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn new(s: &str) -> Option<ServiceName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SERVICE_NAME
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        ok.then(|| ServiceName(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → relay, first message. `software` names the client software.
    Hello { version: u16, software: String },
    /// Relay → client: the version in use.
    HelloAck { version: u16 },
    /// Either way: a fatal error; the sender closes the connection next.
    Error { code: Code, reason: String },
    /// Relay → client: the relay is going away; reconnect later.
    Goodbye { code: Code, reason: String },
    /// Client → relay.
    Register { request_id: u32, role: Role, service: ServiceName },
    /// Relay → client. For an agent `flow` is the datagram flow id of the
    /// service; for a connector it is the service handle used in FlowOpen.
    RegisterOk { request_id: u32, flow: u32 },
    /// Relay → client.
    RegisterError { request_id: u32, code: Code, reason: String },
    /// Client → relay: drop the registration with this flow id / handle.
    Unregister { flow: u32 },
    /// Relay → client: the address the relay sees the client's packets from.
    ObservedAddress { addr: SocketAddr },
    /// Relay → connector: an agent flow now reaches this connector on `flow`.
    FlowOpen { flow: u32, service: u32, agent_addr: SocketAddr, agent_id: String },
    /// Relay → connector (or agent): `flow` is gone.
    FlowClose { flow: u32, code: Code },
    /// Relay → agent: `flow` is now bound to the connector whose SPIFFE
    /// ID is `connector_id` (before RegisterOk, and again on every rebind).
    FlowBound { flow: u32, connector_id: String },
    /// Inner session, agent → connector: the service this session is for;
    /// connector → agent, the same message: accepted.
    SessionHello { version: u16, service: ServiceName },
    /// Inner session, either way: where the sender may be reached directly
    /// and its path policy. `generation` grows with every change; a
    /// message replaces the previous one whole. At most
    /// [`MAX_CANDIDATES`] entries.
    Candidates { generation: u32, policy: PathPolicy, list: Vec<Candidate> },
    /// Inner session, agent → connector: punching round `round` starts now;
    /// the connector's punch packets carry `nonce`.
    PunchNow { round: u32, nonce: u64 },
    /// A message of an extension type this implementation does not know.
    Unknown { ty: u8 },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The body does not follow the type's layout.
    Malformed(u8),
    /// The length field exceeds [`MAX_BODY`].
    TooLarge,
    /// A type in the core or reserved ranges (< 0x80) that v1 does not define.
    UnknownType(u8),
    /// A well-formed Register whose service name is invalid. Recoverable:
    /// the frame is consumed and the request answered with RegisterError.
    BadServiceName { request_id: u32 },
}

impl DecodeError {
    /// The protocol error code to send back for this failure.
    pub fn code(self) -> Code {
        match self {
            DecodeError::Malformed(_) | DecodeError::UnknownType(_) | DecodeError::BadServiceName { .. } => {
                Code::MALFORMED
            }
            DecodeError::TooLarge => Code::FRAME_TOO_LARGE,
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.buf.split_at_checked(n)?;
        self.buf = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes(b.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes(b.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_be_bytes(b.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::from(self.u8()?);
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
    fn addr(&mut self) -> Option<SocketAddr> {
        let ip = match self.u8()? {
            4 => {
                let b: [u8; 4] = self.take(4)?.try_into().ok()?;
                IpAddr::V4(Ipv4Addr::from(b))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().ok()?;
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.u16()?))
    }
    fn end(&self) -> Option<()> {
        self.buf.is_empty().then_some(())
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Strings longer than 255 bytes are cut at a char boundary.
    let mut n = s.len().min(255);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

impl Message {
    /// The type code of this message.
    pub fn ty(&self) -> u8 {
        match self {
            Message::Hello { .. } => ty::HELLO,
            Message::HelloAck { .. } => ty::HELLO_ACK,
            Message::Error { .. } => ty::ERROR,
            Message::Goodbye { .. } => ty::GOODBYE,
            Message::Register { .. } => ty::REGISTER,
            Message::RegisterOk { .. } => ty::REGISTER_OK,
            Message::RegisterError { .. } => ty::REGISTER_ERROR,
            Message::Unregister { .. } => ty::UNREGISTER,
            Message::ObservedAddress { .. } => ty::OBSERVED_ADDRESS,
            Message::FlowOpen { .. } => ty::FLOW_OPEN,
            Message::FlowClose { .. } => ty::FLOW_CLOSE,
            Message::FlowBound { .. } => ty::FLOW_BOUND,
            Message::SessionHello { .. } => ty::SESSION_HELLO,
            Message::Candidates { .. } => ty::CANDIDATES,
            Message::PunchNow { .. } => ty::PUNCH_NOW,
            Message::Unknown { ty } => *ty,
        }
    }

    /// Appends the framed encoding of `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(self.ty());
        out.extend_from_slice(&[0, 0]);
        match self {
            Message::Hello { version, software } => {
                out.extend_from_slice(&version.to_be_bytes());
                put_string(out, software);
            }
            Message::HelloAck { version } => out.extend_from_slice(&version.to_be_bytes()),
            Message::Error { code, reason } | Message::Goodbye { code, reason } => {
                out.extend_from_slice(&code.0.to_be_bytes());
                put_string(out, reason);
            }
            Message::Register { request_id, role, service } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                out.push(role.to_u8());
                put_string(out, service.as_str());
            }
            Message::RegisterOk { request_id, flow } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                out.extend_from_slice(&flow.to_be_bytes());
            }
            Message::RegisterError { request_id, code, reason } => {
                out.extend_from_slice(&request_id.to_be_bytes());
                out.extend_from_slice(&code.0.to_be_bytes());
                put_string(out, reason);
            }
            Message::Unregister { flow } => out.extend_from_slice(&flow.to_be_bytes()),
            Message::ObservedAddress { addr } => put_addr(out, addr),
            Message::FlowOpen { flow, service, agent_addr, agent_id } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&service.to_be_bytes());
                put_addr(out, agent_addr);
                put_string(out, agent_id);
            }
            Message::FlowClose { flow, code } => {
                out.extend_from_slice(&flow.to_be_bytes());
                out.extend_from_slice(&code.0.to_be_bytes());
            }
            Message::FlowBound { flow, connector_id } => {
                out.extend_from_slice(&flow.to_be_bytes());
                put_string(out, connector_id);
            }
            Message::SessionHello { version, service } => {
                out.extend_from_slice(&version.to_be_bytes());
                put_string(out, service.as_str());
            }
            Message::Candidates { generation, policy, list } => {
                out.extend_from_slice(&generation.to_be_bytes());
                out.push(policy.to_u8());
                // Longer lists are cut: the decoder refuses them.
                let list = list.get(..MAX_CANDIDATES).unwrap_or(list);
                out.push(list.len() as u8);
                for c in list {
                    out.push(c.kind.to_u8());
                    put_addr(out, &c.addr);
                }
            }
            Message::PunchNow { round, nonce } => {
                out.extend_from_slice(&round.to_be_bytes());
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Message::Unknown { .. } => {}
        }
        // Every body above is far below MAX_BODY (strings are capped at 255).
        let body_len = (out.len() - start - HEADER_LEN) as u16;
        out[start + 1..start + 3].copy_from_slice(&body_len.to_be_bytes());
    }

    /// Decodes one message body of type `ty`.
    pub fn decode_body(ty: u8, body: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: body };
        let bad = DecodeError::Malformed(ty);
        let msg = match ty {
            ty::HELLO => Message::Hello { version: r.u16().ok_or(bad)?, software: r.string().ok_or(bad)? },
            ty::HELLO_ACK => Message::HelloAck { version: r.u16().ok_or(bad)? },
            ty::ERROR | ty::GOODBYE => {
                let code = Code(r.u16().ok_or(bad)?);
                let reason = r.string().ok_or(bad)?;
                if ty == ty::ERROR {
                    Message::Error { code, reason }
                } else {
                    Message::Goodbye { code, reason }
                }
            }
            ty::REGISTER => {
                let request_id = r.u32().ok_or(bad)?;
                let role = Role::from_u8(r.u8().ok_or(bad)?).ok_or(bad)?;
                let name = r.string().ok_or(bad)?;
                r.end().ok_or(bad)?;
                let service = ServiceName::new(&name).ok_or(DecodeError::BadServiceName { request_id })?;
                Message::Register { request_id, role, service }
            }
            ty::REGISTER_OK => Message::RegisterOk { request_id: r.u32().ok_or(bad)?, flow: r.u32().ok_or(bad)? },
            ty::REGISTER_ERROR => Message::RegisterError {
                request_id: r.u32().ok_or(bad)?,
                code: Code(r.u16().ok_or(bad)?),
                reason: r.string().ok_or(bad)?,
            },
            ty::UNREGISTER => Message::Unregister { flow: r.u32().ok_or(bad)? },
            ty::OBSERVED_ADDRESS => Message::ObservedAddress { addr: r.addr().ok_or(bad)? },
            ty::FLOW_OPEN => Message::FlowOpen {
                flow: r.u32().ok_or(bad)?,
                service: r.u32().ok_or(bad)?,
                agent_addr: r.addr().ok_or(bad)?,
                agent_id: r.string().ok_or(bad)?,
            },
            ty::FLOW_CLOSE => Message::FlowClose { flow: r.u32().ok_or(bad)?, code: Code(r.u16().ok_or(bad)?) },
            ty::FLOW_BOUND => Message::FlowBound { flow: r.u32().ok_or(bad)?, connector_id: r.string().ok_or(bad)? },
            ty::SESSION_HELLO => {
                let version = r.u16().ok_or(bad)?;
                let service = ServiceName::new(&r.string().ok_or(bad)?).ok_or(bad)?;
                Message::SessionHello { version, service }
            }
            ty::CANDIDATES => {
                let generation = r.u32().ok_or(bad)?;
                let policy = PathPolicy::from_u8(r.u8().ok_or(bad)?).ok_or(bad)?;
                let n = usize::from(r.u8().ok_or(bad)?);
                if n > MAX_CANDIDATES {
                    return Err(bad);
                }
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let kind = CandidateKind::from_u8(r.u8().ok_or(bad)?).ok_or(bad)?;
                    list.push(Candidate { kind, addr: r.addr().ok_or(bad)? });
                }
                Message::Candidates { generation, policy, list }
            }
            ty::PUNCH_NOW => Message::PunchNow { round: r.u32().ok_or(bad)?, nonce: r.u64().ok_or(bad)? },
            t if t >= ty::EXTENSION_FIRST => return Ok(Message::Unknown { ty: t }),
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.end().ok_or(bad)?;
        Ok(msg)
    }
}

/// Parses one frame from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((msg, n)))` consumed `n`
/// bytes. Errors are fatal for the stream.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let ty = header[0];
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    if len > MAX_BODY {
        return Err(DecodeError::TooLarge);
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((Message::decode_body(ty, body)?, HEADER_LEN + len)))
}

/// Accumulates stream bytes and yields whole messages. Holds at most
/// `HEADER_LEN + MAX_BODY` bytes of an incomplete frame plus what one read
/// appended; the caller feeds it at most that much at a time.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameDecoder {
    /// Bytes the decoder is willing to take now (so that it never holds more
    /// than two maximum frames).
    pub fn room(&self) -> usize {
        (2 * (HEADER_LEN + MAX_BODY)).saturating_sub(self.buf.len() - self.pos)
    }

    /// Appends stream bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Next complete message, if any. After [`DecodeError::BadServiceName`]
    /// the frame is consumed and decoding may continue; other errors are
    /// fatal for the stream.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        let pending = self.buf.get(self.pos..).unwrap_or_default();
        match decode_frame(pending) {
            Ok(Some((msg, n))) => {
                self.pos += n;
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e @ DecodeError::BadServiceName { .. }) => {
                let len = pending.get(1..3).map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
                self.pos += HEADER_LEN + len;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        ]
    }

    fn arb_service() -> impl Strategy<Value = ServiceName> {
        "[a-z0-9._-]{1,64}".prop_map(|s| ServiceName::new(&s).unwrap())
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = ".{0,40}";
        prop_oneof![
            (any::<u16>(), s).prop_map(|(version, software)| Message::Hello { version, software }),
            any::<u16>().prop_map(|version| Message::HelloAck { version }),
            (any::<u16>(), s).prop_map(|(c, reason)| Message::Error { code: Code(c), reason }),
            (any::<u16>(), s).prop_map(|(c, reason)| Message::Goodbye { code: Code(c), reason }),
            (any::<u32>(), any::<bool>(), arb_service()).prop_map(|(request_id, a, service)| Message::Register {
                request_id,
                role: if a { Role::Agent } else { Role::Connector },
                service
            }),
            (any::<u32>(), any::<u32>()).prop_map(|(request_id, flow)| Message::RegisterOk { request_id, flow }),
            (any::<u32>(), any::<u16>(), s).prop_map(|(request_id, c, reason)| Message::RegisterError {
                request_id,
                code: Code(c),
                reason
            }),
            any::<u32>().prop_map(|flow| Message::Unregister { flow }),
            arb_addr().prop_map(|addr| Message::ObservedAddress { addr }),
            (any::<u32>(), any::<u32>(), arb_addr(), s).prop_map(|(flow, service, agent_addr, agent_id)| {
                Message::FlowOpen { flow, service, agent_addr, agent_id }
            }),
            (any::<u32>(), any::<u16>()).prop_map(|(flow, c)| Message::FlowClose { flow, code: Code(c) }),
            (any::<u32>(), s).prop_map(|(flow, connector_id)| Message::FlowBound { flow, connector_id }),
            (any::<u16>(), arb_service()).prop_map(|(version, service)| Message::SessionHello { version, service }),
            (any::<u32>(), 0..3u8, proptest::collection::vec((1..5u8, arb_addr()), 0..=MAX_CANDIDATES)).prop_map(
                |(generation, p, l)| Message::Candidates {
                    generation,
                    policy: PathPolicy::from_u8(p).unwrap(),
                    list: l
                        .into_iter()
                        .map(|(k, addr)| Candidate { kind: CandidateKind::from_u8(k).unwrap(), addr })
                        .collect(),
                }
            ),
            (any::<u32>(), any::<u64>()).prop_map(|(round, nonce)| Message::PunchNow { round, nonce }),
        ]
    }

    #[test]
    fn register_example_matches_protocol_md() {
        let m = Message::Register { request_id: 1, role: Role::Agent, service: ServiceName::new("echo").unwrap() };
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out, [0x10, 0x00, 0x0a, 0, 0, 0, 1, 0x01, 0x04, b'e', b'c', b'h', b'o']);
        let o = Message::ObservedAddress { addr: "203.0.113.7:4433".parse().unwrap() };
        out.clear();
        o.encode(&mut out);
        assert_eq!(out, [0x20, 0x00, 0x07, 0x04, 203, 0, 113, 7, 0x11, 0x51]);
    }

    #[test]
    fn bad_frames() {
        assert_eq!(decode_frame(&[0x10, 0x04, 0x01]), Err(DecodeError::TooLarge));
        assert_eq!(decode_frame(&[0x10, 0x00]), Ok(None));
        assert_eq!(decode_frame(&[0x10, 0x00, 0x01, 0x00]), Err(DecodeError::Malformed(0x10)));
        assert_eq!(decode_frame(&[0x45, 0x00, 0x00]), Err(DecodeError::UnknownType(0x45)));
        assert_eq!(decode_frame(&[0x90, 0x00, 0x01, 0xff]), Ok(Some((Message::Unknown { ty: 0x90 }, 4))));
        // Trailing bytes inside a body are malformed.
        assert_eq!(decode_frame(&[0x02, 0x00, 0x03, 0, 1, 0]), Err(DecodeError::Malformed(0x02)));
        // Upper-case service names are rejected, recoverably: the decoder
        // skips the frame and goes on with the next one.
        let mut out = Vec::new();
        Message::Register { request_id: 7, role: Role::Agent, service: ServiceName("Echo".into()) }.encode(&mut out);
        assert_eq!(decode_frame(&out), Err(DecodeError::BadServiceName { request_id: 7 }));
        Message::HelloAck { version: 1 }.encode(&mut out);
        let mut d = FrameDecoder::default();
        d.push(&out);
        assert_eq!(d.next_message(), Err(DecodeError::BadServiceName { request_id: 7 }));
        assert_eq!(d.next_message(), Ok(Some(Message::HelloAck { version: 1 })));
        // A Candidates list longer than MAX_CANDIDATES is malformed; the
        // encoder cuts it.
        let c = Candidate { kind: CandidateKind::Host, addr: "192.0.2.1:9".parse().unwrap() };
        let long = Message::Candidates { generation: 1, policy: PathPolicy::Auto, list: vec![c; MAX_CANDIDATES + 1] };
        out.clear();
        long.encode(&mut out);
        let Ok(Some((Message::Candidates { list, .. }, _))) = decode_frame(&out) else { panic!("cut list decodes") };
        assert_eq!(list.len(), MAX_CANDIDATES);
        let mut forged = out.clone();
        forged[8] = MAX_CANDIDATES as u8 + 1;
        assert_eq!(decode_frame(&forged), Err(DecodeError::Malformed(ty::CANDIDATES)));
        forged[8] = MAX_CANDIDATES as u8;
        forged[9] = 9; // unknown candidate kind
        assert_eq!(decode_frame(&forged), Err(DecodeError::Malformed(ty::CANDIDATES)));
    }

    #[test]
    fn decoder_reassembles_split_frames() {
        let mut all = Vec::new();
        for i in 0..10 {
            Message::RegisterOk { request_id: i, flow: i + 1 }.encode(&mut all);
        }
        let mut d = FrameDecoder::default();
        let mut got = Vec::new();
        for chunk in all.chunks(3) {
            d.push(chunk);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 10);
        assert_eq!(got[9], Message::RegisterOk { request_id: 9, flow: 10 });
        assert_eq!(d.buffered(), 0);
    }

    proptest! {
        #[test]
        fn roundtrip(m in arb_message()) {
            let mut out = Vec::new();
            m.encode(&mut out);
            let (back, n) = decode_frame(&out).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(back, m);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = FrameDecoder::default();
            d.push(&bytes);
            for _ in 0..100 {
                match d.next_message() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }

        #[test]
        fn typed_garbage_never_panics(ty in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..60)) {
            let _ = Message::decode_body(ty, &body);
        }
    }
}
