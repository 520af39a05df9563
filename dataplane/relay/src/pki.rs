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

/// Trust domain of the development PKI.
pub const DEV_TRUST_DOMAIN: &str = "dev.ztna";

/// A generated development PKI: an organisation CA for
/// [`DEV_TRUST_DOMAIN`] (key kept, so it can issue client certificates)
/// and a relay certificate for `localhost`, 127.0.0.1 and ::1.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    /// CA certificate (what clients verify the relay with, and what the
    /// relay verifies clients with).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_files: CaFiles,
}

impl DevPki {
    /// Issues (or reuses) a certificate for `kind`/`name` in the dev trust
    /// domain; returns (cert, key).
    pub fn issue(&self, kind: ztna_control::identity::Kind, name: &str) -> Result<(PathBuf, PathBuf)> {
        let id = ztna_control::identity::Identity { trust_domain: DEV_TRUST_DOMAIN.into(), kind, name: name.into() };
        let stem = self.dir.join(format!("{}-{}", kind.as_str(), name));
        let (cert, key) = (stem.with_extension("pem"), stem.with_extension("key"));
        if cert.exists() && key.exists() {
            return Ok((cert, key));
        }
        issue(&self.ca_files, &id, &[], &[], 7, &self.dir)
    }

    /// Client TLS options: verify the relay with the dev CA, present a
    /// certificate for `kind`/`name`.
    pub fn client_tls(&self, kind: ztna_control::identity::Kind, name: &str) -> Result<ztna_control::quic::TlsOptions> {
        let (cert, key) = self.issue(kind, name)?;
        ztna_ops::tls::read_mutual_tls(&self.ca, &cert, &key)
    }
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

/// Creates a dev organisation CA and a relay certificate in a new directory
/// under `base` (7-day validity).
pub fn generate(base: &Path) -> Result<DevPki> {
    let mut rnd = [0u8; 8];
    boring::rand::rand_bytes(&mut rnd)?;
    let dir = base.join(format!("ztna-dev-{}-{:016x}", std::process::id(), u64::from_le_bytes(rnd)));
    let ca_files = init_ca(&dir, DEV_TRUST_DOMAIN, 7)?;
    let relay = ztna_control::identity::Identity {
        trust_domain: DEV_TRUST_DOMAIN.into(),
        kind: ztna_control::identity::Kind::Relay,
        name: "dev-relay".into(),
    };
    let ips: [std::net::IpAddr; 2] = [std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()];
    let (cert, key) = issue(&ca_files, &relay, &["localhost".to_owned()], &ips, 7, &dir)?;
    Ok(DevPki { ca: ca_files.cert.clone(), cert, key, dir, ca_files })
}

/// A certificate authority on disk: `ca.pem` and `ca.key` in one directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles { dir: dir.to_path_buf(), cert: dir.join("ca.pem"), key: dir.join("ca.key") }
    }
}

fn write_private(path: &Path, pem: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (refusing to overwrite a key)", path.display()))?;
    f.write_all(pem)?;
    Ok(())
}

/// Creates an organisation CA for `trust_domain` in `dir` (valid `days`).
/// Refuses to overwrite an existing key.
pub fn init_ca(dir: &Path, trust_domain: &str, days: u32) -> Result<CaFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = CaFiles::in_dir(dir);
    let key = new_key()?;
    let name = name(&format!("ztna CA for {trust_domain}"))?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(days)?)?;
    b.append_extension(&*BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(&*KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    b.sign(&key, MessageDigest::sha256())?;
    write_private(&files.key, &key.private_key_to_pem_pkcs8()?)?;
    std::fs::write(&files.cert, b.build().to_pem()?)?;
    Ok(files)
}

/// Issues a certificate for `id` signed by the CA in `ca`, with exactly one
/// URI SAN (the SPIFFE ID) plus optional DNS/IP SANs (relays), valid
/// `days`. Writes `<kind>-<name>.pem` and `.key` into `out`.
pub fn issue(
    ca: &CaFiles,
    id: &ztna_control::identity::Identity,
    dns: &[String],
    ips: &[std::net::IpAddr],
    days: u32,
    out: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let ca_cert = X509::from_pem(&std::fs::read(&ca.cert).with_context(|| format!("reading {}", ca.cert.display()))?)?;
    let ca_key =
        PKey::private_key_from_pem(&std::fs::read(&ca.key).with_context(|| format!("reading {}", ca.key.display()))?)?;
    if id.kind != ztna_control::identity::Kind::Relay && !(dns.is_empty() && ips.is_empty()) {
        anyhow::bail!("DNS and IP names are for relay certificates only");
    }
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&*name(&id.name)?)?;
    b.set_issuer_name(ca_cert.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(days)?)?;
    let mut san = SubjectAlternativeName::new();
    san.uri(&id.uri());
    for d in dns {
        san.dns(d);
    }
    for ip in ips {
        san.ip(&ip.to_string());
    }
    let san = san.build(&b.x509v3_context(Some(&ca_cert), None))?;
    b.append_extension(&san)?;
    // Only relays may act as TLS servers: an agent or connector certificate
    // must never pass as the relay (clients check serverAuth).
    let mut eku = boring::x509::extension::ExtendedKeyUsage::new();
    eku.client_auth();
    if id.kind == ztna_control::identity::Kind::Relay {
        eku.server_auth();
    }
    b.append_extension(&*eku.build()?)?;
    b.sign(&ca_key, MessageDigest::sha256())?;
    std::fs::create_dir_all(out)?;
    let stem = format!("{}-{}", id.kind.as_str(), id.name);
    let (cert_path, key_path) = (out.join(format!("{stem}.pem")), out.join(format!("{stem}.key")));
    write_private(&key_path, &key.private_key_to_pem_pkcs8()?)?;
    std::fs::write(&cert_path, b.build().to_pem()?)?;
    Ok((cert_path, key_path))
}

/// Issues a certificate with arbitrary URI SANs and validity (Unix
/// seconds), written to `cert`/`key`. For negative tests and tools: the
/// normal path is [`issue`], which enforces one SPIFFE ID.
pub fn issue_raw(ca: &CaFiles, uris: &[&str], valid: (i64, i64), cert: &Path, key_path: &Path) -> Result<()> {
    let uris: Vec<&[u8]> = uris.iter().map(|u| u.as_bytes()).collect();
    issue_raw_bytes(ca, &uris, valid, cert, key_path)
}

/// [`issue_raw`] with URI SANs given as raw bytes, so a test can make a
/// certificate whose URI SAN is not ASCII (not a valid IA5String). The SAN
/// extension is DER-encoded here, since the X.509 builder takes only text.
pub fn issue_raw_bytes(ca: &CaFiles, uris: &[&[u8]], valid: (i64, i64), cert: &Path, key_path: &Path) -> Result<()> {
    let ca_cert = X509::from_pem(&std::fs::read(&ca.cert)?)?;
    let ca_key = PKey::private_key_from_pem(&std::fs::read(&ca.key)?)?;
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*serial()?)?;
    b.set_subject_name(&*name("test")?)?;
    b.set_issuer_name(ca_cert.subject_name())?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::from_unix(valid.0 as _)?)?;
    b.set_not_after(&*Asn1Time::from_unix(valid.1 as _)?)?;
    if !uris.is_empty() {
        let names: Vec<u8> = uris.iter().flat_map(|u| der_tlv(URI_TAG, u)).collect();
        let hex: Vec<String> = der_tlv(0x30, &names).iter().map(|b| format!("{b:02x}")).collect();
        let san = boring::x509::X509Extension::new_nid(
            None,
            Some(&b.x509v3_context(Some(&ca_cert), None)),
            Nid::SUBJECT_ALT_NAME,
            &format!("DER:{}", hex.join(":")),
        )?;
        b.append_extension(&san)?;
    }
    b.append_extension(&*boring::x509::extension::ExtendedKeyUsage::new().client_auth().build()?)?;
    b.sign(&ca_key, MessageDigest::sha256())?;
    write_private(key_path, &key.private_key_to_pem_pkcs8()?)?;
    std::fs::write(cert, b.build().to_pem()?)?;
    Ok(())
}

/// A DER element with a definite length.
fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    if body.len() < 0x80 {
        v.push(body.len() as u8);
    } else {
        let len = body.len().to_be_bytes();
        let significant = len.iter().skip_while(|b| **b == 0).count();
        v.push(0x80 | significant as u8);
        v.extend_from_slice(len.get(len.len() - significant..).unwrap_or_default());
    }
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
use ztna_control::cert::uri_sans;
use ztna_control::cert::URI_TAG;
pub use ztna_control::cert::{identity_from_der, CertIdentityError};

#[cfg(test)]
mod tests {
    use super::*;
    use ztna_control::identity::{Identity, IdentityError, Kind};

    fn tmp(tag: &str) -> PathBuf {
        let mut r = [0u8; 8];
        boring::rand::rand_bytes(&mut r).unwrap();
        std::env::temp_dir().join(format!("ztna-pki-{tag}-{:016x}", u64::from_le_bytes(r)))
    }

    fn der(pem_path: &Path) -> Vec<u8> {
        X509::from_pem(&std::fs::read(pem_path).unwrap()).unwrap().to_der().unwrap()
    }

    #[test]
    fn issued_certificates_carry_exactly_their_identity() {
        let dir = tmp("ca");
        let ca = init_ca(&dir, "corp.example", 30).unwrap();
        assert!(init_ca(&dir, "corp.example", 30).is_err(), "never overwrites a CA key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ca.key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "keys are private");
        let alice = Identity { trust_domain: "corp.example".into(), kind: Kind::Agent, name: "alice".into() };
        let (cert, key) = issue(&ca, &alice, &[], &[], 7, &dir.join("out")).unwrap();
        assert!(key.exists());
        assert_eq!(identity_from_der(&der(&cert), "corp.example"), Ok(alice));
        assert_eq!(
            identity_from_der(&der(&cert), "other.example"),
            Err(CertIdentityError::Invalid(IdentityError::WrongTrustDomain))
        );
        // A relay certificate also names its host.
        let relay = Identity { trust_domain: "corp.example".into(), kind: Kind::Relay, name: "relay-1".into() };
        let (rc, _) =
            issue(&ca, &relay, &["localhost".into()], &["127.0.0.1".parse().unwrap()], 7, &dir.join("out")).unwrap();
        assert_eq!(identity_from_der(&der(&rc), "corp.example").unwrap().kind, Kind::Relay);
        // The dev PKI issues relay and client identities in its own domain.
        let dev = generate(&dir).unwrap();
        assert_eq!(identity_from_der(&der(&dev.cert), DEV_TRUST_DOMAIN).unwrap().kind, Kind::Relay);
        let (c, _) = dev.issue(Kind::Connector, "c1").unwrap();
        assert_eq!(dev.issue(Kind::Connector, "c1").unwrap().0, c, "reused");
        assert_eq!(identity_from_der(&der(&c), DEV_TRUST_DOMAIN).unwrap().name, "c1");
        // No URI SAN at all.
        let (nc, nk) = (dir.join("none.pem"), dir.join("none.key"));
        issue_raw(&ca, &[], (0, 4_000_000_000), &nc, &nk).unwrap();
        assert_eq!(identity_from_der(&der(&nc), "corp.example"), Err(CertIdentityError::NoUri));
        assert_eq!(identity_from_der(b"not a certificate", "corp.example"), Err(CertIdentityError::Unparseable));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A URI SAN that is not ASCII (IA5String) still counts: a second,
    /// unreadable URI must not leave the first as "the only one", and a
    /// lone unreadable one is refused, not skipped.
    #[test]
    fn unreadable_uri_sans_are_counted_and_refused() {
        let dir = tmp("bytes");
        let ca = init_ca(&dir, "corp", 30).unwrap();
        let make = |tag: &str, uris: &[&[u8]]| {
            let (c, k) = (dir.join(format!("{tag}.pem")), dir.join(format!("{tag}.key")));
            issue_raw_bytes(&ca, uris, (0, 4_000_000_000), &c, &k).unwrap();
            der(&c)
        };
        let good: &[u8] = b"spiffe://corp/agent/alice";
        // The control: the same builder with one readable URI gives its identity.
        assert_eq!(identity_from_der(&make("one", &[good]), "corp").unwrap().name, "alice");
        // Not UTF-8; UTF-8 but not ASCII (IA5String is ASCII).
        for (i, bad) in [&b"spiffe://corp/agent/\xff\xfe"[..], b"spiffe://corp/agent/caf\xc3\xa9"].iter().enumerate() {
            let two = make(&format!("two{i}"), &[good, bad]);
            assert_eq!(identity_from_der(&two, "corp"), Err(CertIdentityError::SeveralUris(2)), "bad URI {i} second");
            let rev = make(&format!("rev{i}"), &[bad, good]);
            assert_eq!(identity_from_der(&rev, "corp"), Err(CertIdentityError::SeveralUris(2)), "bad URI {i} first");
            let lone = make(&format!("lone{i}"), &[bad]);
            assert_eq!(identity_from_der(&lone, "corp"), Err(CertIdentityError::UnreadableUri), "bad URI {i} alone");
        }
        // The DER walk never panics and never accepts a damaged certificate.
        let one = make("cut", &[good]);
        for n in 0..one.len() {
            assert!(uri_sans(&one[..n]).is_none_or(|u| u.is_empty()), "truncated at {n}");
            assert!(identity_from_der(&one[..n], "corp").is_err());
        }
        assert_eq!(uri_sans(&one), Some(vec![good]));
        // Two subjectAltName extensions, one URI each: refused.
        let ca_cert = X509::from_pem(&std::fs::read(&ca.cert).unwrap()).unwrap();
        let ca_key = PKey::private_key_from_pem(&std::fs::read(&ca.key).unwrap()).unwrap();
        let key = new_key().unwrap();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name("x").unwrap()).unwrap();
        b.set_issuer_name(ca_cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        for uri in ["spiffe://corp/agent/alice", "spiffe://corp/agent/bob"] {
            let san = SubjectAlternativeName::new().uri(uri).build(&b.x509v3_context(Some(&ca_cert), None)).unwrap();
            b.append_extension(&san).unwrap();
        }
        b.sign(&ca_key, MessageDigest::sha256()).unwrap();
        let twice = b.build().to_der().unwrap();
        assert_eq!(uri_sans(&twice), None);
        assert!(identity_from_der(&twice, "corp").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_uri_sans_are_refused() {
        let dir = tmp("two");
        let ca = init_ca(&dir, "corp", 30).unwrap();
        let ca_cert = X509::from_pem(&std::fs::read(&ca.cert).unwrap()).unwrap();
        let ca_key = PKey::private_key_from_pem(&std::fs::read(&ca.key).unwrap()).unwrap();
        let key = new_key().unwrap();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial().unwrap()).unwrap();
        b.set_subject_name(&name("x").unwrap()).unwrap();
        b.set_issuer_name(ca_cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap()).unwrap();
        let san = SubjectAlternativeName::new()
            .uri("spiffe://corp/agent/a")
            .uri("spiffe://corp/connector/b")
            .build(&b.x509v3_context(Some(&ca_cert), None))
            .unwrap();
        b.append_extension(&san).unwrap();
        b.sign(&ca_key, MessageDigest::sha256()).unwrap();
        let der = b.build().to_der().unwrap();
        assert_eq!(identity_from_der(&der, "corp"), Err(CertIdentityError::SeveralUris(2)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
