//! Stateless address validation and stateless resets (RFC 9000 §8.1.2,
//! §10.3). Both are keyed MACs, so any worker can check what another
//! minted without shared state.
//!
//! Retry token (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version (1) |
//! | 4 | issued: seconds since the relay started |
//! | 1 | length L of the original destination CID (≤ 20) |
//! | L | original destination CID |
//! | 16 | HMAC-SHA256 truncated, over the bytes above, the client's IP (16 bytes, IPv4-mapped) and port, and the Retry's source CID |
//!
//! The MAC key of a token is derived from a random per-process master and
//! the 60-second epoch of `issued`, so keys rotate every minute and a
//! leaked epoch key forges nothing outside its minute. A token is accepted
//! for [`TOKEN_LIFETIME`] after it was issued, only from the address it was
//! issued to, and only with the CID the Retry told the client to use.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ztna_control::reset::hmac;
pub use ztna_control::reset::MIN_RESET_LEN;

use crate::cid::Instance;

/// How long a Retry token is accepted.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// How often the token key changes.
pub const KEY_EPOCH: Duration = Duration::from_secs(60);
const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const MAX_CID: usize = 20;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of ours (wrong length, version or CID length).
    Malformed,
    /// The MAC does not match: forged, altered, or minted for another
    /// client address or CID.
    BadMac,
    /// Older than [`TOKEN_LIFETIME`] (or from the future).
    Expired,
}

fn addr_bytes(a: SocketAddr) -> [u8; 18] {
    let ip = match a.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut b = [0u8; 18];
    b[..16].copy_from_slice(&ip.octets());
    b[16..].copy_from_slice(&a.port().to_be_bytes());
    b
}

/// Retry token keys (shared by every worker of a relay).
#[derive(Clone)]
pub struct RetryKeys {
    master: [u8; 32],
    start: Instant,
}

impl std::fmt::Debug for RetryKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryKeys(..)")
    }
}

impl RetryKeys {
    /// Keys with a fresh random master; `start` is the relay's start.
    pub fn new(start: Instant) -> RetryKeys {
        let mut master = [0u8; 32];
        let _ = boring::rand::rand_bytes(&mut master);
        RetryKeys { master, start }
    }

    fn secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.start).as_secs()).unwrap_or(u32::MAX)
    }

    fn mac(&self, issued: u32, body: &[u8], peer: SocketAddr, scid: &[u8]) -> [u8; MAC_LEN] {
        let epoch = u64::from(issued) / KEY_EPOCH.as_secs();
        let mut label = [0u8; 18];
        label[..10].copy_from_slice(b"ztna retry");
        label[10..].copy_from_slice(&epoch.to_be_bytes());
        let key = hmac(&self.master, &label);
        let mut data = Vec::with_capacity(body.len() + 18 + scid.len());
        data.extend_from_slice(body);
        data.extend_from_slice(&addr_bytes(peer));
        data.extend_from_slice(scid);
        let full = hmac(&key, &data);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&full[..MAC_LEN]);
        mac
    }

    /// A token for a client at `peer` whose first Initial had destination
    /// CID `odcid`, told to continue with `retry_scid`.
    pub fn mint(&self, peer: SocketAddr, odcid: &[u8], retry_scid: &[u8], now: Instant) -> Vec<u8> {
        let odcid = odcid.get(..MAX_CID).unwrap_or(odcid);
        let issued = self.secs(now);
        let mut t = Vec::with_capacity(6 + odcid.len() + MAC_LEN);
        t.push(VERSION);
        t.extend_from_slice(&issued.to_be_bytes());
        t.push(odcid.len() as u8);
        t.extend_from_slice(odcid);
        let mac = self.mac(issued, &t, peer, retry_scid);
        t.extend_from_slice(&mac);
        t
    }

    /// Checks a token that arrived from `peer` in an Initial whose
    /// destination CID is `dcid`; returns the original destination CID.
    pub fn validate<'t>(
        &self,
        token: &'t [u8],
        peer: SocketAddr,
        dcid: &[u8],
        now: Instant,
    ) -> Result<&'t [u8], TokenError> {
        let (&version, rest) = token.split_first().ok_or(TokenError::Malformed)?;
        let (issued, rest) = rest.split_first_chunk::<4>().ok_or(TokenError::Malformed)?;
        let (&len, rest) = rest.split_first().ok_or(TokenError::Malformed)?;
        let len = usize::from(len);
        if version != VERSION || len > MAX_CID || rest.len() != len + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (odcid, mac) = rest.split_at(len);
        let body = token.get(..6 + len).ok_or(TokenError::Malformed)?;
        let issued = u32::from_be_bytes(*issued);
        if !boring::memcmp::eq(&self.mac(issued, body, peer, dcid), mac) {
            return Err(TokenError::BadMac);
        }
        let now = self.secs(now);
        if issued > now || u64::from(now - issued) > TOKEN_LIFETIME.as_secs() {
            return Err(TokenError::Expired);
        }
        Ok(odcid)
    }
}

/// Stateless reset tokens: a MAC of the CID under a key derived from the
/// relay's private key and its [`Instance`]. The key survives a restart
/// only for an instance with a configured node id; replicas sharing a
/// private key get different keys (see [`Instance`]).
#[derive(Clone)]
pub struct ResetKey {
    key: [u8; 32],
    node_id: u16,
}

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    /// `secret` is the relay's private key (DER).
    pub fn derive(secret: &[u8], instance: &Instance) -> ResetKey {
        let mut data = instance.reset_label();
        data.extend_from_slice(secret);
        ResetKey { key: hmac(b"ztna stateless reset v2", &data), node_id: instance.node_id() }
    }

    /// The node id of the instance this key belongs to: the only CIDs it
    /// resets.
    pub fn node_id(&self) -> u16 {
        self.node_id
    }

    /// The reset token the relay announces for `cid`.
    pub fn token(&self, cid: &[u8]) -> u128 {
        ztna_control::reset::token(&self.key, cid)
    }

    /// Writes a stateless reset for a packet of `trigger_len` bytes to
    /// `cid` into `out`. Returns its length, or None when `cid` is not in
    /// this instance's layout and node id (never a client's or another
    /// relay's CID), or when the trigger is too small to answer without
    /// risking a reset loop (a reset must be shorter than what triggered it).
    pub fn write_reset(&self, cid: &[u8], trigger_len: usize, out: &mut [u8]) -> Option<usize> {
        if !crate::cid::is_ours(cid, self.node_id) {
            return None;
        }
        ztna_control::reset::write(self.token(cid), trigger_len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tokens_bind_address_cid_and_time() {
        let t0 = Instant::now();
        let keys = RetryKeys::new(t0);
        let peer = addr("192.0.2.1:5000");
        let odcid = [7u8; 16];
        let scid = [9u8; 16];
        let tok = keys.mint(peer, &odcid, &scid, t0);
        assert_eq!(keys.validate(&tok, peer, &scid, t0 + Duration::from_secs(3)), Ok(&odcid[..]));
        // IPv4-mapped IPv6 is the same client.
        assert_eq!(keys.validate(&tok, addr("[::ffff:192.0.2.1]:5000"), &scid, t0), Ok(&odcid[..]));
        // Replayed from another address or port.
        assert_eq!(keys.validate(&tok, addr("192.0.2.2:5000"), &scid, t0), Err(TokenError::BadMac));
        assert_eq!(keys.validate(&tok, addr("192.0.2.1:5001"), &scid, t0), Err(TokenError::BadMac));
        // With another CID than the Retry named.
        assert_eq!(keys.validate(&tok, peer, &[1u8; 16], t0), Err(TokenError::BadMac));
        // Expired.
        assert_eq!(
            keys.validate(&tok, peer, &scid, t0 + TOKEN_LIFETIME + Duration::from_secs(1)),
            Err(TokenError::Expired)
        );
        // Forged: any flipped bit, or another relay's (process's) key.
        for i in 0..tok.len() {
            let mut bad = tok.clone();
            bad[i] ^= 0x01;
            assert!(keys.validate(&bad, peer, &scid, t0).is_err(), "bit flip at {i} accepted");
        }
        assert_eq!(RetryKeys::new(t0).validate(&tok, peer, &scid, t0), Err(TokenError::BadMac));
        // Garbage of every length never panics and never passes.
        for n in 0..64 {
            assert!(keys.validate(&vec![1u8; n], peer, &scid, t0).is_err());
        }
    }

    #[test]
    fn keys_rotate_per_epoch() {
        let t0 = Instant::now();
        let keys = RetryKeys::new(t0);
        let peer = addr("[2001:db8::1]:443");
        let late = t0 + KEY_EPOCH + Duration::from_secs(1);
        let a = keys.mint(peer, b"odcid", b"scid", t0);
        let b = keys.mint(peer, b"odcid", b"scid", late);
        // Same inputs in another epoch: another key, another MAC.
        assert_ne!(a[a.len() - MAC_LEN..], b[b.len() - MAC_LEN..]);
        assert_eq!(keys.validate(&b, peer, b"scid", late), Ok(&b"odcid"[..]));
    }

    #[test]
    fn resets_are_shorter_than_their_trigger_and_end_in_the_token() {
        let node = Instance::configured(0x0102);
        let k = ResetKey::derive(b"relay private key", &node);
        let cid = crate::cid::make(0x0102, 3, [0xaa; 12]);
        let again = ResetKey::derive(b"relay private key", &node);
        assert_eq!(k.token(&cid), again.token(&cid), "a configured node id is stable across restarts");
        assert_ne!(k.token(&cid), ResetKey::derive(b"another key", &node).token(&cid));
        assert_ne!(k.token(&cid), k.token(&crate::cid::make(0x0102, 3, [0xab; 12])));
        let mut out = [0u8; 64];
        for trigger in [0, 1, 20, 21] {
            assert_eq!(k.write_reset(&cid, trigger, &mut out), None, "trigger {trigger}");
        }
        for trigger in [22, 30, 1200] {
            let n = k.write_reset(&cid, trigger, &mut out).unwrap();
            assert!(n < trigger && n >= MIN_RESET_LEN);
            assert_eq!(out[0] & 0xc0, 0x40, "short header with fixed bit");
            assert_eq!(out[n - 16..n], k.token(&cid).to_be_bytes());
        }
    }

    /// Two instances from one private key: neither resets the other's CIDs,
    /// and their tokens for the same CID differ even when the node ids
    /// collide.
    #[test]
    fn instances_sharing_a_key_never_reset_each_other() {
        let secret = b"one Secret, two replicas";
        let (a, b) = (Instance::random().unwrap(), Instance::random().unwrap());
        let (ka, kb) = (ResetKey::derive(secret, &a), ResetKey::derive(secret, &b));
        let cid_a = crate::cid::make(a.node_id(), 0, [0x11; 12]);
        let mut out = [0u8; 64];
        if a.node_id() != b.node_id() {
            assert_eq!(kb.write_reset(&cid_a, 1200, &mut out), None, "another node id is never reset");
        }
        assert_ne!(ka.token(&cid_a), kb.token(&cid_a));
        // Same node id by chance (or both unset on an old build): still
        // different keys, because the nonces differ.
        let (c, d) = (Instance::random().unwrap(), Instance::random().unwrap());
        assert_ne!(c.reset_label(), d.reset_label());
        // Distinct configured node ids: distinct keys too.
        let (k7, k8) =
            (ResetKey::derive(secret, &Instance::configured(7)), ResetKey::derive(secret, &Instance::configured(8)));
        let cid7 = crate::cid::make(7, 0, [0x22; 12]);
        assert_eq!(k8.write_reset(&cid7, 1200, &mut out), None);
        assert_ne!(k7.token(&cid7), k8.token(&cid7));
        assert!(k7.write_reset(&cid7, 1200, &mut out).is_some());
        // Only CIDs in the relay's layout: never a client-chosen one.
        assert_eq!(k7.write_reset(&[7u8; 16], 1200, &mut out), None);
        assert_eq!(k7.write_reset(&cid7[..8], 1200, &mut out), None);
    }
}
