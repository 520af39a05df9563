//! Who may serve and who may reach each service. Default deny: a service
//! the file does not name cannot be registered by anyone.
//!
//! ```toml
//! [groups]
//! engineering = ["alice", "spiffe://corp.example/agent/bob"]
//!
//! [services.echo]
//! connectors = ["echo-1"]          # connector identities that may serve it
//! agents = ["carol"]               # agent identities that may reach it
//! groups = ["engineering"]         # ... or members of these groups
//!
//! [services.wiki]
//! connectors = ["wiki-1"]
//! agents = ["*"]                   # every agent of the trust domain
//! ```
//!
//! Identities are written as names (`alice`, meaning
//! `spiffe://<trust-domain>/agent/alice` in `agents` and groups, and
//! `.../connector/<name>` in `connectors`) or as full SPIFFE IDs, which must
//! be in the relay's trust domain and of the right kind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use ztna_control::identity::{Identity, Kind};
use ztna_control::wire::ServiceName;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    services: BTreeMap<String, ServiceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    #[serde(default)]
    connectors: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Rule {
    connectors: HashSet<String>,
    agents: HashSet<String>,
    any_agent: bool,
}

/// A parsed, validated policy.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    trust_domain: String,
    services: HashMap<String, Rule>,
}

/// Resolves `entry` to the name of a `kind` identity in `trust_domain`.
fn name_of(entry: &str, kind: Kind, trust_domain: &str) -> Result<String> {
    if entry.starts_with("spiffe://") {
        let id = Identity::parse_in(entry, trust_domain).map_err(|e| anyhow::anyhow!("{entry}: {e}"))?;
        if id.kind != kind {
            bail!("{entry}: expected a {} identity", kind.as_str());
        }
        return Ok(id.name);
    }
    // A bare name must make a valid SPIFFE ID.
    let uri = format!("spiffe://{trust_domain}/{}/{entry}", kind.as_str());
    Identity::parse_in(&uri, trust_domain).map_err(|e| anyhow::anyhow!("{entry:?}: {e}"))?;
    Ok(entry.to_owned())
}

impl Policy {
    /// Denies everything.
    pub fn deny_all(trust_domain: &str) -> Policy {
        Policy { trust_domain: trust_domain.to_owned(), services: HashMap::new() }
    }

    /// Parses and validates a policy for identities in `trust_domain`.
    /// Unknown keys, unknown groups, invalid names and invalid service
    /// names are errors.
    pub fn from_toml(s: &str, trust_domain: &str) -> Result<Policy> {
        let file: PolicyFile = toml::from_str(s)?;
        let mut groups: HashMap<&str, HashSet<String>> = HashMap::new();
        for (g, members) in &file.groups {
            let set = members
                .iter()
                .map(|m| name_of(m, Kind::Agent, trust_domain))
                .collect::<Result<HashSet<_>>>()
                .with_context(|| format!("group {g}"))?;
            groups.insert(g, set);
        }
        let mut services = HashMap::new();
        for (name, svc) in &file.services {
            if ServiceName::new(name).is_none() {
                bail!("invalid service name {name:?}");
            }
            let ctx = || format!("service {name}");
            let mut rule = Rule::default();
            for c in &svc.connectors {
                if c == "*" {
                    bail!("service {name}: connectors must be named (no \"*\"): a wildcard would let any connector hijack it");
                }
                rule.connectors.insert(name_of(c, Kind::Connector, trust_domain).with_context(ctx)?);
            }
            for a in &svc.agents {
                if a == "*" {
                    rule.any_agent = true;
                } else {
                    rule.agents.insert(name_of(a, Kind::Agent, trust_domain).with_context(ctx)?);
                }
            }
            for g in &svc.groups {
                let members = groups.get(g.as_str()).with_context(|| format!("service {name}: unknown group {g:?}"))?;
                rule.agents.extend(members.iter().cloned());
            }
            services.insert(name.clone(), rule);
        }
        Ok(Policy { trust_domain: trust_domain.to_owned(), services })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path, trust_domain: &str) -> Result<Policy> {
        let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Policy::from_toml(&s, trust_domain).with_context(|| format!("policy {}", path.display()))
    }

    fn in_domain(&self, id: &Identity, kind: Kind) -> bool {
        id.kind == kind && id.trust_domain == self.trust_domain
    }

    /// May connector `id` serve `service`?
    pub fn may_serve(&self, id: &Identity, service: &str) -> bool {
        self.in_domain(id, Kind::Connector)
            && self.services.get(service).is_some_and(|r| r.connectors.contains(&id.name))
    }

    /// May agent `id` reach `service`?
    pub fn may_reach(&self, id: &Identity, service: &str) -> bool {
        self.in_domain(id, Kind::Agent)
            && self.services.get(service).is_some_and(|r| r.any_agent || r.agents.contains(&id.name))
    }

    /// Number of services the policy names.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: Kind, name: &str) -> Identity {
        Identity { trust_domain: "corp".into(), kind, name: name.into() }
    }

    const POLICY: &str = r#"
        [groups]
        eng = ["alice", "spiffe://corp/agent/bob"]
        [services.echo]
        connectors = ["echo-1", "spiffe://corp/connector/echo-2"]
        agents = ["carol"]
        groups = ["eng"]
        [services.wiki]
        connectors = ["wiki-1"]
        agents = ["*"]
    "#;

    #[test]
    fn default_deny_and_explicit_grants() {
        let p = Policy::from_toml(POLICY, "corp").unwrap();
        assert!(p.may_serve(&id(Kind::Connector, "echo-1"), "echo"));
        assert!(p.may_serve(&id(Kind::Connector, "echo-2"), "echo"));
        assert!(!p.may_serve(&id(Kind::Connector, "wiki-1"), "echo"), "serves only what it is named for");
        assert!(!p.may_serve(&id(Kind::Agent, "echo-1"), "echo"), "an agent cannot serve");
        for a in ["alice", "bob", "carol"] {
            assert!(p.may_reach(&id(Kind::Agent, a), "echo"), "{a}");
        }
        assert!(!p.may_reach(&id(Kind::Agent, "mallory"), "echo"));
        assert!(!p.may_reach(&id(Kind::Connector, "carol"), "echo"), "a connector is not an agent");
        assert!(p.may_reach(&id(Kind::Agent, "mallory"), "wiki"), "wildcard");
        assert!(!p.may_reach(&id(Kind::Agent, "alice"), "db"), "unnamed service: denied");
        assert!(!p.may_serve(&id(Kind::Connector, "db-1"), "db"));
        let other = Identity { trust_domain: "evil".into(), kind: Kind::Agent, name: "alice".into() };
        assert!(!p.may_reach(&other, "wiki"), "other trust domain");
        let none = Policy::deny_all("corp");
        assert!(!none.may_reach(&id(Kind::Agent, "alice"), "wiki"));
    }

    #[test]
    fn broken_policies_are_refused() {
        for (bad, why) in [
            ("[services.echo]\nconnectors = [\"*\"]", "connector wildcard"),
            ("[services.echo]\ngroups = [\"nope\"]", "unknown group"),
            ("[services.echo]\nagents = [\"spiffe://other/agent/a\"]", "other trust domain"),
            ("[services.echo]\nagents = [\"spiffe://corp/connector/a\"]", "wrong kind"),
            ("[services.echo]\nagents = [\"bad name/x\"]", "invalid name"),
            ("[services.\"bad name\"]\nagents = [\"a\"]", "invalid service name"),
            ("[services.echo]\nagent = [\"a\"]", "unknown key"),
            ("[services.echo", "syntax"),
        ] {
            assert!(Policy::from_toml(bad, "corp").is_err(), "{why} must be refused");
        }
        assert_eq!(Policy::from_toml("", "corp").unwrap().service_count(), 0);
    }
}
