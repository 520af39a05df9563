//! ZTNA protocol v2: wire formats and sans-I/O state machines.
//!
//! Nothing in this crate opens a socket or reads the clock: callers pass
//! bytes and `now` in and take bytes, events and deadlines out. This crate
//! depends on no other crate of the workspace.

pub mod backoff;
pub mod candidate;
pub mod cert;
pub mod cert_check;
pub mod client;
pub mod codes;
pub mod datagram;
pub mod e2e;
pub mod identity;
pub mod packet;
pub mod quic;
pub mod reset;
pub mod rng;
#[cfg(test)]
mod test_pki;
pub mod tls_report;
pub mod varint;
pub mod wire;

pub use codes::Code;
pub use wire::{Message, Role, ServiceName};
