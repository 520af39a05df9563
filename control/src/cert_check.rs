//! Offline checks of an endpoint's own TLS material, for `check-config`:
//! key and certificate belong together, the certificate holds the identity
//! kind the program needs, it is valid now (and not about to expire), and
//! the CA verifies it. PEM bytes and `now` in, a summary or the first
//! problem out: the callers read the files and the clock.

use boring::asn1::Asn1Time;
use boring::pkey::PKey;
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509StoreContext, X509};

use crate::cert::uri_of;
use crate::identity::{Identity, Kind};
use crate::tls_report::describe;

/// Fewer days of validity left than this is worth a warning.
pub const EXPIRY_WARNING_DAYS: i32 = 14;

/// What a checked certificate holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCert {
    pub identity: Identity,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    /// Whole days of validity left.
    pub days_left: i32,
    /// Subject, SANs, validity and issuer in one line.
    pub description: String,
    /// Things that are not errors but deserve a look.
    pub warnings: Vec<String>,
}

/// Checks `cert_pem` (chain, leaf first) and `key_pem` against `want` and
/// the CA bundle `ca_pem` at `now` (Unix seconds). `ca_must_verify`: a
/// CA that does not verify the certificate is an error (else a warning: a
/// relay may carry a publicly issued certificate).
pub fn check_own(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    want: Kind,
    now: i64,
    ca_must_verify: bool,
) -> Result<OwnCert, String> {
    let chain = X509::stack_from_pem(cert_pem).map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("the certificate file holds no certificate")?;
    let key = PKey::private_key_from_pem(key_pem).map_err(|e| format!("the key file is not a PEM private key: {e}"))?;
    let public = leaf.public_key().map_err(|e| format!("the certificate's public key: {e}"))?;
    if !public.public_eq(&key) {
        return Err("the private key does not belong to the certificate".to_owned());
    }
    let der = leaf.to_der().map_err(|e| format!("the certificate: {e}"))?;
    let uri = uri_of(&der).ok_or("the certificate has no single URI SAN (its SPIFFE identity)")?;
    let identity = Identity::parse(&uri).map_err(|e| format!("the certificate's URI SAN {uri:?}: {e}"))?;
    if identity.kind != want {
        return Err(format!(
            "the certificate is {identity}, a {} identity; this program needs {} {} identity \
             (spiffe://<trust-domain>/{}/<name>)",
            identity.kind.as_str(),
            if want == Kind::Agent { "an" } else { "a" },
            want.as_str(),
            want.as_str()
        ));
    }
    let now_t = Asn1Time::from_unix(now).map_err(|e| format!("the clock: {e}"))?;
    let description = describe(leaf);
    if leaf.not_before() > now_t {
        return Err(format!("the certificate is not valid yet: {description}"));
    }
    if leaf.not_after() < now_t {
        return Err(format!("the certificate has expired: {description}"));
    }
    let days_left = now_t.diff(leaf.not_after()).map(|d| d.days).unwrap_or(0);
    let mut warnings = Vec::new();
    if days_left < EXPIRY_WARNING_DAYS {
        warnings.push(format!("the certificate expires in {days_left} day(s) ({})", leaf.not_after()));
    }
    if let Err(e) = verify_chain(ca_pem, leaf, intermediates) {
        if ca_must_verify {
            return Err(e);
        }
        warnings.push(e);
    }
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for n in leaf.subject_alt_names().iter().flatten() {
        if let Some(d) = n.dnsname() {
            dns.push(d.to_owned());
        } else if let Some(raw) = n.ipaddress() {
            if let Ok(b) = <[u8; 4]>::try_from(raw) {
                ips.push(b.into());
            } else if let Ok(b) = <[u8; 16]>::try_from(raw) {
                ips.push(b.into());
            }
        }
    }
    Ok(OwnCert { identity, dns, ips, days_left, description, warnings })
}

/// Whether the CA bundle verifies `leaf` (through `intermediates`).
fn verify_chain(ca_pem: &[u8], leaf: &X509, intermediates: &[X509]) -> Result<(), String> {
    let cas = X509::stack_from_pem(ca_pem).map_err(|e| format!("the CA file is not PEM: {e}"))?;
    if cas.is_empty() {
        return Err("the CA file holds no certificate".to_owned());
    }
    let subjects: Vec<String> = cas.iter().map(|c| crate::tls_report::describe_subject(c.subject_name())).collect();
    let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
    for c in cas {
        store.add_cert(c).map_err(|e| e.to_string())?;
    }
    let store = store.build();
    let mut untrusted = boring::stack::Stack::new().map_err(|e| e.to_string())?;
    for c in intermediates {
        untrusted.push(c.clone()).map_err(|e| e.to_string())?;
    }
    let mut ctx = X509StoreContext::new().map_err(|e| e.to_string())?;
    let verdict = ctx
        .init(&store, leaf, &untrusted, |c| Ok(c.verify_cert().map(|ok| if ok { Ok(()) } else { c.verify_result() })))
        .map_err(|e| e.to_string())?;
    match verdict {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            Err(format!("the CA file ({}) does not verify the certificate: {}", subjects.join(" | "), e.error_string()))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
