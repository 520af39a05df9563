//! In-process QUIC peers for the targets that drive a real session, with a
//! development PKI (`ztna_relay::pki::generate`: an organisation CA for
//! the `dev.ztna` trust domain and a relay certificate for localhost).

use std::path::PathBuf;
use std::sync::OnceLock;

use ztna_control::identity::Kind;
use ztna_control::quic::{self, TlsOptions};
use ztna_relay::pki::{self, DevPki};
use ztna_relay::tls::TlsMaterial;

/// Call once before any quiche config is made (the targets' `init`).
///
/// quiche loads the system CA bundle into every new config (OpenSSL-style
/// default paths), which costs tens of milliseconds and is never used here
/// (clients verify the in-process relay against the dev CA): point
/// BoringSSL at an empty bundle instead. Without this the QUIC targets run
/// at ~20 exec/s.
pub fn init() {
    std::env::set_var("SSL_CERT_FILE", "/dev/null");
    std::env::set_var("SSL_CERT_DIR", "/nonexistent");
}

/// The development PKI, generated once per process in the temp directory
/// and removed at exit.
pub fn dev_pki() -> &'static DevPki {
    static PKI: OnceLock<DevPki> = OnceLock::new();
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = pki::generate(&std::env::temp_dir()).expect("development PKI");
        let _ = DIR.set(pki.dir.clone());
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain `extern "C" fn()` with no captured
        // state; it only removes a directory this process created.
        unsafe { libc::atexit(cleanup) };
        pki
    })
}

/// Client TLS options: verify the relay with the dev CA and present a
/// certificate for `kind`/`name` (issued once per process).
pub fn client_tls(kind: Kind, name: &str) -> TlsOptions {
    dev_pki().client_tls(kind, name).expect("client certificate")
}

/// A client quiche config as agents and connectors build it.
pub fn client_config(kind: Kind, name: &str) -> quiche::Config {
    quic::client_config(&client_tls(kind, name)).expect("client config")
}

/// The relay's TLS material (relay certificate, dev CA as client CA),
/// loaded once per process.
pub fn relay_tls() -> TlsMaterial {
    static TLS: OnceLock<TlsMaterial> = OnceLock::new();
    TLS.get_or_init(|| {
        let p = dev_pki();
        TlsMaterial::load(&p.cert, &p.key, &p.ca, pki::DEV_TRUST_DOMAIN).expect("relay TLS material")
    })
    .clone()
}

/// A plain quiche server config with the relay certificate and the
/// protocol's transport parameters, without client authentication: the
/// relay stand-in of the agent target.
pub fn stand_in_server_config() -> quiche::Config {
    let p = dev_pki();
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("quiche config");
    quic::apply_transport(&mut cfg).expect("transport parameters");
    cfg.set_initial_max_streams_bidi(1);
    cfg.load_cert_chain_from_pem_file(&p.cert.to_string_lossy()).expect("relay certificate");
    cfg.load_priv_key_from_pem_file(&p.key.to_string_lossy()).expect("relay key");
    cfg.verify_peer(false);
    cfg
}
