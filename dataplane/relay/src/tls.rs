//! The relay's side of TLS: its certificate and key, and mutual
//! authentication of every client against the organisation CA with exactly
//! one SPIFFE identity (docs/PROTOCOL.md, "Authentication").
//!
//! The material is read into memory once ([`TlsMaterial::load`]) and every
//! worker builds its quiche config from those same bytes, so a reload
//! (SIGHUP) is atomic: either every worker gets the new certificate, key and
//! CA, or (broken files) nobody does.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use boring::pkey::{PKey, Private};
use boring::ssl::{SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslVerifyMode};
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509StoreContextRef, X509};
use tracing::warn;
use ztna_control::identity::Kind;

use crate::stats::WorkerStats;
use ztna_control::cert::PeerRule;
use ztna_control::tls_report::{describe, OncePerCause};

/// Certificate chain, key and client CA of the relay, parsed.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Leaf first.
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
    /// CAs whose certificates clients must present (the organisation CA).
    pub client_cas: Vec<X509>,
    /// Trust domain every client identity must be in.
    pub trust_domain: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("chain", &self.chain.len())
            .field("client_cas", &self.client_cas.len())
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

impl TlsMaterial {
    /// Reads and checks certificate chain, key and client CA bundle. Fails
    /// (changing nothing) on anything unreadable or inconsistent.
    pub fn load(cert: &Path, key: &Path, client_ca: &Path, trust_domain: &str) -> Result<TlsMaterial> {
        let chain = X509::stack_from_pem(&read(cert)?).with_context(|| format!("parsing {}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = PKey::private_key_from_pem(&read(key)?).with_context(|| format!("parsing {}", key.display()))?;
        let client_cas =
            X509::stack_from_pem(&read(client_ca)?).with_context(|| format!("parsing {}", client_ca.display()))?;
        if client_cas.is_empty() {
            bail!("{} holds no CA certificate", client_ca.display());
        }
        if ztna_control::identity::Identity::parse(&format!("spiffe://{trust_domain}/agent/x")).is_err() {
            bail!("invalid trust domain {trust_domain:?}");
        }
        let m = TlsMaterial { chain, key, client_cas, trust_domain: trust_domain.to_owned() };
        // Building a context checks that the key belongs to the certificate.
        m.context(None)?;
        Ok(m)
    }

    fn context(&self, stats: Option<Arc<WorkerStats>>) -> Result<SslContextBuilder> {
        let mut b = SslContextBuilder::new(SslMethod::tls())?;
        let mut chain = self.chain.iter();
        let leaf = chain.next().context("empty certificate chain")?;
        b.set_certificate(leaf)?;
        for c in chain {
            b.add_extra_chain_cert(c.clone())?;
        }
        b.set_private_key(&self.key)?;
        b.check_private_key().context("the private key does not belong to the certificate")?;
        let mut store = X509StoreBuilder::new()?;
        for ca in &self.client_cas {
            store.add_cert(ca.clone())?;
        }
        b.set_verify_cert_store(store.build())?;
        // No resumption: a resumed session would skip the client
        // certificate (and its validity and identity checks).
        b.set_options(SslOptions::NO_TICKET);
        b.set_session_cache_mode(SslSessionCacheMode::OFF);
        let trust_domain = self.trust_domain.clone();
        let log = std::sync::Mutex::new(OncePerCause::new(std::time::Duration::from_secs(60)));
        b.set_verify_callback(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT, move |ok, ctx| {
            verify(ok, ctx, &trust_domain, stats.as_deref(), &log)
        });
        Ok(b)
    }

    /// The relay's quiche config: this material, mutual TLS, and the
    /// protocol's transport parameters. Rejections are counted in `stats`.
    pub fn server_config(&self, stats: Arc<WorkerStats>) -> Result<quiche::Config> {
        let b = self.context(Some(stats))?;
        let mut cfg = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, b)
            .map_err(|e| anyhow::anyhow!("TLS context: {e}"))?;
        ztna_control::quic::apply_transport(&mut cfg).map_err(|e| anyhow::anyhow!("transport parameters: {e}"))?;
        // One bidirectional stream per client: the control stream.
        cfg.set_initial_max_streams_bidi(1);
        // Note: never call `cfg.verify_peer()` here; quiche would replace
        // the callback installed above and stop requiring a certificate.
        Ok(cfg)
    }
}

pub use ztna_control::cert::Rejection;

fn count(stats: Option<&WorkerStats>, r: Rejection) {
    if let Some(s) = stats {
        let c = match r {
            Rejection::UnknownCa => &s.auth_rejected_unknown_ca,
            Rejection::Validity => &s.auth_rejected_validity,
            Rejection::Identity => &s.auth_rejected_identity,
            Rejection::Other => &s.auth_rejected_other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The chain check plus the identity rule (agents and connectors only).
/// Each refusal is counted; its log line comes once per cause and minute.
fn verify(
    ok: bool,
    ctx: &mut X509StoreContextRef,
    trust_domain: &str,
    stats: Option<&WorkerStats>,
    log: &std::sync::Mutex<OncePerCause>,
) -> bool {
    let rule = PeerRule { trust_domain, kinds: &[Kind::Agent, Kind::Connector], any_purpose: false };
    match ztna_control::cert::verify(ok, ctx, rule) {
        Ok(()) => true,
        Err(r) => {
            let cause = format!("{:?} {}", r.why, r.detail);
            let now = std::time::Instant::now();
            if log.lock().map(|mut l| l.allow(&cause, now)).unwrap_or(true) {
                let certificate = ctx.current_cert().map(describe).unwrap_or_default();
                warn!(reason = ?r.why, detail = r.detail, certificate, "client certificate rejected");
            }
            count(stats, r.why);
            false
        }
    }
}
