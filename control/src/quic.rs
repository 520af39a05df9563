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

/// Client-side quiche config.
pub fn client_config(tls: &TlsOptions) -> Result<quiche::Config, quiche::Error> {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    apply_transport(&mut cfg)?;
    // The client opens exactly one bidirectional stream (control); the
    // relay opens none.
    cfg.set_initial_max_streams_bidi(0);
    cfg.verify_peer(tls.verify_peer);
    if let Some(ca) = &tls.ca_file {
        cfg.load_verify_locations_from_file(ca)?;
    }
    if let Some(cert) = &tls.cert_file {
        cfg.load_cert_chain_from_pem_file(cert)?;
    }
    if let Some(key) = &tls.key_file {
        cfg.load_priv_key_from_pem_file(key)?;
    }
    Ok(cfg)
}
