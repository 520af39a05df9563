#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The relay with either congestion controller quiche offers: bursts
//! forwarded to a client 40 ms of round trip away arrive. With CUBIC
//! quiche never paces (`SendInfo.at` is always now: no pacing hold); with
//! BBR2 it may, and the relay then holds the connection's sending until
//! `at` (how often depends on quiche's wall-clock view of the rates, so it
//! is printed, not asserted).

use std::net::SocketAddr;
use std::time::Duration;

use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::identity::Kind;
use ztna_control::quic;
use ztna_control::{Role, ServiceName};
use ztna_relay::limits::CongestionControl;
use ztna_testkit::hosts::{ClientHost, RelayHost, RelaySpec};
use ztna_testkit::net::{NetConfig, Sim};

/// Three bursts of 200 × 1000-byte datagrams from the agent, forwarded to the
/// connector 40 ms of round trip away by a relay using `cc`. Returns
/// (arrived, relay pacing holds, relay datagram drops).
fn burst(cc: CongestionControl) -> (usize, u64, u64) {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let mut sim = Sim::new(NetConfig { delay: Duration::from_millis(20), ..NetConfig::default() });
    let policy = "[services.echo]\nconnectors = [\"c\"]\nagents = [\"*\"]\n";
    let mut spec = RelaySpec::dev(relay, 1, &pki, policy).unwrap();
    spec.limits.congestion_control = cc;
    let r = sim.add(RelayHost::new(spec, sim.now()).unwrap());
    let mut ids = Vec::new();
    for (i, role) in [Role::Connector, Role::Agent].into_iter().enumerate() {
        let local: SocketAddr = format!("127.0.0.2:{}", 5000 + i).parse().unwrap();
        let mut cfg = ClientConfig::new(relay, local, "localhost");
        cfg.registrations = vec![(role, ServiceName::new("echo").unwrap())];
        let tls = match role {
            Role::Connector => pki.client_tls(Kind::Connector, "c").unwrap(),
            Role::Agent => pki.client_tls(Kind::Agent, "a").unwrap(),
        };
        let session = ClientSession::new(cfg, quic::client_config(&tls).unwrap(), i as u64 + 1, sim.now());
        ids.push(sim.add(ClientHost::new(local, session)));
    }
    let (c, a) = (ids[0], ids[1]);
    let mut flow = None;
    assert!(sim.run_until(Duration::from_secs(10), |sim| {
        let h = sim.host::<ClientHost>(a);
        for e in h.events.drain(..) {
            if let Event::Registered { flow: f, .. } = e {
                flow = Some(f);
            }
        }
        flow.is_some() && sim.host::<ClientHost>(c).session.is_connected()
    }));
    let flow = flow.unwrap();
    // Let the connections' RTT estimates settle.
    sim.run_until(Duration::from_millis(500), |_| false);
    sim.max_step = Duration::from_micros(200);
    // Three bursts of 200, half a second apart: after the first, BBR2's
    // pacing rate follows the delivery rate it measured, and a burst
    // faster than that leaves paced.
    let (mut sent, mut got) = (0u32, 0usize);
    for round in 1..=3u32 {
        sim.run_until(Duration::from_secs(2), |sim| {
            let h = sim.host::<ClientHost>(a);
            while sent < 200 * round && h.session.send_datagram(flow, &[7u8; 1000]).is_ok() {
                sent += 1;
            }
            got += std::mem::take(&mut sim.host::<ClientHost>(c).datagrams).len();
            got >= 200 * round as usize
        });
        sim.run_until(Duration::from_millis(500), |sim| {
            got += std::mem::take(&mut sim.host::<ClientHost>(c).datagrams).len();
            false
        });
    }
    let stats: Vec<_> = sim.host::<RelayHost>(r).workers().iter().map(|w| w.stats().snapshot()).collect();
    let held = stats.iter().map(|s| s.paced_holds).sum();
    let drops = stats.iter().map(|s| s.drop_dgram_queue_full + s.drop_dgram_rate).sum();
    assert_eq!(sent, 600);
    let _ = std::fs::remove_dir_all(&pki.dir);
    (got, held, drops)
}

#[test]
fn forwarded_bursts_arrive_with_cubic_and_with_bbr2() {
    let (cubic_got, cubic_held, cubic_drops) = burst(CongestionControl::Cubic);
    let (bbr_got, bbr_held, bbr_drops) = burst(CongestionControl::Bbr2);
    eprintln!(
        "600 datagrams: cubic {cubic_got} arrived ({cubic_drops} dropped in the relay, {cubic_held} pacing holds), \
         bbr2 {bbr_got} arrived ({bbr_drops} dropped, {bbr_held} pacing holds)"
    );
    // quiche paces with BBR2 only: with CUBIC `SendInfo.at` is always now.
    assert_eq!(cubic_held, 0);
    for got in [cubic_got, bbr_got] {
        assert!(got >= 570, "{got} of 600 arrived");
    }
}
