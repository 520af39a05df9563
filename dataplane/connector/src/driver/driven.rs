//! What the driver needs of the engine it runs: the seam between the
//! sockets and clock ([`super::Connector`]) and the protocol logic.
//!
//! The product has one engine, [`Engine`] (relay sessions, end-to-end
//! sessions, gateway). The seam exists so that the benchmark can run a
//! cleartext baseline engine on the very same driver, sockets and backend
//! I/O (`ztna-bench e2e-system`): the measured difference is then the
//! end-to-end session and nothing else. Nothing in the product implements
//! it but [`Engine`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use ztna_control::quic::{self, TlsOptions};

use crate::backend::{BackendEvent, BackendId, BackendIo, Interest};
use crate::config::{ConnectorConfig, Target};
use crate::engine::status::ConnectorStatus;
use crate::engine::Engine;
use crate::ConnectorStats;

/// What the driver hands an engine it builds.
pub struct EngineInputs {
    /// The configuration (validated).
    pub cfg: ConnectorConfig,
    /// The resolved address of every backend target.
    pub targets: HashMap<Target, SocketAddr>,
    /// The driver's UDP socket address.
    pub local: SocketAddr,
    /// The connector's certificate, key and organisation CA.
    pub tls: TlsOptions,
    pub seed: u64,
    pub now: Instant,
}

/// A sans-I/O connector engine as the driver runs it. See [`Engine`] for
/// what each call means.
pub trait DrivenEngine {
    fn stats(&self) -> &Arc<ConnectorStats>;
    fn set_relays(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
        quic: &mut dyn FnMut() -> Result<quic::ClientTls>,
    ) -> Result<()>;
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo);
    fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>);
    fn handle_timeout(&mut self, now: Instant, io: &mut dyn BackendIo);
    fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)>;
    fn next_timeout(&self, now: Instant) -> Option<Instant>;
    fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>);
    fn close(&mut self);
    fn relays(&self) -> Vec<SocketAddr>;
    fn relays_connected(&self) -> usize;
    fn observed_addresses(&self) -> Vec<Option<SocketAddr>>;
    fn udp_flows(&self) -> usize;
    fn tcp_connections(&self) -> usize;
    fn is_ready(&self) -> bool;
    fn is_serving(&self) -> bool;
    fn status(&self) -> ConnectorStatus;
    /// The host's interface addresses (direct-path candidates); an engine
    /// without direct paths ignores them.
    fn set_host_addresses(&mut self, _ips: Vec<std::net::IpAddr>) {}
    /// The time-to-direct histogram, if the engine has direct paths.
    fn direct_metrics(&self) -> Option<Arc<crate::direct_metrics::DirectMetrics>> {
        None
    }
}

impl DrivenEngine for Engine {
    fn stats(&self) -> &Arc<ConnectorStats> {
        Engine::stats(self)
    }
    fn set_relays(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
        quic: &mut dyn FnMut() -> Result<quic::ClientTls>,
    ) -> Result<()> {
        Engine::set_relays(self, addrs, now, quic)
    }
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, pkt: &mut [u8], io: &mut dyn BackendIo) {
        Engine::handle_datagram(self, now, from, pkt, io)
    }
    fn handle_backend(&mut self, now: Instant, ev: BackendEvent<'_>) {
        Engine::handle_backend(self, now, ev)
    }
    fn handle_timeout(&mut self, now: Instant, io: &mut dyn BackendIo) {
        Engine::handle_timeout(self, now, io)
    }
    fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        Engine::poll_transmit(self, out, now)
    }
    fn next_timeout(&self, now: Instant) -> Option<Instant> {
        Engine::next_timeout(self, now)
    }
    fn backend_interest(&self, out: &mut Vec<(BackendId, Interest)>) {
        Engine::backend_interest(self, out)
    }
    fn close(&mut self) {
        Engine::close(self)
    }
    fn relays(&self) -> Vec<SocketAddr> {
        Engine::relays(self)
    }
    fn relays_connected(&self) -> usize {
        Engine::relays_connected(self)
    }
    fn observed_addresses(&self) -> Vec<Option<SocketAddr>> {
        Engine::observed_addresses(self)
    }
    fn udp_flows(&self) -> usize {
        Engine::udp_flows(self)
    }
    fn tcp_connections(&self) -> usize {
        Engine::tcp_connections(self)
    }
    fn is_ready(&self) -> bool {
        Engine::is_ready(self)
    }
    fn is_serving(&self) -> bool {
        Engine::is_serving(self)
    }
    fn status(&self) -> ConnectorStatus {
        Engine::status(self)
    }
    fn set_host_addresses(&mut self, ips: Vec<std::net::IpAddr>) {
        Engine::set_host_addresses(self, ips)
    }
    fn direct_metrics(&self) -> Option<Arc<crate::direct_metrics::DirectMetrics>> {
        Some(Arc::clone(Engine::direct_metrics(self)))
    }
}
