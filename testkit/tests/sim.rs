#![allow(clippy::unwrap_used, clippy::expect_used)] // test code
//! The sans-I/O cores without sockets: two relay `Worker`s and client
//! `ClientSession`s exchange packets through testkit's in-memory network
//! (virtual clock) that delays, reorders and drops them. No socket is
//! opened; the same engine runs under io_uring in production.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ztna_control::client::{ClientConfig, ClientSession, Event};
use ztna_control::identity::Kind;
use ztna_control::quic;
use ztna_control::{Role, ServiceName};
use ztna_testkit::hosts::{ClientHost, RelayHost, RelaySpec, Steering};
use ztna_testkit::net::{HostId, NetConfig, Sim};

/// An echo crosses four lossy hops (agent→relay→connector→relay→agent) at
/// 5 % loss each: about 81 % come back on average; 65 % leaves room for
/// the variance of 200 samples without hiding a real loss in the relay
/// (whose drop counters are printed on failure).
const MIN_ECHOES: u32 = 130;

#[test]
fn registration_and_echo_survive_delay_reordering_and_loss() {
    let pki = ztna_relay::pki::generate(&std::env::temp_dir()).unwrap();
    let relay: SocketAddr = "127.0.0.1:4433".parse().unwrap();
    let cfg = NetConfig {
        delay: Duration::from_millis(2),
        jitter: Duration::from_millis(15),
        loss: 0.05,
        ..NetConfig::default()
    };
    let mut sim = Sim::new(cfg);
    let policy = "[services.echo]\nconnectors = [\"c\"]\nagents = [\"*\"]\n";
    let mut spec = RelaySpec::dev(relay, 2, &pki, policy).unwrap();
    // The kernel's reuseport hash: any worker; steering or hand-off must cope.
    spec.steering = Steering::Random(7);
    let r = sim.add(RelayHost::new(spec, sim.now()).unwrap());

    let mut clients: Vec<(HostId, Role)> = Vec::new();
    for (i, role) in [Role::Connector, Role::Agent, Role::Agent, Role::Agent].into_iter().enumerate() {
        let local: SocketAddr = format!("127.0.0.2:{}", 5000 + i).parse().unwrap();
        let mut cfg = ClientConfig::new(relay, local, "localhost");
        cfg.registrations = vec![(role, ServiceName::new("echo").unwrap())];
        let tls = match role {
            Role::Connector => pki.client_tls(Kind::Connector, "c").unwrap(),
            Role::Agent => pki.client_tls(Kind::Agent, &format!("a{i}")).unwrap(),
        };
        let session = ClientSession::new(cfg, quic::client_config(&tls).unwrap(), i as u64 + 1, sim.now());
        clients.push((sim.add(ClientHost::new(local, session)), role));
    }

    let mut flows: HashMap<SocketAddr, u32> = HashMap::new();
    let mut sent_by: HashMap<SocketAddr, u32> = HashMap::new();
    let mut echoed_to: HashMap<SocketAddr, u32> = HashMap::new();
    // Each agent sends one datagram every 5 ms of virtual time.
    let pace = Duration::from_millis(5);
    sim.max_step = pace;
    let mut last_sent: HashMap<SocketAddr, std::time::Instant> = HashMap::new();
    sim.run_until(Duration::from_secs(30), |sim| {
        let now = sim.now();
        for (id, role) in &clients {
            let c = sim.host::<ClientHost>(*id);
            for e in c.events.drain(..) {
                if let Event::Registered { flow, .. } = e {
                    flows.insert(c.addr, flow);
                }
            }
            for (flow, payload) in std::mem::take(&mut c.datagrams) {
                match role {
                    Role::Connector => {
                        let _ = c.session.send_datagram(flow, &payload);
                    }
                    Role::Agent => {
                        assert_eq!(&payload[..2], &c.addr.port().to_be_bytes(), "echo reached the wrong agent");
                        *echoed_to.entry(c.addr).or_default() += 1;
                    }
                }
            }
            if *role == Role::Agent {
                let due = last_sent.get(&c.addr).is_none_or(|t| now.duration_since(*t) >= pace);
                if let (Some(flow), true) = (flows.get(&c.addr), due) {
                    let n = sent_by.entry(c.addr).or_default();
                    if *n < 200 && c.session.send_datagram(*flow, &c.addr.port().to_be_bytes()).is_ok() {
                        *n += 1;
                        last_sent.insert(c.addr, now);
                    }
                }
            }
        }
        echoed_to.len() == 3 && echoed_to.values().all(|&n| n >= MIN_ECHOES)
    });
    assert_eq!(flows.len(), 4, "every client registered despite loss: {flows:?}");
    assert!(sim.net.stats.lost > 0, "the network did drop packets");
    let relay_host = sim.host::<RelayHost>(r);
    for (a, n) in &echoed_to {
        // Datagrams are unreliable: with 5% loss each way most, not all,
        // come back.
        let stats: Vec<_> = relay_host.workers().iter().map(|w| w.stats().snapshot()).collect();
        assert!(*n >= MIN_ECHOES, "agent {a} got {n} of 200 echoes; workers {stats:?}");
    }
    assert_eq!(echoed_to.len(), 3);
    let handoffs: u64 = relay_host.workers().iter().map(|w| w.stats().handoff_out.load(Ordering::Relaxed)).sum();
    assert!(handoffs > 0, "packets that reached the wrong worker were handed over");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
