#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! End-to-end tests of the Linux agent in network namespaces: the real
//! `ztna-agent` (TUN device, routes), `ztna-relay`, `ztna-connector` and an
//! echo service, each in its own namespace, the agent behind a NAT.
//!
//! ```text
//!  agent ns                 nat ns                      wan ns (bridge br0)
//!  zt0 100.64.0.1/32        lan0 10.201.1.1/24          ├── relay ns eth0 10.201.0.2  ztna-relay :4433
//!  eth0 10.201.1.2/24 ───── wan0 10.201.0.1/24 ─────────┤
//!  ztna-agent               nft masquerade on wan0      └── site ns  eth0 10.201.0.3  ztna-connector
//!                           (+ 5% loss rules later)                                   echo on 127.0.0.1:7007
//! ```
//!
//! `agent_through_nat_relay_restart_and_loss`: ping and UDP echo to the
//! service VIP, the observed address is the NAT's, an unmapped destination
//! is dropped in the agent (agent counters and relay metrics), the agent
//! reconnects after a relay restart, UDP and ping under 5% loss each way.
//! `tcp_10mb_through_tunnel_with_uplink_loss`: 10 MB through a kernel TCP
//! socket and the connector's userspace TCP, verified, with 5% loss on the
//! NAT's outgoing uplink. Both run in parallel in about 10-15 s.
//!
//! Every namespace is created by the test with a name carrying the test
//! process id and deleted by a Drop guard whatever happens; child
//! processes are killed first. Only private addresses inside these
//! namespaces are used; the root namespace's interfaces, routes and
//! firewall are never touched. Needs root, iproute2, nftables and ping;
//! without root the tests are skipped with a message (under CI=true they
//! fail instead).
//!
//! `lab`: the namespaces and the processes started in them; `start`: relay,
//! echo service, connector and agent; `probe`: counters, ping and the
//! `ztna-bench` probes; the tests are in `single_relay` and `scale_out`.

mod binaries;
mod direct;
mod direct_attack;
mod lab;
mod probe;
mod scale_out;
mod single_relay;
mod start;

pub const RELAY_IP: &str = "10.201.0.2";
pub const NAT_WAN_IP: &str = "10.201.0.1";
pub const AGENT_IP: &str = "10.201.1.2";
pub const SITE_IP: &str = "10.201.0.3";
/// The echo service's virtual address, routed into the agent's TUN.
pub const VIP: &str = "100.100.0.10";
/// Inside the agent's TUN route (the test adds 100.100.0.0/24) but in no
/// service: the agent must drop it.
pub const UNMAPPED: &str = "100.100.0.99";
