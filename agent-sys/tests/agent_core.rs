#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The agent core against a real relay and an echoing connector on
//! loopback: routing by destination and every refusal counted.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use ztna_agent::agent_core::{AgentConfig, AgentCore, AgentEvent, DropReason};
use ztna_control::client::ClientConfig;
use ztna_control::identity::Kind;
use ztna_control::{packet, Role, ServiceName};
use ztna_relay::server::{self, RelayConfig};
use ztna_testkit::client_io::UdpClient;
use ztna_testkit::raw_tunnel::RawConnector;

/// What a connector's UDP echo sends back: the same payload, from the
/// service address to the agent.
fn answer(ip: &[u8]) -> Vec<u8> {
    let v4 = packet::parse_ipv4(ip).unwrap();
    let packet::Transport::Udp { src_port, dst_port, payload } = packet::parse_transport(&v4).unwrap() else {
        panic!("not UDP")
    };
    let mut out = Vec::new();
    packet::build_ipv4_udp(SocketAddrV4::new(v4.dst, dst_port), SocketAddrV4::new(v4.src, src_port), payload, &mut out)
        .unwrap();
    out
}

/// One turn of the connector: answer every tunneled packet as the service.
fn serve(conn: &mut RawConnector) {
    conn.pump();
    while let Some((flow, p)) = conn.recv_ip() {
        conn.send_ip(flow, &answer(&p)).unwrap();
    }
    conn.pump();
}

struct Driver {
    core: AgentCore,
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl Driver {
    fn pump(&mut self) {
        while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
            self.core.recv_udp(&mut self.buf[..n], from, Instant::now());
        }
        let now = Instant::now();
        if self.core.next_deadline().is_some_and(|d| d <= now) {
            self.core.handle_timeout(now);
        }
        let mut out = [0u8; 1500];
        while let Some((n, to)) = self.core.poll_udp(&mut out, now) {
            let _ = self.sock.send_to(&out[..n], to);
        }
    }
}

#[test]
fn routing_and_refusals() {
    let relay = server::start(&RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: Some(2),
        dev: true,
        pin_cores: false,
        policy_toml: Some("[services.echo]\nconnectors = [\"echo\"]\nagents = [\"laptop\"]\n".into()),
        ..RelayConfig::default()
    })
    .unwrap();
    let pki = relay.dev_pki.as_ref().unwrap();
    // A connector that echoes IP packets back unchanged.
    let mut ccfg = ClientConfig::new(relay.local_addr, "127.0.0.1:0".parse().unwrap(), "localhost");
    ccfg.registrations = vec![(Role::Connector, ServiceName::new("echo").unwrap())];
    let ctls = pki.client_tls(Kind::Connector, "echo").unwrap();
    let mut conn =
        RawConnector::new(UdpClient::new(ccfg, &ctls, "127.0.0.1:0".parse().unwrap(), 1).unwrap(), &ctls).unwrap();
    let tls = pki.client_tls(Kind::Agent, "laptop").unwrap();

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_nonblocking(true).unwrap();
    let cfg = AgentConfig {
        relay: relay.local_addr,
        fallback_relays: Vec::new(),
        server_name: "localhost".into(),
        local: sock.local_addr().unwrap(),
        tls,
        pinned_connectors: Vec::new(),
        paths: Default::default(),
        routes: vec![(ServiceName::new("echo").unwrap(), "100.100.0.0/24".parse().unwrap())],
    };
    let mut a = Driver { core: AgentCore::new(cfg, 2, Instant::now()).unwrap(), sock, buf: vec![0; 65536] };

    let me = SocketAddrV4::new("10.7.0.2".parse().unwrap(), 4000);
    let svc = SocketAddrV4::new("100.100.0.10".parse().unwrap(), 7);
    let mut pkt = Vec::new();
    packet::build_ipv4_udp(me, svc, b"early", &mut pkt).unwrap();
    // Before registration: mapped but no flow yet.
    assert_eq!(a.core.send_ip_packet(&pkt), Err(DropReason::NoFlow));

    let end = Instant::now() + Duration::from_secs(10);
    let mut registered = false;
    let mut observed = None;
    let mut up = None;
    while !(registered && observed.is_some() && up.is_some()) {
        conn.pump();
        a.pump();
        while let Some(e) = a.core.poll_event() {
            match e {
                AgentEvent::Registered { .. } => registered = true,
                AgentEvent::ObservedAddress(o) => observed = Some(o),
                AgentEvent::SessionUp { connector, .. } => up = Some(connector),
                _ => {}
            }
        }
        assert!(Instant::now() < end, "agent did not register");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(observed, Some(a.sock.local_addr().unwrap()));
    assert_eq!(up.as_deref(), Some("spiffe://dev.ztna/connector/echo"), "the connector proved the relay's name");
    assert_eq!(a.core.session_peer(&ServiceName::new("echo").unwrap()), up);

    // Mapped: goes through and comes back.
    packet::build_ipv4_udp(me, svc, b"hello", &mut pkt).unwrap();
    a.core.send_ip_packet(&pkt).unwrap();
    let mut back = vec![0u8; 2048];
    let mut got = None;
    while got.is_none() {
        a.pump();
        serve(&mut conn);
        a.pump();
        if let Some(n) = a.core.poll_ip_packet(&mut back) {
            got = Some(back[..n].to_vec());
        }
        assert!(Instant::now() < end, "no echo");
    }
    assert_eq!(got.unwrap(), answer(&pkt), "the service's answer came back");

    // An inbound packet larger than the caller's buffer is dropped and
    // counted, not truncated.
    a.core.send_ip_packet(&pkt).unwrap();
    let mut tiny = [0u8; 8];
    let end = Instant::now() + Duration::from_secs(10);
    while a.core.stats().drop_truncated == 0 {
        a.pump();
        serve(&mut conn);
        a.pump();
        assert_eq!(a.core.poll_ip_packet(&mut tiny), None);
        assert!(Instant::now() < end, "no truncation counted");
    }

    // A connector may only speak for its service: a packet on the flow
    // whose source is outside the service's prefixes (here: pretending to be
    // some other host) is dropped and counted, never delivered.
    let flow = {
        a.core.send_ip_packet(&pkt).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            a.pump();
            conn.pump();
            if let Some((flow, _)) = conn.recv_ip() {
                break flow;
            }
            assert!(Instant::now() < end, "connector got nothing");
        }
    };
    let mut spoof = Vec::new();
    packet::build_ipv4_udp(SocketAddrV4::new("8.8.8.8".parse().unwrap(), 53), me, b"forged", &mut spoof).unwrap();
    conn.send_ip(flow, &spoof).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while a.core.stats().drop_spoofed == 0 {
        conn.pump();
        a.pump();
        assert_eq!(a.core.poll_ip_packet(&mut back), None, "a forged packet was delivered");
        assert!(Instant::now() < end, "spoofed packet not counted");
        std::thread::sleep(Duration::from_millis(2));
    }

    // Unmapped, malformed, IPv6 without a route, too large.
    packet::build_ipv4_udp(me, SocketAddrV4::new("100.101.0.1".parse().unwrap(), 7), b"x", &mut pkt).unwrap();
    assert_eq!(a.core.send_ip_packet(&pkt), Err(DropReason::Unmapped));
    assert_eq!(a.core.send_ip_packet(&[0x45, 0, 0]), Err(DropReason::Malformed));
    assert_eq!(a.core.send_ip_packet(&[]), Err(DropReason::Malformed));
    let mut v6 = vec![0u8; 48];
    v6[0] = 0x60;
    v6[24] = 0xfd;
    assert_eq!(a.core.send_ip_packet(&v6), Err(DropReason::Unmapped));
    packet::build_ipv4_udp(me, svc, &vec![0u8; 1400], &mut pkt).unwrap();
    assert_eq!(a.core.send_ip_packet(&pkt), Err(DropReason::TooLarge));
    // ...answered with ICMP fragmentation-needed carrying the tunnel MTU.
    let n = a.core.poll_ip_packet(&mut back).expect("ICMP frag-needed for the tunnel");
    let icmp = packet::parse_ipv4(&back[..n]).unwrap();
    assert_eq!((icmp.protocol, icmp.dst), (packet::PROTO_ICMP, *me.ip()));
    assert_eq!((icmp.payload[0], icmp.payload[1]), (3, 4), "type 3 code 4");
    let mtu = u16::from_be_bytes([icmp.payload[6], icmp.payload[7]]);
    assert_eq!(usize::from(mtu), a.core.max_packet_size().unwrap());
    let st = a.core.stats();
    assert_eq!(
        (st.drop_no_flow, st.drop_unmapped, st.drop_malformed, st.drop_too_large, st.packets_out, st.packets_in),
        (1, 2, 2, 1, 3, 1)
    );
    assert!(a.core.max_packet_size().unwrap() >= 1280, "a 1280-byte packet fits");

    // The relay goes away: the agent reports it and stops accepting.
    relay.shutdown();
    let mut saw = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while !saw.iter().any(|e| matches!(e, AgentEvent::Disconnected { .. })) {
        a.pump();
        while let Some(e) = a.core.poll_event() {
            saw.push(e);
        }
        assert!(Instant::now() < end, "no disconnect event: {saw:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(saw.iter().any(|e| matches!(e, AgentEvent::Goodbye { .. })), "{saw:?}");
    packet::build_ipv4_udp(me, svc, b"after", &mut pkt).unwrap();
    assert_eq!(a.core.send_ip_packet(&pkt), Err(DropReason::NoFlow));
    let _: SocketAddr = a.sock.local_addr().unwrap();
}
