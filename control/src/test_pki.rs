#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! Certificates for this crate's unit tests: an EC P-256 CA and leaves with
//! one URI SAN, issued for client authentication only (as the
//! organisation CA issues agent and connector certificates).

use boring::asn1::Asn1Time;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::{BasicConstraints, ExtendedKeyUsage, SubjectAlternativeName};
use boring::x509::{X509NameBuilder, X509};

pub struct Ca {
    pub cert: X509,
    pub key: PKey<Private>,
}

pub fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> boring::x509::X509Name {
    let mut n = X509NameBuilder::new().unwrap();
    n.append_entry_by_text("CN", cn).unwrap();
    n.build()
}

pub fn ca() -> Ca {
    let key = key();
    let n = name("test ca");
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&n).unwrap();
    b.set_issuer_name(&n).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
    b.append_extension(&BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    Ca { cert: b.build(), key }
}

/// A leaf for `uri` issued by `ca`, valid from now for `days`, and its key.
pub fn leaf(ca: &Ca, uri: &str, days: u32) -> (X509, PKey<Private>) {
    let key = key();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name("leaf")).unwrap();
    b.set_issuer_name(ca.cert.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(days).unwrap()).unwrap();
    let san = SubjectAlternativeName::new().uri(uri).build(&b.x509v3_context(Some(&ca.cert), None)).unwrap();
    b.append_extension(&san).unwrap();
    b.append_extension(&ExtendedKeyUsage::new().client_auth().build().unwrap()).unwrap();
    b.sign(&ca.key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}
