#![no_main]
//! Configuration files and the strings inside them: `RelayConfig::from_toml`
//! and `validate`, `ConnectorConfig::from_toml` (validates), the Linux
//! agent's `FileConfig::from_toml` and `validate` (agent-linux/src/
//! config.rs, included as a module since it lives in a binary),
//! the relay's policy file (`Policy::from_toml`, checked against a few
//! identities), and the value parsers they and the C API use: `Cidr`,
//! `ServiceName`, `Identity` (SPIFFE URI).
//!
//! Input: UTF-8 text (anything else is skipped).

use libfuzzer_sys::fuzz_target;
use ztna_agent::route::Cidr;
use ztna_control::identity::{Identity, Kind};
use ztna_control::ServiceName;
use ztna_connector::ConnectorConfig;
use ztna_relay::policy::Policy;
use ztna_relay::server::RelayConfig;

const TRUST_DOMAIN: &str = "corp.example";

#[allow(dead_code)]
#[path = "../../agent-linux/src/config.rs"]
mod agent_config;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };

    if let Ok(c) = RelayConfig::from_toml(s) {
        // validate() only looks at the file system (cert/key exist).
        if c.validate().is_ok() {
            let n = c.worker_count();
            assert!((1..=255).contains(&n));
        }
    }
    if let Ok(c) = ConnectorConfig::from_toml(s) {
        assert!(c.validate().is_ok());
        for svc in &c.services {
            assert!(ServiceName::new(&svc.name).is_some());
        }
    }
    if let Ok(f) = agent_config::FileConfig::from_toml(s) {
        if let Ok(c) = f.validate() {
            assert!(!c.routes.is_empty());
            for (_, cidr) in &c.routes {
                assert!(!cidr.contains(c.relay.ip()));
            }
            // Not `agent_config`: it reads the TLS files the input names.
            let _ = c.uses_ipv6();
        }
    }

    if let Ok(p) = Policy::from_toml(s, TRUST_DOMAIN) {
        let id = |kind, name: &str| Identity { trust_domain: TRUST_DOMAIN.into(), kind, name: name.into() };
        let stranger = Identity { trust_domain: "other.example".into(), kind: Kind::Agent, name: "alice".into() };
        for svc in ["echo", "web", "db"] {
            let _ = p.may_serve(&id(Kind::Connector, "echo-1"), svc);
            let _ = p.may_reach(&id(Kind::Agent, "alice"), svc);
            // Identities of the wrong kind or trust domain never match.
            assert!(!p.may_serve(&id(Kind::Agent, "echo-1"), svc));
            assert!(!p.may_reach(&id(Kind::Connector, "alice"), svc));
            assert!(!p.may_reach(&id(Kind::Relay, "alice"), svc));
            assert!(!p.may_reach(&stranger, svc));
        }
        assert_eq!(Policy::from_toml(s, TRUST_DOMAIN).ok(), Some(p));
    }

    // Single values, on every line.
    for line in s.lines().take(64) {
        if let Ok(c) = line.parse::<Cidr>() {
            let max = if c.addr().is_ipv4() { 32 } else { 128 };
            assert!(c.prefix() <= max);
            assert!(c.contains(c.addr()));
            assert_eq!(c.to_string().parse::<Cidr>(), Ok(c));
        }
        if let Some(n) = ServiceName::new(line) {
            assert_eq!(n.as_str(), line);
            assert!(!line.is_empty() && line.len() <= 64);
        }
        if let Ok(id) = Identity::parse(line) {
            assert_eq!(Identity::parse(&id.uri()), Ok(id.clone()));
            assert_eq!(id.uri(), line);
        }
    }
});
