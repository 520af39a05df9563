//! Development PKI: an ephemeral CA and a relay certificate signed by it,
//! written to a fresh directory so quiche can load them. For `--dev` and
//! tests only; nothing here is used with real certificates.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use boring::x509::{X509NameBuilder, X509};

/// Paths of a generated development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn new_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn name(cn: &str) -> Result<boring::x509::X509Name> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_text("CN", cn)?;
    Ok(b.build())
}

fn serial() -> Result<boring::asn1::Asn1Integer> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

/// Creates a CA and a certificate for `localhost`, 127.0.0.1 and ::1 in a
/// new directory under `base` (7-day validity).
pub fn generate(base: &Path) -> Result<DevPki> {
    let mut rnd = [0u8; 8];
    boring::rand::rand_bytes(&mut rnd)?;
    let dir = base.join(format!("ztna-dev-{}-{:016x}", std::process::id(), u64::from_le_bytes(rnd)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let ca_key = new_key()?;
    let ca_name = name("ztna dev CA (ephemeral)")?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&ca_name)?;
    b.set_issuer_name(&ca_name)?;
    b.set_pubkey(&ca_key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(7)?)?;
    b.append_extension(&*BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(&*KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    b.sign(&ca_key, MessageDigest::sha256())?;
    let ca = b.build();

    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&*name("localhost")?)?;
    b.set_issuer_name(&ca_name)?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(7)?)?;
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .ip("::1")
        .build(&b.x509v3_context(Some(&ca), None))?;
    b.append_extension(&san)?;
    b.sign(&ca_key, MessageDigest::sha256())?;
    let cert = b.build();

    let pki = DevPki { ca: dir.join("ca.pem"), cert: dir.join("relay.pem"), key: dir.join("relay.key"), dir };
    std::fs::write(&pki.ca, ca.to_pem()?)?;
    std::fs::write(&pki.cert, cert.to_pem()?)?;
    std::fs::write(&pki.key, key.private_key_to_pem_pkcs8()?)?;
    Ok(pki)
}
