//! Configuration of the Linux agent: a TOML file (unknown keys rejected)
//! that command-line flags override.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use ztna_agent::agent_core::AgentConfig;
use ztna_agent::direct::PathSettings;
use ztna_agent::route::Cidr;
use ztna_control::candidate::PathPolicy;
use ztna_control::candidate::MAX_PORT_PREDICTION;
use ztna_control::e2e::DirectConfig;
use ztna_control::ServiceName;

/// The TUN device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    /// Interface name (at most 15 bytes).
    #[serde(default = "default_tun_name")]
    pub name: String,
    /// Address of the device, e.g. `100.64.0.1/32`: the source address of
    /// tunneled packets.
    #[serde(default = "default_tun_address")]
    pub address: String,
    /// Device MTU, at most 1280: the end-to-end session carries 1280-byte
    /// IP packets in 1400-byte UDP payloads (PROTOCOL.md §8.4).
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig { name: default_tun_name(), address: default_tun_address(), mtu: default_mtu() }
    }
}

/// A service and the destination prefixes reached through it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub cidrs: Vec<String>,
    /// Connector SPIFFE IDs accepted for this service end to end (empty:
    /// any connector the relay binds, whose certificate must then carry
    /// the identity the relay named).
    #[serde(default)]
    pub connectors: Vec<String>,
    /// Whether the service may be reached over a direct path: `"auto"`
    /// (default), `"direct-only"` or `"relay-only"`; the stricter of this
    /// and the connector's wish holds.
    #[serde(default)]
    pub path: Option<String>,
}

/// Agent configuration (TOML, unknown keys rejected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Relay address (IP:PORT); may come from `--relay` instead.
    pub relay: Option<SocketAddr>,
    /// Other relay replicas (IP:PORT) to move to when the relay drains or
    /// is lost, round robin.
    #[serde(default)]
    pub fallback_relays: Vec<SocketAddr>,
    /// TLS server name of the relay (its certificate must cover it): a DNS
    /// name, or the relay's IP address when its certificate lists it as an
    /// IP SAN. Required: `relay` is an address, and which name its
    /// certificate covers cannot be guessed from it.
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA file that signs the relay's certificate (default: none, so
    /// verification fails unless `insecure`).
    pub ca: Option<PathBuf>,
    /// This agent's certificate (one URI SAN
    /// `spiffe://<trust-domain>/agent/<name>`) and key; the relay refuses
    /// clients without one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Skip relay certificate verification (local experiments only; logged).
    #[serde(default)]
    pub insecure: bool,
    /// Local UDP address (default: any address, ephemeral port).
    pub listen: Option<SocketAddr>,
    /// HTTP `GET /status` (JSON: relay session, observed address,
    /// services and their end-to-end sessions, counters) on this address;
    /// default none. As private as the address: bind it to loopback.
    pub status: Option<SocketAddr>,
    #[serde(default)]
    pub tun: TunConfig,
    /// Timings of direct paths (docs/protocol/direct.md §11.4).
    #[serde(default)]
    pub direct: DirectTimings,
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
}

/// `[direct]`: the timings of direct paths, in milliseconds; each key is
/// optional (defaults and their reasons: docs/protocol/direct.md §11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectTimings {
    pub probe_first_ms: Option<u64>,
    pub probe_max_ms: Option<u64>,
    pub round_ms: Option<u64>,
    pub min_round_gap_ms: Option<u64>,
    pub second_round_ms: Option<u64>,
    pub upgrade_every_ms: Option<u64>,
    pub keepalive_ms: Option<u64>,
    pub direct_timeout_ms: Option<u64>,
    /// Port prediction for hard NATs (off: 0; at most 1024 punches per
    /// round; docs/protocol/direct.md §11.9).
    pub port_prediction: Option<u16>,
}

impl DirectTimings {
    /// The defaults with what is set here replaced. Every value must be
    /// from 10 ms (keepalive: 100 ms) to one hour.
    pub fn config(&self) -> Result<DirectConfig> {
        let named = [
            ("probe_first_ms", self.probe_first_ms, 10),
            ("probe_max_ms", self.probe_max_ms, 10),
            ("round_ms", self.round_ms, 10),
            ("min_round_gap_ms", self.min_round_gap_ms, 10),
            ("second_round_ms", self.second_round_ms, 10),
            ("upgrade_every_ms", self.upgrade_every_ms, 10),
            ("keepalive_ms", self.keepalive_ms, 100),
            ("direct_timeout_ms", self.direct_timeout_ms, 100),
        ];
        for (name, v, min) in named {
            if let Some(v) = v.filter(|v| !(min..=3_600_000).contains(v)) {
                bail!("[direct] {name} = {v} is out of range ({min} to 3600000)");
            }
        }
        if let Some(n) = self.port_prediction.filter(|n| *n > MAX_PORT_PREDICTION) {
            bail!("[direct] port_prediction = {n} is out of range (0 to {MAX_PORT_PREDICTION})");
        }
        let d = DirectConfig::default();
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        Ok(DirectConfig {
            probe_first: ms(self.probe_first_ms, d.probe_first),
            probe_max: ms(self.probe_max_ms, d.probe_max),
            round_len: ms(self.round_ms, d.round_len),
            min_round_gap: ms(self.min_round_gap_ms, d.min_round_gap),
            second_round: ms(self.second_round_ms, d.second_round),
            upgrade_every: ms(self.upgrade_every_ms, d.upgrade_every),
            keepalive: ms(self.keepalive_ms, d.keepalive),
            direct_timeout: ms(self.direct_timeout_ms, d.direct_timeout),
            port_prediction: self.port_prediction.unwrap_or(d.port_prediction),
            ..d
        })
    }
}

fn default_tun_name() -> String {
    "ztna0".into()
}
fn default_tun_address() -> String {
    "100.64.0.1/32".into()
}
fn default_mtu() -> u16 {
    1280
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub relay: Option<SocketAddr>,
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
    pub listen: Option<SocketAddr>,
    pub status: Option<SocketAddr>,
    pub tun_name: Option<String>,
    pub tun_address: Option<String>,
    pub mtu: Option<u16>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub relay: SocketAddr,
    pub fallback_relays: Vec<SocketAddr>,
    pub server_name: String,
    pub ca: Option<PathBuf>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub insecure: bool,
    pub listen: SocketAddr,
    pub status: Option<SocketAddr>,
    pub tun_name: String,
    pub tun_address: Cidr,
    pub mtu: u16,
    pub routes: Vec<(ServiceName, Cidr)>,
    /// Service → accepted connector identity.
    pub pins: Vec<(ServiceName, String)>,
    /// Service → path policy (services not listed: auto).
    pub path_policies: Vec<(ServiceName, PathPolicy)>,
    pub direct: DirectConfig,
}

/// Smallest MTU we accept (the IPv4 minimum datagram every host takes).
pub const MIN_MTU: u16 = 576;
/// Largest MTU we accept: what the end-to-end session carries.
pub const MAX_MTU: u16 = ztna_control::e2e::TUNNEL_MTU as u16;

impl FileConfig {
    pub fn from_toml(s: &str) -> Result<FileConfig> {
        Ok(toml::from_str(s)?)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.relay {
            self.relay = Some(v);
        }
        if let Some(v) = &o.server_name {
            self.server_name = Some(v.clone());
        }
        if let Some(v) = &o.ca {
            self.ca = Some(v.clone());
        }
        if let Some(v) = &o.cert {
            self.cert = Some(v.clone());
        }
        if let Some(v) = &o.key {
            self.key = Some(v.clone());
        }
        if o.insecure {
            self.insecure = true;
        }
        if let Some(v) = o.status {
            self.status = Some(v);
        }
        if let Some(v) = o.listen {
            self.listen = Some(v);
        }
        if let Some(v) = &o.tun_name {
            self.tun.name = v.clone();
        }
        if let Some(v) = &o.tun_address {
            self.tun.address = v.clone();
        }
        if let Some(v) = o.mtu {
            self.tun.mtu = v;
        }
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<Config> {
        let Some(relay) = self.relay else { bail!("no relay: set `relay` in the file or pass --relay") };
        if self.ca.is_none() {
            bail!("no CA: set `ca` (or --ca) to the organisation CA (it signs the relay and the connectors)");
        }
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            bail!("no certificate: set `cert` and `key` (or --cert/--key); the relay authenticates every agent")
        };
        let name = &self.tun.name;
        if name.is_empty() || name.len() > 15 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("invalid TUN name {name:?} (1-15 of [A-Za-z0-9._-])");
        }
        let tun_address: Cidr = self.tun.address.parse().map_err(|e| anyhow::anyhow!("tun.address: {e}"))?;
        if !(MIN_MTU..=MAX_MTU).contains(&self.tun.mtu) {
            bail!("tun.mtu {} out of range {MIN_MTU}..={MAX_MTU}", self.tun.mtu);
        }
        if tun_address.addr().is_ipv6() && self.tun.mtu < 1280 {
            bail!("tun.mtu {} is below the IPv6 minimum of 1280", self.tun.mtu);
        }
        if self.services.is_empty() {
            bail!("at least one [[service]] is required");
        }
        let mut routes = Vec::new();
        let mut pins = Vec::new();
        let mut path_policies = Vec::new();
        for s in &self.services {
            let Some(svc) = ServiceName::new(&s.name) else {
                bail!("invalid service name {:?} (1-64 of [a-z0-9._-])", s.name)
            };
            if let Some(p) = &s.path {
                let Some(policy) = PathPolicy::parse(p) else {
                    bail!("service {:?}: path {p:?} is not auto, direct-only or relay-only", s.name)
                };
                path_policies.push((svc.clone(), policy));
            }
            for c in &s.connectors {
                match ztna_control::identity::Identity::parse(c) {
                    Ok(id) if id.kind == ztna_control::identity::Kind::Connector => pins.push((svc.clone(), c.clone())),
                    _ => bail!("service {:?}: connectors entry {c:?} is not a connector SPIFFE ID", s.name),
                }
            }
            if s.cidrs.is_empty() {
                bail!("service {:?} has no cidrs", s.name);
            }
            for c in &s.cidrs {
                let cidr: Cidr = c.parse().map_err(|e| anyhow::anyhow!("service {:?}: {e}", s.name))?;
                // Routing a relay into the tunnel would loop every packet.
                if let Some(r) = std::iter::once(&relay).chain(&self.fallback_relays).find(|r| cidr.contains(r.ip())) {
                    bail!("service {:?}: {cidr} contains the relay address {}", s.name, r.ip());
                }
                if let Some((other, _)) = routes.iter().find(|(_, r): &&(ServiceName, Cidr)| *r == cidr) {
                    bail!("{cidr} is listed twice (services {:?} and {:?})", other.as_str(), s.name);
                }
                routes.push((svc.clone(), cidr));
            }
        }
        if let Some(f) = self.fallback_relays.iter().find(|f| f.is_ipv4() != relay.is_ipv4()) {
            bail!("fallback relay {f} and relay {relay} are of different families (one socket serves both)");
        }
        let listen = match self.listen {
            Some(l) => {
                if l.is_ipv4() != relay.is_ipv4() {
                    bail!("listen address {l} and relay {relay} are of different families");
                }
                l
            }
            None if relay.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => SocketAddr::from(([0u16; 8], 0)),
        };
        let server_name = match &self.server_name {
            Some(n) => ztna_control::quic::check_server_name(n).map(|()| n.clone()),
            // Not verified: any name will do.
            None if self.insecure => Ok("localhost".to_owned()),
            None => ztna_control::quic::default_server_name([relay.to_string().as_str()]),
        }
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Config {
            relay,
            fallback_relays: self.fallback_relays.clone(),
            server_name,
            ca: self.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            insecure: self.insecure,
            listen,
            status: self.status,
            tun_name: name.clone(),
            tun_address,
            mtu: self.tun.mtu,
            routes,
            pins,
            path_policies,
            direct: self.direct.config()?,
        })
    }
}

impl Config {
    /// Reads the file, applies the flags and validates.
    pub fn load(path: &std::path::Path, o: &Overrides) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut f = FileConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?;
        f.apply(o);
        f.validate()
    }

    /// The agent core's configuration, for a UDP socket bound to `local`
    /// (reads the TLS files).
    pub fn agent_config(&self, local: SocketAddr) -> Result<AgentConfig> {
        let tls =
            ztna_ops::tls::read_client_tls(self.ca.as_deref(), Some(&self.cert), Some(&self.key), !self.insecure)?;
        Ok(AgentConfig {
            relay: self.relay,
            fallback_relays: self.fallback_relays.clone(),
            server_name: self.server_name.clone(),
            local,
            tls,
            routes: self.routes.clone(),
            pinned_connectors: self.pins.clone(),
            paths: PathSettings {
                policies: self.path_policies.clone(),
                timing: self.direct.clone(),
                ..PathSettings::default()
            },
        })
    }

    /// Whether any address or route is IPv6.
    pub fn uses_ipv6(&self) -> bool {
        self.tun_address.addr().is_ipv6() || self.routes.iter().any(|(_, c)| c.addr().is_ipv6())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        relay = "192.0.2.1:4433"
        server_name = "relay.example"
        ca = "/etc/ztna/ca.pem"
        cert = "/etc/ztna/agent.pem"
        key = "/etc/ztna/agent.key"

        [tun]
        name = "zt0"
        address = "100.64.0.7/32"
        mtu = 1280

        [[service]]
        name = "echo"
        cidrs = ["100.100.0.10/32", "100.100.1.0/24"]

        [[service]]
        name = "db"
        cidrs = ["fd00:64::/64"]
    "#;

    #[test]
    fn parses_and_validates() {
        let c = FileConfig::from_toml(GOOD).unwrap().validate().unwrap();
        assert_eq!(c.relay, "192.0.2.1:4433".parse().unwrap());
        assert_eq!(c.server_name, "relay.example");
        assert_eq!(c.tun_name, "zt0");
        assert_eq!(c.tun_address.to_string(), "100.64.0.7/32");
        assert_eq!(c.routes.len(), 3);
        assert_eq!(c.listen, "0.0.0.0:0".parse().unwrap());
        assert!(c.uses_ipv6());
        // The TLS files are read when the core's configuration is built:
        // the error names the one missing.
        let e = c.agent_config("10.0.0.2:5000".parse().unwrap()).unwrap_err();
        assert!(format!("{e:#}").contains("/etc/ztna/ca.pem"), "{e:#}");
    }

    #[test]
    fn direct_timings_and_path_policies_are_read_and_checked() {
        let with =
            |extra: &str| FileConfig::from_toml(&GOOD.replacen("[[service]]", &format!("{extra}\n[[service]]"), 1));
        let c = with("[direct]\nsecond_round_ms = 4000\nkeepalive_ms = 500\n").unwrap().validate().unwrap();
        assert_eq!(c.direct.second_round, Duration::from_secs(4));
        assert_eq!(c.direct.keepalive, Duration::from_millis(500));
        assert_eq!(c.direct.upgrade_every, DirectConfig::default().upgrade_every);
        assert_eq!(c.direct.port_prediction, 0, "off by default");
        let c = with("[direct]\nport_prediction = 512\n").unwrap().validate().unwrap();
        assert_eq!(c.direct.port_prediction, 512);
        for bad in [
            "[direct]\nprobe_first_ms = 0\n",
            "[direct]\nkeepalive_ms = 10\n",
            "[direct]\nround_ms = 99999999999\n",
            "[direct]\nport_prediction = 1025\n",
        ] {
            let e = with(bad).unwrap().validate().unwrap_err();
            assert!(format!("{e:#}").contains("out of range"), "{bad}: {e:#}");
        }
        assert!(with("[direct]\nbogus = 1\n").is_err(), "unknown keys are errors");
        let policy =
            GOOD.replacen("cidrs = [\"fd00:64::/64\"]", "cidrs = [\"fd00:64::/64\"]\npath = \"relay-only\"", 1);
        let c = FileConfig::from_toml(&policy).unwrap().validate().unwrap();
        assert_eq!(c.path_policies, [(ServiceName::new("db").unwrap(), PathPolicy::RelayOnly)]);
        let bad = GOOD.replacen("cidrs = [\"fd00:64::/64\"]", "cidrs = [\"fd00:64::/64\"]\npath = \"sometimes\"", 1);
        assert!(FileConfig::from_toml(&bad).unwrap().validate().is_err());
    }

    #[test]
    fn agent_config_carries_the_tls_files_bytes() {
        let dir = std::env::temp_dir().join(format!("ztna-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in [("ca.pem", "CA"), ("a.pem", "CERT"), ("a.key", "KEY")] {
            std::fs::write(dir.join(name), body).unwrap();
        }
        let toml = format!(
            "relay = \"192.0.2.1:4433\"\nserver_name = \"192.0.2.1\"\nca = \"{0}/ca.pem\"\ncert = \"{0}/a.pem\"\nkey = \"{0}/a.key\"\n[[service]]\nname = \"echo\"\ncidrs = [\"100.100.0.10\"]\n",
            dir.display()
        );
        let c = FileConfig::from_toml(&toml).unwrap().validate().unwrap();
        let a = c.agent_config("10.0.0.2:5000".parse().unwrap()).unwrap();
        assert!(a.tls.verify_peer);
        assert_eq!(a.tls.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(a.tls.cert_pem.as_deref(), Some(&b"CERT"[..]));
        assert_eq!(a.tls.key_pem.as_deref(), Some(&b"KEY"[..]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults() {
        let toml = "relay = \"192.0.2.1:4433\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[[service]]\nname = \"echo\"\ncidrs = [\"100.100.0.10\"]\n";
        // The relay is an address: which name its certificate covers must
        // be said.
        let e = FileConfig::from_toml(toml).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("server_name is required"), "{e}");
        let bad = FileConfig::from_toml(&format!("server_name = \"relay..example\"\n{toml}")).unwrap().validate();
        assert!(bad.unwrap_err().to_string().contains("neither an IP address nor a DNS host name"));
        let f = FileConfig::from_toml(&format!("server_name = \"192.0.2.1\"\n{toml}")).unwrap();
        let c = f.validate().unwrap();
        assert_eq!((c.tun_name.as_str(), c.mtu, c.server_name.as_str()), ("ztna0", 1280, "192.0.2.1"));
        assert_eq!(c.tun_address.to_string(), "100.64.0.1/32");
        assert_eq!(c.routes[0].1.to_string(), "100.100.0.10/32");
    }

    #[test]
    fn flags_override_the_file() {
        let mut f = FileConfig::from_toml(GOOD).unwrap();
        f.apply(&Overrides {
            relay: Some("198.51.100.1:443".parse().unwrap()),
            ca: Some("/tmp/other.pem".into()),
            tun_name: Some("zt9".into()),
            mtu: Some(1200),
            ..Overrides::default()
        });
        let c = f.validate().unwrap();
        assert_eq!(c.relay.port(), 443);
        assert_eq!(c.ca.unwrap(), PathBuf::from("/tmp/other.pem"));
        assert_eq!((c.tun_name.as_str(), c.mtu), ("zt9", 1200));
    }

    #[test]
    fn rejects_bad_configs() {
        let err = |s: &str| FileConfig::from_toml(s).and_then(|f| f.validate()).unwrap_err().to_string();
        let svc = "[[service]]\nname = \"echo\"\ncidrs = [\"100.100.0.10/32\"]\n";
        let head = "relay = \"192.0.2.1:4433\"\nserver_name = \"relay.example\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n";
        assert!(err(&format!("relay = \"192.0.2.1:4433\"\nca = \"ca.pem\"\n{svc}")).contains("no certificate"));
        assert!(err(&format!("{head}bogus = 1\n{svc}")).contains("unknown field"));
        assert!(err(&format!("{head}[tun]\nnmae = \"x\"\n{svc}")).contains("unknown field"));
        assert!(err(&format!("ca = \"ca.pem\"\n{svc}")).contains("no relay"));
        assert!(err(&format!("relay = \"192.0.2.1:4433\"\ncert = \"a\"\nkey = \"k\"\n{svc}")).contains("no CA"));
        assert!(err(head).contains("at least one"));
        assert!(err(&format!("{head}[tun]\nmtu = 100\n{svc}")).contains("out of range"));
        assert!(err(&format!("{head}[tun]\nname = \"a-very-long-tun-name\"\n{svc}")).contains("TUN name"));
        assert!(err(&format!("{head}[tun]\naddress = \"nope\"\n{svc}")).contains("tun.address"));
        assert!(err(&format!("{head}[[service]]\nname = \"Bad Name\"\ncidrs = [\"1.2.3.4\"]\n")).contains("invalid"));
        assert!(err(&format!("{head}[[service]]\nname = \"e\"\ncidrs = []\n")).contains("no cidrs"));
        assert!(err(&format!("{head}[[service]]\nname = \"e\"\ncidrs = [\"1.2.3.4/40\"]\n")).contains("prefix"));
        // The relay must stay outside the tunnel.
        assert!(err(&format!("{head}[[service]]\nname = \"all\"\ncidrs = [\"0.0.0.0/0\"]\n")).contains("relay"));
        assert!(
            err(&format!("{head}{svc}[[service]]\nname = \"b\"\ncidrs = [\"100.100.0.10/32\"]\n")).contains("twice")
        );
    }
}
