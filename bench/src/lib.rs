//! `ztna-bench`: load generator and demo for the ZTNA relay.
//!
//! - [`load`]: the generator (pacing, window, RTT histogram) over a
//!   [`load::Transport`].
//! - [`quic_clients`]: protocol-v1 agents and echo connectors on a relay.
//! - [`relay_bench`]: `ztna-bench relay`, in-process or external.
//! - [`udp_bench`]: `ztna-bench udp-forwarder`, the same load without QUIC.
//! - [`naive`]: the stock-quiche references of `compare`: a relay (N) and
//!   a DATAGRAM echo (E), written the obvious way.
//! - [`compare`]: `ztna-bench compare`, R/E, N/R and R/U in one run.
//! - [`demo`]: `ztna-bench demo`, a short guided run.
//! - [`tunnel`]: traffic through agent core → relay → connector → echo
//!   (UDP and TCP), for the demo and `ztna-bench tunnel`.
//! - [`handshakes`]: `ztna-bench handshakes`, handshake rate with Retry on
//!   and off and the relay's memory under an Initial flood.
//! - [`connector_turns`]: `ztna-bench connector-turns`, a connector loop
//!   turn's CPU with many idle UDP flows against one.
//! - [`e2e_cost`]: `ztna-bench e2e-cost`, CPU per packet of the end-to-end
//!   session against the relay-terminated baseline (bench only).
//! - [`plot`]: `compare --plot`: CPU bars and RTT CDFs as SVG.
//! - [`progress`]: a progress bar on a terminal, lines otherwise.
//! - [`report`]: the summary, printed and as JSON.
//! - [`probe`]: `echo`, `udp-probe`, `tcp-probe`: tools for end-to-end
//!   tests through a tunnel.

pub mod cleartext;
pub mod cli;
pub mod compare;
pub mod connector_turns;
pub mod cpu;
pub mod demo;
pub mod e2e_cost;
pub mod e2e_system;
pub mod forwarder;
pub mod handshakes;
pub mod load;
pub mod naive;
pub mod plot;
pub mod probe;
pub mod progress;
pub mod quic_clients;
pub mod relay_bench;
pub mod report;
pub mod tunnel;
pub mod udp_bench;
