use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cand(kind: CandidateKind, a: &str) -> Candidate {
    Candidate { kind, addr: addr(a) }
}

/// Runs the manager's timers from `from` to `to` in 1 ms steps and
/// returns the actions with their times (ms after `t0`).
fn run(m: &mut PathManager, t0: Instant, from_ms: u64, to_ms: u64) -> Vec<(u64, PathAction)> {
    let mut out = Vec::new();
    for ms in from_ms..=to_ms {
        let now = t0 + Duration::from_millis(ms);
        if m.next_deadline().is_some_and(|d| d <= now) || ms == from_ms {
            m.handle_timeout(now);
        }
        while let Some(a) = m.poll_action() {
            out.push((ms, a));
        }
    }
    out
}

/// Nonces 1, 2, 3, … (tests only: the product's are random).
fn counter() -> Box<dyn FnMut() -> u64 + Send> {
    let mut n = 0;
    Box::new(move || {
        n += 1;
        n
    })
}

fn agent(t0: Instant) -> PathManager {
    let mut m = PathManager::new(DirectConfig::default(), true, counter(), t0);
    m.set_candidates(vec![cand(CandidateKind::Host, "192.168.1.2:5000")]);
    m.set_up();
    m
}

#[test]
fn a_round_probes_with_backoff_and_the_first_validated_path_is_taken() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    let got = run(&mut m, t0, 0, 10);
    assert!(
        matches!(&got[..], [(0, PathAction::SendCandidates { generation: 1, policy: PathPolicy::Auto, list })] if list.len() == 1)
    );
    // Nothing to punch toward before the connector's candidates.
    assert_eq!(m.counters().rounds, 0);
    let peer =
        vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000"), cand(CandidateKind::Host, "10.0.0.5:4000")];
    m.on_candidates(1, PathPolicy::Auto, peer);
    m.note_tunneled(t0 + Duration::from_millis(10));
    let got = run(&mut m, t0, 11, 3000);
    assert!(matches!(got[0], (11, PathAction::SendPunchNow { round: 1, .. })));
    let probe_times: Vec<u64> =
        got.iter().filter(|(_, a)| *a == PathAction::Probe(addr("10.0.0.5:4000"))).map(|(t, _)| *t).collect();
    // 50 ms doubling up to 1 s.
    assert_eq!(probe_times, [11, 61, 161, 361, 761, 1561, 2561]);
    assert_eq!(m.counters().probes, 14);
    // The LAN path validates: it is taken; the round goes on probing the
    // other target until it ends (8 s), in case it is better.
    let now = t0 + Duration::from_millis(3000);
    m.on_validated(addr("10.0.0.5:4000"), Duration::from_millis(2), 0, now);
    let got = run(&mut m, t0, 3001, 3001);
    assert_eq!(got, [(3001, PathAction::Migrate(Some(addr("10.0.0.5:4000"))))]);
    assert_eq!(m.current(), Some(addr("10.0.0.5:4000")));
    assert_eq!(m.counters().time_to_direct, Some(Duration::from_millis(2991)));
    for ms in (3100..5900).step_by(500) {
        m.on_rx(Some(addr("10.0.0.5:4000")), t0 + Duration::from_millis(ms));
        let got = run(&mut m, t0, ms + 1, ms + 500);
        let probed: Vec<&(u64, PathAction)> = got.iter().filter(|(_, a)| matches!(a, PathAction::Probe(_))).collect();
        assert!(probed.iter().all(|(_, a)| *a == PathAction::Probe(addr("203.0.113.5:4000"))), "{probed:?}");
    }
}

#[test]
fn a_silent_direct_path_falls_back_to_the_relay_and_a_new_round_follows() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    let direct = addr("203.0.113.5:4000");
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    run(&mut m, t0, 0, 100);
    m.on_validated(direct, Duration::from_millis(20), 0, t0 + Duration::from_millis(100));
    let got = run(&mut m, t0, 101, 101);
    assert_eq!(got, [(101, PathAction::Migrate(Some(direct)))]);
    // Alive while packets come over it; a keepalive every second.
    for s in 1..=5u64 {
        m.on_rx(Some(direct), t0 + Duration::from_millis(101 + s * 1000 - 500));
    }
    let got = run(&mut m, t0, 102, 5101);
    let keepalives: Vec<u64> = got.iter().filter(|(_, a)| *a == PathAction::Keepalive).map(|(t, _)| *t).collect();
    assert_eq!(keepalives, [1101, 2101, 3101, 4101, 5101]);
    assert!(got.iter().all(|(_, a)| matches!(a, PathAction::Keepalive)), "{got:?}");
    // Then silence: 3 s after the last packet (4601 ms) it is given up.
    let got = run(&mut m, t0, 5102, 7700);
    let back = got.iter().find(|(_, a)| *a == PathAction::Migrate(None)).map(|(t, _)| *t);
    assert_eq!(back, Some(7601));
    assert_eq!(m.current(), None);
    assert_eq!(m.counters().direct_timeouts, 1);
    // The round still running (until 8 s) probes on; then a new one, at
    // once (the last started 8 s ago, more than the gap).
    let got = run(&mut m, t0, 7701, 8100);
    assert!(got.iter().any(|(t, a)| *t == 8000 && matches!(a, PathAction::SendPunchNow { round: 2, .. })), "{got:?}");
}

#[test]
fn rounds_repeat_at_31_s_then_every_60_s_while_on_the_relay_and_not_within_the_gap() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    let got = run(&mut m, t0, 0, 200_000);
    let rounds: Vec<u64> =
        got.iter().filter(|(_, a)| matches!(a, PathAction::SendPunchNow { .. })).map(|(t, _)| *t).collect();
    assert_eq!(rounds, [0, 31_000, 91_000, 151_000]);
    // A candidate change asks for a round, but not sooner than 5 s after
    // the last one.
    m.on_candidates(2, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4001")]);
    let got = run(&mut m, t0, 151_001, 160_000);
    let rounds: Vec<u64> =
        got.iter().filter(|(_, a)| matches!(a, PathAction::SendPunchNow { .. })).map(|(t, _)| *t).collect();
    assert_eq!(rounds, [156_000]);
    // A stale generation is ignored.
    m.on_candidates(1, PathPolicy::RelayOnly, Vec::new());
    assert_eq!(m.policy(), PathPolicy::Auto);
}

#[test]
fn lan_beats_wan_ipv6_beats_ipv4_and_similar_rtts_do_not_flap() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    let v4 = addr("203.0.113.5:4000");
    let v6 = addr("[2001:db8::5]:4000");
    let lan = addr("10.0.0.5:4000");
    let v4b = addr("198.51.100.7:4000");
    let peer = vec![
        cand(CandidateKind::ServerReflexive, "203.0.113.5:4000"),
        cand(CandidateKind::ServerReflexive, "198.51.100.7:4000"),
        cand(CandidateKind::Configured, "[2001:db8::5]:4000"),
        cand(CandidateKind::Host, "10.0.0.5:4000"),
    ];
    m.on_candidates(1, PathPolicy::Auto, peer);
    run(&mut m, t0, 0, 10);
    let ms = Duration::from_millis;
    m.on_validated(v4, ms(20), 0, t0 + ms(10));
    assert_eq!(run(&mut m, t0, 11, 11), [(11, PathAction::Migrate(Some(v4)))]);
    // A similar IPv4 path: no switch; a much faster one: switch.
    m.on_validated(v4b, ms(18), 0, t0 + ms(12));
    m.on_rx(Some(v4), t0 + ms(12));
    assert!(run(&mut m, t0, 12, 13).is_empty());
    m.on_path_stats(v4b, ms(10), 0);
    assert_eq!(run(&mut m, t0, 14, 14), [(14, PathAction::Migrate(Some(v4b)))]);
    // IPv6 beats IPv4 whatever the RTT; the LAN beats both.
    m.on_validated(v6, ms(40), 0, t0 + ms(15));
    assert_eq!(run(&mut m, t0, 15, 15), [(15, PathAction::Migrate(Some(v6)))]);
    m.on_validated(lan, ms(1), 0, t0 + ms(16));
    assert_eq!(run(&mut m, t0, 16, 16), [(16, PathAction::Migrate(Some(lan)))]);
    assert_eq!(m.counters().to_direct, 4);
}

#[test]
fn relay_only_on_either_side_means_no_rounds_and_no_candidates() {
    let t0 = Instant::now();
    // The agent's own relay-only: its Candidates carry no address.
    let mut m = agent(t0);
    m.set_policy(PathPolicy::RelayOnly);
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    let got = run(&mut m, t0, 0, 100_000);
    assert!(
        matches!(&got[..], [(0, PathAction::SendCandidates { policy: PathPolicy::RelayOnly, list, .. })] if list.is_empty()),
        "{got:?}"
    );
    // The connector's relay-only: the agent never probes, and leaves a
    // direct path it was on.
    let mut m = agent(t0);
    let direct = addr("203.0.113.5:4000");
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    run(&mut m, t0, 0, 10);
    m.on_validated(direct, Duration::from_millis(5), 0, t0);
    run(&mut m, t0, 11, 11);
    assert_eq!(m.current(), Some(direct));
    m.on_candidates(2, PathPolicy::RelayOnly, Vec::new());
    assert_eq!(m.current(), None);
    let got = run(&mut m, t0, 12, 100_000);
    assert_eq!(got.first().map(|(_, a)| a), Some(&PathAction::Migrate(None)));
    assert!(got.iter().all(|(_, a)| !matches!(a, PathAction::Probe(_) | PathAction::SendPunchNow { .. })));
    assert!(!m.relay_allowed() || m.policy() == PathPolicy::RelayOnly);
}

#[test]
fn the_connector_punches_toward_the_agent_for_a_round_and_refuses_early_rounds() {
    let t0 = Instant::now();
    let mut m = PathManager::new(DirectConfig::default(), false, counter(), t0);
    m.set_candidates(vec![cand(CandidateKind::Configured, "198.51.100.1:443")]);
    m.set_up();
    m.on_candidates(
        1,
        PathPolicy::Auto,
        vec![cand(CandidateKind::Host, "192.168.1.2:5000"), cand(CandidateKind::ServerReflexive, "203.0.113.9:6000")],
    );
    let got = run(&mut m, t0, 0, 5);
    assert!(matches!(got[..], [(0, PathAction::SendCandidates { .. })]), "the connector starts no round: {got:?}");
    m.on_punch_now(1, 42, t0 + Duration::from_millis(5));
    let got = run(&mut m, t0, 5, 1000);
    let to_nat: Vec<u64> = got
        .iter()
        .filter(|(_, a)| *a == PathAction::Punch { to: addr("203.0.113.9:6000"), round: 1, nonce: 42 })
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(to_nat, [5, 55, 155, 355, 755]);
    assert_eq!(m.counters().punches, 10);
    m.on_peer_migrated(Some(addr("203.0.113.9:6000")), t0 + Duration::from_millis(1000));
    assert_eq!(m.current(), Some(addr("203.0.113.9:6000")));
    // The round runs its 8 s (the agent may still find a better path).
    let got = run(&mut m, t0, 1001, 9000);
    assert!(got.iter().all(|(t, _)| *t < 8005) && !got.is_empty(), "{got:?}");
    // A PunchNow too soon after the last, or not above it, is refused.
    m.on_punch_now(2, 43, t0 + Duration::from_millis(3000));
    m.on_punch_now(1, 44, t0 + Duration::from_millis(9000));
    assert!(run(&mut m, t0, 9000, 9100).is_empty());
    assert_eq!(m.counters().rounds_refused, 2);
    m.on_punch_now(2, 45, t0 + Duration::from_millis(9100));
    assert!(!run(&mut m, t0, 9100, 9100).is_empty(), "a later round punches");
    m.on_peer_migrated(None, t0 + Duration::from_millis(9000));
    assert_eq!((m.counters().to_direct, m.counters().to_relay), (1, 1));
}

#[test]
fn punches_of_the_round_teach_the_agent_peer_reflexive_targets() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    let got = run(&mut m, t0, 0, 0);
    let Some(PathAction::SendPunchNow { round, nonce }) = got.iter().map(|(_, a)| a.clone()).nth(1) else {
        panic!("{got:?}")
    };
    let prflx = addr("203.0.113.5:4999");
    assert!(!m.on_punch(prflx, round, nonce ^ 1), "a wrong nonce is not ours");
    assert!(!m.on_punch(prflx, round + 1, nonce));
    assert!(m.on_punch(prflx, round, nonce));
    let got = run(&mut m, t0, 1, 100);
    assert!(got.contains(&(50, PathAction::Probe(prflx))), "{got:?}");
    m.on_validated(prflx, Duration::from_millis(9), 0, t0 + Duration::from_millis(100));
    run(&mut m, t0, 101, 101);
    assert_eq!(m.current(), Some(prflx));
}

#[test]
fn probe_timeouts_without_an_answer_fail_the_direct_path_over_at_once() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    let direct = addr("203.0.113.5:4000");
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    run(&mut m, t0, 0, 10);
    let ms = Duration::from_millis;
    m.on_validated(direct, ms(20), 0, t0 + ms(10));
    run(&mut m, t0, 11, 11);
    // quiche has counted 5 probe timeouts on the path so far (while it
    // was validated); one more with an answer in between changes nothing.
    m.on_path_stats(direct, ms(20), 5);
    m.on_path_stats(direct, ms(20), 6);
    m.on_rx(Some(direct), t0 + ms(12));
    assert!(run(&mut m, t0, 12, 12).is_empty());
    assert_eq!(m.current(), Some(direct));
    // Two with nothing received: the relay takes over, long before the
    // 3 s silence timeout.
    m.on_path_stats(direct, ms(20), 8);
    let got = run(&mut m, t0, 150, 150);
    assert_eq!(got.first(), Some(&(150, PathAction::Migrate(None))), "{got:?}");
    assert_eq!(m.counters().direct_timeouts, 1);
}

#[test]
fn only_usable_candidates_are_probed_and_only_round_targets_are_taken() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    let peer = vec![
        cand(CandidateKind::Configured, "0.0.0.0:4000"),
        cand(CandidateKind::ServerReflexive, "127.0.0.1:4000"),
        cand(CandidateKind::ServerReflexive, "203.0.113.5:0"),
        cand(CandidateKind::ServerReflexive, "224.0.0.1:4000"),
        cand(CandidateKind::ServerReflexive, "203.0.113.5:4000"),
    ];
    m.on_candidates(1, PathPolicy::Auto, peer);
    let got = run(&mut m, t0, 0, 0);
    let probes: Vec<&PathAction> = got.iter().map(|(_, a)| a).filter(|a| matches!(a, PathAction::Probe(_))).collect();
    assert_eq!(probes, [&PathAction::Probe(addr("203.0.113.5:4000"))]);
    // quiche validating some other address (a relay answering a challenge
    // it provoked, say) moves nothing.
    m.on_validated(addr("192.0.2.66:666"), Duration::from_millis(1), 0, t0);
    assert!(run(&mut m, t0, 1, 1).iter().all(|(_, a)| !matches!(a, PathAction::Migrate(_))));
    assert_eq!(m.current(), None);
}

#[test]
fn punches_add_at_most_two_peer_reflexive_targets_and_only_at_the_connectors_ip() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    let got = run(&mut m, t0, 0, 0);
    let Some((round, nonce)) = got.iter().find_map(|(_, a)| match a {
        PathAction::SendPunchNow { round, nonce } => Some((*round, *nonce)),
        _ => None,
    }) else {
        panic!("{got:?}")
    };
    // From a victim's address (spoofed, with the nonce seen on the wire):
    // counted as the round's but never probed.
    assert!(m.on_punch(addr("192.0.2.7:53"), round, nonce));
    for port in [5001, 5002, 5003] {
        m.on_punch(addr(&format!("203.0.113.5:{port}")), round, nonce);
    }
    let got = run(&mut m, t0, 1, 60);
    let mut probed: Vec<String> =
        got.iter().filter_map(|(_, a)| if let PathAction::Probe(t) = a { Some(t.to_string()) } else { None }).collect();
    probed.sort();
    probed.dedup();
    assert_eq!(probed, ["203.0.113.5:4000", "203.0.113.5:5001", "203.0.113.5:5002"]);
}

#[test]
fn relay_only_against_direct_only_leaves_no_path() {
    let t0 = Instant::now();
    let mut m = agent(t0);
    m.set_policy(PathPolicy::RelayOnly);
    m.on_candidates(1, PathPolicy::DirectOnly, Vec::new());
    assert!(!m.relay_allowed(), "the peer keeps tunneled packets off the relay");
    assert!(run(&mut m, t0, 0, 100_000).iter().all(|(_, a)| !matches!(a, PathAction::SendPunchNow { .. })));
    let mut m = agent(t0);
    m.on_candidates(1, PathPolicy::DirectOnly, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    assert!(!m.relay_allowed());
    assert_eq!(m.policy(), PathPolicy::DirectOnly);
}

#[test]
fn the_path_state_says_why_a_session_is_on_the_relay_and_rounds_count_their_outcome() {
    let t0 = Instant::now();
    let mut m = PathManager::new(DirectConfig::default(), true, counter(), t0);
    m.set_candidates(vec![cand(CandidateKind::Host, "192.168.1.2:5000")]);
    assert_eq!(m.state(), PathState::Pending);
    m.set_up();
    run(&mut m, t0, 0, 10);
    assert_eq!(m.state(), PathState::Pending, "no candidates from the peer yet");
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::Host, "127.0.0.1:9")]);
    assert_eq!(m.state(), PathState::NoCandidates, "loopback is not probed");
    let direct = addr("203.0.113.5:4000");
    m.on_candidates(2, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    run(&mut m, t0, 11, 20);
    assert_eq!(m.state(), PathState::Punching);
    // The first round (from 11 ms) validates nothing.
    run(&mut m, t0, 21, 8100);
    assert_eq!(m.state(), PathState::NoAnswer);
    assert_eq!((m.counters().rounds, m.counters().rounds_direct, m.counters().rounds_failed), (1, 0, 1));
    // The second round (31 s after the first) does.
    run(&mut m, t0, 8101, 31_100);
    assert_eq!((m.counters().rounds, m.state()), (2, PathState::NoAnswer), "the last outcome, while round 2 runs");
    m.on_validated(direct, Duration::from_millis(20), 0, t0 + Duration::from_millis(31_100));
    run(&mut m, t0, 31_101, 31_101);
    assert_eq!(m.state(), PathState::Direct);
    assert_eq!((m.counters().rounds_direct, m.counters().rounds_failed), (1, 1), "counted when taken");
    for ms in (31_200..39_200).step_by(500) {
        m.on_rx(Some(direct), t0 + Duration::from_millis(ms));
        run(&mut m, t0, ms + 1, ms + 500);
    }
    assert_eq!((m.counters().rounds, m.counters().rounds_direct, m.counters().rounds_failed), (2, 1, 1));
    // Silence: back on the relay ("lost" while the new round, at once,
    // runs); it validates nothing.
    run(&mut m, t0, 39_201, 42_800);
    assert_eq!((m.counters().direct_timeouts, m.state()), (1, PathState::Lost));
    run(&mut m, t0, 42_801, 51_000);
    assert_eq!(m.state(), PathState::NoAnswer);
    // A relay-only peer wins over everything.
    m.on_candidates(3, PathPolicy::RelayOnly, Vec::new());
    assert_eq!(m.state(), PathState::RelayOnly);
}

#[test]
fn the_connector_s_state_follows_the_agent_s_moves() {
    let t0 = Instant::now();
    let mut m = PathManager::new(DirectConfig::default(), false, counter(), t0);
    m.set_up();
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:4000")]);
    m.on_punch_now(1, 7, t0);
    assert_eq!(m.state(), PathState::Punching);
    m.on_peer_migrated(Some(addr("203.0.113.5:4000")), t0 + Duration::from_millis(40));
    assert_eq!(m.state(), PathState::Direct);
    m.on_peer_migrated(None, t0 + Duration::from_secs(20));
    run(&mut m, t0, 20_000, 20_001);
    assert_eq!(m.state(), PathState::Lost);
    assert_eq!((m.counters().rounds_direct, m.counters().rounds_failed), (1, 0));
}

#[test]
fn port_prediction_punches_the_ports_nearest_the_peers_reflexive_one_in_bursts() {
    let t0 = Instant::now();
    let cfg = DirectConfig { port_prediction: 300, ..DirectConfig::default() };
    for agent_side in [true, false] {
        let mut m = PathManager::new(cfg.clone(), agent_side, counter(), t0);
        m.set_candidates(vec![cand(CandidateKind::Host, "192.168.1.2:5000")]);
        m.set_up();
        let peer =
            vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:40000"), cand(CandidateKind::Host, "10.0.0.5:4000")];
        m.on_candidates(1, PathPolicy::Auto, peer);
        if !agent_side {
            m.on_punch_now(1, 9, t0);
        }
        let got = run(&mut m, t0, 0, 100);
        let predicted: Vec<(u64, SocketAddr)> = got
            .iter()
            .filter_map(|(t, a)| match a {
                PathAction::Punch { to, .. } if *to != addr("10.0.0.5:4000") && *to != addr("203.0.113.5:40000") => {
                    Some((*t, *to))
                }
                _ => None,
            })
            .collect();
        assert_eq!(predicted.len(), 300, "agent {agent_side}");
        assert_eq!(m.counters().predicted, 300);
        assert_eq!(predicted[0].1, addr("203.0.113.5:40001"));
        assert_eq!(predicted[1].1, addr("203.0.113.5:39999"));
        assert!(predicted.iter().all(|(_, a)| a.ip() == addr("203.0.113.5:1").ip()));
        // In bursts of 128, 2 ms apart: all within a few ms of the start.
        assert_eq!(predicted.iter().filter(|(t, _)| *t == predicted[0].0).count(), 128);
        assert!(predicted.iter().all(|(t, _)| *t <= predicted[0].0 + 4), "{predicted:?}");
    }
    // Off by default.
    let mut m = agent(t0);
    m.on_candidates(1, PathPolicy::Auto, vec![cand(CandidateKind::ServerReflexive, "203.0.113.5:40000")]);
    run(&mut m, t0, 0, 100);
    assert_eq!(m.counters().predicted, 0);
}
