//! The relay: thread-per-core QUIC DATAGRAM forwarding.
//!
//! - [`server`] loads the configuration, starts workers and hands back a
//!   [`server::RelayHandle`].
//! - [`worker::Worker`] is the per-core engine (no I/O of its own);
//!   [`event_loop`] drives it with a `ztna_udp` backend.
//! - [`cid`] lays out connection IDs so that `ztna_udp::steering` and the
//!   workers agree on which worker owns a packet.
//! - [`mesh`] carries datagrams and registry messages between workers.
//! - [`routing`] holds the directory and flow tables, pure and tested in memory.
//! - [`security`], [`tls`], [`pki`], [`policy`], [`retry`], [`ratelimit`],
//!   [`budget`]: who may connect, register and reach what, and within
//!   which limits.

pub mod budget;
pub mod cid;
pub mod event_loop;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod ratelimit;
pub mod retry;
pub mod routing;
pub mod security;
pub mod server;
pub mod stats;
pub mod status;
pub mod tls;
pub mod worker;
