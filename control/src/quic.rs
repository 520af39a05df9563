//! quiche configuration shared by every endpoint of protocol v1.

use crate::wire::ALPN;

/// QUIC idle timeout (both sides advertise it).
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// Largest UDP payload we send/accept. 1350 leaves room for IPv6 (40) + UDP
/// (8) headers on a 1500-byte path with slack for tunnels (see PROTOCOL.md §5).
pub const MAX_UDP_PAYLOAD: usize = 1350;
/// Bounded DATAGRAM queues (frames), per connection and direction.
pub const DGRAM_QUEUE_LEN: usize = 1024;

/// TLS material for a client endpoint. The default verifies the relay and
/// presents no certificate (which the relay refuses: see
/// docs/PROTOCOL.md, "Authentication").
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// PEM file with the CA(s) that sign the relay's certificate.
    pub ca_file: Option<String>,
    /// PEM certificate chain this client presents (its SPIFFE identity).
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<String>,
    /// Verify the relay's certificate and name. Turning this off is for
    /// local experiments only.
    pub verify_peer: bool,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions { ca_file: None, cert_file: None, key_file: None, verify_peer: true }
    }
}

impl TlsOptions {
    /// Verifies the relay against `ca` and presents `cert`/`key`.
    pub fn mutual(
        ca: impl AsRef<std::path::Path>,
        cert: impl AsRef<std::path::Path>,
        key: impl AsRef<std::path::Path>,
    ) -> Self {
        let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
        TlsOptions {
            ca_file: Some(s(ca.as_ref())),
            cert_file: Some(s(cert.as_ref())),
            key_file: Some(s(key.as_ref())),
            verify_peer: true,
        }
    }
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

/// Client-side quiche config. With `ca_file` the relay must chain to that
/// CA alone (the system store is not consulted: a public CA cannot vouch
/// for a relay); without it, the system store is used.
pub fn client_config(tls: &TlsOptions) -> Result<quiche::Config, quiche::Error> {
    use boring::ssl::{SslContextBuilder, SslFiletype, SslMethod};
    let fail = |_| quiche::Error::TlsFail;
    let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(fail)?;
    match &tls.ca_file {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|_| quiche::Error::TlsFail)?;
            let mut store = boring::x509::store::X509StoreBuilder::new().map_err(fail)?;
            for c in boring::x509::X509::stack_from_pem(&pem).map_err(fail)? {
                store.add_cert(c).map_err(fail)?;
            }
            b.set_verify_cert_store(store.build()).map_err(fail)?;
        }
        None => b.set_default_verify_paths().map_err(fail)?,
    }
    if let Some(cert) = &tls.cert_file {
        b.set_certificate_chain_file(cert).map_err(fail)?;
    }
    if let Some(key) = &tls.key_file {
        b.set_private_key_file(key, SslFiletype::PEM).map_err(fail)?;
        b.check_private_key().map_err(fail)?;
    }
    let mut cfg = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, b)?;
    apply_transport(&mut cfg)?;
    // The client opens exactly one bidirectional stream (control); the
    // relay opens none.
    cfg.set_initial_max_streams_bidi(0);
    cfg.verify_peer(tls.verify_peer);
    Ok(cfg)
}
