//! The test and benchmark kit (a dev-dependency of the product crates; the
//! bench uses it too). Nothing here ships in the relay, connector or agent.
//!
//! - [`net`]: an in-memory UDP network with a virtual clock (delay, jitter
//!   and so reordering, loss, duplication, MTU) and [`net::Sim`], which runs
//!   engines on it; [`hosts`]: relay workers, protocol clients and agent
//!   cores as hosts of that network.
//! - [`agent_link`]: the agent core on a UDP socket, as an IP link.
//! - [`client_io`]: a UDP socket driver for `ztna_control`'s client session.
//! - [`echo`]: UDP and TCP echo servers.
//! - [`fixtures`]: relays, clients and configurations for integration tests.
//! - [`raw_tunnel`]: an agent whose end-to-end session the test drives,
//!   for bad input from an authenticated agent.
//! - [`tunnel_tcp`]: agent-side TCP through the tunnel (smoltcp), without
//!   a TUN device.

pub mod agent_link;
pub mod client_io;
pub mod echo;
pub mod fixtures;
pub mod hosts;
pub mod net;
pub mod raw_tunnel;
pub mod tunnel_tcp;
