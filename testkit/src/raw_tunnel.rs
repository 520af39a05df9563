//! A hand-driven agent: the protocol client on its own socket plus an
//! end-to-end session the test drives itself, so it can put any bytes
//! into the tunnel (malformed IP, IPv6, oversized packets) that the agent
//! core would refuse to send. For tests of what a connector does with
//! bad input from an authenticated agent.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztna_control::client::Event;
use ztna_control::e2e::{self, E2eSession, Rejections, SendIpError};
use ztna_control::quic::TlsOptions;
use ztna_control::ServiceName;

use crate::client_io::UdpClient;

pub struct RawTunnel {
    pub client: UdpClient,
    pub flow: u32,
    pub session: E2eSession,
    buf: Vec<u8>,
}

impl RawTunnel {
    /// Waits for `client`'s flow for `service` and its binding, then
    /// brings up the end-to-end session (with `tls`, the client's own).
    pub fn connect(
        mut client: UdpClient,
        tls: &TlsOptions,
        service: ServiceName,
        timeout: Duration,
    ) -> io::Result<RawTunnel> {
        let end = Instant::now() + timeout;
        let (mut flow, mut bound) = (None, None);
        while flow.is_none() || bound.is_none() {
            let left = end.saturating_duration_since(Instant::now());
            match client.wait_for(left, |_| true, |_| {}) {
                Some(Event::Registered { flow: f, .. }) => flow = Some(f),
                Some(Event::FlowBound { connector_id, .. }) => bound = Some(connector_id),
                Some(Event::RegisterFailed { code, reason, .. }) => {
                    return Err(io::Error::other(format!("registration refused: {code} {reason}")))
                }
                Some(_) => {}
                None => return Err(io::Error::other("no flow binding in time")),
            }
        }
        let (Some(flow), Some(connector)) = (flow, bound) else { return Err(io::Error::other("unreachable")) };
        let own = e2e::own_identity(tls).map_err(io::Error::other)?;
        let mut cfg = e2e::client_config(tls, Arc::new(Rejections::default())).map_err(io::Error::other)?;
        let mut scid = [0u8; e2e::CID_LEN];
        boring::rand::rand_bytes(&mut scid).map_err(io::Error::other)?;
        let session = E2eSession::connect(&mut cfg, scid, &own.trust_domain, &connector, service, Instant::now())
            .map_err(io::Error::other)?;
        let mut session = session;
        // A tool of the relay path: it never punches or goes direct.
        session.set_path_policy(ztna_control::candidate::PathPolicy::RelayOnly);
        let mut t = RawTunnel { client, flow, session, buf: vec![0u8; 2048] };
        while !t.session.is_up() {
            if t.session.is_closed() || Instant::now() > end {
                return Err(io::Error::other("end-to-end session did not come up"));
            }
            t.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(t)
    }

    /// Moves packets between the socket, the relay session and the inner
    /// session; runs their timers.
    pub fn pump(&mut self) {
        let now = Instant::now();
        self.client.pump();
        while let Some(n) = self.client.session.recv_datagram(&mut self.buf) {
            let Some(d) = self.buf.get_mut(..n) else { continue };
            let Ok((flow, inner)) = ztna_control::datagram::parse(d) else { continue };
            if flow != self.flow {
                continue;
            }
            let start = n - inner.len();
            if let Some(inner) = self.buf.get_mut(start..n) {
                self.session.recv(inner, now);
            }
        }
        if self.session.next_deadline().is_some_and(|d| d <= now) {
            self.session.handle_timeout(now);
        }
        // Relay-only sessions (below): every packet goes on the flow.
        while let Some((n, _)) = self.session.poll_transmit(&mut self.buf, now) {
            if let Some(p) = self.buf.get(..n) {
                let _ = self.client.session.send_datagram(self.flow, p);
            }
        }
        while self.session.poll_event().is_some() {}
        self.client.pump();
    }

    /// Puts `pkt` into the tunnel as it is.
    pub fn send_ip(&mut self, pkt: &[u8]) -> Result<(), SendIpError> {
        let r = self.session.send_ip(pkt);
        self.pump();
        r
    }

    /// The next tunneled packet from the connector.
    pub fn recv_ip(&mut self, out: &mut [u8]) -> Option<usize> {
        self.pump();
        self.session.recv_ip(out)
    }
}

/// The connector side, hand-driven: a protocol client registered as a
/// connector that accepts end-to-end sessions on its flows (every agent
/// it admits, whatever the service) and lets the test answer, or forge,
/// tunneled packets.
pub struct RawConnector {
    pub client: UdpClient,
    cfg: quiche::Config,
    reset: e2e::ResetKey,
    trust_domain: String,
    /// Flow → its session.
    pub sessions: std::collections::HashMap<u32, E2eSession>,
    buf: Vec<u8>,
}

impl RawConnector {
    pub fn new(client: UdpClient, tls: &TlsOptions) -> io::Result<RawConnector> {
        let own = e2e::own_identity(tls).map_err(io::Error::other)?;
        let cfg = e2e::server_config(tls, Arc::new(Rejections::default())).map_err(io::Error::other)?;
        let reset = e2e::ResetKey::from_tls(tls).map_err(io::Error::other)?;
        Ok(RawConnector {
            client,
            cfg,
            reset,
            trust_domain: own.trust_domain,
            sessions: Default::default(),
            buf: vec![0u8; 2048],
        })
    }

    pub fn pump(&mut self) {
        let now = Instant::now();
        self.client.pump();
        while let Some(n) = self.client.session.recv_datagram(&mut self.buf) {
            let Some(d) = self.buf.get_mut(..n) else { continue };
            let Ok((flow, inner)) = ztna_control::datagram::parse(d) else { continue };
            let start = n - inner.len();
            let Some(inner) = self.buf.get_mut(start..n) else { continue };
            if !self.sessions.contains_key(&flow) && e2e::is_initial(inner) {
                let mut scid = [0u8; e2e::CID_LEN];
                let _ = boring::rand::rand_bytes(&mut scid);
                if let Ok(mut s) = E2eSession::accept(&mut self.cfg, scid, &self.trust_domain, &self.reset, now) {
                    s.set_path_policy(ztna_control::candidate::PathPolicy::RelayOnly);
                    self.sessions.insert(flow, s);
                }
            }
            if let Some(s) = self.sessions.get_mut(&flow) {
                s.recv(inner, now);
            }
        }
        for (flow, s) in self.sessions.iter_mut() {
            if s.next_deadline().is_some_and(|d| d <= now) {
                s.handle_timeout(now);
            }
            while let Some(e) = s.poll_event() {
                if matches!(e, ztna_control::e2e::SessionEvent::Hello { .. }) {
                    s.admit();
                }
            }
            while let Some((n, _)) = s.poll_transmit(&mut self.buf, now) {
                if let Some(p) = self.buf.get(..n) {
                    let _ = self.client.session.send_datagram(*flow, p);
                }
            }
        }
        self.client.pump();
    }

    /// The next tunneled packet from an agent, with its flow.
    pub fn recv_ip(&mut self) -> Option<(u32, Vec<u8>)> {
        let mut out = [0u8; 2048];
        for (flow, s) in self.sessions.iter_mut() {
            if let Some(n) = s.recv_ip(&mut out) {
                return out.get(..n).map(|p| (*flow, p.to_vec()));
            }
        }
        None
    }

    /// Sends `pkt` to the agent on `flow` through its session.
    pub fn send_ip(&mut self, flow: u32, pkt: &[u8]) -> Result<(), SendIpError> {
        let r = self.sessions.get_mut(&flow).map_or(Err(SendIpError::Closed), |s| s.send_ip(pkt));
        self.pump();
        r
    }
}
