//! QUIC stateless resets (RFC 9000 §10.3): the tokens and the packet.
//!
//! A stateless reset lets an endpoint that lost a connection's state tell
//! the peer at once, instead of leaving it to an idle timeout: a packet
//! that looks like a short-header packet and ends with the 16-byte token
//! the endpoint announced for that connection ID. The token is a MAC of
//! the connection ID under a secret key, so anyone holding the key (a
//! restarted process, a replica with the same key) can compute it and no
//! one else can. The relay resets its client connections this way; a
//! connector resets end-to-end sessions it does not hold
//! (docs/protocol/e2e.md §8.7).

/// Smallest stateless reset (RFC 9000 §10.3).
pub const MIN_RESET_LEN: usize = 21;
/// Largest reset sent: enough to look like a short packet.
pub const MAX_RESET_LEN: usize = 43;

/// HMAC-SHA256 of `data` under `key`.
pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC-SHA256 with an in-memory key cannot fail; a zero MAC would only
    // make tokens useless, never valid for someone else's key.
    boring::hash::hmac_sha256(key, data).unwrap_or([0u8; 32])
}

/// The reset token for connection ID `cid` under `key`.
pub fn token(key: &[u8; 32], cid: &[u8]) -> u128 {
    let mac = hmac(key, cid);
    let mut t = [0u8; 16];
    t.copy_from_slice(mac.get(..16).unwrap_or(&[0u8; 16]));
    u128::from_be_bytes(t)
}

/// Writes a stateless reset carrying `token` in answer to a packet of
/// `trigger_len` bytes into `out`; returns its length. None when the
/// trigger is too small to answer without risking a reset loop (a reset
/// must be shorter than what triggered it) or `out` too short.
pub fn write(token: u128, trigger_len: usize, out: &mut [u8]) -> Option<usize> {
    let len = trigger_len.checked_sub(1)?.min(MAX_RESET_LEN);
    if len < MIN_RESET_LEN {
        return None;
    }
    let out = out.get_mut(..len)?;
    let _ = boring::rand::rand_bytes(out);
    if let Some(first) = out.first_mut() {
        // Short header form with the fixed bit: 0b01xx_xxxx.
        *first = (*first & 0x3f) | 0x40;
    }
    out.get_mut(len - 16..)?.copy_from_slice(&token.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test code
    use super::*;

    #[test]
    fn a_reset_is_shorter_than_its_trigger_looks_short_and_ends_with_the_token() {
        let key = [7u8; 32];
        let t = token(&key, b"cid-0001");
        assert_ne!(t, token(&key, b"cid-0002"));
        assert_ne!(t, token(&[8u8; 32], b"cid-0001"));
        let mut out = [0u8; 64];
        let n = write(t, 60, &mut out).unwrap();
        assert_eq!(n, MAX_RESET_LEN);
        assert_eq!(out[0] & 0xc0, 0x40);
        assert_eq!(out[n - 16..n], t.to_be_bytes());
        assert_eq!(write(t, 30, &mut out), Some(29));
        assert_eq!(write(t, MIN_RESET_LEN, &mut out), None, "no reset as long as its trigger");
        assert_eq!(write(t, 0, &mut out), None);
    }
}
