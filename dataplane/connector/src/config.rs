//! Connector configuration (TOML, unknown keys rejected): relays, services
//! and their backends, and the limits of the flow tables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use ztna_control::candidate::PathPolicy;
use ztna_control::ServiceName;

#[allow(unused_imports)] // doc links
use super::RESOLVE_EVERY;
/// Transport protocol of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Udp,
    Tcp,
}

/// One reachable backend: packets to the service on `port` go to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRoute {
    pub protocol: Proto,
    pub port: u16,
    pub target: Target,
}

/// A backend address: `ip:port`, or `host:port` resolved (first address)
/// when the connector starts, e.g. a Kubernetes Service name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Target(String);

impl Target {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address, resolving a name (blocking).
    pub fn resolve(&self) -> Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        self.0
            .to_socket_addrs()
            .with_context(|| format!("resolving backend {}", self.0))?
            .next()
            .with_context(|| format!("backend {} resolves to no address", self.0))
    }
}

impl TryFrom<String> for Target {
    type Error = String;
    fn try_from(s: String) -> Result<Target, String> {
        if is_host_port(&s) {
            Ok(Target(s))
        } else {
            Err(format!("backend target {s:?} is not host:port"))
        }
    }
}

/// `host:port` with a non-empty host and a port from 1 to 65535 (the form
/// of relay entries and backend targets; names are resolved later).
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0))
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.0
    }
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Target {
        Target(a.to_string())
    }
}

/// One service this connector serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Answer ICMP echo requests to the service (default on).
    #[serde(default = "yes")]
    pub icmp: bool,
    #[serde(default)]
    pub backend: Vec<BackendRoute>,
    /// Defence in depth: when set, only these agent identities (full
    /// SPIFFE IDs, as proven in the end-to-end session) may use the
    /// service, whatever the relay's policy says. Sessions of other agents
    /// are closed with the application code `denied`.
    #[serde(default)]
    pub allow_agents: Option<Vec<String>>,
    /// Whether agents may reach the service over a direct path:
    /// `"auto"` (default), `"direct-only"` or `"relay-only"`; the stricter
    /// of the connector's and the agent's wish holds.
    #[serde(default)]
    pub path: PathMode,
}

/// A service's path policy in the configuration (`"auto"`,
/// `"direct-only"`, `"relay-only"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathMode(pub PathPolicy);

impl TryFrom<String> for PathMode {
    type Error = String;
    fn try_from(s: String) -> Result<PathMode, String> {
        PathPolicy::parse(&s).map(PathMode).ok_or_else(|| format!("path {s:?} is not auto, direct-only or relay-only"))
    }
}

impl From<PathMode> for String {
    fn from(p: PathMode) -> String {
        p.0.as_str().to_owned()
    }
}

fn yes() -> bool {
    true
}

/// Connector configuration (TOML, unknown keys rejected). Every key but
/// `relays` and the services is optional: its default is in
/// `ConnectorConfig::default`, the one place defaults are written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// Relays to register at, each `host:port` (all of them, from the same
    /// socket). A DNS name stands for every address it resolves to and is
    /// re-resolved every [`RESOLVE_EVERY`], so a Kubernetes headless Service
    /// connects the connector to every relay replica.
    pub relays: Vec<String>,
    /// HTTP `/healthz`, `/readyz` (every service registered at one relay
    /// or more) and `/metrics`, e.g. `0.0.0.0:9091`.
    pub health: Option<SocketAddr>,
    /// Local UDP address; agents punch to its port on the host's addresses.
    pub listen: SocketAddr,
    /// Addresses at which agents may reach this connector directly, as
    /// `ip:port` (a public address a firewall forwards to `listen`, say):
    /// advertised as configured candidates, besides the host's own
    /// addresses and the ones the relays observe.
    pub advertise: Vec<SocketAddr>,
    /// Port prediction for hard NATs: punch packets per round to the
    /// ports nearest the agent's server-reflexive one (0: off; at most
    /// 1024; docs/protocol/direct.md §11.9).
    pub port_prediction: u16,
    /// The TLS name the relays' certificate must cover: a DNS name or an
    /// IP address (checked against its IP SANs). Default: the host of
    /// `relays` when they are one DNS name; required when a relay is
    /// given by IP address ([`ConnectorConfig::relay_server_name`]).
    pub server_name: Option<String>,
    /// The organisation CA: it signs the relays' certificates and the
    /// agents' (required: every end-to-end session verifies its agent
    /// against it).
    pub ca: Option<PathBuf>,
    /// This connector's certificate (one URI SAN:
    /// `spiffe://<trust-domain>/connector/<name>`) and key. Required: the
    /// relay authenticates every client.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Skip relay certificate verification (local experiments only; logged).
    pub insecure: bool,
    /// UDP flows (backend sockets) in total.
    pub max_udp_flows: usize,
    /// UDP flows one agent flow (one agent connection's flow for one
    /// service) may hold.
    pub max_udp_flows_per_agent: usize,
    /// UDP flows one agent identity may hold over all its agent flows
    /// (default: a quarter of `max_udp_flows`). When the table is full, a
    /// new flow of an identity below its share takes the least recently
    /// used flow of the identity holding the most, so one identity, or a
    /// few, cannot lock the others out.
    pub max_udp_flows_per_identity: Option<usize>,
    pub udp_idle_secs: u64,
    /// Agent flows with TCP state (one smoltcp interface each).
    pub max_tcp_flows: usize,
    /// TCP connections per agent flow.
    pub max_tcp_per_flow: usize,
    /// Agent flows with TCP state one agent identity may hold (default: a
    /// quarter of `max_tcp_flows`). SYNs over it are answered with an RST.
    pub max_tcp_flows_per_identity: Option<usize>,
    /// TCP connections in total. Worst-case buffer memory is
    /// `max_tcp_connections × 2 × tcp_buffer_bytes`.
    pub max_tcp_connections: usize,
    /// TCP connections one agent identity may hold over all its agent flows
    /// (default: a quarter of `max_tcp_connections`). SYNs over it are
    /// answered with an RST. When the table is full, a SYN of an identity
    /// below its share resets the least recently used connection of the
    /// identity holding the most.
    pub max_tcp_connections_per_identity: Option<usize>,
    /// Packets one agent identity may have queued in the connector's TCP
    /// endpoint (received from the agent and waiting for smoltcp, or waiting
    /// to be sent to the agent), over all its agent flows; beyond it,
    /// segments from the agent are dropped (`drop_tcp_queue_full`) and
    /// smoltcp holds back what it would send.
    pub max_tcp_queued_packets_per_identity: usize,
    /// Size of each of the two smoltcp buffers of a TCP connection; it is
    /// also the largest window advertised to the agent.
    pub tcp_buffer_bytes: usize,
    /// A TCP connection that moves no byte and gets no segment for this
    /// long is reset on both sides.
    pub tcp_idle_secs: u64,
    /// End-to-end sessions (one per agent and service) in total, and per
    /// agent identity (proven in the inner handshake). Beyond either, a new
    /// session is refused with `limit`.
    pub max_e2e_sessions: usize,
    pub max_e2e_sessions_per_identity: usize,
    /// Inner handshakes in progress in total, and per agent identity (as
    /// the relay named it: the only name before the handshake ends). Over
    /// either, new Initials are dropped (`e2e_handshakes_refused`), so a
    /// flood from one identity leaves room for the others.
    pub max_e2e_handshakes: usize,
    pub max_e2e_handshakes_per_identity: usize,
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// The default per-identity share of a table: a quarter of it (at least
/// one entry), so at least four identities fill it before reclaiming
/// starts.
pub const DEFAULT_IDENTITY_SHARE_DIVISOR: usize = 4;

fn default_share(table: usize) -> usize {
    (table / DEFAULT_IDENTITY_SHARE_DIVISOR).max(1)
}

/// How long a backend TCP connect may take before the agent gets an RST.
pub(crate) const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ConnectorConfig {
    /// No relays and no services (both required), everything else at its
    /// default.
    fn default() -> ConnectorConfig {
        ConnectorConfig {
            relays: Vec::new(),
            health: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 4434)),
            advertise: Vec::new(),
            port_prediction: 0,
            server_name: None,
            ca: None,
            cert: None,
            key: None,
            insecure: false,
            max_udp_flows: 4096,
            max_udp_flows_per_agent: 256,
            max_udp_flows_per_identity: None,
            udp_idle_secs: 60,
            max_tcp_flows: 1024,
            max_tcp_per_flow: 64,
            max_tcp_flows_per_identity: None,
            max_tcp_connections: 2048,
            max_tcp_connections_per_identity: None,
            max_tcp_queued_packets_per_identity: 4096,
            tcp_buffer_bytes: 256 * 1024,
            tcp_idle_secs: 600,
            max_e2e_sessions: 1024,
            max_e2e_sessions_per_identity: 64,
            max_e2e_handshakes: 128,
            max_e2e_handshakes_per_identity: 8,
            services: Vec::new(),
        }
    }
}

impl ConnectorConfig {
    /// A configuration with every optional setting at its default.
    /// For tests and embedding: relays by address, verified under the
    /// name `localhost` (the development relay's certificate).
    pub fn new(relays: Vec<SocketAddr>, services: Vec<ServiceConfig>) -> ConnectorConfig {
        ConnectorConfig {
            relays: relays.iter().map(SocketAddr::to_string).collect(),
            server_name: Some("localhost".into()),
            services,
            ..ConnectorConfig::default()
        }
    }

    /// The name every relay's certificate must cover: `server_name`, else
    /// the relays' one DNS name. An error says what to configure.
    pub fn relay_server_name(&self) -> Result<String> {
        match &self.server_name {
            Some(n) => ztna_control::quic::check_server_name(n).map(|()| n.clone()),
            None if self.insecure => Ok("localhost".to_owned()),
            None => ztna_control::quic::default_server_name(self.relays.iter().map(String::as_str)),
        }
        .map_err(|e| anyhow::anyhow!(e))
    }

    pub fn from_toml(s: &str) -> Result<Self> {
        let c: ConnectorConfig = toml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    /// The relay sessions' TLS material, read from the `ca`, `cert` and
    /// `key` files now (each new relay session reads them again, so files
    /// rotated on disk are picked up).
    pub fn client_tls(&self) -> Result<ztna_control::quic::TlsOptions> {
        ztna_ops::tls::read_client_tls(self.ca.as_deref(), self.cert.as_deref(), self.key.as_deref(), !self.insecure)
    }

    pub fn validate(&self) -> Result<()> {
        if self.relays.is_empty() {
            bail!("at least one relay is required");
        }
        if let Some(r) = self.relays.iter().find(|r| !is_host_port(r)) {
            bail!("relay {r:?} is not host:port");
        }
        if self.services.is_empty() {
            bail!("at least one service is required");
        }
        if self.cert.is_none() || self.key.is_none() {
            bail!("cert and key are required: the relay and every agent authenticate the connector");
        }
        if self.ca.is_none() {
            bail!("ca is required: end-to-end sessions verify every agent against the organisation CA");
        }
        let e2e = [
            ("max_e2e_sessions", self.max_e2e_sessions),
            ("max_e2e_sessions_per_identity", self.max_e2e_sessions_per_identity),
            ("max_e2e_handshakes", self.max_e2e_handshakes),
            ("max_e2e_handshakes_per_identity", self.max_e2e_handshakes_per_identity),
        ];
        if let Some((key, _)) = e2e.iter().find(|(_, v)| *v == 0) {
            bail!("{key} must be positive");
        }
        for s in &self.services {
            if ServiceName::new(&s.name).is_none() {
                bail!("invalid service name {:?} (1-64 of [a-z0-9._-])", s.name);
            }
            for a in s.allow_agents.iter().flatten() {
                match ztna_control::identity::Identity::parse(a) {
                    Ok(id) if id.kind == ztna_control::identity::Kind::Agent => {}
                    _ => bail!("service {}: allow_agents entry {a:?} is not an agent SPIFFE ID", s.name),
                }
            }
        }
        if self.port_prediction > ztna_control::candidate::MAX_PORT_PREDICTION {
            bail!("port_prediction must be at most {}", ztna_control::candidate::MAX_PORT_PREDICTION);
        }
        if !(4096..=16 << 20).contains(&self.tcp_buffer_bytes) {
            bail!("tcp_buffer_bytes must be between 4096 and 16 MiB");
        }
        // Bounded so that `last + idle` can never overflow an Instant.
        const WEEK: u64 = 7 * 24 * 3600;
        if !(1..=WEEK).contains(&self.tcp_idle_secs) || !(1..=WEEK).contains(&self.udp_idle_secs) {
            bail!("tcp_idle_secs and udp_idle_secs must be between 1 s and one week");
        }
        if self.max_udp_flows_per_agent == 0 {
            bail!("max_udp_flows_per_agent must be positive");
        }
        let shares = [
            ("max_udp_flows_per_identity", self.max_udp_flows_per_identity),
            ("max_tcp_flows_per_identity", self.max_tcp_flows_per_identity),
            ("max_tcp_connections_per_identity", self.max_tcp_connections_per_identity),
        ];
        if let Some((key, _)) = shares.iter().find(|(_, v)| *v == Some(0)) {
            bail!("{key} must be positive");
        }
        if self.max_tcp_queued_packets_per_identity == 0 {
            bail!("max_tcp_queued_packets_per_identity must be positive");
        }
        self.relay_server_name()?;
        Ok(())
    }

    /// UDP flows one agent identity may hold (the setting, or its default).
    pub fn udp_flows_per_identity(&self) -> usize {
        self.max_udp_flows_per_identity.unwrap_or_else(|| default_share(self.max_udp_flows))
    }

    /// Agent flows with TCP state one identity may hold.
    pub fn tcp_flows_per_identity(&self) -> usize {
        self.max_tcp_flows_per_identity.unwrap_or_else(|| default_share(self.max_tcp_flows))
    }

    /// TCP connections one agent identity may hold.
    pub fn tcp_connections_per_identity(&self) -> usize {
        self.max_tcp_connections_per_identity.unwrap_or_else(|| default_share(self.max_tcp_connections))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use super::*;

    #[test]
    fn omitted_keys_take_the_defaults_and_unknown_keys_are_refused() {
        let toml = "relays = [\"relay:4433\"]\ninsecure = true\n[[service]]\nname = \"echo\"\n";
        let c: ConnectorConfig = toml::from_str(toml).unwrap();
        let d = ConnectorConfig::default();
        assert_eq!((c.max_udp_flows, c.udp_idle_secs, c.max_tcp_connections), (4096, 60, 2048));
        assert_eq!((c.listen, c.tcp_buffer_bytes, c.tcp_idle_secs), (d.listen, d.tcp_buffer_bytes, d.tcp_idle_secs));
        let n = ConnectorConfig::new(vec!["127.0.0.1:4433".parse().unwrap()], c.services.clone());
        assert_eq!((n.max_tcp_per_flow, n.server_name.as_deref()), (d.max_tcp_per_flow, Some("localhost")));
        assert!(toml::from_str::<ConnectorConfig>(&format!("max_udp_flowz = 1\n{toml}")).is_err());
        let no_relay: ConnectorConfig = toml::from_str("insecure = true\n[[service]]\nname = \"echo\"\n").unwrap();
        assert!(no_relay.validate().is_err(), "a relay is required");
        assert_eq!(c.port_prediction, 0, "port prediction is off by default");
    }

    #[test]
    fn port_prediction_is_bounded() {
        let base = "relays = [\"127.0.0.1:4433\"]\nserver_name = \"relay\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";
        let with = |n: u32| -> ConnectorConfig {
            toml::from_str(&format!("{base}port_prediction = {n}\n[[service]]\nname = \"echo\"\n")).unwrap()
        };
        assert!(with(1024).validate().is_ok());
        let e = with(1025).validate().unwrap_err();
        assert!(format!("{e:#}").contains("port_prediction"), "{e:#}");
    }

    #[test]
    fn server_name_defaults_to_the_relays_dns_name_and_is_required_for_ip_relays() {
        let base = "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[[service]]\nname = \"echo\"\n";
        let by_name = ConnectorConfig::from_toml(&format!("relays = [\"relay.example.org:4433\"]\n{base}")).unwrap();
        assert_eq!(by_name.relay_server_name().unwrap(), "relay.example.org");
        let err = ConnectorConfig::from_toml(&format!("relays = [\"198.51.100.10:4433\"]\n{base}")).unwrap_err();
        assert!(err.to_string().contains("server_name is required"), "{err}");
        let named = format!("relays = [\"198.51.100.10:4433\"]\nserver_name = \"198.51.100.10\"\n{base}");
        assert_eq!(ConnectorConfig::from_toml(&named).unwrap().relay_server_name().unwrap(), "198.51.100.10");
        let bad = format!("relays = [\"198.51.100.10:4433\"]\nserver_name = \"relay_1\"\n{base}");
        assert!(ConnectorConfig::from_toml(&bad).unwrap_err().to_string().contains("neither an IP address"));
    }
}
