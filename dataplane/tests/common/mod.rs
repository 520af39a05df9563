//! Shared helpers for the relay integration tests: a real relay on
//! 127.0.0.1 and protocol-v1 clients on real UDP sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ztna_control::client::{ClientConfig, Event};
use ztna_control::{Role, ServiceName};
use ztna_dataplane::client_io::UdpClient;
use ztna_dataplane::io::IoBackend;
use ztna_dataplane::relay::{self, RelayConfig, RelayHandle};

pub const T: Duration = Duration::from_secs(10);

pub fn start_relay(workers: usize, backend: IoBackend, steering: bool) -> RelayHandle {
    let cfg = RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(workers),
        dev: true,
        io_backend: backend,
        steering,
        pin_cores: false,
        shutdown_grace_ms: 1000,
        ..RelayConfig::default()
    };
    relay::start(&cfg).expect("relay starts")
}

pub fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

pub fn client(relay: &RelayHandle, regs: &[(Role, &str)], seed: u64) -> UdpClient {
    let mut cfg = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "localhost");
    cfg.registrations = regs.iter().map(|(r, s)| (*r, svc(s))).collect();
    let tls = UdpClient::tls_with_ca(&relay.dev_pki.as_ref().unwrap().ca);
    UdpClient::new(cfg, &tls, "127.0.0.1:0".parse::<SocketAddr>().unwrap(), seed).unwrap()
}

/// Pumps `c` until it is registered for every registration it holds;
/// returns the flow ids (agent flows / connector handles) in order.
pub fn until_registered(c: &mut UdpClient, n: usize) -> Vec<u32> {
    let mut flows = Vec::new();
    while flows.len() < n {
        match c.wait_for(T, |e| matches!(e, Event::Registered { .. } | Event::RegisterFailed { .. }), |_| {}) {
            Some(Event::Registered { flow, .. }) => flows.push(flow),
            other => panic!("registration failed: {other:?}"),
        }
    }
    flows
}

/// Echoes every datagram a connector receives back on the same flow.
pub fn echo_all(c: &mut UdpClient) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    c.pump();
    while let Some(len) = c.session.recv_datagram(&mut buf) {
        if let Ok((flow, payload)) = ztna_control::datagram::parse(&buf[..len]) {
            let payload = payload.to_vec();
            if c.session.send_datagram(flow, &payload).is_ok() {
                n += 1;
            }
        }
    }
    c.pump();
    n
}
