//! Direct paths of one end-to-end session, sans I/O and without quiche:
//! candidate exchange, punching rounds, probe backoff, path selection with
//! hysteresis and fallback to the relay (docs/protocol/direct.md). The
//! session ([`super::E2eSession`]) feeds it what quiche reports and carries
//! out the [`PathAction`]s it gives.
//!
//! The agent decides: it starts rounds (PunchNow), probes candidate pairs
//! with QUIC path validation and migrates the session. The connector
//! follows: on PunchNow it sends punch packets toward the agent's
//! candidates to open its own NAT, and its quiche follows the agent's
//! migrations.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::path_telemetry::PathState;
use crate::candidate::{predicted_ports, usable_host_ip};
use crate::candidate::{Candidate, CandidateKind, PathPolicy, MAX_CANDIDATES};

/// Timings of direct paths. The defaults and where they come from are in
/// docs/protocol/direct.md §11.4.
#[derive(Debug, Clone)]
pub struct DirectConfig {
    /// First probe interval of a round; it doubles up to `probe_max`.
    pub probe_first: Duration,
    pub probe_max: Duration,
    /// How long one round probes (agent) or punches (connector).
    pub round_len: Duration,
    /// Least time between the starts of two rounds.
    pub min_round_gap: Duration,
    /// A second round this long after the first, if still on the relay
    /// (stale conntrack entries from the first round have expired).
    pub second_round: Duration,
    /// While on the relay, a new round this often.
    pub upgrade_every: Duration,
    /// On a direct path, an ack-eliciting packet after this much silence.
    pub keepalive: Duration,
    /// The direct path in use is dead when nothing came over it this long.
    pub direct_timeout: Duration,
    /// ... or sooner, when this many QUIC probe timeouts fired on it with
    /// nothing received in between (its packets stopped being
    /// acknowledged while it carried traffic).
    pub pto_failover: u64,
    /// Another direct path is taken only if its RTT is below this fraction
    /// of the current one's (or it is of a better class).
    pub rtt_hysteresis: f64,
    /// Port prediction (off: 0): at the start of each round, this many
    /// punch packets to the ports nearest the peer's server-reflexive
    /// port ([`crate::candidate::predicted_ports`]), for NATs whose
    /// mapping depends on the destination but whose ports are sequential
    /// or from a small block. At most
    /// [`crate::candidate::MAX_PORT_PREDICTION`].
    pub port_prediction: u16,
    /// Peer candidates on loopback are probed too: only where the relay
    /// itself is reached over loopback (one host: tests, labs). Otherwise
    /// an agent could make its connector punch the connector host's own
    /// services.
    pub loopback: bool,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            probe_first: Duration::from_millis(50),
            probe_max: Duration::from_secs(1),
            round_len: Duration::from_secs(8),
            min_round_gap: Duration::from_secs(5),
            second_round: Duration::from_secs(31),
            upgrade_every: Duration::from_secs(60),
            keepalive: Duration::from_secs(1),
            direct_timeout: Duration::from_secs(3),
            pto_failover: 2,
            rtt_hysteresis: 0.75,
            port_prediction: 0,
            loopback: false,
        }
    }
}

/// What the session must do for its paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathAction {
    /// Send a Candidates message on the end-to-end stream.
    SendCandidates { generation: u32, policy: PathPolicy, list: Vec<Candidate> },
    /// Agent: send PunchNow on the end-to-end stream.
    SendPunchNow { round: u32, nonce: u64 },
    /// Agent: probe the path to `addr` (QUIC path validation).
    Probe(SocketAddr),
    /// Connector: send a punch packet to `to`.
    Punch { to: SocketAddr, round: u32, nonce: u64 },
    /// Agent: make this the session's path (`None`: the relay).
    Migrate(Option<SocketAddr>),
    /// Agent: an ack-eliciting packet on the current direct path.
    Keepalive,
}

/// Counters of one session's paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathCounters {
    pub rounds: u64,
    /// Rounds during which the session took a direct path (counted when
    /// it does), and rounds that ended without one.
    pub rounds_direct: u64,
    pub rounds_failed: u64,
    /// Connector: PunchNow messages refused (a round number not above the
    /// last, or sooner than the least gap after it).
    pub rounds_refused: u64,
    pub probes: u64,
    pub punches: u64,
    /// Punch packets to predicted ports (`port_prediction`).
    pub predicted: u64,
    /// Probes quiche could not send (no spare connection ID).
    pub probes_skipped: u64,
    pub to_direct: u64,
    pub to_relay: u64,
    /// Direct paths given up because nothing came over them.
    pub direct_timeouts: u64,
    /// From the first tunneled packet (before any: the session's start)
    /// to the first direct path.
    pub time_to_direct: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Round {
    number: u32,
    nonce: u64,
    started: Instant,
    next: Instant,
    interval: Duration,
    targets: Vec<SocketAddr>,
    /// Peer-reflexive targets punch packets added.
    prflx: usize,
    /// The session took a direct path during the round.
    took_direct: bool,
    /// Predicted ports still to punch at (last first), and when the next
    /// burst goes.
    predict: Vec<SocketAddr>,
    predict_next: Instant,
}

#[derive(Debug, Clone)]
struct DirectPath {
    kind: CandidateKind,
    rtt: Duration,
    last_rx: Instant,
    /// QUIC probe timeouts on the path: the latest count, and the count
    /// when something last arrived over it.
    ptos: u64,
    ptos_at_rx: Option<u64>,
}

/// Path preference: lower is better. Direct on the LAN (the peer's host
/// address), then direct over the WAN with IPv6 before IPv4.
fn class(kind: CandidateKind, addr: SocketAddr) -> u8 {
    match (kind, addr.is_ipv6()) {
        (CandidateKind::Host, true) => 0,
        (CandidateKind::Host, false) => 1,
        (_, true) => 2,
        (_, false) => 3,
    }
}

/// Where round nonces come from.
struct NonceSource(Box<dyn FnMut() -> u64 + Send>);

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceSource")
    }
}

/// Predicted-port punches sent at once, and the pause between bursts:
/// the engines' direct-path queues (agent 256 packets) take a burst
/// whole, and 1024 predictions go out within 16 ms.
const PREDICT_BURST: usize = 128;
const PREDICT_EVERY: Duration = Duration::from_millis(2);

/// Most peer-reflexive targets punch packets may add to one round.
const MAX_PRFLX_PER_ROUND: usize = 2;
/// Most host candidates one end advertises (the rest of the
/// [`MAX_CANDIDATES`] are kept for server-reflexive and configured ones,
/// which cross NATs; a session has few QUIC paths to spend).
const MAX_HOST_CANDIDATES: usize = 4;

/// The order candidates are advertised and probed in: configured and
/// server-reflexive addresses (they cross NATs) before host ones.
fn probe_order(c: &Candidate) -> (u8, SocketAddr) {
    let k = match c.kind {
        CandidateKind::Configured => 0,
        CandidateKind::ServerReflexive => 1,
        CandidateKind::Host => 2,
        CandidateKind::PeerReflexive => 3,
    };
    (k, c.addr)
}

/// Whether a peer's candidate may be probed or punched at: a usable
/// unicast address (loopback only when `loopback`) and a port.
fn probeable(c: &Candidate, loopback: bool) -> bool {
    c.addr.port() != 0 && (usable_host_ip(c.addr.ip()) || (loopback && c.addr.ip().is_loopback()))
}

/// The direct paths of one session (module docs).
#[derive(Debug)]
pub struct PathManager {
    cfg: DirectConfig,
    agent: bool,
    created: Instant,
    policy: PathPolicy,
    peer_policy: PathPolicy,
    local: Vec<Candidate>,
    local_gen: u32,
    /// Our candidates changed since the last Candidates sent.
    local_dirty: bool,
    peer: Vec<Candidate>,
    peer_gen: Option<u32>,
    up: bool,
    nonces: NonceSource,
    round: Option<Round>,
    rounds_started: u32,
    first_round: Option<Instant>,
    last_round: Option<Instant>,
    second_done: bool,
    /// A change asks for a round (started once `min_round_gap` allows).
    want_round: bool,
    direct: BTreeMap<SocketAddr, DirectPath>,
    /// The path in use: `None` is the relay.
    current: Option<SocketAddr>,
    /// Why the session is on the relay after a round or a direct path
    /// ended ([`PathState::NoAnswer`] or [`PathState::Lost`]).
    fallback: Option<PathState>,
    last_keepalive: Instant,
    first_tunneled: Option<Instant>,
    actions: VecDeque<PathAction>,
    pub(super) counters: PathCounters,
}

impl PathManager {
    /// `nonces` gives each round's PunchNow nonce: it must be
    /// unpredictable (the session draws them from BoringSSL's RNG).
    pub fn new(cfg: DirectConfig, agent: bool, nonces: Box<dyn FnMut() -> u64 + Send>, now: Instant) -> PathManager {
        PathManager {
            cfg,
            agent,
            created: now,
            policy: PathPolicy::Auto,
            peer_policy: PathPolicy::Auto,
            local: Vec::new(),
            local_gen: 0,
            local_dirty: true,
            peer: Vec::new(),
            peer_gen: None,
            up: false,
            nonces: NonceSource(nonces),
            round: None,
            rounds_started: 0,
            first_round: None,
            last_round: None,
            second_done: false,
            want_round: false,
            direct: BTreeMap::new(),
            current: None,
            fallback: None,
            last_keepalive: now,
            first_tunneled: None,
            actions: VecDeque::new(),
            counters: PathCounters::default(),
        }
    }

    /// This end's policy (before the session is up).
    pub fn set_policy(&mut self, policy: PathPolicy) {
        self.policy = policy;
        self.local_dirty = true;
    }

    /// This end's own policy.
    pub fn own_policy(&self) -> PathPolicy {
        self.policy
    }

    /// The policy both ends' wishes leave.
    pub fn policy(&self) -> PathPolicy {
        self.policy.strictest(self.peer_policy)
    }

    /// Neither end is `relay-only`.
    fn direct_allowed(&self) -> bool {
        self.policy != PathPolicy::RelayOnly && self.peer_policy != PathPolicy::RelayOnly
    }

    /// Whether tunneled packets may go through the relay: neither end is
    /// `direct-only` (`relay-only` against `direct-only` leaves no path).
    pub fn relay_allowed(&self) -> bool {
        self.policy != PathPolicy::DirectOnly && self.peer_policy != PathPolicy::DirectOnly
    }

    /// The path in use: `None` is the relay.
    pub fn current(&self) -> Option<SocketAddr> {
        self.current
    }

    pub fn counters(&self) -> &PathCounters {
        &self.counters
    }

    /// Where the session's packets go and, on the relay, why.
    pub fn state(&self) -> PathState {
        if self.current.is_some() {
            PathState::Direct
        } else if !self.direct_allowed() {
            PathState::RelayOnly
        } else if !self.up || self.peer_gen.is_none() {
            PathState::Pending
        } else if self.peer.is_empty() {
            PathState::NoCandidates
        } else if let Some(why) = self.fallback {
            // Why it is on the relay says more than that a round runs.
            why
        } else if self.round.is_some() {
            PathState::Punching
        } else {
            PathState::Pending
        }
    }

    /// The round ends: counted by its outcome.
    fn end_round(&mut self) {
        let Some(r) = self.round.take() else { return };
        if !r.took_direct {
            self.counters.rounds_failed += 1;
            if self.current.is_none() {
                self.fallback = Some(PathState::NoAnswer);
            }
        }
    }

    /// This end's candidates, replacing the previous ones (cut to
    /// [`MAX_CANDIDATES`]). A change is announced and starts a round.
    pub fn set_candidates(&mut self, mut list: Vec<Candidate>) {
        list.sort_by_key(probe_order);
        list.dedup();
        let mut hosts = 0;
        list.retain(|c| {
            hosts += usize::from(c.kind == CandidateKind::Host);
            c.kind != CandidateKind::Host || hosts <= MAX_HOST_CANDIDATES
        });
        list.truncate(MAX_CANDIDATES);
        if list != self.local {
            self.local = list;
            self.local_dirty = true;
            self.want_round = true;
        }
    }

    /// The session is up: candidates may be exchanged.
    pub fn set_up(&mut self) {
        self.up = true;
    }

    /// The first tunneled packet of the session (time to direct counts
    /// from here).
    pub fn note_tunneled(&mut self, now: Instant) {
        self.first_tunneled.get_or_insert(now);
    }

    /// The peer's Candidates. Older or repeated generations are ignored.
    pub fn on_candidates(&mut self, generation: u32, policy: PathPolicy, list: Vec<Candidate>) {
        if self.peer_gen.is_some_and(|g| generation <= g) {
            return;
        }
        self.peer_gen = Some(generation);
        self.peer_policy = policy;
        let loopback = self.cfg.loopback;
        let mut list: Vec<Candidate> =
            list.into_iter().filter(|c| probeable(c, loopback)).take(MAX_CANDIDATES).collect();
        list.sort_by_key(probe_order);
        self.peer = list;
        self.want_round = true;
        // Paths validated toward the old candidates are validated again
        // by the next round before they are taken.
        self.direct.retain(|a, _| Some(*a) == self.current);
        if !self.direct_allowed() {
            self.end_round();
            if self.agent && self.current.is_some() {
                self.switch(None, self.last_keepalive);
            }
        }
    }

    /// Connector: the agent started round `round`.
    pub fn on_punch_now(&mut self, round: u32, nonce: u64, now: Instant) {
        if self.agent || !self.direct_allowed() {
            return;
        }
        // Rounds only go forward, and not faster than the agent may start
        // them: an agent cannot make this end punch on demand.
        let early = self.last_round.is_some_and(|t| now.saturating_duration_since(t) < self.cfg.min_round_gap);
        if round <= self.rounds_started || early {
            self.counters.rounds_refused += 1;
            return;
        }
        self.begin_round(round, nonce, now);
    }

    /// Round `number` starts now, toward the peer's candidates.
    fn begin_round(&mut self, number: u32, nonce: u64, now: Instant) {
        self.rounds_started = number;
        self.last_round = Some(now);
        let targets = self.peer.iter().map(|c| c.addr).collect();
        let interval = self.cfg.probe_first;
        self.end_round();
        // Connector: the agent may have moved before its PunchNow arrived
        // (a LAN or public address validates faster than the relay relays).
        let took_direct = self.current.is_some();
        if took_direct {
            self.counters.rounds_direct += 1;
        }
        self.round = Some(Round {
            number,
            nonce,
            started: now,
            next: now,
            interval,
            targets,
            prflx: 0,
            took_direct,
            predict: Vec::new(),
            predict_next: now,
        });
        self.counters.rounds += 1;
        self.predict_ports();
    }

    /// Port prediction's punches of the round that just began, toward
    /// the ports nearest each of the peer's server-reflexive candidates
    /// (the budget shared among them), sent [`PREDICT_BURST`] at a time.
    fn predict_ports(&mut self) {
        let srflx: Vec<SocketAddr> =
            self.peer.iter().filter(|c| c.kind == CandidateKind::ServerReflexive).map(|c| c.addr).collect();
        let Some(each) = u16::try_from(srflx.len()).ok().filter(|n| *n > 0).map(|n| self.cfg.port_prediction / n)
        else {
            return;
        };
        if let Some(r) = self.round.as_mut() {
            r.predict = srflx.into_iter().flat_map(|c| predicted_ports(c, each)).rev().collect();
        }
    }

    /// The next burst of predicted-port punches, if the round has any left.
    fn spray(&mut self, now: Instant) {
        let Some(r) = self.round.as_mut().filter(|r| !r.predict.is_empty() && now >= r.predict_next) else { return };
        for _ in 0..PREDICT_BURST {
            let Some(to) = r.predict.pop() else { break };
            self.actions.push_back(PathAction::Punch { to, round: r.number, nonce: r.nonce });
            self.counters.predicted += 1;
        }
        r.predict_next = now + PREDICT_EVERY;
    }

    /// Agent: a punch packet from `from`. One of the current round whose
    /// source is no candidate adds that source as a peer-reflexive target
    /// (the connector's NAT mapped it elsewhere than its relay saw).
    /// Returns whether it belonged to this session's round.
    /// Only a source whose IP is one the connector advertised counts (its
    /// NAT picked another port), at most [`MAX_PRFLX_PER_ROUND`] per round:
    /// the nonce is visible on the wire, so a spoofed punch must not make
    /// this end probe an address of someone else's choosing.
    pub fn on_punch(&mut self, from: SocketAddr, round: u32, nonce: u64) -> bool {
        let Some(r) = self.round.as_mut().filter(|r| r.number == round && r.nonce == nonce) else {
            return false;
        };
        let known_ip = self.peer.iter().any(|c| c.kind != CandidateKind::Host && c.addr.ip() == from.ip());
        if known_ip && !r.targets.contains(&from) && r.prflx < MAX_PRFLX_PER_ROUND {
            r.targets.push(from);
            r.prflx += 1;
        }
        true
    }

    /// Agent: quiche validated the path to `addr`; `ptos` is its probe
    /// timeouts so far. Only a target of the current round counts: quiche
    /// validates any path a PATH_RESPONSE answers, and a relay could make
    /// it validate one toward an address of its choosing.
    pub fn on_validated(&mut self, addr: SocketAddr, rtt: Duration, ptos: u64, now: Instant) {
        // The connector follows the agent's migrations; it keeps no
        // direct paths of its own.
        if !self.agent || !self.round.as_ref().is_some_and(|r| r.targets.contains(&addr)) {
            return;
        }
        let kind = self.peer.iter().find(|c| c.addr == addr).map_or(CandidateKind::PeerReflexive, |c| c.kind);
        self.direct.insert(addr, DirectPath { kind, rtt, last_rx: now, ptos, ptos_at_rx: Some(ptos) });
    }

    /// Agent: an authenticated packet came over `addr`, a path quiche
    /// validated before but this manager gave up (it went silent). During
    /// a round that probes it, this answer to a probe validates it again;
    /// outside one (a late packet) it does not.
    pub fn on_revalidated(&mut self, addr: SocketAddr, rtt: Duration, ptos: u64, now: Instant) {
        if !self.direct.contains_key(&addr) {
            self.on_validated(addr, rtt, ptos, now);
        }
    }

    /// Whether `addr` is a validated direct path in use or in reserve.
    pub fn is_validated(&self, addr: SocketAddr) -> bool {
        self.direct.contains_key(&addr)
    }

    /// Agent: quiche's RTT estimate and probe-timeout count of a
    /// validated direct path.
    pub fn on_path_stats(&mut self, addr: SocketAddr, rtt: Duration, ptos: u64) {
        if let Some(p) = self.direct.get_mut(&addr) {
            p.rtt = rtt;
            // The first look: count from here.
            p.ptos_at_rx.get_or_insert(ptos);
            p.ptos = ptos;
        }
    }

    /// Agent: the path to `addr` failed validation.
    pub fn on_failed(&mut self, addr: SocketAddr) {
        self.direct.remove(&addr);
        if self.current == Some(addr) {
            self.switch(None, self.last_keepalive);
            self.want_round = true;
        }
    }

    /// An authenticated packet arrived over `from` (`None`: a relay).
    pub fn on_rx(&mut self, from: Option<SocketAddr>, now: Instant) {
        if let Some(p) = from.and_then(|a| self.direct.get_mut(&a)) {
            p.last_rx = now;
            p.ptos_at_rx = Some(p.ptos);
        }
    }

    /// Connector: the agent moved the session to `to` (`None`: a relay).
    pub fn on_peer_migrated(&mut self, to: Option<SocketAddr>, now: Instant) {
        if self.agent || to == self.current {
            return;
        }
        self.moved(to, now);
    }

    /// The session moved to `to` (`None`: the relay): counted, and the
    /// time to direct noted at the first direct path.
    fn moved(&mut self, to: Option<SocketAddr>, now: Instant) {
        self.current = to;
        match to {
            Some(_) => {
                self.counters.to_direct += 1;
                self.fallback = None;
                if let Some(r) = self.round.as_mut().filter(|r| !r.took_direct) {
                    r.took_direct = true;
                    self.counters.rounds_direct += 1;
                }
                if self.counters.time_to_direct.is_none() {
                    // From the first tunneled packet, or, before any, from
                    // the session's start.
                    let since = now.saturating_duration_since(self.first_tunneled.unwrap_or(self.created));
                    self.counters.time_to_direct = Some(since);
                }
            }
            None => {
                self.counters.to_relay += 1;
                self.fallback = Some(PathState::Lost);
            }
        }
    }

    pub fn poll_action(&mut self) -> Option<PathAction> {
        self.actions.pop_front()
    }

    /// The next time [`PathManager::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.up {
            return None;
        }
        if self.local_dirty {
            // Candidates to announce: at once.
            return Some(self.created);
        }
        let round = self.round.as_ref().map(|r| {
            let spray = (!r.predict.is_empty()).then_some(r.predict_next);
            spray.into_iter().chain([r.next, r.started + self.cfg.round_len]).min().unwrap_or(r.next)
        });
        let start = self.next_round_start();
        let keepalive = self.current.map(|_| self.last_keepalive + self.cfg.keepalive).filter(|_| self.agent);
        let dead = self.current.and_then(|a| self.direct.get(&a)).map(|p| p.last_rx + self.cfg.direct_timeout);
        let dead = dead.filter(|_| self.agent);
        [round, start, keepalive, dead].into_iter().flatten().min()
    }

    /// When the agent starts its next round, if it wants one.
    fn next_round_start(&self) -> Option<Instant> {
        let idle = self.round.is_none() && self.current.is_none();
        if !self.agent || !self.direct_allowed() || self.peer.is_empty() || !idle {
            return None;
        }
        let gap = self.last_round.map(|t| t + self.cfg.min_round_gap);
        let wanted = if self.want_round {
            Some(gap)
        } else {
            // On the relay: the second round, then upgrade attempts.
            self.second_round_at().or(self.last_round.map(|t| t + self.cfg.upgrade_every)).map(Some)
        };
        // `None` inside: at once (no earlier round to keep a gap from).
        wanted.map(|at| match (at, gap) {
            (Some(a), Some(g)) => a.max(g),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.created,
        })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.up {
            return;
        }
        if self.local_dirty {
            self.local_dirty = false;
            self.local_gen = self.local_gen.wrapping_add(1);
            let list = if self.policy == PathPolicy::RelayOnly { Vec::new() } else { self.local.clone() };
            self.actions.push_back(PathAction::SendCandidates {
                generation: self.local_gen,
                policy: self.policy,
                list,
            });
        }
        if self.agent {
            self.agent_timers(now);
        } else {
            self.connector_timers(now);
        }
        self.spray(now);
    }

    fn agent_timers(&mut self, now: Instant) {
        if self.round.as_ref().is_some_and(|r| now >= r.started + self.cfg.round_len) {
            self.end_round();
        }
        // Failure first: a dead direct path goes, and the relay (or
        // another direct path) takes over.
        if let Some(addr) = self.current {
            let dead = |p: &DirectPath| {
                now >= p.last_rx + self.cfg.direct_timeout
                    || p.ptos.saturating_sub(p.ptos_at_rx.unwrap_or(p.ptos)) >= self.cfg.pto_failover
            };
            if self.direct.get(&addr).is_none_or(dead) {
                // Every direct path is validated again by a round before it
                // is taken: the others went unheard all this time too.
                self.direct.clear();
                self.counters.direct_timeouts += 1;
                self.switch(None, now);
                self.want_round = true;
            }
        }
        if self.next_round_start().is_some_and(|t| t <= now) {
            self.start_round(now);
        }
        if let Some(best) = self.best() {
            if self.better_than_current(best) {
                self.switch(Some(best), now);
            }
        }
        if self.current.is_some() && now >= self.last_keepalive + self.cfg.keepalive {
            self.last_keepalive = now;
            self.actions.push_back(PathAction::Keepalive);
        }
        // A round runs its full length even once a path is taken: a
        // better one (the LAN, IPv6) may validate later.
        let Some(r) = self.round.as_mut() else { return };
        if now >= r.started + self.cfg.round_len {
            self.end_round();
            return;
        }
        if now >= r.next {
            for &t in &r.targets {
                if !self.direct.contains_key(&t) {
                    self.actions.push_back(PathAction::Probe(t));
                    self.counters.probes += 1;
                }
            }
            r.next = now + r.interval;
            r.interval = (r.interval * 2).min(self.cfg.probe_max);
        }
    }

    fn connector_timers(&mut self, now: Instant) {
        let Some(r) = self.round.as_mut() else { return };
        if now >= r.started + self.cfg.round_len {
            self.end_round();
            return;
        }
        if now >= r.next {
            for &to in &r.targets {
                self.actions.push_back(PathAction::Punch { to, round: r.number, nonce: r.nonce });
                self.counters.punches += 1;
            }
            r.next = now + r.interval;
            r.interval = (r.interval * 2).min(self.cfg.probe_max);
        }
    }

    /// When the round 31 s after the first is due, until it ran.
    fn second_round_at(&self) -> Option<Instant> {
        self.first_round.filter(|_| !self.second_done).map(|t| t + self.cfg.second_round)
    }

    fn start_round(&mut self, now: Instant) {
        self.want_round = false;
        if self.second_round_at().is_some_and(|t| t <= now) {
            self.second_done = true;
        }
        self.first_round.get_or_insert(now);
        let (number, nonce) = (self.rounds_started.wrapping_add(1), (self.nonces.0)());
        self.begin_round(number, nonce, now);
        self.actions.push_back(PathAction::SendPunchNow { round: number, nonce });
    }

    /// The best validated direct path.
    fn best(&self) -> Option<SocketAddr> {
        if !self.direct_allowed() {
            return None;
        }
        self.direct.iter().min_by_key(|(a, p)| (class(p.kind, **a), p.rtt)).map(|(a, _)| *a)
    }

    fn better_than_current(&self, cand: SocketAddr) -> bool {
        let Some(cur) = self.current else { return true };
        if cur == cand {
            return false;
        }
        let (Some(c), Some(n)) = (self.direct.get(&cur), self.direct.get(&cand)) else { return true };
        let (cc, nc) = (class(c.kind, cur), class(n.kind, cand));
        nc < cc || (nc == cc && n.rtt.as_secs_f64() < c.rtt.as_secs_f64() * self.cfg.rtt_hysteresis)
    }

    /// Agent: moves the session (`None`: to the relay).
    fn switch(&mut self, to: Option<SocketAddr>, now: Instant) {
        if to == self.current {
            return;
        }
        self.actions.push_back(PathAction::Migrate(to));
        self.moved(to, now);
        if to.is_some() {
            self.last_keepalive = now;
        }
        if let Some(p) = to.and_then(|a| self.direct.get_mut(&a)) {
            // Heard from now on: it was validated just now.
            p.last_rx = now;
            p.ptos_at_rx = Some(p.ptos);
        }
    }
}

#[cfg(test)]
#[path = "paths_tests.rs"]
mod tests;
