//! The agent core on a real UDP socket, as an [`IpLink`]: what the tests,
//! the demo and the benchmark use to send IP packets through the whole
//! tunnel (end-to-end session included) without a TUN device.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use ztna_agent::agent_core::{AgentConfig, AgentCore, AgentEvent, DropReason};
use ztna_agent::direct::PathSettings;
use ztna_agent::route::Cidr;
use ztna_control::quic::TlsOptions;
use ztna_control::ServiceName;

use crate::client_io::wait_readable;
use crate::tunnel_tcp::{IpLink, LinkRefused};

pub struct AgentLink {
    pub core: AgentCore,
    sock: UdpSocket,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Events seen while waiting (the caller may inspect them).
    pub events: Vec<AgentEvent>,
}

impl AgentLink {
    /// An agent for `routes`, on a socket bound next to `relay` (loopback
    /// for a local relay).
    pub fn new(
        relay: SocketAddr,
        tls: TlsOptions,
        routes: Vec<(ServiceName, Cidr)>,
        seed: u64,
    ) -> io::Result<AgentLink> {
        AgentLink::with_paths(relay, tls, routes, seed, PathSettings::default())
    }

    /// [`AgentLink::new`] with direct-path settings (a policy, timings).
    pub fn with_paths(
        relay: SocketAddr,
        tls: TlsOptions,
        routes: Vec<(ServiceName, Cidr)>,
        seed: u64,
        paths: PathSettings,
    ) -> io::Result<AgentLink> {
        let sock = ztna_udp::bind(SocketAddr::new(relay.ip(), 0))?;
        let cfg = AgentConfig {
            relay,
            fallback_relays: Vec::new(),
            server_name: "localhost".into(),
            local: sock.local_addr()?,
            tls,
            pinned_connectors: Vec::new(),
            paths,
            routes,
        };
        let core = AgentCore::new(cfg, seed, Instant::now()).map_err(io::Error::other)?;
        Ok(AgentLink { core, sock, buf: vec![0u8; 65_536], out: vec![0u8; 2048], events: Vec::new() })
    }

    /// Pumps until `services` end-to-end sessions are up; returns the
    /// relay-observed address. Fails on a refused registration, a closed
    /// session (with its reason) or the timeout.
    pub fn wait_ready(&mut self, services: usize, timeout: Duration) -> io::Result<SocketAddr> {
        let end = Instant::now() + timeout;
        loop {
            self.pump();
            while let Some(e) = self.core.poll_event() {
                if let AgentEvent::RegisterFailed { service, code, reason } = &e {
                    return Err(io::Error::other(format!("registration of {service} refused: {code} {reason}")));
                }
                self.events.push(e);
            }
            if let (true, Some(o)) = (self.core.sessions_up() >= services, self.core.observed_address()) {
                return Ok(o);
            }
            if Instant::now() > end {
                let closed: Vec<&AgentEvent> =
                    self.events.iter().filter(|e| matches!(e, AgentEvent::SessionClosed { .. })).collect();
                return Err(io::Error::other(format!("no end-to-end session within {timeout:?}: {closed:?}")));
            }
            wait_readable(&[self.sock.as_raw_fd()], Duration::from_millis(5));
        }
    }

    /// Pumps for `d`, keeping events.
    pub fn pump_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump();
            while let Some(e) = self.core.poll_event() {
                self.events.push(e);
            }
            wait_readable(&[self.sock.as_raw_fd()], Duration::from_millis(2));
        }
    }
}

impl IpLink for AgentLink {
    fn pump(&mut self) {
        while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
            if let Some(b) = self.buf.get_mut(..n) {
                self.core.recv_udp(b, from, Instant::now());
            }
        }
        let now = Instant::now();
        if self.core.next_deadline().is_some_and(|d| d <= now) {
            self.core.handle_timeout(now);
        }
        while let Some((n, to)) = self.core.poll_udp(&mut self.out, now) {
            if let Some(b) = self.out.get(..n) {
                let _ = self.sock.send_to(b, to);
            }
        }
    }

    fn recv_packet(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.core.poll_ip_packet(buf)
    }

    fn send_packet(&mut self, pkt: &[u8]) -> Result<(), LinkRefused> {
        match self.core.send_ip_packet(pkt) {
            Ok(()) => Ok(()),
            Err(DropReason::Backpressure) => Err(LinkRefused::Full),
            Err(_) => Err(LinkRefused::Dropped),
        }
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.core.next_deadline()
    }
}
