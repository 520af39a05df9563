//! `ztna-bench demo`: a relay with two workers, one echo connector and
//! three agents, a few hundred datagrams, and a short summary of what
//! happened. Finishes in a few seconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use ztna_dataplane::io::IoBackend;

use crate::load::{self, LoadConfig, RttSummary, Sample};
use crate::quic_clients::{ClientInfo, ClientSetup, QuicClients};
use crate::relay_bench::{counter_deltas, dev_tls, start_dev_relay};

/// Service the demo connector serves.
pub const SERVICE: &str = "echo";
pub const WORKERS: usize = 2;
pub const AGENTS: usize = 3;
pub const DATAGRAMS_PER_AGENT: u64 = 200;
/// Loss above this fails the demo (loopback should lose nothing).
pub const MAX_LOSS_PCT: f64 = 5.0;

#[derive(Debug, Clone, Serialize)]
pub struct DemoClient {
    #[serde(flatten)]
    pub info: ClientInfo,
    /// Agents: datagrams sent and echoes received.
    pub sent: Option<u64>,
    pub echoed: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub success: bool,
    pub failures: Vec<String>,
    pub relay_addr: SocketAddr,
    pub io_backend: String,
    pub workers: usize,
    pub steering: bool,
    pub service: String,
    pub clients: Vec<DemoClient>,
    pub registrations_ok: u64,
    pub sent: u64,
    pub echoed: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub rtt: RttSummary,
    pub relay_forwarded: u64,
    pub relay_cross_worker: u64,
    pub relay_drops: BTreeMap<String, u64>,
    pub relay_counters: BTreeMap<String, u64>,
    pub metrics_hint: String,
}

/// Runs the demo on `io_backend`. An `Err` means it could not even set up
/// (relay start, registration timeout); a failed check is reported in
/// [`DemoReport::success`].
pub fn run(io_backend: IoBackend) -> Result<DemoReport> {
    let h = start_dev_relay(WORKERS, io_backend, false)?;
    let r = run_on(&h);
    h.shutdown();
    r
}

fn run_on(h: &ztna_dataplane::relay::RelayHandle) -> Result<DemoReport> {
    let before = h.totals();
    let setup = ClientSetup {
        relay: h.local_addr,
        server_name: "localhost".into(),
        tls: dev_tls(h)?,
        service: SERVICE.into(),
        connectors: 1,
        agents: AGENTS,
        timeout: Duration::from_secs(6),
    };
    let mut clients = QuicClients::connect(&setup)?;
    let load = LoadConfig {
        agents: AGENTS,
        connectors: 1,
        size: 256,
        rate: 0,
        duration: Duration::from_secs(3),
        window: 16,
        max_per_agent: Some(DATAGRAMS_PER_AGENT),
        grace: Duration::from_secs(1),
        progress: false,
    };
    let (result, _) = load::run_load(&mut clients, &load, &mut Sample::default)?;
    clients.drain_events();
    clients.close();
    let after = h.totals();
    let (drops, counters) = counter_deltas(&before, &after);

    let mut failures = Vec::new();
    let mut demo_clients = Vec::new();
    let mut agent = 0;
    for info in &clients.info {
        if info.flow.is_none() {
            failures.push(format!("{} {:?} not registered", info.role, info.local_addr));
        }
        if info.observed_addr.is_none() {
            failures.push(format!("{} {:?} got no observed address", info.role, info.local_addr));
        }
        let (sent, echoed) = if info.role == "agent" {
            let a = result.per_agent.get(agent).cloned().unwrap_or_default();
            agent += 1;
            if a.received == 0 {
                failures.push(format!("agent {:?}: no echo", info.local_addr));
            }
            (Some(a.sent), Some(a.received))
        } else {
            (None, None)
        };
        demo_clients.push(DemoClient { info: info.clone(), sent, echoed });
    }
    if result.loss_pct > MAX_LOSS_PCT {
        failures.push(format!("loss {:.2}% above {MAX_LOSS_PCT}%", result.loss_pct));
    }
    if result.misrouted > 0 {
        failures.push(format!("{} echoes arrived on the wrong agent or flow", result.misrouted));
    }
    Ok(DemoReport {
        success: failures.is_empty(),
        failures,
        relay_addr: h.local_addr,
        io_backend: format!("{:?}", h.backend).to_lowercase(),
        workers: WORKERS,
        steering: h.steering,
        service: SERVICE.into(),
        clients: demo_clients,
        registrations_ok: after.registrations_ok.saturating_sub(before.registrations_ok),
        sent: result.sent,
        echoed: result.received,
        lost: result.lost,
        loss_pct: result.loss_pct,
        rtt: result.rtt,
        relay_forwarded: after.datagrams_forwarded.saturating_sub(before.datagrams_forwarded),
        relay_cross_worker: after.datagrams_cross_worker.saturating_sub(before.datagrams_cross_worker),
        relay_drops: drops,
        relay_counters: counters,
        metrics_hint: "run a standalone relay with `ztna-relay --dev --metrics 127.0.0.1:9090` for Prometheus metrics"
            .into(),
    })
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), |v| v.to_string())
}

impl DemoReport {
    pub fn print(&self) {
        println!(
            "relay      {} ({} workers, io {}, steering {})",
            self.relay_addr,
            self.workers,
            self.io_backend,
            if self.steering { "on" } else { "off" }
        );
        println!("service    {:?}: 1 echo connector, {} agents", self.service, self.clients.len().saturating_sub(1));
        for c in &self.clients {
            let extra = match (c.sent, c.echoed) {
                (Some(s), Some(e)) => format!(" sent {s:>4} echoed {e:>4}"),
                _ => format!(" flows opened {}", c.info.flows_opened),
            };
            let refused = if c.info.register_failures.is_empty() {
                String::new()
            } else {
                format!(" (refused first: {})", c.info.register_failures.join("; "))
            };
            println!(
                "{:<10} local {:<21} observed {:<21} flow {:<4}{}{}",
                c.info.role,
                opt(&c.info.local_addr),
                opt(&c.info.observed_addr),
                opt(&c.info.flow),
                extra,
                refused
            );
        }
        println!("registered {} (relay registrations_ok)", self.registrations_ok);
        println!(
            "echo       {} of {} datagrams, loss {:.2}%, rtt p50 {} us p99 {} us",
            self.echoed, self.sent, self.loss_pct, self.rtt.p50_us, self.rtt.p99_us
        );
        let drops: Vec<String> = self.relay_drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "relay      forwarded {} cross-worker {}{}",
            self.relay_forwarded,
            self.relay_cross_worker,
            if drops.is_empty() { String::new() } else { format!(" drops: {}", drops.join(" ")) }
        );
        println!("metrics    {}", self.metrics_hint);
        if self.success {
            println!("result     OK");
        } else {
            println!("result     FAILED: {}", self.failures.join("; "));
        }
    }
}
