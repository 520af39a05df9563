//! The relay data plane: thread-per-core QUIC DATAGRAM forwarding.
//!
//! - [`relay`] starts workers and hands back a [`relay::RelayHandle`].
//! - [`worker::Worker`] is the per-core engine (no I/O of its own).
//! - [`io`] drives workers with io_uring or portable syscalls.
//! - [`cid`] and [`bpf`] steer packets to the worker owning their CID.
//! - [`mesh`] carries datagrams and registry messages between workers.
//! - [`routing`] holds the directory and flow tables, pure and tested in memory.

pub mod bpf;
pub mod budget;
pub mod cid;
pub mod client_io;
pub mod connector;
pub mod echo;
pub mod forwarder;
pub mod http;
pub mod io;
pub mod mesh;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod ratelimit;
pub mod relay;
pub mod retry;
pub mod routing;
pub mod sdnotify;
pub mod security;
pub mod stats;
pub mod tls;
pub mod tunnel_tcp;
pub mod vdev;
pub mod worker;
