//! Peer identities: SPIFFE IDs of the form
//! `spiffe://<trust-domain>/<agent|connector|relay>/<name>`.
//!
//! Certificates carry exactly one such URI SAN (see the zero-trust
//! issue); this module parses and validates the URI. Extracting it from an
//! X.509 certificate is `dataplane::pki::identity_from_der`.

use std::fmt;

/// What a certificate may act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Agent,
    Connector,
    Relay,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Connector => "connector",
            Kind::Relay => "relay",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "agent" => Some(Kind::Agent),
            "connector" => Some(Kind::Connector),
            "relay" => Some(Kind::Relay),
            _ => None,
        }
    }
}

/// A validated identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub kind: Kind,
    pub name: String,
}

/// Why a URI is not an acceptable identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    NotSpiffe,
    BadTrustDomain,
    BadKind,
    BadName,
    WrongTrustDomain,
    /// Longer than [`MAX_URI_LEN`] (it must fit FlowOpen's agent_id).
    TooLong,
}

/// Longest accepted SPIFFE ID, in bytes: FlowOpen carries it in a string
/// with a one-byte length.
pub const MAX_URI_LEN: usize = 255;

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityError::NotSpiffe => "not a spiffe:// URI",
            IdentityError::BadTrustDomain => "invalid trust domain",
            IdentityError::BadKind => "path must start with /agent/, /connector/ or /relay/",
            IdentityError::BadName => "invalid name (1-64 of [a-z0-9._-])",
            IdentityError::WrongTrustDomain => "trust domain does not match",
            IdentityError::TooLong => "longer than 255 bytes",
        })
    }
}

impl std::error::Error for IdentityError {}

fn valid_label(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
}

impl Identity {
    /// Parses `spiffe://td/kind/name` (lower case only, no query, fragment,
    /// port, user info or extra path segments).
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(IdentityError::NotSpiffe)?;
        if uri.len() > MAX_URI_LEN {
            return Err(IdentityError::TooLong);
        }
        let (td, path) = rest.split_once('/').ok_or(IdentityError::BadKind)?;
        if !valid_label(td, 255, b".-") || td.starts_with('.') || td.ends_with('.') {
            return Err(IdentityError::BadTrustDomain);
        }
        let (kind, name) = path.split_once('/').ok_or(IdentityError::BadKind)?;
        let kind = Kind::parse(kind).ok_or(IdentityError::BadKind)?;
        if !valid_label(name, 64, b"._-") || name == "." || name == ".." {
            return Err(IdentityError::BadName);
        }
        Ok(Identity { trust_domain: td.to_owned(), kind, name: name.to_owned() })
    }

    /// Parses and requires `trust_domain`.
    pub fn parse_in(uri: &str, trust_domain: &str) -> Result<Identity, IdentityError> {
        let id = Identity::parse(uri)?;
        if id.trust_domain != trust_domain {
            return Err(IdentityError::WrongTrustDomain);
        }
        Ok(id)
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}/{}", self.trust_domain, self.kind.as_str(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_rejects() {
        let id = Identity::parse("spiffe://corp.example/agent/alice-laptop").unwrap();
        assert_eq!(
            (id.trust_domain.as_str(), id.kind, id.name.as_str()),
            ("corp.example", Kind::Agent, "alice-laptop")
        );
        assert_eq!(id.uri(), "spiffe://corp.example/agent/alice-laptop");
        assert_eq!(Identity::parse("https://corp.example/agent/a"), Err(IdentityError::NotSpiffe));
        assert_eq!(Identity::parse("spiffe://Corp/agent/a"), Err(IdentityError::BadTrustDomain));
        assert_eq!(Identity::parse("spiffe://corp/admin/a"), Err(IdentityError::BadKind));
        assert_eq!(Identity::parse("spiffe://corp/agent/a/b"), Err(IdentityError::BadName));
        assert_eq!(Identity::parse("spiffe://corp/agent/"), Err(IdentityError::BadName));
        assert_eq!(Identity::parse("spiffe://corp/agent/.."), Err(IdentityError::BadName));
        assert_eq!(Identity::parse("spiffe://corp/agent/."), Err(IdentityError::BadName));
        let long_td = "a".repeat(200);
        let name = "n".repeat(60);
        assert_eq!(Identity::parse(&format!("spiffe://{long_td}/agent/{name}")), Err(IdentityError::TooLong));
        let fits = format!("spiffe://{}/agent/{name}", "a".repeat(255 - 9 - 7 - 60));
        assert_eq!(fits.len(), MAX_URI_LEN);
        assert!(Identity::parse(&fits).is_ok());
        assert_eq!(Identity::parse("spiffe://corp:443/agent/a"), Err(IdentityError::BadTrustDomain));
        assert_eq!(Identity::parse("spiffe://corp/agent/a?x=1"), Err(IdentityError::BadName));
        assert_eq!(Identity::parse_in("spiffe://other/agent/a", "corp"), Err(IdentityError::WrongTrustDomain));
        assert!(Identity::parse_in("spiffe://corp/connector/db-1", "corp").is_ok());
    }

    proptest! {
        #[test]
        fn roundtrip(td in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,2}", k in 0..3usize, name in "[a-z0-9._-]{1,64}") {
            let kind = [Kind::Agent, Kind::Connector, Kind::Relay][k];
            let dots = name == "." || name == "..";
            let id = Identity { trust_domain: td, kind, name };
            if dots {
                prop_assert_eq!(Identity::parse(&id.uri()), Err(IdentityError::BadName));
            } else {
                prop_assert_eq!(Identity::parse(&id.uri()), Ok(id));
            }
        }

        #[test]
        fn garbage_never_panics(s in ".{0,120}") {
            let _ = Identity::parse(&s);
        }
    }
}
