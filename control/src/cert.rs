//! Identities in X.509 certificates: the SPIFFE rule applied to a DER
//! certificate (exactly one URI SAN, in the trust domain), and the
//! BoringSSL verification hook every mutual-TLS endpoint installs (the
//! relay for its clients, agent and connector for each other end to end).

use boring::x509::{X509StoreContextRef, X509VerifyError, X509};

use crate::identity::{Identity, IdentityError, Kind};

/// GeneralName `uniformResourceIdentifier`: `[6] IMPLICIT IA5String`.
pub const URI_TAG: u8 = 0x86;

/// Why a peer certificate carries no acceptable identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentityError {
    /// Not a parseable X.509 certificate.
    Unparseable,
    /// No URI SAN at all.
    NoUri,
    /// More than one URI SAN (ambiguous identity), readable or not.
    SeveralUris(usize),
    /// The only URI SAN is not ASCII (an IA5String must be).
    UnreadableUri,
    /// The URI SAN is not an acceptable SPIFFE ID.
    Invalid(IdentityError),
}

/// The identity in a (DER) peer certificate: exactly one URI SAN, a SPIFFE
/// ID in `trust_domain`. Chain and validity are checked by TLS; this is the
/// identity rule on top.
///
/// Every URI SAN counts, whatever its bytes: the count comes from the DER
/// itself ([`uri_sans`]), not from the names a string accessor can read, so
/// a second URI that is not ASCII cannot make the first look like the only
/// one. The one URI must be ASCII (an IA5String), and BoringSSL's own
/// reading of the SAN extension must agree with ours.
pub fn identity_from_der(der: &[u8], trust_domain: &str) -> std::result::Result<Identity, CertIdentityError> {
    let cert = X509::from_der(der).map_err(|_| CertIdentityError::Unparseable)?;
    let uris = uri_sans(der).ok_or(CertIdentityError::Unparseable)?;
    let one = match uris.as_slice() {
        [] => return Err(CertIdentityError::NoUri),
        [one] => *one,
        many => return Err(CertIdentityError::SeveralUris(many.len())),
    };
    let uri = std::str::from_utf8(one).ok().filter(|u| u.is_ascii()).ok_or(CertIdentityError::UnreadableUri)?;
    let readable: Vec<String> = cert
        .subject_alt_names()
        .map(|names| names.iter().filter_map(|n| n.uri().map(str::to_owned)).collect())
        .unwrap_or_default();
    if readable != [uri] {
        return Err(CertIdentityError::Unparseable);
    }
    Identity::parse_in(uri, trust_domain).map_err(CertIdentityError::Invalid)
}

/// subjectAltName, OID 2.5.29.17 (the contents of its DER encoding).
const SAN_OID: [u8; 3] = [0x55, 0x1d, 0x11];

/// Splits one DER element off `input`: (tag, contents, the rest). `None`
/// for what DER does not allow or a certificate does not use: indefinite
/// lengths, high tag numbers, lengths over 4 bytes or past the input.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (bytes.iter().fold(0usize, |len, b| (len << 8) | usize::from(*b)), rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The contents of every URI SAN of a DER certificate, in order, whatever
/// their bytes (a constructed `[6]` counts too). `None` when the structure
/// cannot be walked, or the certificate has more than one subjectAltName
/// extension (RFC 5280 §4.2 forbids it, and which one counts is ambiguous).
pub fn uri_sans(cert: &[u8]) -> Option<Vec<&[u8]>> {
    let (0x30, cert, _) = der_element(cert)? else { return None };
    let (0x30, mut tbs, _) = der_element(cert)? else { return None };
    let mut uris = Vec::new();
    let mut sans = 0;
    while !tbs.is_empty() {
        let (tag, field, rest) = der_element(tbs)?;
        tbs = rest;
        // extensions [3] EXPLICIT SEQUENCE OF Extension
        if tag != 0xa3 {
            continue;
        }
        let (0x30, mut exts, _) = der_element(field)? else { return None };
        while !exts.is_empty() {
            let (0x30, ext, rest) = der_element(exts)? else { return None };
            exts = rest;
            let (0x06, oid, ext) = der_element(ext)? else { return None };
            if oid != SAN_OID {
                continue;
            }
            sans += 1;
            // critical BOOLEAN DEFAULT FALSE, then extnValue OCTET STRING.
            let (mut tag, mut value, ext) = der_element(ext)?;
            if tag == 0x01 {
                (tag, value, _) = der_element(ext)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (0x30, mut names, _) = der_element(value)? else { return None };
            while !names.is_empty() {
                let (tag, name, rest) = der_element(names)?;
                names = rest;
                if tag == URI_TAG || tag == URI_TAG | 0x20 {
                    uris.push(name);
                }
            }
        }
    }
    (sans <= 1).then_some(uris)
}

/// Why a peer certificate was refused (each endpoint counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not signed by the organisation CA (or the chain is incomplete).
    UnknownCa,
    /// Outside its validity period.
    Validity,
    /// Zero or several URI SANs, wrong trust domain, or a kind of identity
    /// this endpoint does not accept from its peer.
    Identity,
    /// Anything else the chain check reported.
    Other,
}

/// A refused certificate: why, and a line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: Rejection,
    pub detail: String,
}

fn classify(err: X509VerifyError) -> Rejection {
    match err {
        X509VerifyError::CERT_HAS_EXPIRED | X509VerifyError::CERT_NOT_YET_VALID => Rejection::Validity,
        X509VerifyError::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | X509VerifyError::UNABLE_TO_GET_ISSUER_CERT
        | X509VerifyError::DEPTH_ZERO_SELF_SIGNED_CERT
        | X509VerifyError::SELF_SIGNED_CERT_IN_CHAIN
        | X509VerifyError::UNABLE_TO_VERIFY_LEAF_SIGNATURE
        | X509VerifyError::CERT_SIGNATURE_FAILURE => Rejection::UnknownCa,
        _ => Rejection::Other,
    }
}

fn subject(ctx: &X509StoreContextRef) -> String {
    ctx.current_cert()
        .and_then(|c| c.subject_name().entries().next().and_then(|e| e.data().as_utf8().ok()).map(|s| s.to_string()))
        .unwrap_or_default()
}

/// What [`verify`] accepts from the peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerRule<'a> {
    pub trust_domain: &'a str,
    /// Identity kinds the peer may hold.
    pub kinds: &'a [Kind],
    /// Accept a leaf whose extended key usage does not name this use (the
    /// organisation CA issues agent and connector certificates for client
    /// authentication only; end to end the connector is the TLS server, and
    /// its SPIFFE kind, not the EKU, says what it may act as).
    pub any_purpose: bool,
}

/// BoringSSL's per-certificate verification hook: the chain check's
/// verdict (`ok`) plus, for the leaf, the identity rule. `Ok` accepts this
/// certificate of the chain; on `Err` the caller logs, counts and returns
/// false (an identity refusal is marked as an application verification
/// error, so the peer gets a certificate alert, not internal_error).
pub fn verify(ok: bool, ctx: &mut X509StoreContextRef, rule: PeerRule<'_>) -> Result<(), Refusal> {
    if !ok {
        let err = ctx.verify_result().err().unwrap_or(X509VerifyError::UNSPECIFIED);
        let purpose_only = rule.any_purpose && ctx.error_depth() == 0 && err == X509VerifyError::INVALID_PURPOSE;
        if !purpose_only {
            let detail = format!("{} (depth {}, subject {:?})", err.error_string(), ctx.error_depth(), subject(ctx));
            return Err(Refusal { why: classify(err), detail });
        }
    }
    if ctx.error_depth() != 0 {
        return Ok(());
    }
    let Some(der) = ctx.current_cert().and_then(|c| c.to_der().ok()) else {
        return Err(Refusal { why: Rejection::Other, detail: "leaf certificate unreadable".into() });
    };
    let refuse = |ctx: &mut X509StoreContextRef, detail: String| {
        ctx.set_error(Err(X509VerifyError::APPLICATION_VERIFICATION));
        Err(Refusal { why: Rejection::Identity, detail })
    };
    match identity_from_der(&der, rule.trust_domain) {
        Ok(id) if rule.kinds.contains(&id.kind) => {
            if !ok {
                // The purpose error was waived above; clear it so the
                // handshake goes on.
                ctx.set_error(Ok(()));
            }
            Ok(())
        }
        Ok(id) => refuse(ctx, format!("identity {id} is not of an accepted kind {:?}", rule.kinds)),
        Err(e) => {
            let detail = match e {
                CertIdentityError::Unparseable => "unparseable certificate".to_owned(),
                CertIdentityError::NoUri => "no URI SAN".to_owned(),
                CertIdentityError::SeveralUris(n) => format!("{n} URI SANs (exactly one allowed)"),
                CertIdentityError::UnreadableUri => "URI SAN is not ASCII".to_owned(),
                CertIdentityError::Invalid(i) => format!("URI SAN: {i}"),
            };
            refuse(ctx, format!("subject {:?}: {detail}", subject(ctx)))
        }
    }
}

/// The one URI SAN of a DER certificate (own certificates: no trust
/// domain to check against yet).
pub fn uri_of(der: &[u8]) -> Option<String> {
    match uri_sans(der)?.as_slice() {
        [one] => std::str::from_utf8(one).ok().filter(|u| u.is_ascii()).map(str::to_owned),
        _ => None,
    }
}

/// The identity of a verified peer certificate (after the handshake: the
/// verify hook accepted it under `trust_domain`).
pub fn peer_identity(der: &[u8], trust_domain: &str) -> Option<Identity> {
    identity_from_der(der, trust_domain).ok()
}
