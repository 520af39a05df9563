//! quiche configuration shared by every endpoint of protocol v1.

use crate::wire::ALPN;

/// QUIC idle timeout (both sides advertise it).
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// Largest UDP payload we send/accept. 1400 + IPv6 (40) + UDP (8) = 1448
/// fits a 1450-byte overlay (VXLAN) path; it leaves room for an end-to-end
/// session's 1280-byte tunneled packets (see PROTOCOL.md §5.4 and §8.4).
pub const MAX_UDP_PAYLOAD: usize = 1400;
/// Bounded DATAGRAM queues (frames), per connection and direction.
pub const DGRAM_QUEUE_LEN: usize = 1024;

/// TLS material of a client endpoint, in memory: this crate does no I/O,
/// so the caller reads the files (see `ztna_ops::tls` for the binaries,
/// the C API for the agent library). The default verifies the relay
/// against the system store and presents no certificate (which the relay
/// refuses: see docs/PROTOCOL.md, "Authentication").
#[derive(Clone)]
pub struct TlsOptions {
    /// PEM: the CA certificate(s) that sign the relay's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM: the certificate chain this client presents (its SPIFFE
    /// identity), leaf first.
    pub cert_pem: Option<Vec<u8>>,
    /// PEM: the private key of the leaf certificate.
    pub key_pem: Option<Vec<u8>>,
    /// Verify the relay's certificate and name. Turning this off is for
    /// local experiments only.
    pub verify_peer: bool,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions { ca_pem: None, cert_pem: None, key_pem: None, verify_peer: true }
    }
}

impl std::fmt::Debug for TlsOptions {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("cert_pem", &self.cert_pem.as_ref().map(Vec::len))
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

impl TlsOptions {
    /// Verifies the relay against `ca` and presents `cert`/`key` (PEM).
    pub fn mutual(ca: Vec<u8>, cert: Vec<u8>, key: Vec<u8>) -> Self {
        TlsOptions { ca_pem: Some(ca), cert_pem: Some(cert), key_pem: Some(key), verify_peer: true }
    }
}

/// Why [`client_config`] could not build a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    /// BoringSSL could not set up a TLS context.
    #[error("cannot create a TLS context")]
    Context,
    /// `ca_pem` holds no parsable certificate.
    #[error("the CA file holds no valid PEM certificate")]
    Ca,
    /// The system's CA store could not be loaded.
    #[error("cannot load the system CA store")]
    SystemCa,
    /// `cert_pem` holds no parsable certificate chain.
    #[error("the certificate file holds no valid PEM certificate chain")]
    Certificate,
    /// `key_pem` is not a PEM private key.
    #[error("the key file holds no valid PEM private key")]
    Key,
    /// The key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// End to end: no CA configured (the peer must chain to the
    /// organisation CA, never to the system store).
    #[error("no CA configured: end-to-end sessions need the organisation CA")]
    NoCa,
    /// End to end: no certificate, or one without a SPIFFE identity.
    #[error("no certificate with a SPIFFE identity configured")]
    NoIdentity,
    /// quiche refused the configuration.
    #[error("QUIC configuration: {0}")]
    Quic(quiche::Error),
}

/// Transport parameters every endpoint of protocol v1 uses (the relay
/// builds its TLS context itself and then applies these).
pub fn apply_transport(cfg: &mut quiche::Config) -> Result<(), quiche::Error> {
    cfg.set_application_protos(&[ALPN])?;
    cfg.set_max_idle_timeout(IDLE_TIMEOUT_MS);
    cfg.set_max_recv_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg.set_max_send_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg.set_initial_max_data(1 << 20);
    cfg.set_initial_max_stream_data_bidi_local(64 * 1024);
    cfg.set_initial_max_stream_data_bidi_remote(64 * 1024);
    cfg.set_initial_max_stream_data_uni(0);
    cfg.set_initial_max_streams_uni(0);
    cfg.set_active_connection_id_limit(4);
    cfg.enable_dgram(true, DGRAM_QUEUE_LEN, DGRAM_QUEUE_LEN);
    Ok(())
}

/// Client-side quiche config. With `ca_pem` the relay must chain to those
/// CAs alone (the system store is not consulted: a public CA cannot vouch
/// for a relay); without it, the system store is used. For callers that
/// drive quiche themselves; a [`crate::client::ClientSession`] takes
/// [`client_tls`], which also says why a handshake failed.
pub fn client_config(tls: &TlsOptions) -> Result<quiche::Config, TlsConfigError> {
    client_tls(tls).map(|c| c.quic)
}

/// A client's quiche config and the report its verification hook fills
/// (see [`crate::tls_report`]).
pub struct ClientTls {
    pub quic: quiche::Config,
    pub report: std::sync::Arc<crate::tls_report::HandshakeReport>,
}

impl From<quiche::Config> for ClientTls {
    /// A config built elsewhere: no IP-address check, no failure report.
    fn from(quic: quiche::Config) -> Self {
        ClientTls { quic, report: std::sync::Arc::default() }
    }
}

/// [`client_config`] with its [`crate::tls_report::HandshakeReport`].
pub fn client_tls(tls: &TlsOptions) -> Result<ClientTls, TlsConfigError> {
    use boring::pkey::PKey;
    use boring::ssl::{SslContextBuilder, SslMethod};
    use boring::x509::X509;
    use TlsConfigError as E;
    let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(|_| E::Context)?;
    let mut ca_names = "the system store".to_owned();
    match &tls.ca_pem {
        Some(pem) => {
            let cas = X509::stack_from_pem(pem).map_err(|_| E::Ca)?;
            if cas.is_empty() {
                return Err(E::Ca);
            }
            let names: Vec<String> =
                cas.iter().map(|c| crate::tls_report::describe_subject(c.subject_name())).collect();
            ca_names = names.join(" | ");
            let mut store = boring::x509::store::X509StoreBuilder::new().map_err(|_| E::Context)?;
            for c in cas {
                store.add_cert(c).map_err(|_| E::Ca)?;
            }
            b.set_verify_cert_store(store.build()).map_err(|_| E::Context)?;
        }
        None => b.set_default_verify_paths().map_err(|_| E::SystemCa)?,
    }
    if let Some(pem) = &tls.cert_pem {
        let mut chain = X509::stack_from_pem(pem).map_err(|_| E::Certificate)?.into_iter();
        let leaf = chain.next().ok_or(E::Certificate)?;
        b.set_certificate(&leaf).map_err(|_| E::Certificate)?;
        for c in chain {
            b.add_extra_chain_cert(c).map_err(|_| E::Certificate)?;
        }
    }
    if let Some(pem) = &tls.key_pem {
        let key = PKey::private_key_from_pem(pem).map_err(|_| E::Key)?;
        // BoringSSL checks the key against the certificate already here.
        b.set_private_key(&key).map_err(|_| E::KeyMismatch)?;
        b.check_private_key().map_err(|_| E::KeyMismatch)?;
    }
    let report = std::sync::Arc::new(crate::tls_report::HandshakeReport::new(ca_names, tls.verify_peer));
    if tls.verify_peer {
        let r = std::sync::Arc::clone(&report);
        b.set_verify_callback(boring::ssl::SslVerifyMode::PEER, move |ok, ctx| r.verify(ok, ctx));
    }
    let mut cfg = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, b).map_err(E::Quic)?;
    apply_transport(&mut cfg).map_err(E::Quic)?;
    // The client opens exactly one bidirectional stream (control); the
    // relay opens none.
    cfg.set_initial_max_streams_bidi(0);
    if !tls.verify_peer {
        // Never with verification on: quiche would replace the hook
        // installed above.
        cfg.verify_peer(false);
    }
    Ok(ClientTls { quic: cfg, report })
}

/// Whether `name` can be a relay's TLS server name: an IP address (either
/// family; checked against the certificate's IP SANs) or a DNS host name
/// (labels of letters, digits and inner hyphens, at most 63 bytes each and
/// 253 in all).
pub fn check_server_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("server_name {name:?} is neither an IP address nor a DNS host name"));
    }
    if name.split('.').next_back().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!("server_name {name:?} looks like a malformed IP address"));
    }
    Ok(())
}

/// The server name for relays given as `host:port` when none is
/// configured: their host, when every relay is the same DNS name (a
/// Kubernetes headless Service, a round-robin name). A relay given by IP
/// address needs `server_name` set: which name or address its
/// certificate covers is not something the client can guess.
pub fn default_server_name<'a>(relays: impl IntoIterator<Item = &'a str>) -> Result<String, String> {
    let mut name: Option<&str> = None;
    for r in relays {
        let host = r.rsplit_once(':').map_or(r, |(h, _)| h);
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "server_name is required: relay {r} is given by IP address. Set server_name to the DNS name in \
                 the relay's certificate, or to the IP address itself if the certificate lists it as an IP SAN \
                 (ztna-relay ca issue --ip)"
            ));
        }
        match name {
            Some(n) if !n.eq_ignore_ascii_case(host) => {
                return Err(format!("server_name is required: the relays have different host names ({n}, {host})"))
            }
            Some(_) => {}
            None => name = Some(host),
        }
    }
    let name = name.ok_or("no relay to take the server name from")?;
    check_server_name(name)?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use boring::ec::{EcGroup, EcKey};
    use boring::hash::MessageDigest;
    use boring::nid::Nid;
    use boring::pkey::{PKey, Private};
    use boring::x509::{X509Builder, X509NameBuilder};

    fn key() -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    /// A self-signed certificate of `key`, as PEM.
    fn cert_pem(key: &PKey<Private>) -> Vec<u8> {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "test").unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&boring::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&boring::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.sign(key, MessageDigest::sha256()).unwrap();
        b.build().to_pem().unwrap()
    }

    fn err(tls: TlsOptions) -> Option<TlsConfigError> {
        client_config(&tls).err()
    }

    #[test]
    fn pem_material_builds_and_each_bad_part_has_its_error() {
        let k = key();
        let (cert, key_pem) = (cert_pem(&k), k.private_key_to_pem_pkcs8().unwrap());
        assert_eq!(err(TlsOptions::mutual(cert.clone(), cert.clone(), key_pem.clone())), None);
        assert_eq!(err(TlsOptions { verify_peer: false, ..TlsOptions::default() }), None);
        assert_eq!(
            err(TlsOptions::mutual(b"not pem".to_vec(), cert.clone(), key_pem.clone())),
            Some(TlsConfigError::Ca)
        );
        assert_eq!(err(TlsOptions::mutual(Vec::new(), cert.clone(), key_pem.clone())), Some(TlsConfigError::Ca));
        assert_eq!(
            err(TlsOptions::mutual(cert.clone(), b"junk".to_vec(), key_pem.clone())),
            Some(TlsConfigError::Certificate)
        );
        assert_eq!(err(TlsOptions::mutual(cert.clone(), cert.clone(), b"junk".to_vec())), Some(TlsConfigError::Key));
        let other = key().private_key_to_pem_pkcs8().unwrap();
        assert_eq!(err(TlsOptions::mutual(cert.clone(), cert, other)), Some(TlsConfigError::KeyMismatch));
    }

    #[test]
    fn debug_never_prints_the_key() {
        let t = TlsOptions::mutual(b"ca".to_vec(), b"cert".to_vec(), b"SECRET KEY".to_vec());
        let s = format!("{t:?}");
        assert!(!s.contains("SECRET") && s.contains("redacted"), "{s}");
    }

    #[test]
    fn server_names_are_ips_or_dns_host_names() {
        for ok in ["relay.example.com", "localhost", "198.51.100.10", "2001:db8::1", "a-b.c1.", "xn--bcher-kva.de"] {
            assert_eq!(check_server_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "relay..example", "-relay.example", "relay_1.example", "198.51.100.300", "https://relay", "a b"]
        {
            assert!(check_server_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_server_name_is_the_relays_one_dns_name() {
        assert_eq!(default_server_name(["relay.example.org:4433"]).as_deref(), Ok("relay.example.org"));
        let same = ["r.example.org:4433", "R.example.org:4434"];
        assert_eq!(default_server_name(same).as_deref(), Ok("r.example.org"));
        let ip = default_server_name(["198.51.100.10:4433"]).unwrap_err();
        assert!(ip.contains("server_name is required") && ip.contains("198.51.100.10:4433"), "{ip}");
        assert!(default_server_name(["[2001:db8::1]:4433"]).unwrap_err().contains("IP address"));
        assert!(default_server_name(["a.example:1", "b.example:1"]).unwrap_err().contains("different host names"));
    }
}
