//! The connector: registers services at one or more relays from a single
//! UDP socket with a fixed port, and turns tunneled IP packets into real
//! traffic to the configured backends.
//!
//! It handles UDP (a bounded flow table of backend sockets with idle
//! expiry, see [`udp`]), ICMP echo (answered by the connector) and TCP (a userspace TCP
//! endpoint in smoltcp per agent flow, proxied to real TCP connections with
//! flow control both ways; see [`tcp`]). Only the configured (protocol,
//! port) → backend pairs are reachable: anything else is dropped and counted
//! (a TCP SYN is also answered with an RST, as a closed port would), so the
//! connector is not an open proxy.
//!
//! Every table an agent can grow (UDP flows, TCP connections, TCP agent
//! flows) is bounded in total, per agent flow and per agent identity, and
//! shared fairly between identities when full ([`fair`]).
//!
//! IPv4 packets larger than the tunnel MTU (1280) with DF set are dropped
//! and answered with ICMP "fragmentation needed" (next-hop MTU 1280), so the
//! agent's path MTU discovery settles on what the tunnel carries.
//!
//! # Layers
//!
//! - [`Engine`] (sans I/O): relay sessions, registrations, agent flows,
//!   parking and adoption; QUIC packets, backend events and `now` in, QUIC
//!   packets, backend calls and deadlines out.
//! - [`Gateway`] (sans I/O): the IP layer under it: one agent flow's IP
//!   packets to backend traffic and back (ICMP, [`udp`], [`tcp`]).
//! - [`backend`]: the boundary to the backend sockets ([`BackendIo`],
//!   [`BackendEvent`]); [`memory_backends`] implements it in memory.
//! - [`Connector`]: the driver: the UDP socket, real backend sockets,
//!   the clock, the resolver, health.

pub mod backend;
pub mod budget;
mod config;
pub mod direct_metrics;
mod driver;
mod engine;
mod fair;
mod gateway;
mod health;
pub mod memory_backends;
mod peers;
mod tcp;
mod udp;
pub mod vdev;

use std::sync::atomic::{AtomicU64, Ordering};

pub use self::backend::{BackendEvent, BackendId, BackendIo, Interest};
pub use self::config::{
    BackendRoute, ConnectorConfig, PathMode, Proto, ServiceConfig, Target, DEFAULT_IDENTITY_SHARE_DIVISOR,
};
pub use self::driver::{resolve_relays, Connector, DrivenEngine, EngineInputs, RESOLVE_EVERY};
pub use self::engine::status::{ConnectorStatus, RelayStatus, SessionStatus};
pub use self::engine::Engine;
pub use self::gateway::{FlowKey, Gateway};
pub use self::health::{serve_health, ConnectorHealth};
pub use self::tcp::TxOutcome;

ztna_ops::counters! {
    /// Counters of a connector.
    ConnectorStats, ConnectorStatsSnapshot {
    packets_from_agents,
    /// End-to-end sessions refused: the agent's proven identity is not in
    /// the service's `allow_agents`, or it asked for a service this flow
    /// is not for (closed with `denied`).
    flows_refused,
    packets_to_agents,
    udp_to_backend,
    udp_from_backend,
    icmp_echo_replies,
    udp_flows_opened,
    udp_flows_expired,
    /// New UDP flows refused because their agent identity holds its share
    /// (max_udp_flows_per_identity).
    udp_flows_refused_identity_share,
    /// UDP flows closed to make room for an identity below its share (the
    /// least recently used flow of the identity holding the most).
    udp_flows_reclaimed,
    /// recv calls on UDP backend sockets (only sockets epoll reported
    /// readable are read).
    udp_backend_reads,
    /// Not IPv4, malformed, fragments, bad checksums, non-unicast source or
    /// destination.
    drop_malformed,
    drop_ipv6,
    /// Destination (protocol, port) not configured for the service (a TCP
    /// SYN among them is answered with an RST).
    drop_not_allowed,
    /// IPv4 packets over 1280 bytes with DF set (answered with ICMP
    /// fragmentation needed).
    drop_too_big,
    /// TCP connections whose backend connect succeeded (the agent's SYN was
    /// then accepted).
    tcp_connections_opened,
    /// TCP connections removed (closed, reset, timed out, failed).
    tcp_connections_closed,
    tcp_bytes_to_backend,
    tcp_bytes_from_backend,
    /// Backend connect refused, failed or timed out (the agent got an RST).
    tcp_backend_connect_failed,
    /// Backend read or write errors on an open connection (agent got an RST).
    tcp_backend_errors,
    tcp_idle_timeouts,
    /// SYNs refused with an RST at max_tcp_flows, max_tcp_per_flow or
    /// max_tcp_connections (nothing to reclaim).
    drop_tcp_limit,
    /// SYNs refused with an RST because their agent identity holds its
    /// share (max_tcp_connections_per_identity, max_tcp_flows_per_identity).
    tcp_refused_identity_share,
    /// TCP connections reset (both sides) to make room for an identity
    /// below its share (the least recently used connection of the identity
    /// holding the most).
    tcp_connections_reclaimed,
    /// Segments (not SYN) for no known connection; answered with an RST.
    drop_tcp_no_connection,
    /// Segments dropped because a flow's smoltcp input queue, or its
    /// identity's queue budget (max_tcp_queued_packets_per_identity), was
    /// full.
    drop_tcp_queue_full,
    drop_flow_table_full,
    drop_unknown_flow,
    drop_send_to_agent,
    /// Datagrams from an address that is not a relay's that no session
    /// took: unknown connection IDs, Initials, punch packets.
    drop_direct,
    /// Inner packets authenticated over direct paths, and sent over them
    /// (punch packets included).
    direct_packets_in,
    direct_packets_out,
    /// Direct-path packets a full direct queue dropped.
    drop_direct_queue_full,
    /// Bytes of those packets (UDP payloads).
    direct_bytes_in,
    direct_bytes_out,
    /// Sessions the agent moved onto a direct path, and back to a relay.
    path_to_direct,
    path_to_relay,
    /// Punching rounds the agent started with this connector that ended
    /// with the session on a direct path, and those that did not.
    punch_rounds,
    punch_rounds_direct,
    punch_rounds_failed,
    /// Punch packets to predicted ports (`port_prediction`).
    punch_predicted,
    /// Punch packets not sent: their agent identity, or all agents
    /// together, used up the punch budget (budget.rs).
    drop_punch_budget,
    /// Inner packets on a relay flow whose connection ID no session has.
    drop_unknown_cid,
    /// End-to-end sessions accepted (Initials that created one), admitted
    /// (up), and ended.
    e2e_handshakes,
    e2e_established,
    e2e_closed,
    /// Initials dropped at max_e2e_handshakes(_per_identity) or
    /// max_e2e_sessions, and sessions refused at
    /// max_e2e_sessions_per_identity.
    e2e_handshakes_refused,
    e2e_sessions_refused_identity,
    /// Agent certificates refused in inner handshakes (CA, validity, kind).
    e2e_cert_rejected,
    /// Inner packets that failed authentication (altered on the way, or
    /// for keys the session does not have).
    e2e_packets_rejected,
    /// Stateless resets sent for inner packets of sessions this connector
    /// does not hold (after a restart, or from a same-identity replica).
    e2e_resets_sent,
    /// Resets not sent: their agent identity, or all agents together, used
    /// up the reset budget (budget.rs).
    e2e_resets_suppressed,
    /// Tunneled packets an agent sent before the connector admitted its
    /// session (dropped: nothing passes before admission).
    e2e_early_dropped,
    }
}

/// Counts one event on a counter of [`ConnectorStats`].
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts `n` on a counter of [`ConnectorStats`].
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
