//! `ztna-bench demo`: the whole system on loopback in a few seconds, no
//! root needed. A relay with two workers, a connector whose "echo" service
//! has UDP and TCP echo backends, and the agent core in-process (as a
//! packet-tunnel extension runs it) sending IP packets: UDP datagrams and
//! a TCP stream through smoltcp. Prints what happened; `--json` prints a
//! machine summary instead.

use anyhow::Result;
use serde::Serialize;
use ztna_udp::IoBackend;

use crate::tunnel::{self, TunnelReport};

pub const WORKERS: usize = 2;
/// UDP datagrams the agent sends (at most `WINDOW` in flight).
pub const UDP_DATAGRAMS: u64 = 500;
pub const WINDOW: u64 = 16;
/// Bytes echoed over TCP.
pub const TCP_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub success: bool,
    pub failures: Vec<String>,
    #[serde(flatten)]
    pub tunnel: TunnelReport,
}

/// Runs the demo. An `Err` means it could not set up or a transfer broke;
/// failed checks are in [`DemoReport::failures`].
pub fn run(io_backend: IoBackend) -> Result<DemoReport> {
    let t = tunnel::run(WORKERS, io_backend, UDP_DATAGRAMS, WINDOW, TCP_BYTES)?;
    let mut failures = Vec::new();
    if t.received != t.sent || t.sent != UDP_DATAGRAMS {
        failures.push(format!("UDP: {} of {} datagrams echoed", t.received, UDP_DATAGRAMS));
    }
    if t.tcp_bytes_echoed != TCP_BYTES as u64 {
        failures.push(format!("TCP: {} of {TCP_BYTES} bytes echoed", t.tcp_bytes_echoed));
    }
    if !t.end_to_end {
        failures.push("the end-to-end session with the connector did not come up".to_owned());
    }
    if t.e2e_handshakes != 1 {
        failures.push(format!("{} inner handshakes (one expected)", t.e2e_handshakes));
    }
    if t.agent_drops != 0 {
        failures.push(format!("the agent dropped {} packets", t.agent_drops));
    }
    Ok(DemoReport { success: failures.is_empty(), failures, tunnel: t })
}

impl DemoReport {
    pub fn print(&self) {
        tunnel::print_summary(&self.tunnel);
        if self.success {
            println!("result     OK");
        } else {
            for f in &self.failures {
                println!("FAILED     {f}");
            }
        }
    }
}
