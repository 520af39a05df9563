//! The load generator shared by every target: payload format, pacing, the
//! in-flight window, RTT histogram and progress lines. A [`Transport`]
//! carries the payloads (QUIC clients of a relay, or plain UDP sockets of
//! the forwarder); this module never touches a socket itself.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Bytes of the payload header: sequence number, send time, agent index.
pub const PAYLOAD_HEADER: usize = 20;
/// Default in-flight window per agent in flat-out mode.
pub const DEFAULT_WINDOW: u64 = 256;
/// An unanswered datagram older than this stops counting against the
/// window (it still counts as lost unless it arrives before the end).
pub const WINDOW_EXPIRY: Duration = Duration::from_millis(250);
/// How long the generator waits for stragglers after the send phase.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// What load to offer.
#[derive(Debug, Clone, Serialize)]
pub struct LoadConfig {
    pub agents: usize,
    pub connectors: usize,
    /// Datagram payload bytes (at least [`PAYLOAD_HEADER`]).
    pub size: usize,
    /// Datagrams per second over all agents; 0 = flat out (window-bound).
    pub rate: u64,
    /// Length of the send phase.
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
    /// Outstanding datagrams per agent in flat-out mode.
    pub window: u64,
    /// QUIC clients send with UDP GSO (see `ClientSetup::gso`).
    pub client_gso: bool,
    /// Clients receive with UDP GRO (see `ClientSetup::gro`).
    pub client_gro: bool,
    /// Stop each agent after this many datagrams (the demo).
    pub max_per_agent: Option<u64>,
    /// Wait for stragglers after the send phase (ends early when nothing
    /// is outstanding).
    #[serde(serialize_with = "ser_secs")]
    pub grace: Duration,
    /// Print a progress line each second on stderr.
    #[serde(skip)]
    pub progress: bool,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            agents: 4,
            connectors: 1,
            size: 1200,
            rate: 0,
            duration: Duration::from_secs(5),
            window: DEFAULT_WINDOW,
            client_gso: true,
            client_gro: true,
            max_per_agent: None,
            grace: DEFAULT_GRACE,
            progress: true,
        }
    }
}

impl LoadConfig {
    pub fn validate(&self) -> Result<()> {
        if self.agents == 0 || self.connectors == 0 {
            bail!("need at least one agent and one connector");
        }
        if self.size < PAYLOAD_HEADER {
            bail!("--size must be at least {PAYLOAD_HEADER} bytes (sequence, timestamp, agent)");
        }
        if self.window == 0 {
            bail!("--window must be positive");
        }
        Ok(())
    }
}

/// Writes the payload header into `buf` (the rest is left as is).
pub fn encode_payload(buf: &mut [u8], seq: u64, sent_ns: u64, agent: u32) {
    if let Some(h) = buf.get_mut(..PAYLOAD_HEADER) {
        h[..8].copy_from_slice(&seq.to_le_bytes());
        h[8..16].copy_from_slice(&sent_ns.to_le_bytes());
        h[16..20].copy_from_slice(&agent.to_le_bytes());
    }
}

/// Reads `(seq, sent_ns, agent)` from a payload.
pub fn decode_payload(buf: &[u8]) -> Option<(u64, u64, u32)> {
    let h = buf.get(..PAYLOAD_HEADER)?;
    let seq = u64::from_le_bytes(h[..8].try_into().ok()?);
    let ts = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let agent = u32::from_le_bytes(h[16..20].try_into().ok()?);
    Some((seq, ts, agent))
}

/// Carries datagrams between agents and echoing connectors.
pub trait Transport {
    /// Descriptors that become readable when there is something to receive.
    fn fds(&self) -> Vec<RawFd>;
    /// Earliest protocol timer (QUIC loss recovery, keep-alive).
    fn next_deadline(&self) -> Option<Instant>;
    /// Receives what is waiting, runs due timers, lets connectors echo, and
    /// hands each payload an agent received to `on_echo(agent, payload)`.
    /// `ready` is the result of the last wait, in [`Transport::fds`] order:
    /// descriptors it does not mark readable need not be read (`None`:
    /// read them all).
    fn receive(&mut self, ready: Option<&[libc::pollfd]>, on_echo: &mut dyn FnMut(usize, &[u8]));
    /// Queues a datagram from `agent`; `false` means back-pressure (nothing
    /// was queued; try again after the next receive).
    fn send(&mut self, agent: usize, payload: &[u8]) -> bool;
    /// Puts queued packets on the wire.
    fn flush(&mut self);
    /// Echoes connectors could not send (their queue or socket was full).
    fn echo_drops(&self) -> u64 {
        0
    }
}

/// True unless the last wait says descriptor `i` has nothing to read.
pub fn is_ready(ready: Option<&[libc::pollfd]>, i: usize) -> bool {
    ready.is_none_or(|r| r.get(i).is_none_or(|p| p.revents != 0))
}

/// Growable bit set indexed by sequence number.
#[derive(Debug, Default)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn get(&self, i: u64) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; returns whether it was clear.
    fn set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        match self.0.get_mut(w) {
            Some(word) => {
                let was = *word & (1 << (i % 64)) != 0;
                *word |= 1 << (i % 64);
                !was
            }
            None => false,
        }
    }
}

/// One agent's sequence space and window.
#[derive(Debug, Default)]
struct AgentTrack {
    next_seq: u64,
    /// Lowest sequence number still counted against the window.
    front_seq: u64,
    /// Send times (ns) of `front_seq..next_seq`.
    sent_at: VecDeque<u64>,
    received: BitSet,
    outstanding: u64,
    rx: u64,
    duplicates: u64,
    misrouted: u64,
}

impl AgentTrack {
    fn on_send(&mut self, now_ns: u64) {
        self.sent_at.push_back(now_ns);
        self.next_seq += 1;
        self.outstanding += 1;
    }

    /// Returns true if this is a new, valid echo.
    fn on_recv(&mut self, seq: u64) -> bool {
        if seq >= self.next_seq {
            self.misrouted += 1;
            return false;
        }
        if !self.received.set(seq) {
            self.duplicates += 1;
            return false;
        }
        self.rx += 1;
        if seq >= self.front_seq {
            self.outstanding = self.outstanding.saturating_sub(1);
        }
        true
    }

    /// Stops counting answered or long-unanswered datagrams.
    fn expire(&mut self, now_ns: u64, expiry_ns: u64) {
        while let Some(&t) = self.sent_at.front() {
            let answered = self.received.get(self.front_seq);
            if !answered && now_ns.saturating_sub(t) < expiry_ns {
                break;
            }
            if !answered {
                self.outstanding = self.outstanding.saturating_sub(1);
            }
            self.sent_at.pop_front();
            self.front_seq += 1;
        }
    }
}

/// RTT percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RttSummary {
    pub samples: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl RttSummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return RttSummary::default();
        }
        RttSummary {
            samples: h.len(),
            min_us: h.min(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Per-agent outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentResult {
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    /// Echoes that carried another agent's index or an unsent sequence.
    pub misrouted: u64,
}

/// What the generator observed.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub misrouted: u64,
    /// Send attempts refused by back-pressure (flat out: the normal way
    /// the window meets the transport's queue).
    pub backpressure: u64,
    /// Rate-mode sends skipped because the generator fell behind.
    pub skipped: u64,
    pub echo_drops: u64,
    /// Length of the send phase as run.
    pub send_secs: f64,
    /// Send phase plus the wait for stragglers.
    pub total_secs: f64,
    pub round_trips_per_sec: f64,
    pub rtt: RttSummary,
    pub per_agent: Vec<AgentResult>,
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

/// A reading of the system under test, taken at phase boundaries and for
/// progress lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Datagrams the target forwarded so far (if it can tell).
    pub forwarded: Option<u64>,
    /// CPU time the target used so far (if known).
    pub cpu: Option<Duration>,
    /// CPU time of this whole process (in-process targets: target plus
    /// load generator).
    pub process_cpu: Option<Duration>,
}

impl Sample {
    /// A sample of an in-process target: its counters plus this process's
    /// CPU time.
    pub fn in_process(forwarded: u64, cpu: Duration) -> Self {
        Sample {
            forwarded: Some(forwarded),
            cpu: Some(cpu),
            process_cpu: crate::cpu::process_cpu_time(std::process::id()).ok(),
        }
    }
}

/// Samples the target at the start of the send phase, at its end, and
/// after the grace period.
#[derive(Debug, Clone, Copy, Default)]
pub struct Samples {
    pub start: Sample,
    pub send_end: Sample,
    pub end: Sample,
}

/// Waits until one of `fds` is readable or `timeout` passes (nanosecond
/// resolution, unlike poll(2)).
pub fn wait_readable(fds: &mut [libc::pollfd], timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is a live, correctly sized slice of pollfd; `ts` lives
    // for the call; a null sigmask leaves the mask unchanged.
    unsafe {
        libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null());
    }
}

/// Runs the load through `t`. `probe` reads the target's counters.
pub fn run_load(
    t: &mut dyn Transport,
    cfg: &LoadConfig,
    probe: &mut dyn FnMut() -> Sample,
) -> Result<(LoadResult, Samples)> {
    cfg.validate()?;
    let epoch = Instant::now();
    let ns = |i: Instant| i.saturating_duration_since(epoch).as_nanos() as u64;
    let expiry_ns = WINDOW_EXPIRY.as_nanos() as u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tracks: Vec<AgentTrack> = (0..cfg.agents).map(|_| AgentTrack::default()).collect();
    let mut payload = vec![0u8; cfg.size];
    let mut pfds: Vec<libc::pollfd> =
        t.fds().into_iter().map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let (mut backpressure, mut skipped, mut attempts) = (0u64, 0u64, 0u64);
    let mut next_agent = 0usize;
    let mut waited = false;

    let mut samples = Samples { start: probe(), ..Samples::default() };
    let start = Instant::now();
    let send_end = start + cfg.duration;
    let mut hard_end = send_end + cfg.grace;
    let mut in_grace = false;
    let mut send_phase_end = send_end;
    let mut next_progress = start + Duration::from_secs(1);
    let progress = crate::progress::Progress::new(cfg.duration, cfg.progress);
    let mut last_progress = (start, 0u64, 0u64, samples.start.forwarded.unwrap_or(0));
    // Rate mode: no burst larger than 10 ms worth of sends.
    let max_debt = (cfg.rate / 100).max(1);

    loop {
        // Receive echoes.
        {
            let tracks = &mut tracks;
            let hist = &mut hist;
            let ready = if std::mem::take(&mut waited) { Some(&pfds[..]) } else { None };
            t.receive(ready, &mut |agent, p| {
                let now = ns(Instant::now());
                let Some(track) = tracks.get_mut(agent) else { return };
                match decode_payload(p) {
                    Some((seq, sent, a)) if a as usize == agent && p.len() == cfg.size => {
                        if track.on_recv(seq) {
                            let _ = hist.record((now.saturating_sub(sent) / 1000).max(1));
                        }
                    }
                    _ => track.misrouted += 1,
                }
            });
        }
        let now = Instant::now();
        let now_ns = ns(now);
        for tr in &mut tracks {
            tr.expire(now_ns, expiry_ns);
        }
        let all_done =
            |tracks: &[AgentTrack]| cfg.max_per_agent.is_some_and(|m| tracks.iter().all(|tr| tr.next_seq >= m));

        // Send.
        let mut more_to_send = false;
        if now < send_end && !all_done(&tracks) {
            if cfg.rate > 0 {
                let due =
                    (now.saturating_duration_since(start).as_nanos() * u128::from(cfg.rate) / 1_000_000_000) as u64;
                if due.saturating_sub(attempts) > max_debt {
                    skipped += due - attempts - max_debt;
                    attempts = due - max_debt;
                }
                let mut refused = 0;
                while attempts < due && refused < cfg.agents {
                    let a = next_agent % cfg.agents;
                    next_agent = next_agent.wrapping_add(1);
                    let Some(tr) = tracks.get_mut(a) else { break };
                    if cfg.max_per_agent.is_some_and(|m| tr.next_seq >= m) {
                        refused += 1;
                        continue;
                    }
                    encode_payload(&mut payload, tr.next_seq, ns(Instant::now()), a as u32);
                    if t.send(a, &payload) {
                        tr.on_send(now_ns);
                        attempts += 1;
                        refused = 0;
                    } else {
                        backpressure += 1;
                        refused += 1;
                    }
                }
            } else {
                for (a, tr) in tracks.iter_mut().enumerate() {
                    let limit = cfg.max_per_agent.unwrap_or(u64::MAX);
                    // Bounded per turn so receiving is not starved.
                    let mut burst = 0;
                    while tr.outstanding < cfg.window && tr.next_seq < limit && burst < 64 {
                        encode_payload(&mut payload, tr.next_seq, ns(Instant::now()), a as u32);
                        if !t.send(a, &payload) {
                            backpressure += 1;
                            break;
                        }
                        tr.on_send(now_ns);
                        burst += 1;
                    }
                    if burst == 64 {
                        more_to_send = true;
                    }
                }
            }
        }
        t.flush();

        // Phase changes.
        let now = Instant::now();
        if !in_grace && (now >= send_end || all_done(&tracks)) {
            in_grace = true;
            samples.send_end = probe();
            send_phase_end = now.min(send_end);
            hard_end = send_phase_end + cfg.grace;
        }
        let outstanding: u64 = tracks.iter().map(|tr| tr.outstanding).sum();
        if in_grace {
            let unanswered: u64 = tracks.iter().map(|tr| tr.next_seq - tr.rx).sum();
            if unanswered == 0 || now >= hard_end {
                break;
            }
        }

        // Progress.
        if cfg.progress && now >= next_progress {
            let s = probe();
            let sent: u64 = tracks.iter().map(|tr| tr.next_seq).sum();
            let rx: u64 = tracks.iter().map(|tr| tr.rx).sum();
            let dt = now.saturating_duration_since(last_progress.0).as_secs_f64().max(1e-9);
            let fwd = s
                .forwarded
                .map_or(String::new(), |f| format!(" fwd/s {:>9.0}", f.saturating_sub(last_progress.3) as f64 / dt));
            let loss = if sent > 0 { 100.0 * sent.saturating_sub(rx) as f64 / sent as f64 } else { 0.0 };
            let line = format!(
                "sent {:>9} echoed {:>9} rt/s {:>9.0}{} in-flight {:>5} unanswered {:.2}%",
                sent,
                rx,
                rx.saturating_sub(last_progress.2) as f64 / dt,
                fwd,
                outstanding,
                loss
            );
            progress.update(now.saturating_duration_since(start), &line);
            last_progress = (now, sent, rx, s.forwarded.unwrap_or(last_progress.3));
            next_progress += Duration::from_secs(1);
        }

        // Wait.
        if more_to_send {
            continue;
        }
        let mut until = [Some(next_progress), t.next_deadline(), Some(hard_end)].into_iter().flatten().min();
        if !in_grace {
            until = until.map(|u| u.min(send_end));
            if cfg.rate > 0 {
                // First instant at which `due` exceeds `attempts`.
                let ns = (u128::from(attempts) + 1) * 1_000_000_000;
                let next_due = start + Duration::from_nanos(ns.div_ceil(u128::from(cfg.rate)) as u64);
                until = until.map(|u| u.min(next_due));
            }
        }
        let timeout = until.map_or(Duration::from_millis(1), |u| u.saturating_duration_since(now));
        if !timeout.is_zero() {
            wait_readable(&mut pfds, timeout.min(Duration::from_millis(100)));
            waited = true;
        }
    }
    samples.end = probe();
    progress.finish();
    let end = Instant::now();

    let sent: u64 = tracks.iter().map(|tr| tr.next_seq).sum();
    let received: u64 = tracks.iter().map(|tr| tr.rx).sum();
    let lost = sent.saturating_sub(received);
    let send_secs = send_phase_end.saturating_duration_since(start).as_secs_f64().max(1e-9);
    let result = LoadResult {
        sent,
        received,
        lost,
        loss_pct: if sent > 0 { 100.0 * lost as f64 / sent as f64 } else { 0.0 },
        duplicates: tracks.iter().map(|tr| tr.duplicates).sum(),
        misrouted: tracks.iter().map(|tr| tr.misrouted).sum(),
        backpressure,
        skipped,
        echo_drops: t.echo_drops(),
        send_secs,
        total_secs: end.saturating_duration_since(start).as_secs_f64(),
        round_trips_per_sec: received as f64 / send_secs,
        rtt: RttSummary::from_histogram(&hist),
        per_agent: tracks
            .iter()
            .map(|tr| AgentResult {
                sent: tr.next_seq,
                received: tr.rx,
                duplicates: tr.duplicates,
                misrouted: tr.misrouted,
            })
            .collect(),
        histogram: Some(hist),
    };
    Ok((result, samples))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrip() {
        let mut b = vec![0u8; 64];
        encode_payload(&mut b, 7, 123_456, 3);
        assert_eq!(decode_payload(&b), Some((7, 123_456, 3)));
        assert_eq!(decode_payload(&b[..10]), None);
    }

    #[test]
    fn window_accounting() {
        let mut tr = AgentTrack::default();
        for i in 0..4 {
            tr.on_send(i * 10);
        }
        assert_eq!(tr.outstanding, 4);
        assert!(tr.on_recv(1));
        assert!(!tr.on_recv(1), "duplicate");
        assert!(!tr.on_recv(9), "never sent");
        assert_eq!(tr.outstanding, 3);
        // seq 0 (sent at 0) expires at 100; seq 1 is answered.
        tr.expire(100, 100);
        assert_eq!((tr.front_seq, tr.outstanding), (2, 2));
        // A late echo of the expired seq 0 counts as received, not twice
        // against the window.
        assert!(tr.on_recv(0));
        assert_eq!((tr.rx, tr.outstanding), (2, 2));
        assert!(tr.on_recv(2) && tr.on_recv(3));
        assert_eq!(tr.outstanding, 0);
        tr.expire(100, 1000);
        assert!(tr.sent_at.is_empty());
    }

    /// An in-memory echo transport: every send comes back on the next receive.
    struct Loopback {
        queued: Vec<(usize, Vec<u8>)>,
        cap: usize,
    }

    impl Transport for Loopback {
        fn fds(&self) -> Vec<RawFd> {
            Vec::new()
        }
        fn next_deadline(&self) -> Option<Instant> {
            None
        }
        fn receive(&mut self, _: Option<&[libc::pollfd]>, on_echo: &mut dyn FnMut(usize, &[u8])) {
            for (a, p) in self.queued.drain(..) {
                on_echo(a, &p);
            }
        }
        fn send(&mut self, agent: usize, payload: &[u8]) -> bool {
            if self.queued.len() >= self.cap {
                return false;
            }
            self.queued.push((agent, payload.to_vec()));
            true
        }
        fn flush(&mut self) {}
    }

    #[test]
    fn loopback_rate_and_count() {
        let mut t = Loopback { queued: Vec::new(), cap: 1000 };
        let cfg = LoadConfig {
            agents: 2,
            rate: 2000,
            duration: Duration::from_millis(300),
            size: 32,
            progress: false,
            ..LoadConfig::default()
        };
        let (r, _) = run_load(&mut t, &cfg, &mut Sample::default).unwrap();
        assert!(r.sent >= 500 && r.sent <= 700, "about 600 sent at 2000/s: {}", r.sent);
        assert_eq!((r.received, r.lost, r.misrouted), (r.sent, 0, 0));
        let cfg = LoadConfig { agents: 3, max_per_agent: Some(50), window: 8, progress: false, ..cfg };
        let (r, _) = run_load(&mut t, &cfg, &mut Sample::default).unwrap();
        assert_eq!(r.sent, 150);
        assert!(r.per_agent.iter().all(|a| a.received == 50));
    }
}
