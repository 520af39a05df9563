//! End-to-end sessions: an inner QUIC connection between an agent (client)
//! and a connector (server), carried in the DATAGRAMs of the agent's relay
//! flow, under mutual TLS with SPIFFE identities (docs/PROTOCOL.md §8).
//!
//! The relay forwards the inner packets as opaque bytes: it sees their
//! sizes, timing and the inner connection IDs, never what they carry. One
//! inner session per relay flow, that is per (agent, service); the session
//! is not tied to the relay leg, so when the agent moves to another relay
//! the same inner connection goes on over the new flow.
//!
//! quiche needs addresses for a connection: inner packets carried by a relay
//! use the fixed synthetic pair [`RELAY_PATH_LOCAL`]/[`RELAY_PATH_PEER`]
//! whatever relay carries them, so a relay change is not a QUIC migration.

mod direct;
pub mod path_telemetry;
pub mod paths;
mod session;
#[cfg(test)]
mod tests;

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use boring::pkey::PKey;
use boring::ssl::{SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslVerifyMode};
use boring::x509::store::X509StoreBuilder;
use boring::x509::X509;

use crate::cert::{self, PeerRule, Rejection};
use crate::identity::{Identity, Kind};
use crate::quic::{TlsConfigError, TlsOptions};

pub use direct::{direct_dcid, DirectQueue, Via};
pub use path_telemetry::{PathState, TimeToDirect};
pub use paths::{DirectConfig, PathCounters};
pub use session::{E2eSession, SendIpError, SessionEvent, SessionState, ACK_DELAY, MAX_PENDING};

/// ALPN of the inner connection.
pub const ALPN: &[u8] = b"ztna-e2e/1";
/// Length of every connection ID either end issues for an inner session.
pub const CID_LEN: usize = 8;
/// MTU of the tunnel device: the largest IP packet carried, IPv4 and IPv6.
pub const TUNNEL_MTU: usize = 1280;
/// Largest inner QUIC packet: the outer relay path's smallest DATAGRAM
/// payload (relay → client: 1400 − 1 − 20 − 4 − 16 − 3) minus a 4-byte flow
/// id. The size table is in docs/PROTOCOL.md §8.4.
pub const MAX_INNER_PACKET: usize = crate::quic::MAX_UDP_PAYLOAD - 44 - 4;
/// Inner QUIC overhead on a DATAGRAM: flags (1), DCID (8), packet number
/// (4), AEAD tag (16), DATAGRAM frame type and length (3).
pub const INNER_OVERHEAD: usize = 1 + CID_LEN + 4 + 16 + 3;
const _: () = assert!(MAX_INNER_PACKET - INNER_OVERHEAD >= TUNNEL_MTU);
/// Idle timeout of the inner connection (both ends): long enough to ride
/// out a relay failover (the agent's relay session notices a dead relay
/// after 15 s of silence, then reconnects with a backoff); the agent
/// notices a dead connector sooner (25 s of silence while carried).
pub const IDLE_TIMEOUT_MS: u64 = 120_000;
/// Bounded inner DATAGRAM queues (frames), per session and direction.
pub const DGRAM_QUEUE_LEN: usize = 256;
/// A relay leg from which nothing arrived for this long is stalled: the
/// sessions it carries hold their loss-recovery timer (see
/// [`E2eSession::set_stalled`]).
pub const RELAY_STALL: std::time::Duration = std::time::Duration::from_secs(1);
/// The synthetic addresses quiche sees for the relay path.
pub const RELAY_PATH_LOCAL: SocketAddr =
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1), 1, 0, 0));
pub const RELAY_PATH_PEER: SocketAddr =
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 2), 2, 0, 0));
/// The local address quiche sees for every direct path (the one socket;
/// like the relay pair it never goes on the wire). The peer address of a
/// direct path is the real one.
pub const DIRECT_PATH_LOCAL: SocketAddr =
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1), 3, 0, 0));
/// Connection IDs each end keeps active: one per path (the relay path and
/// up to seven direct ones).
pub const ACTIVE_CIDS: u64 = 8;
/// Application close codes and the TLS alert of a refused identity, as
/// the peer sees them in CONNECTION_CLOSE: `bad_certificate` (42) in the
/// crypto error range.
pub const CLOSE_BAD_CERTIFICATE: u64 = 0x100 + 42;

/// Peer certificates refused in inner handshakes, by reason (shared by all
/// sessions of one endpoint).
#[derive(Debug, Default)]
pub struct Rejections {
    pub unknown_ca: AtomicU64,
    pub validity: AtomicU64,
    pub identity: AtomicU64,
    pub other: AtomicU64,
}

impl Rejections {
    fn count(&self, r: Rejection) {
        let c = match r {
            Rejection::UnknownCa => &self.unknown_ca,
            Rejection::Validity => &self.validity,
            Rejection::Identity => &self.identity,
            Rejection::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// All refusals together.
    pub fn total(&self) -> u64 {
        [&self.unknown_ca, &self.validity, &self.identity, &self.other].iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A connector's stateless reset key for end-to-end sessions
/// (docs/protocol/e2e.md §8.7). Derived from its private key: every replica
/// holding the same identity and key can reset the sessions of any of
/// them, a restarted connector those of its previous run, and no one
/// without the key (the relay included) can forge a reset.
#[derive(Clone)]
pub struct ResetKey([u8; 32]);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    /// The key of the endpoint whose private key `tls` holds.
    pub fn from_tls(tls: &TlsOptions) -> Result<ResetKey, TlsConfigError> {
        let key = PKey::private_key_from_pem(tls.key_pem.as_deref().ok_or(TlsConfigError::Key)?)
            .map_err(|_| TlsConfigError::Key)?;
        let der = key.private_key_to_der().map_err(|_| TlsConfigError::Key)?;
        Ok(ResetKey(crate::reset::hmac(b"ztna e2e stateless reset v1", &der)))
    }

    /// The token a session whose connection ID is `cid` announces.
    pub fn token(&self, cid: &[u8]) -> u128 {
        crate::reset::token(&self.0, cid)
    }

    /// A stateless reset for a packet of `trigger_len` bytes to `cid`
    /// ([`crate::reset::write`]).
    pub fn write_reset(&self, cid: &[u8], trigger_len: usize, out: &mut [u8]) -> Option<usize> {
        crate::reset::write(self.token(cid), trigger_len, out)
    }
}

/// The identity in this endpoint's own certificate (the trust domain the
/// peer must share).
pub fn own_identity(tls: &TlsOptions) -> Result<Identity, TlsConfigError> {
    let pem = tls.cert_pem.as_ref().ok_or(TlsConfigError::NoIdentity)?;
    let leaf = X509::stack_from_pem(pem).ok().and_then(|v| v.into_iter().next()).ok_or(TlsConfigError::Certificate)?;
    let der = leaf.to_der().map_err(|_| TlsConfigError::Certificate)?;
    let uri = cert::uri_of(&der).ok_or(TlsConfigError::NoIdentity)?;
    Identity::parse(&uri).map_err(|_| TlsConfigError::NoIdentity)
}

fn context(tls: &TlsOptions, peer: Kind, rejections: Arc<Rejections>) -> Result<SslContextBuilder, TlsConfigError> {
    use TlsConfigError as E;
    let own = own_identity(tls)?;
    let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(|_| E::Context)?;
    let cas = X509::stack_from_pem(tls.ca_pem.as_deref().ok_or(E::NoCa)?).map_err(|_| E::Ca)?;
    if cas.is_empty() {
        return Err(E::Ca);
    }
    let mut store = X509StoreBuilder::new().map_err(|_| E::Context)?;
    for c in cas {
        store.add_cert(c).map_err(|_| E::Ca)?;
    }
    b.set_verify_cert_store(store.build()).map_err(|_| E::Context)?;
    let mut chain =
        X509::stack_from_pem(tls.cert_pem.as_deref().ok_or(E::NoIdentity)?).map_err(|_| E::Certificate)?.into_iter();
    let leaf = chain.next().ok_or(E::Certificate)?;
    b.set_certificate(&leaf).map_err(|_| E::Certificate)?;
    for c in chain {
        b.add_extra_chain_cert(c).map_err(|_| E::Certificate)?;
    }
    let key = PKey::private_key_from_pem(tls.key_pem.as_deref().ok_or(E::Key)?).map_err(|_| E::Key)?;
    b.set_private_key(&key).map_err(|_| E::KeyMismatch)?;
    b.check_private_key().map_err(|_| E::KeyMismatch)?;
    // No resumption: every session proves both certificates afresh.
    b.set_options(SslOptions::NO_TICKET);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    let trust_domain = own.trust_domain;
    b.set_verify_callback(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT, move |ok, ctx| {
        let rule = PeerRule { trust_domain: &trust_domain, kinds: &[peer], any_purpose: true };
        match cert::verify(ok, ctx, rule) {
            Ok(()) => true,
            Err(r) => {
                tracing::warn!(reason = ?r.why, detail = r.detail, "end-to-end peer certificate rejected");
                rejections.count(r.why);
                false
            }
        }
    });
    Ok(b)
}

fn transport(b: SslContextBuilder) -> Result<quiche::Config, TlsConfigError> {
    let e = TlsConfigError::Quic;
    let mut cfg = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, b).map_err(e)?;
    cfg.set_application_protos(&[ALPN]).map_err(e)?;
    cfg.set_max_idle_timeout(IDLE_TIMEOUT_MS);
    cfg.set_max_recv_udp_payload_size(crate::quic::MAX_UDP_PAYLOAD);
    cfg.set_max_send_udp_payload_size(MAX_INNER_PACKET);
    cfg.set_initial_max_data(256 * 1024);
    cfg.set_initial_max_stream_data_bidi_local(64 * 1024);
    cfg.set_initial_max_stream_data_bidi_remote(64 * 1024);
    cfg.set_initial_max_stream_data_uni(0);
    cfg.set_initial_max_streams_uni(0);
    // The agent opens one bidirectional stream: end-to-end control.
    cfg.set_initial_max_streams_bidi(1);
    cfg.set_active_connection_id_limit(ACTIVE_CIDS);
    cfg.enable_dgram(true, DGRAM_QUEUE_LEN, DGRAM_QUEUE_LEN);
    Ok(cfg)
}

/// The agent's inner config: it requires a `connector/` identity in its
/// own trust domain under the CA of `tls`, and presents its certificate.
pub fn client_config(tls: &TlsOptions, rejections: Arc<Rejections>) -> Result<quiche::Config, TlsConfigError> {
    transport(context(tls, Kind::Connector, rejections)?)
}

/// The connector's inner config: it requires an `agent/` identity.
pub fn server_config(tls: &TlsOptions, rejections: Arc<Rejections>) -> Result<quiche::Config, TlsConfigError> {
    transport(context(tls, Kind::Agent, rejections)?)
}

/// The destination connection ID of an inner packet (short header:
/// always [`CID_LEN`] bytes; long header: as long as the header says, up to
/// 20, since an agent's first Initials carry its random original DCID).
pub fn packet_dcid(pkt: &[u8]) -> Option<&[u8]> {
    let first = *pkt.first()?;
    if first & 0x80 == 0 {
        return pkt.get(1..1 + CID_LEN);
    }
    // Long header: flags, version (4), DCID length (1), DCID.
    let len = usize::from(*pkt.get(5)?);
    if len > 20 {
        return None;
    }
    pkt.get(6..6 + len)
}

/// Whether an inner packet is a QUIC Initial (long header, type 0) of
/// version 1: the only packet that may create a session.
pub fn is_initial(pkt: &[u8]) -> bool {
    matches!(pkt.first(), Some(f) if f & 0xf0 == 0xc0) && pkt.get(1..5) == Some(&[0, 0, 0, 1][..])
}
