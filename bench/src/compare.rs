//! `ztna-bench compare`: the relay against its references, in one run, on
//! the same cores, with the same load generator and load:
//! - R: our relay (per I/O backend), CPU per forwarded datagram;
//! - N: the naive stock-quiche relay ([`crate::naive`]);
//! - E: the naive stock-quiche DATAGRAM echo;
//! - U: the plain UDP forwarder on the same backend (the I/O floor).
//!
//! It prints R/E, N/R and R/U per backend; `--json` carries every report
//! and ratio. The aims (issue: fast path) are R ≤ 0.6 × E, N/R ≥ 2 and
//! R/U ≤ 3, flat out with 1200-byte payloads.

use anyhow::Result;
use serde::Serialize;
use ztna_relay::limits::CongestionControl;
use ztna_udp::IoBackend;

use crate::load::LoadConfig;
use crate::naive::{self, NaiveMode};
use crate::plot::Series;
use crate::relay_bench::{self, RelayBenchConfig, RelayTarget};
use crate::report::Report;
use crate::udp_bench;

/// Aim for R/E: the relay at most this fraction of the naive echo.
pub const AIM_R_OVER_E: f64 = 0.6;
/// Aim for N/R: the naive relay at least this many times the relay.
pub const AIM_N_OVER_R: f64 = 2.0;
/// Aim for R/U: the relay at most this many times the UDP forwarder.
pub const AIM_R_OVER_U: f64 = 3.0;

/// The relay and the forwarder on one backend, and the ratios.
#[derive(Debug, Serialize)]
pub struct BackendResult {
    pub io_backend: String,
    pub relay: Report,
    pub udp_forwarder: Report,
    /// R/E: relay CPU per datagram over the naive echo's.
    pub r_over_e: Option<f64>,
    /// N/R: the naive relay's CPU per datagram over the relay's.
    pub n_over_r: Option<f64>,
    /// R/U: the relay's over the forwarder's.
    pub r_over_u: Option<f64>,
}

/// Everything `compare` measured.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub naive_relay: Report,
    pub naive_echo: Report,
    pub backends: Vec<BackendResult>,
    /// CPU µs per datagram: N and E.
    pub n_cpu_us: Option<f64>,
    pub e_cpu_us: Option<f64>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The backends to run: each requested one, `auto` resolved, repeats and
/// io_uring on a kernel without it skipped.
pub fn backends(requested: &[IoBackend]) -> Vec<IoBackend> {
    let mut out = Vec::new();
    for b in requested {
        let b = ztna_udp::resolve(*b);
        if b == IoBackend::Uring && !ztna_udp::uring_available() {
            eprintln!("compare: io_uring is not available here; skipped");
            continue;
        }
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// Runs E, N, then R and U on each backend, and prints the table.
pub fn run(requested: &[IoBackend], workers: usize, load: &LoadConfig) -> Result<Comparison> {
    let naive_echo = naive::run(NaiveMode::Echo, load)?;
    let naive_relay = naive::run(NaiveMode::Relay, load)?;
    let (e, n) = (naive_echo.cpu_us_per_forwarded, naive_relay.cpu_us_per_forwarded);
    let mut results = Vec::new();
    for b in backends(requested) {
        let relay = relay_bench::run(&RelayBenchConfig {
            target: RelayTarget::InProcess {
                workers,
                io_backend: b,
                pin_cores: true,
                congestion_control: CongestionControl::Cubic,
            },
            load: load.clone(),
        })?;
        let udp_forwarder = udp_bench::run(b, load)?;
        let r = relay.cpu_us_per_forwarded;
        results.push(BackendResult {
            io_backend: relay.io_backend.clone(),
            r_over_e: ratio(r, e),
            n_over_r: ratio(n, r),
            r_over_u: ratio(r, udp_forwarder.cpu_us_per_forwarded),
            relay,
            udp_forwarder,
        });
    }
    let c = Comparison { naive_relay, naive_echo, backends: results, n_cpu_us: n, e_cpu_us: e };
    print(&c);
    Ok(c)
}

fn row(name: &str, r: &Report) {
    let cpu = r.cpu_us_per_forwarded.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!(
        "{name:<34} {:>10.0} {:>12} {:>9} {:>9} {:>7.2}",
        r.forwarded_per_sec, cpu, r.result.rtt.p50_us, r.result.rtt.p99_us, r.result.loss_pct
    );
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.2}"))
}

/// The table: one row per variant, then the ratios per backend.
pub fn print(c: &Comparison) {
    println!();
    println!(
        "{:<34} {:>10} {:>12} {:>9} {:>9} {:>7}",
        "variant", "fwd/s", "cpu us/dgram", "p50 us", "p99 us", "loss %"
    );
    row("E naive quiche echo", &c.naive_echo);
    row("N naive quiche relay", &c.naive_relay);
    for b in &c.backends {
        row(&format!("R relay ({})", b.io_backend), &b.relay);
        row(&format!("U udp forwarder ({})", b.io_backend), &b.udp_forwarder);
    }
    println!();
    for b in &c.backends {
        println!(
            "{:<9} R/E = {} (aim <= {AIM_R_OVER_E})   N/R = {} (aim >= {AIM_N_OVER_R})   R/U = {} (aim <= {AIM_R_OVER_U})",
            b.io_backend,
            fmt_ratio(b.r_over_e),
            fmt_ratio(b.n_over_r),
            fmt_ratio(b.r_over_u)
        );
    }
}

/// Draws the comparison (see [`crate::plot`]).
pub fn plot(c: &Comparison, path: &std::path::Path) -> Result<()> {
    let mut series = vec![
        Series {
            name: "E naive echo".into(),
            cpu_us: c.naive_echo.cpu_us_per_forwarded,
            rtt: c.naive_echo.result.histogram.as_ref(),
        },
        Series {
            name: "N naive relay".into(),
            cpu_us: c.naive_relay.cpu_us_per_forwarded,
            rtt: c.naive_relay.result.histogram.as_ref(),
        },
    ];
    for b in &c.backends {
        series.push(Series {
            name: format!("R {}", b.io_backend),
            cpu_us: b.relay.cpu_us_per_forwarded,
            rtt: b.relay.result.histogram.as_ref(),
        });
        series.push(Series {
            name: format!("U {}", b.io_backend),
            cpu_us: b.udp_forwarder.cpu_us_per_forwarded,
            rtt: b.udp_forwarder.result.histogram.as_ref(),
        });
    }
    let load = &c.naive_echo.load;
    let rate = if load.rate == 0 { "flat out".to_owned() } else { format!("{}/s", load.rate) };
    let title = format!(
        "ztna-bench compare: E naive quiche echo, N naive quiche relay, R relay, U UDP forwarder; {} B, {rate}, {} agents",
        load.size, load.agents
    );
    crate::plot::draw(path, &title, &series)
}
