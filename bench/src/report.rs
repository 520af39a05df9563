//! The benchmark summary: numbers derived from a [`LoadResult`] and the
//! target's samples, printed for people and written as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::load::{LoadConfig, LoadResult, Samples};

/// What was measured.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    pub kind: String,
    pub address: String,
    pub in_process: bool,
    pub io_backend: String,
    pub workers: Option<usize>,
}

/// One benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// "relay" or "udp-forwarder".
    pub kind: String,
    /// Address of the target.
    pub target: String,
    /// True when the target ran inside this process.
    pub in_process: bool,
    pub io_backend: String,
    pub workers: Option<usize>,
    pub load: LoadConfig,
    pub result: LoadResult,
    /// Datagrams the target forwarded during the send phase and grace.
    pub forwarded: u64,
    /// Where `forwarded` comes from.
    pub forwarded_source: String,
    /// Forwarded datagrams per second of the send phase.
    pub forwarded_per_sec: f64,
    /// Forwarded payload, both directions, Gbit/s.
    pub payload_gbps: f64,
    /// Target CPU time over the send phase and grace.
    pub cpu_secs: Option<f64>,
    /// Target CPU time per forwarded datagram, microseconds.
    pub cpu_us_per_forwarded: Option<f64>,
    /// CPU time of the load generator (this process less an in-process
    /// target; an external target's process is not ours) over the run.
    pub generator_cpu_secs: Option<f64>,
    /// Generator CPU per echoed round trip, microseconds.
    pub generator_us_per_round_trip: Option<f64>,
    /// Non-zero drop counters of the target (deltas over the run).
    pub drops: BTreeMap<String, u64>,
    /// Other counters of the target (deltas over the run).
    pub counters: BTreeMap<String, u64>,
    /// Notes worth reading next to the numbers.
    pub notes: Vec<String>,
}

impl Report {
    /// Derives rates and CPU per datagram. `forwarded` overrides the
    /// target's own count (external relay: 2 per round trip).
    pub fn new(target: TargetInfo, load: &LoadConfig, result: LoadResult, samples: &Samples) -> Self {
        let (forwarded, send_fwd, source) =
            match (samples.start.forwarded, samples.send_end.forwarded, samples.end.forwarded) {
                (Some(a), Some(b), Some(c)) => (c.saturating_sub(a), b.saturating_sub(a), "target counters"),
                _ => (2 * result.received, 2 * result.received, "2 x echoed round trips (seen by the bench)"),
            };
        let cpu = match (samples.start.cpu, samples.end.cpu) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        let process = match (samples.start.process_cpu, samples.end.process_cpu) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        let generator = match (process, cpu, target.in_process) {
            (Some(p), Some(c), true) => Some((p - c).max(0.0)),
            (Some(p), _, false) => Some(p),
            _ => None,
        };
        let forwarded_per_sec = send_fwd as f64 / result.send_secs.max(1e-9);
        Report {
            kind: target.kind,
            target: target.address,
            in_process: target.in_process,
            io_backend: target.io_backend,
            workers: target.workers,
            load: load.clone(),
            forwarded,
            forwarded_source: source.to_owned(),
            forwarded_per_sec,
            payload_gbps: forwarded_per_sec * load.size as f64 * 8.0 / 1e9,
            cpu_secs: cpu,
            cpu_us_per_forwarded: cpu.filter(|_| forwarded > 0).map(|c| c * 1e6 / forwarded as f64),
            generator_cpu_secs: generator,
            generator_us_per_round_trip: generator
                .filter(|_| result.received > 0)
                .map(|g| g * 1e6 / result.received as f64),
            drops: BTreeMap::new(),
            counters: BTreeMap::new(),
            notes: Vec::new(),
            result,
        }
    }

    /// Prints the human summary on stdout.
    pub fn print(&self) {
        let r = &self.result;
        let l = &self.load;
        let rate =
            if l.rate == 0 { format!("flat out (window {}/agent)", l.window) } else { format!("{} pps", l.rate) };
        println!(
            "== {} {} ({}{}, io {}) ==",
            self.kind,
            self.target,
            if self.in_process { "in-process" } else { "external" },
            self.workers.map_or(String::new(), |w| format!(", {w} worker(s)")),
            self.io_backend
        );
        println!(
            "load:        {} agents, {} connectors, {} B payload, {}, {:.2} s",
            l.agents, l.connectors, l.size, rate, r.send_secs
        );
        println!(
            "throughput:  {:.0} round trips/s, {:.0} forwarded datagrams/s ({}), {:.3} Gbit/s payload",
            r.round_trips_per_sec, self.forwarded_per_sec, self.forwarded_source, self.payload_gbps
        );
        println!(
            "delivery:    sent {} echoed {} lost {} ({:.3}%) dup {} misrouted {} backpressure {} skipped {} echo-drops {}",
            r.sent, r.received, r.lost, r.loss_pct, r.duplicates, r.misrouted, r.backpressure, r.skipped, r.echo_drops
        );
        let t = &r.rtt;
        println!(
            "rtt (us):    p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            t.p50_us, t.p90_us, t.p99_us, t.p999_us, t.max_us, t.samples
        );
        match (self.cpu_secs, self.cpu_us_per_forwarded) {
            (Some(c), Some(per)) => {
                println!(
                    "cpu:         {:.3} s for {} forwarded = {:.3} us per forwarded datagram",
                    c, self.forwarded, per
                )
            }
            (Some(c), None) => println!("cpu:         {c:.3} s, nothing forwarded"),
            _ => println!("cpu:         unknown (pass --relay-pid for an external relay)"),
        }
        if let (Some(g), Some(per)) = (self.generator_cpu_secs, self.generator_us_per_round_trip) {
            println!(
                "generator:   {g:.3} s CPU = {per:.3} us per round trip (load generator, all clients, one thread)"
            );
        }
        if !self.drops.is_empty() {
            let d: Vec<String> = self.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("drops:       {}", d.join(" "));
        }
        for n in &self.notes {
            println!("note:        {n}");
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }
}

/// Writes any serialisable value as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let s = serde_json::to_string_pretty(v)?;
    std::fs::write(path, s + "\n").with_context(|| format!("writing {}", path.display()))
}
