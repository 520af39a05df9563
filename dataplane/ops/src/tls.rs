//! Reading a client's TLS files (`ztna_control` does no I/O: it takes the
//! PEM bytes). The connector, the Linux agent, the bench and the tests read
//! their files here; the agent's C API reads its own (the static library
//! does not link this crate).

use std::path::Path;

use anyhow::{Context, Result};
use ztna_control::quic::TlsOptions;

/// Reads the PEM files of a client: `ca` (None: the system store), the
/// certificate chain `cert` and its private key `key` (None: no client
/// certificate). The error names the file that could not be read.
pub fn read_client_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    verify_peer: bool,
) -> Result<TlsOptions> {
    let read = |p: Option<&Path>, what: &str| -> Result<Option<Vec<u8>>> {
        p.map(|p| std::fs::read(p).with_context(|| format!("reading the {what} file {}", p.display()))).transpose()
    };
    Ok(TlsOptions {
        ca_pem: read(ca, "CA")?,
        cert_pem: read(cert, "certificate")?,
        key_pem: read(key, "private key")?,
        verify_peer,
    })
}

/// [`read_client_tls`] for mutual TLS: verify the relay against `ca`,
/// present `cert`/`key`.
pub fn read_mutual_tls(ca: &Path, cert: &Path, key: &Path) -> Result<TlsOptions> {
    read_client_tls(Some(ca), Some(cert), Some(key), true)
}

/// `check-config`'s offline check of an endpoint's own certificate (see
/// [`ztna_control::cert_check::check_own`]) on files, at the current time.
/// Errors name the files.
pub fn check_own_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
    want: ztna_control::identity::Kind,
    ca_must_verify: bool,
) -> Result<ztna_control::cert_check::OwnCert> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    ztna_control::cert_check::check_own(&read(ca)?, &read(cert)?, &read(key)?, want, now, ca_must_verify).map_err(|e| {
        anyhow::anyhow!("{e} (certificate {}, key {}, CA {})", cert.display(), key.display(), ca.display())
    })
}

/// Prints what `check-config` found in a checked certificate: the
/// identity, its validity, and every warning (on stderr, as `warning:`).
pub fn print_own(c: &ztna_control::cert_check::OwnCert) {
    println!("certificate: {} ({} day(s) left)", c.identity, c.days_left);
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_is_named_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("ztna-ops-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, b"ca bytes").unwrap();
        let t = read_client_tls(Some(&ca), None, None, false).unwrap();
        assert_eq!(t.ca_pem.as_deref(), Some(&b"ca bytes"[..]));
        assert!(t.cert_pem.is_none() && t.key_pem.is_none() && !t.verify_peer);
        let missing = dir.join("nope.key");
        let e = read_mutual_tls(&ca, &ca, &missing).unwrap_err();
        assert!(format!("{e:#}").contains("private key file") && format!("{e:#}").contains("nope.key"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
