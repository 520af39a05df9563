#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use super::*;
use crate::test_pki::{ca, key, leaf};

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn pem(c: &X509) -> Vec<u8> {
    c.to_pem().unwrap()
}

#[test]
fn a_good_certificate_is_summarised_and_each_bad_part_named() {
    let ca = ca();
    let (cert, k) = leaf(&ca, "spiffe://corp.test/connector/c1", 1);
    let kp = k.private_key_to_pem_pkcs8().unwrap();
    let ok = check_own(&pem(&ca.cert), &pem(&cert), &kp, Kind::Connector, now(), true).unwrap();
    assert_eq!(ok.identity.to_string(), "spiffe://corp.test/connector/c1");
    assert!(ok.days_left <= 1);
    assert!(ok.warnings.iter().any(|w| w.contains("expires in")), "{:?}", ok.warnings);
    // Wrong kind.
    let e = check_own(&pem(&ca.cert), &pem(&cert), &kp, Kind::Agent, now(), true).unwrap_err();
    assert!(e.contains("a connector identity; this program needs an agent identity"), "{e}");
    // Key of another certificate.
    let other = key().private_key_to_pem_pkcs8().unwrap();
    let e = check_own(&pem(&ca.cert), &pem(&cert), &other, Kind::Connector, now(), true).unwrap_err();
    assert!(e.contains("does not belong"), "{e}");
    // Another CA.
    let e = check_own(&pem(&crate::test_pki::ca().cert), &pem(&cert), &kp, Kind::Connector, now(), true).unwrap_err();
    assert!(e.contains("does not verify the certificate"), "{e}");
    let relaxed = check_own(&pem(&crate::test_pki::ca().cert), &pem(&cert), &kp, Kind::Connector, now(), false);
    assert!(relaxed.unwrap().warnings.iter().any(|w| w.contains("does not verify")));
    // Expired (checked a week later) and not yet valid (a week earlier).
    let e = check_own(&pem(&ca.cert), &pem(&cert), &kp, Kind::Connector, now() + 7 * 86400, true).unwrap_err();
    assert!(e.contains("has expired"), "{e}");
    let e = check_own(&pem(&ca.cert), &pem(&cert), &kp, Kind::Connector, now() - 7 * 86400, true).unwrap_err();
    assert!(e.contains("not valid yet"), "{e}");
    // Not PEM.
    let e = check_own(b"x", b"junk", &kp, Kind::Connector, now(), true).unwrap_err();
    assert!(e.contains("no certificate") || e.contains("not PEM"), "{e}");
}
