//! In-process QUIC peers for the targets that drive a real session: the
//! server side (a relay stand-in for the agent, the relay worker itself)
//! needs a certificate; clients skip verification.

use std::path::PathBuf;
use std::sync::OnceLock;

use ztna_control::quic::{self, TlsOptions};

/// Call once before any quiche config is made (the targets' `init`).
///
/// quiche loads the system CA bundle into every new config (OpenSSL-style
/// default paths), which costs tens of milliseconds and is never used here
/// (clients do not verify the in-process server): point BoringSSL at an
/// empty bundle instead. Without this the QUIC targets run at ~20 exec/s.
pub fn init() {
    std::env::set_var("SSL_CERT_FILE", "/dev/null");
    std::env::set_var("SSL_CERT_DIR", "/nonexistent");
}

/// Certificate and key files of a development PKI, generated once per
/// process (`ztna_dataplane::pki::generate`) in the temp directory and
/// removed at exit.
pub fn cert_files() -> &'static (String, String) {
    static FILES: OnceLock<(String, String)> = OnceLock::new();
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    FILES.get_or_init(|| {
        let pki = ztna_dataplane::pki::generate(&std::env::temp_dir()).expect("development PKI");
        let _ = DIR.set(pki.dir.clone());
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain `extern "C" fn()` with no captured
        // state; it only removes a directory this process created.
        unsafe { libc::atexit(cleanup) };
        (pki.cert.to_string_lossy().into_owned(), pki.key.to_string_lossy().into_owned())
    })
}

/// A quiche server config exactly as the relay builds it.
pub fn server_config() -> quiche::Config {
    let (cert, key) = cert_files();
    quic::server_config(cert, key).expect("server config")
}

/// A quiche client config as agents and connectors build it, without
/// certificate verification (the in-process server's CA is throwaway).
pub fn client_config() -> quiche::Config {
    quic::client_config(&TlsOptions { ca_file: None, verify_peer: false }).expect("client config")
}
