#![no_main]
//! Retry tokens and stateless resets (`dataplane/relay/src/retry.rs`): a client
//! puts any bytes it likes in the token field of an Initial, and the relay
//! validates them (`RetryKeys::validate`) before it spends a handshake. A
//! short-header packet for an unknown CID gets a stateless reset whose size
//! derives from the trigger's (`ResetKey::write_reset`).
//!
//! Checks: arbitrary tokens are refused (nobody forges the MAC); a minted
//! token validates for the same peer, CID and time window and returns the
//! original DCID; a token with any byte changed, from another address, for
//! another CID, too old or from the future is refused; resets are shorter
//! than their trigger, at least 21 bytes, look like short-header packets
//! and end with the CID's token.
//!
//! Input: `[peer: family, 16 ip, port BE][dcid len][dcid][odcid len]
//! [odcid][age s: u16 BE][flip index: u16 BE][trigger len: u16 BE][token]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ztna_relay::cid::{self, Instance};
use ztna_relay::retry::{ResetKey, RetryKeys, TokenError, MIN_RESET_LEN, TOKEN_LIFETIME};

/// Node id of the fuzzed reset key: only 16-byte DCIDs starting
/// `0f 00 00` are its own and get a reset.
const FUZZ_NODE: u16 = 0;

struct Keys {
    start: Instant,
    retry: RetryKeys,
    reset: ResetKey,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        // Far enough from the start that tokens "from the future" exist.
        let start = Instant::now();
        Keys { start, retry: RetryKeys::new(start), reset: ResetKey::derive(b"fuzz relay private key", &Instance::configured(FUZZ_NODE)) }
    })
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        match self.take(2) {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from(*a),
            _ => 0,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    let mut inp = Input(data);
    let family = inp.u8();
    let mut ip = [0u8; 16];
    let b = inp.take(16);
    ip[..b.len()].copy_from_slice(b);
    let port = inp.u16();
    let peer = if family & 1 == 0 {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])), port)
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
    };
    let n = usize::from(inp.u8() % 24);
    let dcid = inp.take(n).to_vec();
    let n = usize::from(inp.u8() % 24);
    let odcid = inp.take(n).to_vec();
    let age = Duration::from_secs(u64::from(inp.u16() % 64));
    let flip = usize::from(inp.u16());
    let trigger = usize::from(inp.u16());
    let token = inp.0;
    // Times up to an hour after the start, so key epochs vary.
    let issued = k.start + Duration::from_secs(u64::from(port) % 3600);
    let now = issued + age;

    // Anything the fuzzer makes up is refused.
    if let Ok(o) = k.retry.validate(token, peer, &dcid, now) {
        panic!("forged token accepted: {token:02x?} -> odcid {o:02x?}");
    }

    // A genuine token.
    let t = k.retry.mint(peer, &odcid, &dcid, issued);
    let expect = &odcid[..odcid.len().min(20)];
    let fresh = age <= TOKEN_LIFETIME;
    match k.retry.validate(&t, peer, &dcid, now) {
        Ok(o) => {
            assert!(fresh, "token accepted {age:?} after issue");
            assert_eq!(o, expect);
        }
        Err(TokenError::Expired) => assert!(!fresh, "fresh token expired"),
        Err(e) => panic!("genuine token refused: {e:?}"),
    }
    // From the future (the relay's clock never goes back, but tokens of
    // another relay process may claim anything).
    if age > Duration::ZERO {
        let future = k.retry.mint(peer, &odcid, &dcid, now);
        assert_eq!(k.retry.validate(&future, peer, &dcid, issued), Err(TokenError::Expired));
    }
    // Any changed byte, another address or another CID: refused.
    let mut bad = t.clone();
    let i = flip % bad.len();
    bad[i] ^= 1 | (flip >> 8) as u8;
    assert!(k.retry.validate(&bad, peer, &dcid, issued).is_err(), "token with byte {i} changed accepted");
    let other = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
    assert!(k.retry.validate(&t, other, &dcid, issued).is_err(), "token accepted from another port");
    let mut cid2 = dcid.clone();
    cid2.push(0);
    assert!(k.retry.validate(&t, peer, &cid2, issued).is_err(), "token accepted for another CID");
    assert!(k.retry.validate(&t[..t.len() - 1], peer, &dcid, issued).is_err());

    // Stateless reset for a trigger of `trigger` bytes.
    let mut out = vec![0u8; 64];
    match k.reset.write_reset(&dcid, trigger, &mut out) {
        Some(n) => {
            assert!(n < trigger && n >= MIN_RESET_LEN, "reset of {n} bytes for a {trigger}-byte trigger");
            assert_eq!(out[0] & 0xc0, 0x40, "not a short-header packet");
            assert_eq!(out[n - 16..n], k.reset.token(&dcid).to_be_bytes());
        }
        None => assert!(trigger <= MIN_RESET_LEN || !cid::is_ours(&dcid, FUZZ_NODE), "no reset for our CID"),
    }
});
