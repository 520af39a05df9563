//! `ztna-bench e2e-system`: the whole system on loopback, end to end
//! versus the cleartext baseline, in one run.
//!
//! Both variants run the same relay, the same connector driver, sockets,
//! gateway and echo backends, and an agent on its own UDP socket in this
//! thread:
//! - **cleartext** (bench only, the product has no such mode): the agent
//!   is the protocol client alone ([`FlowLink`]: IP packets as relay-flow
//!   DATAGRAMs) and the connector runs [`ClearEngine`];
//! - **end to end**: the agent core ([`ztna_testkit::agent_link::AgentLink`])
//!   and the product's connector [`ztna_connector::Engine`], the inner
//!   session between them, held on the relay path (`relay-only`);
//! - **direct**: the same, with the session moved onto the direct path
//!   (loopback: nothing stands between agent and connector), for direct
//!   versus relay in the same run.
//!
//! Per variant: UDP echo round trips one at a time (RTT p50/p99), a UDP
//! echo flood (`window` in flight) over which agent, connector and relay
//! CPU are measured, and one TCP echo (goodput). Variants alternate
//! `rounds` times, A B B A, so neither gets a warmer machine; sums and merged
//! histograms are reported, and the ratios end to end / cleartext.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use ztna_control::client::{ClientConfig, Event};
use ztna_control::{Role, ServiceName};
use ztna_testkit::client_io::UdpClient;
use ztna_testkit::tunnel_tcp::{FlowLink, IpLink};
use ztna_udp::IoBackend;

use ztna_control::candidate::PathPolicy;

use crate::cleartext::ClearEngine;
use crate::cpu;
use crate::tunnel::{self, Rtt, TunnelEnv, SERVICE};

/// What one run does per variant and round.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SystemPlan {
    /// UDP payload bytes of the echo datagrams.
    pub payload: usize,
    /// Echoes one at a time, for the RTT.
    pub rtt_echoes: u64,
    /// Echoes of the flood (CPU), and how many in flight.
    pub flood_echoes: u64,
    pub window: u64,
    /// Bytes of the TCP echo.
    pub tcp_bytes: usize,
    pub rounds: u32,
    pub relay_workers: usize,
    /// Run only this variant (to profile it): "cleartext", "end_to_end"
    /// or "direct".
    #[serde(skip)]
    pub only: Option<&'static str>,
}

/// One variant's totals over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub variant: &'static str,
    pub rtt_us: Rtt,
    /// Of the flood.
    pub echoes_per_sec: f64,
    pub echoes_lost: u64,
    /// CPU per IP packet through the agent (out and back), its thread.
    pub agent_cpu_us_per_packet: f64,
    /// CPU per IP packet through the connector (in and out), its thread.
    pub connector_cpu_us_per_packet: f64,
    /// Relay workers' CPU per forwarded datagram, and per tunneled packet
    /// (what matters: the inner session packs small tunneled packets
    /// several to a DATAGRAM, and adds ACKs of its own).
    pub relay_cpu_us_per_datagram: f64,
    pub relay_cpu_us_per_packet: f64,
    /// DATAGRAMs the relay forwarded and UDP packets it received per echo
    /// (one echo is two tunneled packets; the rest is ACKs: the inner
    /// session's travel as DATAGRAMs, the relay legs' are QUIC ACKs).
    pub relay_datagrams_per_echo: f64,
    pub relay_packets_per_echo: f64,
    /// The median over the rounds, and each round's (a lost segment costs
    /// smoltcp's agent side a retransmission timeout, so rounds vary).
    pub tcp_goodput_mbit_s: f64,
    pub tcp_goodput_rounds: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(0.0),
        n => (v.get(n / 2 - 1).copied().unwrap_or(0.0) + v.get(n / 2).copied().unwrap_or(0.0)) / 2.0,
    }
}

/// End to end over cleartext.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub agent_cpu: f64,
    pub connector_cpu: f64,
    pub relay_cpu: f64,
    pub relay_cpu_per_packet: f64,
    pub rtt_p50: f64,
    pub rtt_p99: f64,
    pub tcp_goodput: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SystemReport {
    pub plan: SystemPlan,
    pub io_backend: String,
    pub cleartext: VariantReport,
    pub end_to_end: VariantReport,
    pub direct: VariantReport,
    pub ratios: Ratios,
    /// direct / end to end (relay path), the same measures.
    pub direct_vs_relay: Ratios,
}

/// Sums of one variant.
struct Totals {
    rtt: Histogram<u64>,
    flood_echoes: u64,
    flood_packets: u64,
    flood_secs: f64,
    lost: u64,
    agent_cpu: Duration,
    connector_cpu: Duration,
    relay_cpu: Duration,
    forwarded: u64,
    /// UDP packets the relay received (DATAGRAMs and ACKs, both legs).
    relay_packets: u64,
    /// Goodput of each round's TCP echo (Mbit/s).
    tcp_goodput: Vec<f64>,
}

impl Totals {
    fn new() -> Result<Totals> {
        Ok(Totals {
            rtt: Histogram::new(3).context("histogram")?,
            flood_echoes: 0,
            flood_packets: 0,
            flood_secs: 0.0,
            lost: 0,
            agent_cpu: Duration::ZERO,
            connector_cpu: Duration::ZERO,
            relay_cpu: Duration::ZERO,
            forwarded: 0,
            relay_packets: 0,
            tcp_goodput: Vec::new(),
        })
    }

    fn report(&self, variant: &'static str) -> VariantReport {
        let per = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n.max(1) as f64;
        let q = |p: f64| self.rtt.value_at_quantile(p);
        VariantReport {
            variant,
            rtt_us: Rtt { p50: q(0.5), p90: q(0.9), p99: q(0.99), max: self.rtt.max() },
            echoes_per_sec: self.flood_echoes as f64 / self.flood_secs.max(1e-9),
            echoes_lost: self.lost,
            agent_cpu_us_per_packet: per(self.agent_cpu, self.flood_packets),
            connector_cpu_us_per_packet: per(self.connector_cpu, self.flood_packets),
            relay_cpu_us_per_datagram: per(self.relay_cpu, self.forwarded),
            relay_cpu_us_per_packet: per(self.relay_cpu, self.flood_packets),
            relay_datagrams_per_echo: self.forwarded as f64 / self.flood_echoes.max(1) as f64,
            relay_packets_per_echo: self.relay_packets as f64 / self.flood_echoes.max(1) as f64,
            tcp_goodput_mbit_s: median(&self.tcp_goodput),
            tcp_goodput_rounds: self.tcp_goodput.clone(),
        }
    }
}

/// The cleartext agent: a protocol client registered for [`SERVICE`],
/// its flow as an [`IpLink`].
fn clear_link(env: &TunnelEnv) -> Result<FlowLink> {
    let relay = env.relay.local_addr;
    let mut cfg = ClientConfig::new(relay, relay, "localhost");
    cfg.registrations = vec![(Role::Agent, ServiceName::new(SERVICE).context("service")?)];
    // Buffers as large as the agent core's socket (AgentLink), or the
    // baseline would lose packets the end-to-end variant does not.
    let mut client =
        UdpClient::new(cfg, &env.agent_tls("tunnel-agent")?, SocketAddr::new(relay.ip(), 0), 5)?.with_large_buffers();
    let done = |e: &Event| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. });
    match client.wait_for(Duration::from_secs(10), done, |_| {}) {
        Some(Event::Registered { flow, .. }) => Ok(FlowLink::new(client, flow)),
        other => bail!("cleartext agent not registered: {other:?}"),
    }
}

/// One round of one variant on `env` through `link`, added to `t`.
fn measure<L: IpLink>(env: &TunnelEnv, link: L, plan: &SystemPlan, t: &mut Totals) -> Result<()> {
    let mut link = link;
    // Warm-up: the flow reaches the connector, backend sockets open.
    let mut scratch = Histogram::<u64>::new(3).context("histogram")?;
    let end = Instant::now() + Duration::from_secs(10);
    while tunnel::udp_echoes(&mut link, (20, 4, plan.payload), &mut scratch).received < 20 {
        if Instant::now() > end {
            bail!("no UDP echoes through the tunnel");
        }
    }
    let e = tunnel::udp_echoes(&mut link, (plan.rtt_echoes, 1, plan.payload), &mut t.rtt);
    t.lost += e.sent - e.received;

    let (a0, c0, r0) = (cpu::thread_cpu_time(), cpu::task_cpu_time(env.connector_tid), env.relay.cpu_time());
    let rt0 = env.relay.totals();
    let f0 = rt0.datagrams_forwarded;
    let e = tunnel::udp_echoes(&mut link, (plan.flood_echoes, plan.window, plan.payload), &mut scratch);
    t.flood_secs += e.secs;
    t.agent_cpu += cpu::thread_cpu_time().saturating_sub(a0);
    t.connector_cpu += cpu::task_cpu_time(env.connector_tid).saturating_sub(c0);
    t.relay_cpu += env.relay.cpu_time().saturating_sub(r0);
    let rt1 = env.relay.totals();
    t.forwarded += rt1.datagrams_forwarded - f0;
    t.relay_packets += rt1.packets_rx - rt0.packets_rx;
    t.flood_echoes += e.received;
    // Tunneled packets through agent and connector: each sent datagram
    // once, each echo once more.
    t.flood_packets += e.sent + e.received;
    t.lost += e.sent - e.received;

    let (_, bytes, secs) = tunnel::tcp_echo(link, plan.tcp_bytes)?;
    t.tcp_goodput.push(bytes as f64 * 8.0 / 1e6 / secs.max(1e-9));
    Ok(())
}

pub fn run(plan: SystemPlan, io_backend: IoBackend) -> Result<SystemReport> {
    let (mut clear, mut e2e, mut direct) = (Totals::new()?, Totals::new()?, Totals::new()?);
    let mut backend = String::new();
    for round in 0..plan.rounds.max(1) {
        // A B C C B A …: no variant always goes first.
        let order = ["cleartext", "end_to_end", "direct"];
        let order: Vec<&str> = if round % 2 == 0 { order.to_vec() } else { order.into_iter().rev().collect() };
        for variant in order {
            if plan.only.is_some_and(|o| o != variant) {
                continue;
            }
            if variant == "cleartext" {
                let env = TunnelEnv::start_with(plan.relay_workers, io_backend, ClearEngine::new)?;
                backend = format!("{:?}", env.relay.backend).to_lowercase();
                let r = clear_link(&env).and_then(|l| measure(&env, l, &plan, &mut clear));
                env.stop();
                r.context("cleartext")?;
            } else {
                let on_direct = variant == "direct";
                let env = TunnelEnv::start(plan.relay_workers, io_backend)?;
                backend = format!("{:?}", env.relay.backend).to_lowercase();
                let r = (|| {
                    let policy = if on_direct { PathPolicy::Auto } else { PathPolicy::RelayOnly };
                    let mut link = tunnel::agent_link(env.relay.local_addr, env.agent_tls("tunnel-agent")?, 5, policy)?;
                    link.wait_ready(1, Duration::from_secs(10))?;
                    let end = Instant::now() + Duration::from_secs(5);
                    while on_direct && link.core.sessions_direct() == 0 {
                        if Instant::now() > end {
                            bail!("the session did not go direct");
                        }
                        link.pump();
                    }
                    measure(&env, link, &plan, if on_direct { &mut direct } else { &mut e2e })
                })();
                env.stop();
                r.context(variant)?;
            }
        }
    }
    let (c, e, d) = (clear.report("cleartext"), e2e.report("end_to_end"), direct.report("direct"));
    let (ratios, direct_vs_relay) = (Ratios::of(&e, &c), Ratios::of(&d, &e));
    Ok(SystemReport { plan, io_backend: backend, cleartext: c, end_to_end: e, direct: d, ratios, direct_vs_relay })
}

impl Ratios {
    /// `a` over `b`, measure by measure.
    fn of(a: &VariantReport, b: &VariantReport) -> Ratios {
        let ratio = |x: f64, y: f64| x / y.max(1e-9);
        Ratios {
            agent_cpu: ratio(a.agent_cpu_us_per_packet, b.agent_cpu_us_per_packet),
            connector_cpu: ratio(a.connector_cpu_us_per_packet, b.connector_cpu_us_per_packet),
            relay_cpu: ratio(a.relay_cpu_us_per_datagram, b.relay_cpu_us_per_datagram),
            relay_cpu_per_packet: ratio(a.relay_cpu_us_per_packet, b.relay_cpu_us_per_packet),
            rtt_p50: ratio(a.rtt_us.p50 as f64, b.rtt_us.p50 as f64),
            rtt_p99: ratio(a.rtt_us.p99 as f64, b.rtt_us.p99 as f64),
            tcp_goodput: ratio(a.tcp_goodput_mbit_s, b.tcp_goodput_mbit_s),
        }
    }
}

impl SystemReport {
    pub fn print(&self) {
        let p = &self.plan;
        println!(
            "whole system on loopback, relay {} x{}; {} B UDP payloads; {} round(s) per variant",
            self.io_backend, p.relay_workers, p.payload, p.rounds
        );
        println!(
            "{:<11} {:>9} {:>9} {:>10} {:>11} {:>11} {:>11} {:>11} {:>10}",
            "variant",
            "rtt p50",
            "rtt p99",
            "echoes/s",
            "agent us/p",
            "conn us/p",
            "relay us/p",
            "relay us/d",
            "tcp Mbit/s"
        );
        for v in [&self.cleartext, &self.end_to_end, &self.direct] {
            println!(
                "{:<11} {:>9} {:>9} {:>10.0} {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>10.1}",
                v.variant,
                v.rtt_us.p50,
                v.rtt_us.p99,
                v.echoes_per_sec,
                v.agent_cpu_us_per_packet,
                v.connector_cpu_us_per_packet,
                v.relay_cpu_us_per_packet,
                v.relay_cpu_us_per_datagram,
                v.tcp_goodput_mbit_s
            );
        }
        let r = &self.ratios;
        println!(
            "end to end / cleartext: agent CPU {:.2}, connector CPU {:.2}, relay CPU per packet {:.2} \
             (per datagram {:.2}), rtt p50 {:.2} p99 {:.2}, TCP goodput {:.2}",
            r.agent_cpu, r.connector_cpu, r.relay_cpu_per_packet, r.relay_cpu, r.rtt_p50, r.rtt_p99, r.tcp_goodput
        );
        let d = &self.direct_vs_relay;
        println!(
            "direct / end to end on the relay: agent CPU {:.2}, connector CPU {:.2}, rtt p50 {:.2} p99 {:.2}, \
             TCP goodput {:.2}",
            d.agent_cpu, d.connector_cpu, d.rtt_p50, d.rtt_p99, d.tcp_goodput
        );
        for v in [&self.cleartext, &self.end_to_end] {
            println!(
                "{:<11} per echo: relay forwarded {:.2} DATAGRAMs, received {:.2} UDP packets",
                v.variant, v.relay_datagrams_per_echo, v.relay_packets_per_echo
            );
        }
        for v in [&self.cleartext, &self.end_to_end, &self.direct] {
            let rounds: Vec<String> = v.tcp_goodput_rounds.iter().map(|g| format!("{g:.0}")).collect();
            println!("{:<11} TCP Mbit/s per round: {}", v.variant, rounds.join(" "));
        }
        let lost = self.cleartext.echoes_lost + self.end_to_end.echoes_lost;
        if lost > 0 {
            println!(
                "lost       {} cleartext, {} end to end echoes",
                self.cleartext.echoes_lost, self.end_to_end.echoes_lost
            );
        }
    }
}
