#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
mod common;
use common::*;
use ztna_control::client::Event;
use ztna_control::Role;
use ztna_dataplane::io::IoBackend;

#[test]
fn one_agent_one_connector_echo() {
    let relay = start_relay(2, IoBackend::Auto, true);
    let mut conn = client(&relay, &[(Role::Connector, "echo")], 1);
    until_registered(&mut conn, 1);
    let mut agent = client(&relay, &[(Role::Agent, "echo")], 2);
    let flow = until_registered(&mut agent, 1)[0];
    agent.session.send_datagram(flow, b"hello").unwrap();
    let mut got = None;
    let mut buf = [0u8; 2048];
    for _ in 0..200 {
        echo_all(&mut conn);
        agent.pump();
        if let Some(n) = agent.session.recv_datagram(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let got = got.expect("echo arrives");
    assert_eq!(ztna_control::datagram::parse(&got).unwrap(), (flow, &b"hello"[..]));
    let _ = Event::Connected;
    relay.shutdown();
}
