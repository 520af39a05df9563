//! Starting the binaries under test in the lab: relay, echo service,
//! connector and agent.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::lab::{ok, workspace_bin, Lab, Proc};
use crate::{RELAY_IP, SITE_IP, VIP};

pub struct Bins {
    pub relay: PathBuf,
    pub connector: PathBuf,
    pub bench: PathBuf,
    pub agent: PathBuf,
}

pub fn bins() -> Bins {
    Bins {
        relay: workspace_bin("ztna-relay"),
        connector: workspace_bin("ztna-connector"),
        bench: workspace_bin("ztna-bench"),
        agent: PathBuf::from(env!("CARGO_BIN_EXE_ztna-agent")),
    }
}

/// The relay with a certificate for its address and `localhost` (the
/// CA stays, so a restart keeps what clients trust), mutual TLS against
/// the same CA, a policy letting
/// connector `site` serve `echo` to agents `laptop` and `phone`, one
/// worker, metrics on the wan address.
pub fn start_relay(lab: &Lab, b: &Bins, pki: &ztna_relay::pki::DevPki) -> Proc {
    start_relay_at(lab, b, pki, RELAY_IP)
}

pub fn start_relay_at(lab: &Lab, b: &Bins, pki: &ztna_relay::pki::DevPki, ip: &str) -> Proc {
    // A certificate for this relay's address (an IP SAN, as a cloud VM
    // without a DNS name would have) and for `localhost`.
    let id = ztna_control::identity::Identity {
        trust_domain: ztna_relay::pki::DEV_TRUST_DOMAIN.into(),
        kind: ztna_control::identity::Kind::Relay,
        name: format!("wan-{}", ip.replace('.', "-")),
    };
    let stem = lab.dir.join(format!("relay-{}", id.name));
    let (cert, key) = (stem.with_extension("pem"), stem.with_extension("key"));
    if !cert.exists() {
        // (A restart reuses it.)
        ztna_relay::pki::issue(&pki.ca_files, &id, &["localhost".into()], &[ip.parse().unwrap()], 7, &lab.dir).unwrap();
    }
    let policy =
        lab.write("policy.toml", "[services.echo]\nconnectors = [\"site\"]\nagents = [\"laptop\", \"phone\"]\n");
    let mut relay = Proc::spawn(
        &lab.relay,
        &format!("relay {ip}"),
        &b.relay,
        &[
            "--listen",
            &format!("{ip}:4433"),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--client-ca",
            pki.ca.to_str().unwrap(),
            "--trust-domain",
            ztna_relay::pki::DEV_TRUST_DOMAIN,
            "--policy",
            policy.to_str().unwrap(),
            "--workers",
            "1",
            "--metrics",
            &format!("{ip}:9090"),
        ],
    );
    relay.wait_out(0, Duration::from_secs(10), |l| l.starts_with("listening on")).expect("relay listening");
    relay
}

/// The connector's health listener and the agent's status listener, on
/// loopback inside their namespaces.
pub const CONNECTOR_HEALTH: &str = "127.0.0.1:9091";
pub const AGENT_STATUS: &str = "127.0.0.1:9092";

/// Everything up to an agent registered for `echo`.
pub struct Running {
    pub pki: ztna_relay::pki::DevPki,
    pub relay: Proc,
    pub connector: Proc,
    pub agent: Proc,
    pub _echo: Proc,
}

/// [`bring_up_with`] with the agent on the relay path only (`relay-only`):
/// what most tests here are about.
pub fn bring_up(lab: &Lab, b: &Bins) -> Running {
    bring_up_with(lab, b, "relay-only", "")
}

/// Relay, echo service, connector and agent; the agent's service has path
/// policy `path` (`auto`, `direct-only`, `relay-only`); `agent_extra` is
/// appended to the agent's configuration before its services (a
/// `[direct]` table, say).
pub fn bring_up_with(lab: &Lab, b: &Bins, path: &str, agent_extra: &str) -> Running {
    let pki = ztna_relay::pki::generate(&lab.dir).unwrap();
    let (ccert, ckey) = pki.issue(ztna_control::identity::Kind::Connector, "site").unwrap();
    let (acert, akey) = pki.issue(ztna_control::identity::Kind::Agent, "laptop").unwrap();
    let relay = start_relay(lab, b, &pki);

    let mut echo =
        Proc::spawn(&lab.site, "echo", &b.bench, &["echo", "--udp", "127.0.0.1:7007", "--tcp", "127.0.0.1:7007"]);
    echo.wait_out(0, Duration::from_secs(10), |l| l.starts_with("echo udp")).expect("echo service up");

    let ccfg = lab.write(
        "connector.toml",
        &format!(
            "relays = [\"{RELAY_IP}:4433\"]\nlisten = \"{SITE_IP}:4434\"\nserver_name = \"{RELAY_IP}\"\nca = \"{}\"\n\
             cert = \"{}\"\nkey = \"{}\"\nhealth = \"{CONNECTOR_HEALTH}\"\n\n\
             [[service]]\nname = \"echo\"\nicmp = true\n\n\
             [[service.backend]]\nprotocol = \"udp\"\nport = 7\ntarget = \"127.0.0.1:7007\"\n\n\
             [[service.backend]]\nprotocol = \"tcp\"\nport = 7\ntarget = \"127.0.0.1:7007\"\n",
            pki.ca.display(),
            ccert.display(),
            ckey.display()
        ),
    );
    let mut connector = Proc::spawn(&lab.site, "connector", &b.connector, &["--config", ccfg.to_str().unwrap()]);
    connector.wait_err(0, Duration::from_secs(10), |l| l.contains("registered")).expect("connector registered");

    let acfg = lab.write(
        "agent.toml",
        &format!(
            "relay = \"{RELAY_IP}:4433\"\nserver_name = \"{RELAY_IP}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             status = \"{AGENT_STATUS}\"\n\n\
             [tun]\nname = \"zt0\"\naddress = \"100.64.0.1/32\"\nmtu = 1280\n\n{agent_extra}\n\
             [[service]]\nname = \"echo\"\ncidrs = [\"{VIP}/32\"]\npath = \"{path}\"\n",
            pki.ca.display(),
            acert.display(),
            akey.display()
        ),
    );
    ok(Command::new(&b.agent).args(["check-config", "--config", acfg.to_str().unwrap()]));
    let mut agent = Proc::spawn(&lab.agent, "agent", &b.agent, &["--config", acfg.to_str().unwrap()]);
    agent.wait_out(0, Duration::from_secs(15), |l| l.starts_with("registered echo")).expect("agent registered");
    Running { pki, relay, connector, agent, _echo: echo }
}
