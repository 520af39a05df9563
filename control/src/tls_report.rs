//! Why a TLS handshake with a relay failed, in words an operator can act
//! on, and the relay's name check for relays reached by IP address.
//!
//! BoringSSL checks a DNS `server_name` against the certificate's DNS SANs
//! itself (quiche hands it the name). An IP address is checked here, in the
//! client's verification hook, against the certificate's IP SANs: quiche
//! has no per-connection IP check, and an IP literal must not go in SNI
//! (RFC 6066 §3), so the session connects without SNI and tells the hook
//! which address to expect ([`HandshakeReport::expect`]).
//!
//! Every refusal leaves one line in the report (expected name, what the
//! certificate holds, the CA, the verification error); the session takes
//! it into its `Disconnected` reason, and [`OncePerCause`] keeps the log to
//! one line per distinct cause and interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boring::x509::{X509Ref, X509StoreContextRef, X509VerifyError};

/// The name a TLS alert code carries (QUIC CRYPTO_ERROR 0x100 + alert).
pub fn alert_name(code: u64) -> Option<&'static str> {
    Some(match code.checked_sub(0x100)? {
        10 => "unexpected_message",
        20 => "bad_record_mac",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        80 => "internal_error",
        109 => "missing_extension",
        112 => "unrecognized_name",
        116 => "certificate_required",
        120 => "no_application_protocol",
        0..=255 => "other TLS alert",
        _ => return None,
    })
}

/// A QUIC close code in words: `TLS alert bad_certificate (0x12a)`, or the
/// bare code for what is not a TLS alert.
pub fn close_code_text(code: u64) -> String {
    match alert_name(code) {
        Some(name) => format!("TLS alert {name} ({code:#x})"),
        None => format!("code {code:#x}"),
    }
}

/// What a certificate holds, for a log line: subject, SANs (DNS, IP, URI),
/// validity and issuer.
pub fn describe(cert: &X509Ref) -> String {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    let mut uris = Vec::new();
    for n in cert.subject_alt_names().iter().flatten() {
        if let Some(d) = n.dnsname() {
            dns.push(d.to_owned());
        } else if let Some(ip) = n.ipaddress().and_then(ip_of) {
            ips.push(ip.to_string());
        } else if let Some(u) = n.uri() {
            uris.push(u.to_owned());
        }
    }
    let list = |v: &[String]| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
    format!(
        "subject {}; DNS SANs: {}; IP SANs: {}; URI SANs: {}; valid {} to {}; issuer {}",
        describe_subject(cert.subject_name()),
        list(&dns),
        list(&ips),
        list(&uris),
        cert.not_before(),
        cert.not_after(),
        describe_subject(cert.issuer_name()),
    )
}

/// A certificate name as `CN=x,O=y`.
pub fn describe_subject(name: &boring::x509::X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .filter_map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            e.data().as_utf8().ok().map(|v| format!("{key}={v}"))
        })
        .collect();
    if parts.is_empty() {
        "(empty)".to_owned()
    } else {
        parts.join(",")
    }
}

fn ip_of(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Whether `cert` lists `ip` among its IP SANs (an IPv4-mapped IPv6
/// address matches its IPv4 form).
pub fn covers_ip(cert: &X509Ref, ip: IpAddr) -> bool {
    cert.subject_alt_names()
        .iter()
        .flatten()
        .filter_map(|n| n.ipaddress().and_then(ip_of))
        .any(|san| san.to_canonical() == ip.to_canonical())
}

/// Why a relay connection ended, in words: who closed it, the close code
/// (a TLS alert by name), the peer's reason text, and what the
/// verification hook found (`failure`).
pub fn close_reason(conn: &quiche::Connection, failure: Option<String>) -> String {
    let text = |e: &quiche::ConnectionError| {
        let reason = String::from_utf8_lossy(&e.reason);
        let code = if e.is_app { format!("code {:#x}", e.error_code) } else { close_code_text(e.error_code) };
        if reason.is_empty() {
            code
        } else {
            format!("{code} {reason}")
        }
    };
    match (conn.peer_error(), conn.local_error()) {
        (Some(e), _) if !conn.is_established() && !e.is_app && alert_name(e.error_code).is_some() => format!(
            "closed by relay during the handshake: {} (the relay refused this client's certificate; its log says why)",
            text(e)
        ),
        (Some(e), _) => format!("closed by relay: {}", text(e)),
        (None, Some(e)) => match failure {
            Some(f) => format!("closed locally: {}: {f}", text(e)),
            None => format!("closed locally: {}", text(e)),
        },
        (None, None) if conn.is_timed_out() => "idle timeout".to_owned(),
        (None, None) => "closed".to_owned(),
    }
}

/// Shared between a client's TLS configuration (its verification hook)
/// and the session using it: which address to expect, and why the last
/// handshake was refused.
#[derive(Debug, Default)]
pub struct HandshakeReport {
    inner: Mutex<ReportState>,
}

#[derive(Debug, Default)]
struct ReportState {
    /// `server_name` when it is an IP address (checked by the hook).
    expect_ip: Option<IpAddr>,
    /// The configured name, for the report.
    expect_name: String,
    /// Subjects of the configured CA certificates.
    cas: String,
    last_failure: Option<String>,
    hooked: bool,
}

impl HandshakeReport {
    pub(crate) fn new(cas: String, hooked: bool) -> Self {
        HandshakeReport { inner: Mutex::new(ReportState { cas, hooked, ..ReportState::default() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReportState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next handshake is with a relay called `server_name`; an IP
    /// address is checked against the certificate's IP SANs. Clears the
    /// last failure.
    pub fn expect(&self, server_name: &str) {
        let mut s = self.state();
        s.expect_ip = server_name.parse().ok();
        s.expect_name = server_name.to_owned();
        s.last_failure = None;
    }

    /// Whether the verification hook is installed (a config from
    /// [`crate::quic::client_tls`] with verification on): only then may an
    /// IP `server_name` go without SNI.
    pub fn checks_ip(&self) -> bool {
        self.state().hooked
    }

    /// Why the last handshake refused the relay's certificate, once.
    pub fn take_failure(&self) -> Option<String> {
        self.state().last_failure.take()
    }

    /// The client's verification hook: BoringSSL's verdict `ok` for the
    /// certificate at the context's depth, plus the IP check on the leaf.
    /// Records why when it refuses.
    pub fn verify(&self, ok: bool, ctx: &mut X509StoreContextRef) -> bool {
        let mut s = self.state();
        let depth = ctx.error_depth();
        let cert = ctx.current_cert().map(describe).unwrap_or_else(|| "no certificate".to_owned());
        let why = if !ok {
            let err = ctx.verify_result().err().unwrap_or(X509VerifyError::UNSPECIFIED);
            match err {
                X509VerifyError::HOSTNAME_MISMATCH => {
                    format!("the certificate does not cover the server name {:?}", s.expect_name)
                }
                X509VerifyError::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
                | X509VerifyError::UNABLE_TO_GET_ISSUER_CERT
                | X509VerifyError::UNABLE_TO_VERIFY_LEAF_SIGNATURE
                | X509VerifyError::SELF_SIGNED_CERT_IN_CHAIN
                | X509VerifyError::DEPTH_ZERO_SELF_SIGNED_CERT => {
                    format!("{} (not signed by the configured CA: {})", err.error_string(), s.cas)
                }
                _ => err.error_string().to_owned(),
            }
        } else if let (0, Some(ip)) = (depth, s.expect_ip) {
            if ctx.current_cert().is_some_and(|c| covers_ip(c, ip)) {
                return true;
            }
            ctx.set_error(Err(X509VerifyError::IP_ADDRESS_MISMATCH));
            format!("the certificate does not cover the server name {ip} (an IP address: IP SANs are checked)")
        } else {
            return true;
        };
        let expected =
            if why.contains("server name") { String::new() } else { format!("; server name {:?}", s.expect_name) };
        s.last_failure =
            Some(format!("relay certificate refused: {why}{expected}; certificate (depth {depth}): {cert}"));
        false
    }
}

/// Lets a log line through once per cause and interval: a client that
/// retries a failing handshake every few seconds logs its cause once a
/// minute, a new cause at once. Bounded: at most `MAX_CAUSES` remembered.
#[derive(Debug)]
pub struct OncePerCause {
    every: Duration,
    last: HashMap<String, Instant>,
}

const MAX_CAUSES: usize = 64;

impl OncePerCause {
    pub fn new(every: Duration) -> Self {
        OncePerCause { every, last: HashMap::new() }
    }

    /// Whether `cause` should be logged now (and remembers that it was).
    pub fn allow(&mut self, cause: &str, now: Instant) -> bool {
        if self.last.get(cause).is_some_and(|t| now.saturating_duration_since(*t) < self.every) {
            return false;
        }
        if self.last.len() >= MAX_CAUSES && !self.last.contains_key(cause) {
            let every = self.every;
            self.last.retain(|_, t| now.saturating_duration_since(*t) < every);
            if self.last.len() >= MAX_CAUSES {
                return false;
            }
        }
        self.last.insert(cause.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_codes_in_words() {
        assert_eq!(close_code_text(0x12a), "TLS alert bad_certificate (0x12a)");
        assert_eq!(close_code_text(0x130), "TLS alert unknown_ca (0x130)");
        assert_eq!(close_code_text(0x1), "code 0x1");
    }

    #[test]
    fn once_per_cause_and_interval() {
        let t = Instant::now();
        let mut o = OncePerCause::new(Duration::from_secs(60));
        assert!(o.allow("a", t));
        assert!(!o.allow("a", t + Duration::from_secs(5)));
        assert!(o.allow("b", t + Duration::from_secs(5)));
        assert!(o.allow("a", t + Duration::from_secs(61)));
        for i in 0..200 {
            o.allow(&i.to_string(), t + Duration::from_secs(62));
        }
        assert!(o.last.len() <= MAX_CAUSES);
    }
}
