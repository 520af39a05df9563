#![no_main]
//! Peer certificates: `pki::identity_from_der` (the identity rule applied to
//! a peer's DER certificate: exactly one URI SAN, a SPIFFE ID in the trust
//! domain) and `Identity::parse`/`parse_in` on the raw bytes as text.
//!
//! Input: a DER certificate (or anything).

use libfuzzer_sys::fuzz_target;
use ztna_control::identity::Identity;
use ztna_relay::pki::{identity_from_der, CertIdentityError};

const TRUST_DOMAIN: &str = "corp.example";

fuzz_target!(|data: &[u8]| {
    match identity_from_der(data, TRUST_DOMAIN) {
        Ok(id) => {
            assert_eq!(id.trust_domain, TRUST_DOMAIN);
            assert_eq!(Identity::parse_in(&id.uri(), TRUST_DOMAIN), Ok(id));
        }
        Err(CertIdentityError::SeveralUris(n)) => assert!(n > 1),
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = Identity::parse(&text) {
        assert_eq!(id.uri(), text);
        assert_eq!(Identity::parse_in(&text, &id.trust_domain), Ok(id));
    }
});
