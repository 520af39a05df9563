//! One relay worker: the QUIC connections whose CIDs it issued, its replica
//! of the service directory and its side of the mesh. Backend-agnostic: an
//! I/O driver (`io::uring` or `io::portable`) feeds it packets and inbox
//! wake-ups and drains its transmits. Nothing here blocks or takes a lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use ztna_control::datagram;
use ztna_control::identity::{Identity, Kind};
use ztna_control::wire::{self, FrameDecoder, Message, Role};
use ztna_control::Code;

use crate::budget::{self, BudgetShare};
use crate::cid::{self, CID_LEN};
use crate::mesh::{Ctrl, Data, Mesh};
use crate::ratelimit::TokenBucket;
use crate::routing::{AgentIndex, Binding, ConnKey, Directory, Flow, FlowTable, Serving};
use crate::security::{RetryMode, Security, Shared};
use crate::stats::WorkerStats;

/// Stream carrying the control channel.
const CONTROL_STREAM: u64 = 0;
/// Spare CIDs each connection is offered for migration.
const SPARE_CIDS: usize = 3;
/// Inbox data messages handled per loop turn (keeps the socket serviced).
const INBOX_BATCH: usize = 4096;
/// Smallest UDP payload that may carry a client Initial (RFC 9000 §14.1).
const MIN_INITIAL_LEN: usize = 1200;
/// How long a connection that failed keeps running so its Error message
/// reaches the client before CONNECTION_CLOSE (quiche sends no stream data
/// once closing).
const ERROR_LINGER: Duration = Duration::from_millis(100);
/// Connectors tried for one agent flow before the registration is refused.
const MAX_BIND_ATTEMPTS: u8 = 4;
/// What one connection is charged to the memory budget for its own state
/// (quiche connection, TLS, flow table), from its first Initial on. A
/// half-open connection was measured at 30.5 KiB (issue 10, finding 7).
pub const CONN_CHARGE: u64 = 32 * 1024;
/// A destination whose DATAGRAM send queue holds less than this still
/// gets datagrams when the budget is exhausted: receivers that acknowledge
/// keep short queues and keep working; the ones that let their queue grow
/// (they stop acknowledging) are the ones refused.
const DGRAM_QUEUE_FLOOR: usize = 16 * 1024;
/// New connections are refused once the budget is this full (the rest is
/// left to established sessions).
const NEW_CONN_PERCENT: u64 = 90;
/// `retry = "auto"` demands Retry from every new connection once the
/// budget is this full, whatever the handshake rate.
const RETRY_PRESSURE_PERCENT: u64 = 50;
/// Below this, releases are not worth a trim.
const PAGE_BYTES: u64 = 64 * 1024;
/// Amplification limit before an address is validated (RFC 9000 §8.1).
const AMPLIFICATION_FACTOR: u64 = 3;
/// Budget released since the last trim after which freed heap is given
/// back to the system (at most once per [`TRIM_INTERVAL`]).
const TRIM_AFTER_BYTES: u64 = 4 << 20;
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Anything released is given back at least this often (the tail of a
/// flood that ended below [`TRIM_AFTER_BYTES`]).
const TRIM_IDLE_INTERVAL: Duration = Duration::from_secs(5);

/// A QUIC CRYPTO_ERROR (0x100 + TLS alert) as a name for logs.
fn tls_alert_name(code: u64) -> &'static str {
    match code.checked_sub(0x100) {
        Some(40) => "handshake_failure",
        Some(42) => "bad_certificate",
        Some(43) => "unsupported_certificate",
        Some(44) => "certificate_revoked",
        Some(45) => "certificate_expired",
        Some(46) => "certificate_unknown",
        Some(48) => "unknown_ca",
        Some(51) => "decrypt_error",
        Some(116) => "certificate_required (no client certificate)",
        Some(120) => "no_application_protocol",
        Some(0..=255) => "other TLS alert",
        _ => "transport error",
    }
}

/// An address as clients should see it (IPv4-mapped IPv6 → IPv4).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Per-relay limits (each counted when hit).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections per worker.
    pub max_conns_per_worker: usize,
    /// Registrations (agent flows + connector services) per connection.
    pub max_registrations: usize,
    /// Flow-table entries per connection (connector legs included).
    pub max_flows_per_conn: usize,
    /// Unsent control bytes the relay keeps for a client that does not read.
    pub max_control_backlog: usize,
    /// Register/Unregister operations per second per connection (sustained;
    /// bursts up to `max_registrations`). Beyond it: RegisterError{limit}.
    pub registrations_per_sec: u32,
    /// Open connections over all workers.
    pub max_conns: usize,
    /// When new connections must first prove their address with Retry.
    pub retry: RetryMode,
    /// `RetryMode::Auto`: new handshakes per second per worker above which
    /// Retry is required.
    pub retry_above_handshakes_per_sec: u32,
    /// Datagrams per second (sustained, one second of burst) a connection
    /// without connector registrations may send. 0 = unlimited.
    pub agent_datagrams_per_sec: u32,
    /// Payload bytes per second for the same.
    pub agent_bytes_per_sec: u64,
    /// Datagrams per second a connector connection may send.
    pub connector_datagrams_per_sec: u32,
    /// Payload bytes per second for the same.
    pub connector_bytes_per_sec: u64,
    /// Stateless resets per second per worker.
    pub stateless_resets_per_sec: u32,
    /// A connection that has not completed its handshake this long after
    /// its first Initial is dropped silently (half-open flood protection;
    /// the QUIC idle timeout alone would keep it 30 s).
    pub handshake_timeout: Duration,
    /// Bytes a connection's DATAGRAM send queue may hold; a datagram that
    /// would exceed it is dropped (`drop_dgram_queue_full`), so a receiver
    /// that stops acknowledging loses only its own datagrams.
    pub max_dgram_queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns_per_worker: 50_000,
            max_registrations: 64,
            max_flows_per_conn: 65_536,
            max_control_backlog: 256 * 1024,
            registrations_per_sec: 10,
            max_conns: 100_000,
            retry: RetryMode::Auto,
            retry_above_handshakes_per_sec: 200,
            agent_datagrams_per_sec: 100_000,
            agent_bytes_per_sec: 125_000_000,
            connector_datagrams_per_sec: 1_000_000,
            connector_bytes_per_sec: 1_250_000_000,
            stateless_resets_per_sec: 100,
            handshake_timeout: Duration::from_secs(10),
            max_dgram_queue_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    fn dgram_buckets(&self, connector: bool, now: Instant) -> (TokenBucket, TokenBucket) {
        let (n, b) = if connector {
            (self.connector_datagrams_per_sec, self.connector_bytes_per_sec)
        } else {
            (self.agent_datagrams_per_sec, self.agent_bytes_per_sec)
        };
        (TokenBucket::new(f64::from(n), f64::from(n), now), TokenBucket::new(b as f64, b as f64, now))
    }
}

/// Static configuration of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub index: usize,
    pub workers: usize,
    pub node_id: u16,
    pub local_addr: SocketAddr,
    pub limits: Limits,
}

/// Where a worker writes packets to send.
pub trait Transmit {
    /// A buffer for the next packet (at least the max UDP payload).
    fn buf(&mut self) -> &mut [u8];
    /// Sends the first `len` bytes of the last [`Transmit::buf`] to `to`.
    fn commit(&mut self, len: usize, to: SocketAddr);
}

/// Fixed-size key for the CID map (no allocation per lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CidKey {
    len: u8,
    bytes: [u8; quiche::MAX_CONN_ID_LEN],
}

impl CidKey {
    fn new(cid: &[u8]) -> Option<CidKey> {
        let mut bytes = [0u8; quiche::MAX_CONN_ID_LEN];
        bytes.get_mut(..cid.len())?.copy_from_slice(cid);
        Some(CidKey { len: cid.len() as u8, bytes })
    }
}

/// What `accept` needs of a client Initial's header.
struct Initial {
    dcid: Vec<u8>,
    scid: Vec<u8>,
    token: Vec<u8>,
    version: u32,
}

struct Conn {
    quic: quiche::Connection,
    key: ConnKey,
    peer: SocketAddr,
    hello: bool,
    rx: FrameDecoder,
    tx: Vec<u8>,
    flows: FlowTable,
    cids: Vec<CidKey>,
    timer: Option<Instant>,
    dirty: bool,
    /// Close with this code once the instant passes (after Error/Goodbye).
    close_at: Option<(Instant, Code)>,
    /// Set once the relay decided to close: nothing the peer sends is
    /// processed any more (never cleared).
    stopped: bool,
    /// Token bucket for Register/Unregister: (tokens, last refill).
    reg_tokens: (f64, Instant),
    /// The SPIFFE ID of the client certificate (set once established).
    identity: Option<Identity>,
    /// `identity` as a URI, shared with FlowOpen messages.
    identity_uri: Arc<str>,
    /// Holds connector registrations (selects the datagram limits).
    is_connector: bool,
    /// Datagram count and byte buckets.
    dgram_rate: (TokenBucket, TokenBucket),
    /// Source IP counted in the per-IP table (released on reap).
    ip: std::net::IpAddr,
    /// Until established: when the handshake must be done.
    handshake_deadline: Option<Instant>,
    /// Until the peer's address is validated (Retry token or completed
    /// handshake): bytes received from and sent to it, for the 3× limit.
    amplification: Option<(u64, u64)>,
    /// Counted once in `amplification_limited`.
    amplification_hit: bool,
    /// DATAGRAM send-queue and control-backlog bytes last charged to the
    /// memory budget.
    charged_queues: u64,
    /// Counted in the per-identity connection table (released on reap).
    identity_counted: bool,
}

/// The worker state machine.
pub struct Worker {
    cfg: WorkerConfig,
    quic_cfg: quiche::Config,
    shared: Arc<Shared>,
    security: Arc<Security>,
    generation: u64,
    /// New handshakes per second (RetryMode::Auto).
    handshake_rate: TokenBucket,
    reset_rate: TokenBucket,
    /// RetryMode::Auto: Retry stays on until then.
    retry_until: Instant,
    /// Boxed: a `quiche::Connection` is ~8 KB, and the slot vector keeps
    /// its largest length, so inline slots would pin a flood's peak memory.
    slots: Vec<Option<Box<Conn>>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    by_cid: HashMap<CidKey, u32>,
    dir: Directory,
    /// This worker's connections with an agent flow, per service.
    agents: AgentIndex,
    mesh: Arc<Mesh>,
    local_ctrl: VecDeque<Ctrl>,
    outbox: Vec<VecDeque<Ctrl>>,
    wake: Vec<bool>,
    timers: BTreeSet<(Instant, u32)>,
    dirty: Vec<u32>,
    pending_tx: Vec<(Vec<u8>, SocketAddr)>,
    delivered_at: Vec<Instant>,
    scratch: Vec<u8>,
    dgram_buf: Vec<u8>,
    stats: Arc<WorkerStats>,
    latency: metrics::Histogram,
    shutting_down: bool,
    /// Draining: Goodbye{DRAINING} sent, no new connections, forwarding
    /// goes on for the clients that have not left yet.
    draining: bool,
    /// The `now` of the current entry point.
    now: Instant,
    /// This worker's part of the relay-wide memory budget.
    budget: BudgetShare,
    /// Budget released since freed heap was last given back.
    released: u64,
    last_trim: Instant,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // BoringSSL's CSPRNG; it cannot fail short of an aborted process.
    let _ = boring::rand::rand_bytes(&mut b);
    b
}

impl Worker {
    /// A worker with its quiche config built from the current security
    /// snapshot (fails only on TLS material BoringSSL refuses).
    pub fn new(
        cfg: WorkerConfig,
        shared: Arc<Shared>,
        mesh: Arc<Mesh>,
        stats: Arc<WorkerStats>,
    ) -> anyhow::Result<Self> {
        let n = mesh.len();
        let latency = metrics::histogram!("ztna_relay_forward_latency_seconds", "worker" => cfg.index.to_string());
        let (generation, security) = shared.security.current();
        // CIDs carry cfg.node_id; the reset key answers only its own.
        anyhow::ensure!(cfg.node_id == security.reset.node_id(), "worker node id is not the reset key's");
        let quic_cfg = security.tls.server_config(Arc::clone(&stats))?;
        let now = Instant::now();
        let hs = f64::from(cfg.limits.retry_above_handshakes_per_sec);
        let resets = f64::from(cfg.limits.stateless_resets_per_sec.max(1));
        Ok(Worker {
            handshake_rate: TokenBucket::new(hs.max(1.0), hs.max(1.0), now),
            reset_rate: TokenBucket::new(resets, resets, now),
            retry_until: now,
            cfg,
            quic_cfg,
            shared,
            security,
            generation,
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            by_cid: HashMap::new(),
            dir: Directory::default(),
            agents: AgentIndex::default(),
            mesh,
            local_ctrl: VecDeque::new(),
            outbox: (0..n).map(|_| VecDeque::new()).collect(),
            wake: vec![false; n],
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            pending_tx: Vec::new(),
            delivered_at: Vec::new(),
            scratch: Vec::with_capacity(2048),
            dgram_buf: vec![0u8; 65_536],
            stats,
            latency,
            shutting_down: false,
            draining: false,
            now,
            budget: BudgetShare::default(),
            released: 0,
            last_trim: now,
        })
    }

    pub fn index(&self) -> usize {
        self.cfg.index
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Open connections.
    pub fn conn_count(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// A packet read from this worker's socket.
    pub fn handle_packet(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        self.now = now;
        self.stats.packets_rx.fetch_add(1, Ordering::Relaxed);
        let Some(owner) = cid::owner(buf, self.cfg.workers) else {
            self.stats.drop_bad_packet.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if owner != self.cfg.index {
            // Steering missed (no BPF, or the worker count changed): hand the
            // packet to its owner instead of dropping it.
            let msg =
                Data::Packet { from, bytes: self.mesh.buffer(self.cfg.index, buf), sender: self.cfg.index as u16 };
            if let Some(inbox) = self.mesh.inboxes.get(owner) {
                if inbox.data.push(msg).is_ok() {
                    self.charge(buf.len() as i64);
                    self.stats.handoff_out.fetch_add(1, Ordering::Relaxed);
                    self.wake[owner] = true;
                } else {
                    self.stats.drop_handoff_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        self.process_packet(buf, from, now);
    }

    fn process_packet(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let hdr = match quiche::Header::from_slice(buf, CID_LEN) {
            Ok(h) => h,
            Err(_) => {
                self.stats.drop_bad_packet.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let slot = match CidKey::new(&hdr.dcid).and_then(|k| self.by_cid.get(&k)) {
            Some(s) => *s,
            None => {
                if hdr.ty != quiche::Type::Initial {
                    self.stats.drop_unknown_cid.fetch_add(1, Ordering::Relaxed);
                    if hdr.ty == quiche::Type::Short {
                        let dcid = hdr.dcid.to_vec();
                        self.stateless_reset(&dcid, buf.len(), from, now);
                    }
                    return;
                }
                if buf.len() < MIN_INITIAL_LEN {
                    // RFC 9000 §14.1: drop short Initials (no Version
                    // Negotiation either: it would amplify).
                    self.stats.drop_initial.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if !quiche::version_is_supported(hdr.version) {
                    let mut out = vec![0u8; 256];
                    if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut out) {
                        out.truncate(n);
                        self.pending_tx.push((out, from));
                    }
                    self.stats.drop_initial.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let initial = Initial {
                    dcid: hdr.dcid.to_vec(),
                    scid: hdr.scid.to_vec(),
                    token: hdr.token.clone().unwrap_or_default(),
                    version: hdr.version,
                };
                match self.accept(&initial, from, buf.len(), now) {
                    Some(s) => s,
                    None => return,
                }
            }
        };
        let Some(mut conn) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.stats.packets_processed.fetch_add(1, Ordering::Relaxed);
        if let Some((rx, _)) = conn.amplification.as_mut() {
            *rx += buf.len() as u64;
        }
        let info = quiche::RecvInfo { from, to: self.cfg.local_addr };
        if let Err(e) = conn.quic.recv(buf, info) {
            debug!(worker = self.cfg.index, error = %e, "packet rejected by connection");
        }
        self.after_io(&mut conn, now);
        self.put(conn);
    }

    /// Answers a short-header packet for an unknown CID with a stateless
    /// reset (rate-limited), so a client of a relay that restarted or lost
    /// the connection learns it at once instead of after the idle timeout.
    fn stateless_reset(&mut self, dcid: &[u8], len: usize, from: SocketAddr, now: Instant) {
        if !cid::is_ours(dcid, self.cfg.node_id) {
            return;
        }
        if !self.reset_rate.take(1.0, now) {
            self.stats.drop_reset_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut out = [0u8; 64];
        if let Some(n) = self.security.reset.write_reset(dcid, len, &mut out) {
            self.pending_tx.push((out[..n].to_vec(), from));
            self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends a Retry carrying a token bound to the client's address.
    fn send_retry(&mut self, initial: &Initial, from: SocketAddr, now: Instant) {
        let new_scid = cid::make(self.cfg.node_id, self.cfg.index as u8, random_bytes());
        let token = self.shared.retry_keys.mint(from, &initial.dcid, &new_scid, now);
        let mut out = vec![0u8; 256];
        let r = quiche::retry(
            &quiche::ConnectionId::from_ref(&initial.scid),
            &quiche::ConnectionId::from_ref(&initial.dcid),
            &quiche::ConnectionId::from_ref(&new_scid),
            &token,
            initial.version,
            &mut out,
        );
        if let Ok(n) = r {
            out.truncate(n);
            self.pending_tx.push((out, from));
            self.stats.retries_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A new connection for an Initial with an unknown CID, after the
    /// limits, the per-IP limits and (when required) address validation.
    fn accept(&mut self, initial: &Initial, from: SocketAddr, len: usize, now: Instant) -> Option<u32> {
        let limits = &self.cfg.limits;
        if len < MIN_INITIAL_LEN || self.shutting_down || self.draining {
            self.stats.drop_initial.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.conn_count() >= limits.max_conns_per_worker
            || self.shared.conns.load(Ordering::Relaxed) >= limits.max_conns
        {
            self.stats.drop_conn_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let budget = &self.shared.budget;
        if budget.used().saturating_add(CONN_CHARGE) > budget.limit() / 100 * NEW_CONN_PERCENT {
            // The rest of the budget belongs to established sessions.
            self.stats.drop_memory_budget.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let pressure = budget.percent_used() >= RETRY_PRESSURE_PERCENT;
        // Address validation. A token is only ever present in answer to our
        // Retry, so it is checked whatever the mode.
        let (scid, odcid) = if initial.token.is_empty() {
            let retry = match limits.retry {
                RetryMode::Always => true,
                RetryMode::Off => false,
                RetryMode::Auto => {
                    // Once over the rate, stay on for a second: a client's
                    // first flight may span two Initial datagrams, and the
                    // second must not open a connection its first was
                    // refused (it would hold a ClientHello fragment).
                    // Under memory pressure, too: a half-open connection
                    // costs [`CONN_CHARGE`], a Retry nothing.
                    if !self.handshake_rate.take(1.0, now) || pressure {
                        self.retry_until = now + Duration::from_secs(1);
                    }
                    now < self.retry_until
                }
            };
            if retry {
                self.send_retry(initial, from, now);
                return None;
            }
            (cid::make(self.cfg.node_id, self.cfg.index as u8, random_bytes()), None)
        } else {
            match self.shared.retry_keys.validate(&initial.token, from, &initial.dcid, now) {
                Ok(odcid) => {
                    // The MAC covers the DCID, so it is the CID our Retry
                    // minted (this worker's).
                    let mut scid = [0u8; CID_LEN];
                    if initial.dcid.len() != CID_LEN {
                        self.stats.drop_bad_token.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    scid.copy_from_slice(&initial.dcid);
                    (scid, Some(odcid.to_vec()))
                }
                Err(e) => {
                    debug!(worker = self.cfg.index, %from, error = ?e, "Retry token refused");
                    self.stats.drop_bad_token.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        };
        let ip = from.ip();
        let per_ip = &self.shared.per_ip;
        let secs = u32::try_from(now.saturating_duration_since(self.shared.started).as_secs()).unwrap_or(u32::MAX);
        if !per_ip.allow_handshake(ip, secs) {
            self.stats.drop_ip_handshake_rate.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !per_ip.try_open(ip) {
            self.stats.drop_ip_conn_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.quic_cfg.set_stateless_reset_token(Some(self.security.reset.token(&scid)));
        let odcid_ref = odcid.as_deref().map(quiche::ConnectionId::from_ref);
        let quic = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            odcid_ref.as_ref(),
            self.cfg.local_addr,
            from,
            &mut self.quic_cfg,
        ) {
            Ok(q) => q,
            Err(_) => {
                per_ip.close(ip);
                self.stats.drop_initial.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        self.shared.conns.fetch_add(1, Ordering::Relaxed);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self.gens.get(slot as usize).copied().unwrap_or(0);
        let key = ConnKey { worker: self.cfg.index as u16, slot, gen };
        let scid_key = CidKey::new(&scid)?;
        self.by_cid.insert(scid_key, slot);
        let mut cids = vec![scid_key];
        if odcid.is_none() {
            // Without Retry the client keeps using the DCID it chose until
            // our first packet reaches it.
            if let Some(k) = CidKey::new(&initial.dcid) {
                self.by_cid.insert(k, slot);
                cids.push(k);
            }
        }
        let conn = Conn {
            quic,
            key,
            peer: from,
            hello: false,
            rx: FrameDecoder::default(),
            tx: Vec::new(),
            flows: FlowTable::new(self.cfg.limits.max_flows_per_conn),
            cids,
            timer: None,
            dirty: false,
            close_at: None,
            stopped: false,
            reg_tokens: (self.cfg.limits.max_registrations as f64, self.now),
            identity: None,
            identity_uri: Arc::from(""),
            ip,
            is_connector: false,
            dgram_rate: self.cfg.limits.dgram_buckets(false, now),
            handshake_deadline: Some(now + self.cfg.limits.handshake_timeout),
            // A valid Retry token proves the address.
            amplification: if odcid.is_some() { None } else { Some((0, 0)) },
            amplification_hit: false,
            charged_queues: 0,
            identity_counted: false,
        };
        self.charge(CONN_CHARGE as i64);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(Box::new(conn));
        }
        self.stats.conns_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.conns_active.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Adjusts this worker's budget share by `delta` bytes.
    fn charge(&mut self, delta: i64) {
        self.budget.adjust(&self.shared.budget, delta);
        if delta < 0 {
            self.released = self.released.saturating_add(delta.unsigned_abs());
        }
    }

    /// Charges what `conn` now holds in its DATAGRAM send queue and control
    /// backlog (called whenever a connection goes back into its slot).
    fn recharge(&mut self, conn: &mut Conn) {
        let now_held = (conn.quic.dgram_send_queue_byte_size() + conn.tx.len()) as u64;
        if now_held != conn.charged_queues {
            let delta = now_held as i64 - conn.charged_queues as i64;
            conn.charged_queues = now_held;
            self.charge(delta);
        }
    }

    /// Whether a datagram of `len` bytes may join `dst`'s send queue:
    /// within the per-connection byte cap, and, once the memory budget is
    /// exhausted, only while the queue is short (counted when refused).
    fn admit(&self, dst: &Conn, len: usize) -> bool {
        let queued = dst.quic.dgram_send_queue_byte_size();
        if queued + len > self.cfg.limits.max_dgram_queue_bytes {
            self.stats.drop_dgram_queue_full.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if queued >= DGRAM_QUEUE_FLOOR && !self.shared.budget.fits(len as u64) {
            self.stats.drop_memory_budget.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn put(&mut self, mut conn: Box<Conn>) {
        self.recharge(&mut conn);
        let slot = conn.key.slot;
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(conn);
        }
    }

    fn take(&mut self, key: ConnKey) -> Option<Box<Conn>> {
        if usize::from(key.worker) != self.cfg.index || self.gens.get(key.slot as usize) != Some(&key.gen) {
            return None;
        }
        self.slots.get_mut(key.slot as usize).and_then(Option::take)
    }

    /// Everything a received packet or timeout may have changed.
    fn after_io(&mut self, conn: &mut Conn, now: Instant) {
        while let Some(ev) = conn.quic.path_event_next() {
            if let quiche::PathEvent::PeerMigrated(_, peer) = ev {
                info!(worker = self.cfg.index, old = %conn.peer, new = %peer, "client address changed");
                conn.peer = peer;
                if conn.hello {
                    self.send_msg(conn, &Message::ObservedAddress { addr: canonical(peer) });
                }
            }
        }
        while let Some(retired) = conn.quic.retired_scid_next() {
            if let Some(k) = CidKey::new(&retired) {
                self.by_cid.remove(&k);
                conn.cids.retain(|c| *c != k);
            }
        }
        if conn.quic.is_established() {
            // The client's Handshake packets proved its address.
            conn.handshake_deadline = None;
            conn.amplification = None;
        }
        if conn.quic.is_established() && !conn.stopped && conn.identity.is_none() {
            self.authenticate(conn);
        }
        if conn.quic.is_established() && !conn.stopped {
            while conn.quic.scids_left() > 0 && conn.cids.len() < SPARE_CIDS + 2 {
                let cid = cid::make(self.cfg.node_id, self.cfg.index as u8, random_bytes());
                let token = self.security.reset.token(&cid);
                if conn.quic.new_scid(&quiche::ConnectionId::from_ref(&cid), token, false).is_err() {
                    break;
                }
                if let Some(k) = CidKey::new(&cid) {
                    self.by_cid.insert(k, conn.key.slot);
                    conn.cids.push(k);
                }
            }
            self.read_control(conn);
            self.read_datagrams(conn, now);
        }
    }

    /// Reads the identity of an established connection. TLS has already
    /// verified the chain and the identity rule (`tls::verify`); this only
    /// fails if the certificate vanished, which closes the connection.
    fn authenticate(&mut self, conn: &mut Conn) {
        let td = &self.security.tls.trust_domain;
        match conn.quic.peer_cert().map(|der| crate::pki::identity_from_der(der, td)) {
            Some(Ok(id)) => {
                if !self.shared.per_identity.try_open(id.uri()) {
                    self.stats.drop_identity_conn_limit.fetch_add(1, Ordering::Relaxed);
                    return self.fail(conn, Code::LIMIT, "too many connections for this identity");
                }
                conn.identity_counted = true;
                debug!(worker = self.cfg.index, peer = %conn.peer, identity = %id.uri(), "client authenticated");
                conn.identity_uri = Arc::from(id.uri());
                if id.kind == Kind::Agent {
                    self.shared.agents.fetch_add(1, Ordering::Relaxed);
                }
                conn.identity = Some(id);
            }
            _ => self.fail(conn, Code::DENIED, "no acceptable client certificate"),
        }
    }

    fn read_control(&mut self, conn: &mut Conn) {
        let mut buf = [0u8; 2048];
        loop {
            let room = conn.rx.room().min(buf.len());
            if room == 0 || conn.quic.is_closed() {
                return;
            }
            match conn.quic.stream_recv(CONTROL_STREAM, &mut buf[..room]) {
                Ok((n, _)) if n > 0 => conn.rx.push(&buf[..n]),
                _ => return,
            }
            loop {
                if conn.stopped {
                    return;
                }
                match conn.rx.next_message() {
                    Ok(Some(m)) => self.on_message(conn, m),
                    Ok(None) => break,
                    Err(wire::DecodeError::BadServiceName { request_id }) if conn.hello => {
                        self.register_error(conn, request_id, Code::MALFORMED, "invalid service name");
                    }
                    Err(e) => {
                        self.fail(conn, e.code(), "malformed control frame");
                        return;
                    }
                }
            }
        }
    }

    /// Sends Error{code}, stops reading the connection and closes it with
    /// the same code after [`ERROR_LINGER`].
    fn fail(&mut self, conn: &mut Conn, code: Code, reason: &str) {
        self.stats.control_errors.fetch_add(1, Ordering::Relaxed);
        warn!(worker = self.cfg.index, peer = %conn.peer, %code, reason, "closing connection");
        self.send_msg(conn, &Message::Error { code, reason: reason.to_owned() });
        conn.close_at = Some((self.now + ERROR_LINGER, code));
        conn.stopped = true;
    }

    fn send_msg(&mut self, conn: &mut Conn, m: &Message) {
        m.encode(&mut conn.tx);
        self.flush_control(conn);
    }

    fn flush_control(&mut self, conn: &mut Conn) {
        if !conn.tx.is_empty() {
            if let Ok(n) = conn.quic.stream_send(CONTROL_STREAM, &conn.tx, false) {
                conn.tx.drain(..n);
            }
        }
        if conn.tx.len() > self.cfg.limits.max_control_backlog {
            // The client does not read its control stream; stop buffering.
            conn.tx.clear();
            conn.stopped = true;
            self.stats.control_errors.fetch_add(1, Ordering::Relaxed);
            let _ = conn.quic.close(true, u64::from(Code::CONTROL_BACKLOG.0), b"control backlog");
        }
    }

    fn on_message(&mut self, conn: &mut Conn, m: Message) {
        if !conn.hello {
            match m {
                Message::Hello { version, .. } if version == wire::VERSION => {
                    conn.hello = true;
                    self.send_msg(conn, &Message::HelloAck { version });
                    let addr = canonical(conn.peer);
                    self.send_msg(conn, &Message::ObservedAddress { addr });
                    if self.draining {
                        // Handshaking when the drain began: tell it now.
                        self.send_msg(conn, &drain_goodbye());
                        self.stats.goodbyes_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Message::Hello { .. } => self.fail(conn, Code::UNSUPPORTED_VERSION, "unsupported version"),
                _ => self.fail(conn, Code::UNEXPECTED_MESSAGE, "expected Hello"),
            }
            return;
        }
        match m {
            Message::Register { request_id, role, service } => {
                if self.take_reg_token(conn) {
                    self.on_register(conn, request_id, role, service);
                } else {
                    self.register_error(conn, request_id, Code::LIMIT, "registration rate exceeded");
                }
            }
            Message::Unregister { flow } => {
                // Unregister is always honoured but costs a token, so
                // register/unregister churn is bounded by the rate.
                self.take_reg_token(conn);
                self.on_unregister(conn, flow);
            }
            Message::FlowClose { flow, code } => self.on_flow_refused(conn, flow, code),
            Message::Unknown { .. } => {}
            _ => self.fail(conn, Code::UNEXPECTED_MESSAGE, "unexpected message"),
        }
    }

    /// A connector closes one of its flows (its own allow-list refused the
    /// agent). Anything but a connector leg of this connection is ignored.
    fn on_flow_refused(&mut self, conn: &mut Conn, flow: u32, code: Code) {
        let Some(Flow::Peer { agent, agent_flow, .. }) = conn.flows.get(flow) else { return };
        let (agent, agent_flow) = (*agent, *agent_flow);
        conn.flows.remove(flow);
        info!(worker = self.cfg.index, connector = %conn.identity_uri, flow, %code, "connector refused a flow");
        // Whatever code the connector gave, the agent learns "denied".
        let msg = Ctrl::Refused { agent, agent_flow, connector: conn.key, connector_flow: flow, code: Code::DENIED };
        self.send_ctrl(usize::from(agent.worker), msg);
    }

    /// Refills and takes one Register/Unregister token.
    fn take_reg_token(&mut self, conn: &mut Conn) -> bool {
        let (tokens, last) = conn.reg_tokens;
        let rate = f64::from(self.cfg.limits.registrations_per_sec);
        let burst = self.cfg.limits.max_registrations as f64;
        let refilled = (tokens + self.now.saturating_duration_since(last).as_secs_f64() * rate).min(burst);
        let ok = refilled >= 1.0;
        conn.reg_tokens = (if ok { refilled - 1.0 } else { refilled }, self.now);
        ok
    }

    fn register_error(&mut self, conn: &mut Conn, request_id: u32, code: Code, reason: &str) {
        self.stats.registrations_failed.fetch_add(1, Ordering::Relaxed);
        self.send_msg(conn, &Message::RegisterError { request_id, code, reason: reason.to_owned() });
    }

    /// May this connection hold `role` for `service` under the current
    /// policy? (An agent certificate can never register as a connector, and
    /// the reverse: the policy checks the identity's kind.)
    fn allowed(&self, conn: &Conn, role: Role, service: &str) -> bool {
        let Some(id) = &conn.identity else { return false };
        match role {
            Role::Connector => self.security.policy.may_serve(id, service),
            Role::Agent => self.security.policy.may_reach(id, service),
        }
    }

    fn on_register(&mut self, conn: &mut Conn, request_id: u32, role: Role, service: wire::ServiceName) {
        if !self.allowed(conn, role, service.as_str()) {
            self.stats.registrations_denied.fetch_add(1, Ordering::Relaxed);
            warn!(worker = self.cfg.index, peer = %conn.peer, identity = %conn.identity_uri, role = role.as_str(),
                  %service, "registration denied by policy");
            return self.register_error(conn, request_id, Code::DENIED, "denied by policy");
        }
        if conn.flows.registrations() >= self.cfg.limits.max_registrations {
            return self.register_error(conn, request_id, Code::LIMIT, "too many registrations");
        }
        let dup = match role {
            Role::Agent => conn.flows.has_agent(&service),
            Role::Connector => conn.flows.has_service(&service),
        };
        if dup {
            return self.register_error(conn, request_id, Code::DUPLICATE, "already registered");
        }
        match role {
            Role::Connector => {
                let Some(handle) = conn.flows.insert(Flow::Service { service: service.clone() }) else {
                    return self.register_error(conn, request_id, Code::LIMIT, "flow table full");
                };
                info!(worker = self.cfg.index, peer = %conn.peer, identity = %conn.identity_uri, %service, handle,
                      "connector registered");
                if !conn.is_connector {
                    conn.is_connector = true;
                    conn.dgram_rate = self.cfg.limits.dgram_buckets(true, self.now);
                }
                self.stats.registrations_ok.fetch_add(1, Ordering::Relaxed);
                self.send_msg(conn, &Message::RegisterOk { request_id, flow: handle });
                self.broadcast(Ctrl::ConnectorUp { service, conn: conn.key, handle });
            }
            Role::Agent => {
                let Some(target) = self.dir.pick(&service, conn.key, None) else {
                    return self.register_error(conn, request_id, Code::UNKNOWN_SERVICE, "no connector serves it");
                };
                let flow = Flow::Agent {
                    service: service.clone(),
                    pending_request: Some(request_id),
                    binding: Binding::Pending(target.conn),
                };
                let Some(agent_flow) = conn.flows.insert(flow) else {
                    return self.register_error(conn, request_id, Code::LIMIT, "flow table full");
                };
                self.agents.add(&service, conn.key);
                debug!(worker = self.cfg.index, peer = %conn.peer, %service, agent_flow, "agent registering");
                let id = Arc::clone(&conn.identity_uri);
                self.send_bind(conn.key, agent_flow, conn.peer, id, target, 1);
            }
        }
    }

    fn on_unregister(&mut self, conn: &mut Conn, flow: u32) {
        if matches!(conn.flows.get(flow), Some(Flow::Peer { .. }) | None) {
            // Connector legs are the relay's to close, not the client's.
            return;
        }
        self.drop_registration(conn, flow);
    }

    /// Removes an agent flow or a connector's service registration and
    /// tells the other side (Unbind, ConnectorDown).
    fn drop_registration(&mut self, conn: &mut Conn, flow: u32) {
        match conn.flows.remove(flow) {
            Some(Flow::Agent { service, binding, .. }) => {
                self.agents.remove(&service, conn.key);
                if let Binding::Bound { connector, flow } = binding {
                    self.send_ctrl(usize::from(connector.worker), Ctrl::Unbind { connector, connector_flow: flow });
                }
            }
            Some(Flow::Service { service }) => {
                let peers: Vec<u32> = conn
                    .flows
                    .iter()
                    .filter_map(|(id, f)| matches!(f, Flow::Peer { handle, .. } if *handle == flow).then_some(id))
                    .collect();
                for id in peers {
                    conn.flows.remove(id);
                }
                self.broadcast(Ctrl::ConnectorDown { service, conn: conn.key });
            }
            _ => {}
        }
    }

    fn send_bind(
        &mut self,
        agent: ConnKey,
        agent_flow: u32,
        agent_addr: SocketAddr,
        agent_id: Arc<str>,
        target: Serving,
        attempt: u8,
    ) {
        let msg = Ctrl::Bind {
            connector: target.conn,
            handle: target.handle,
            agent,
            agent_flow,
            agent_addr,
            agent_id,
            attempt,
        };
        self.send_ctrl(usize::from(target.conn.worker), msg);
    }

    fn send_ctrl(&mut self, worker: usize, msg: Ctrl) {
        if worker == self.cfg.index {
            self.local_ctrl.push_back(msg);
        } else if let Some(q) = self.outbox.get_mut(worker) {
            q.push_back(msg);
        }
    }

    fn broadcast(&mut self, msg: Ctrl) {
        for w in 0..self.cfg.workers {
            self.send_ctrl(w, msg.clone());
        }
    }

    fn read_datagrams(&mut self, conn: &mut Conn, now: Instant) {
        let mut buf = std::mem::take(&mut self.dgram_buf);
        while let Ok(n) = conn.quic.dgram_recv(&mut buf) {
            let Some(d) = buf.get_mut(..n) else { break };
            self.forward(conn, d, now);
        }
        self.dgram_buf = buf;
    }

    /// Forwards one datagram received on `conn` to the other leg of its flow.
    fn forward(&mut self, conn: &mut Conn, d: &mut [u8], now: Instant) {
        let (flow, payload_len) = match datagram::parse(d) {
            Ok((f, p)) => (f, p.len()),
            Err(_) => {
                self.stats.drop_bad_datagram.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if !conn.dgram_rate.0.take(1.0, now) || !conn.dgram_rate.1.take(payload_len as f64, now) {
            self.stats.drop_dgram_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (to, to_flow) = match conn.flows.get(flow) {
            Some(Flow::Agent { binding: Binding::Bound { connector, flow }, .. }) => (*connector, *flow),
            Some(Flow::Agent { .. }) => {
                self.stats.drop_no_connector.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(Flow::Peer { agent, agent_flow, .. }) => (*agent, *agent_flow),
            Some(Flow::Service { .. }) | None => {
                self.stats.drop_unknown_flow.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let bytes: &[u8] = if datagram::rewrite_in_place(d, to_flow) {
            d
        } else {
            let payload = d.get(d.len() - payload_len..).unwrap_or_default();
            datagram::encode_into(to_flow, payload, &mut scratch);
            &scratch
        };
        self.deliver(conn, to, bytes, payload_len, now);
        self.scratch = scratch;
    }

    fn deliver(&mut self, conn: &mut Conn, to: ConnKey, bytes: &[u8], payload_len: usize, now: Instant) {
        if usize::from(to.worker) == self.cfg.index {
            if to == conn.key {
                if self.admit(conn, bytes.len()) {
                    let r = conn.quic.dgram_send(bytes);
                    self.count_delivery(r, payload_len, now);
                }
            } else if let Some(mut dst) = self.take(to) {
                if self.admit(&dst, bytes.len()) {
                    let r = dst.quic.dgram_send(bytes);
                    self.count_delivery(r, payload_len, now);
                }
                self.put(dst);
            } else {
                self.stats.drop_peer_gone.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let w = usize::from(to.worker);
        if !self.shared.budget.fits(bytes.len() as u64) {
            self.stats.drop_memory_budget.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let charged = bytes.len() as i64;
        let msg = Data::Datagram {
            to,
            bytes: self.mesh.buffer(self.cfg.index, bytes),
            received: now,
            sender: self.cfg.index as u16,
        };
        match self.mesh.inboxes.get(w).map(|i| i.data.push(msg)) {
            Some(Ok(())) => {
                // Released by the receiving worker when it pops it.
                self.charge(charged);
                self.stats.datagrams_cross_worker.fetch_add(1, Ordering::Relaxed);
                self.wake[w] = true;
            }
            _ => {
                self.stats.drop_queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn count_delivery(&mut self, r: quiche::Result<()>, payload_len: usize, received: Instant) {
        match r {
            Ok(()) => {
                self.stats.datagrams_forwarded.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_forwarded.fetch_add(payload_len as u64, Ordering::Relaxed);
                self.delivered_at.push(received);
            }
            Err(quiche::Error::Done) => {
                self.stats.drop_dgram_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.drop_too_large.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Handles what other workers sent. Returns after a bounded batch.
    pub fn drain_inbox(&mut self, now: Instant) {
        self.now = now;
        let mesh = Arc::clone(&self.mesh);
        let Some(inbox) = mesh.inboxes.get(self.cfg.index) else { return };
        inbox.clear_notified();
        for _ in 0..INBOX_BATCH {
            let Some(c) = inbox.ctrl.pop() else { break };
            self.on_ctrl(c);
        }
        for _ in 0..INBOX_BATCH {
            let Some(d) = inbox.data.pop() else { break };
            match d {
                Data::Datagram { to, bytes, received, sender } => {
                    self.charge(-(bytes.len() as i64));
                    let payload_len = datagram::parse(&bytes).map(|(_, p)| p.len()).unwrap_or(0);
                    if let Some(mut dst) = self.take(to) {
                        if self.admit(&dst, bytes.len()) {
                            let r = dst.quic.dgram_send(&bytes);
                            self.count_delivery(r, payload_len, received);
                        }
                        self.put(dst);
                    } else {
                        self.stats.drop_peer_gone.fetch_add(1, Ordering::Relaxed);
                    }
                    mesh.recycle(usize::from(sender), bytes);
                }
                Data::Packet { from, mut bytes, sender } => {
                    self.charge(-(bytes.len() as i64));
                    self.stats.handoff_in.fetch_add(1, Ordering::Relaxed);
                    self.process_packet(&mut bytes, from, now);
                    mesh.recycle(usize::from(sender), bytes);
                }
            }
        }
        if !inbox.data.is_empty() || !inbox.ctrl.is_empty() {
            // More than one batch waiting: make sure we come back.
            self.wake[self.cfg.index] = true;
        }
        self.run_local_ctrl();
    }

    fn run_local_ctrl(&mut self) {
        while let Some(c) = self.local_ctrl.pop_front() {
            self.on_ctrl(c);
        }
    }

    fn on_ctrl(&mut self, c: Ctrl) {
        match c {
            Ctrl::ConnectorUp { service, conn, handle } => {
                self.dir.add(service.clone(), Serving { conn, handle });
                self.rebind_where(&service, |b| *b == Binding::Unbound, None);
            }
            Ctrl::ConnectorDown { service, conn } => {
                self.dir.remove(&service, conn);
                self.rebind_where(
                    &service,
                    |b| matches!(b, Binding::Pending(c) | Binding::Bound { connector: c, .. } if *c == conn),
                    Some(conn),
                );
            }
            Ctrl::Bind { connector, handle, agent, agent_flow, agent_addr, agent_id, attempt } => {
                let reply_to = usize::from(agent.worker);
                let failed = Ctrl::BindFailed { agent, agent_flow, connector, attempt };
                let Some(mut c) = self.take(connector) else {
                    return self.send_ctrl(reply_to, failed);
                };
                let serves = matches!(c.flows.get(handle), Some(Flow::Service { .. }));
                let flow =
                    serves.then(|| c.flows.insert(Flow::Peer { agent, agent_flow, handle, agent_addr })).flatten();
                match flow {
                    Some(flow) => {
                        let agent_addr = canonical(agent_addr);
                        let open =
                            Message::FlowOpen { flow, service: handle, agent_addr, agent_id: agent_id.to_string() };
                        self.send_msg(&mut c, &open);
                        self.send_ctrl(reply_to, Ctrl::Bound { agent, agent_flow, connector, connector_flow: flow });
                    }
                    None => self.send_ctrl(reply_to, failed),
                }
                self.put(c);
            }
            Ctrl::Bound { agent, agent_flow, connector, connector_flow } => {
                let unbind = Ctrl::Unbind { connector, connector_flow };
                let Some(mut a) = self.take(agent) else {
                    return self.send_ctrl(usize::from(connector.worker), unbind);
                };
                let mut reply = None;
                match a.flows.get_mut(agent_flow) {
                    Some(Flow::Agent { binding, pending_request, .. }) if *binding == Binding::Pending(connector) => {
                        *binding = Binding::Bound { connector, flow: connector_flow };
                        reply = pending_request.take();
                    }
                    _ => self.send_ctrl(usize::from(connector.worker), unbind),
                }
                if let Some(request_id) = reply {
                    self.stats.registrations_ok.fetch_add(1, Ordering::Relaxed);
                    self.send_msg(&mut a, &Message::RegisterOk { request_id, flow: agent_flow });
                }
                self.put(a);
            }
            Ctrl::BindFailed { agent, agent_flow, connector, attempt } => {
                let Some(mut a) = self.take(agent) else { return };
                let peer = a.peer;
                let id = Arc::clone(&a.identity_uri);
                let mut retry = None;
                let mut refuse = None;
                if let Some(Flow::Agent { service, binding, pending_request }) = a.flows.get_mut(agent_flow) {
                    if *binding == Binding::Pending(connector) {
                        let next = if attempt < MAX_BIND_ATTEMPTS {
                            self.dir.pick(service, agent, Some(connector))
                        } else {
                            None
                        };
                        match next {
                            Some(t) => {
                                *binding = Binding::Pending(t.conn);
                                retry = Some(t);
                            }
                            None => {
                                *binding = Binding::Unbound;
                                refuse = pending_request.take();
                            }
                        }
                    }
                }
                if let Some(t) = retry {
                    self.send_bind(agent, agent_flow, peer, id, t, attempt.saturating_add(1));
                }
                if let Some(request_id) = refuse {
                    self.remove_agent_flow(&mut a, agent_flow);
                    self.register_error(&mut a, request_id, Code::UNKNOWN_SERVICE, "no connector serves it");
                }
                self.put(a);
            }
            Ctrl::Unbind { connector, connector_flow } => {
                let Some(mut c) = self.take(connector) else { return };
                if let Some(Flow::Peer { .. }) = c.flows.get(connector_flow) {
                    c.flows.remove(connector_flow);
                    self.send_msg(&mut c, &Message::FlowClose { flow: connector_flow, code: Code::AGENT_GONE });
                }
                self.put(c);
            }
            Ctrl::Refused { agent, agent_flow, connector, connector_flow, code } => {
                let Some(mut a) = self.take(agent) else { return };
                // Only the binding the refusal is about (not a newer one to
                // the same connector).
                let bound_here = matches!(
                    a.flows.get(agent_flow),
                    Some(Flow::Agent { binding: Binding::Bound { connector: c, flow }, .. })
                        if *c == connector && *flow == connector_flow
                );
                if bound_here {
                    self.remove_agent_flow(&mut a, agent_flow);
                    self.send_msg(&mut a, &Message::FlowClose { flow: agent_flow, code });
                }
                self.put(a);
            }
        }
    }

    /// Applies a new security snapshot: new TLS config for new handshakes
    /// (established connections keep theirs), and every registration the
    /// new policy no longer allows is closed with FlowClose{denied}.
    fn reload(&mut self) {
        let (generation, security) = self.shared.security.current();
        self.generation = generation;
        match security.tls.server_config(Arc::clone(&self.stats)) {
            Ok(cfg) => self.quic_cfg = cfg,
            Err(e) => warn!(worker = self.cfg.index, error = %e, "new TLS material refused; keeping the old"),
        }
        self.security = security;
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        let mut revoked = Vec::new();
        for conn in self.slots.iter().flatten() {
            for (id, f) in conn.flows.iter() {
                let (role, service, pending) = match f {
                    Flow::Agent { service, pending_request, .. } => (Role::Agent, service, *pending_request),
                    Flow::Service { service } => (Role::Connector, service, None),
                    Flow::Peer { .. } => continue,
                };
                if !self.allowed(conn, role, service.as_str()) {
                    revoked.push((conn.key, id, role, service.clone(), pending));
                }
            }
        }
        for (key, flow, role, service, pending) in revoked {
            let Some(mut conn) = self.take(key) else { continue };
            warn!(worker = self.cfg.index, identity = %conn.identity_uri, role = role.as_str(), %service,
                  "policy reload revoked a registration");
            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
            if role == Role::Connector {
                // Tell the connector about each agent leg it loses, then
                // about the service handle itself.
                let legs: Vec<u32> = conn
                    .flows
                    .iter()
                    .filter_map(|(id, f)| matches!(f, Flow::Peer { handle, .. } if *handle == flow).then_some(id))
                    .collect();
                for leg in legs {
                    self.send_msg(&mut conn, &Message::FlowClose { flow: leg, code: Code::DENIED });
                }
            }
            self.drop_registration(&mut conn, flow);
            match pending {
                // Still waiting for its answer: the answer is "denied".
                Some(request_id) => {
                    self.register_error(&mut conn, request_id, Code::DENIED, "denied by policy");
                }
                None => self.send_msg(&mut conn, &Message::FlowClose { flow, code: Code::DENIED }),
            }
            self.put(conn);
        }
    }

    /// Removes an agent flow of `conn` and its index entry.
    fn remove_agent_flow(&mut self, conn: &mut Conn, id: u32) {
        if let Some(Flow::Agent { service, .. }) = conn.flows.remove(id) {
            self.agents.remove(&service, conn.key);
        }
    }

    /// Re-binds every local agent flow for `service` whose binding matches
    /// `pred` to a connector picked from the directory (skipping
    /// `exclude`), or marks it unbound. Visits only the connections that
    /// hold an agent flow for `service` ([`AgentIndex`]).
    fn rebind_where(&mut self, service: &wire::ServiceName, pred: impl Fn(&Binding) -> bool, exclude: Option<ConnKey>) {
        let mut binds = Vec::new();
        let mut unbinds = Vec::new();
        let mut refusals = Vec::new();
        let conns = self.agents.conns(service);
        self.stats.rebind_visits.fetch_add(conns.len() as u64, Ordering::Relaxed);
        for key in conns {
            if self.gens.get(key.slot as usize) != Some(&key.gen) {
                continue;
            }
            let Some(conn) = self.slots.get_mut(key.slot as usize).and_then(Option::as_mut) else { continue };
            let peer = conn.peer;
            let agent_id = Arc::clone(&conn.identity_uri);
            for (id, f) in conn.flows.iter_mut() {
                let Flow::Agent { service: s, binding, pending_request } = f else { continue };
                if s != service || !pred(binding) {
                    continue;
                }
                if let Binding::Bound { connector, flow } = *binding {
                    unbinds.push((connector, flow));
                }
                match self.dir.pick(service, key, exclude) {
                    Some(t) => {
                        *binding = Binding::Pending(t.conn);
                        binds.push((key, id, peer, Arc::clone(&agent_id), t));
                    }
                    None => {
                        *binding = Binding::Unbound;
                        // A Register still waiting for its answer gets one
                        // now: nobody serves the service any more.
                        if let Some(request_id) = pending_request.take() {
                            refusals.push((key, id, request_id));
                        }
                    }
                }
            }
        }
        for (connector, flow) in unbinds {
            self.send_ctrl(usize::from(connector.worker), Ctrl::Unbind { connector, connector_flow: flow });
        }
        for (key, id, peer, agent_id, t) in binds {
            self.send_bind(key, id, peer, agent_id, t, 1);
        }
        for (key, id, request_id) in refusals {
            if let Some(mut c) = self.take(key) {
                self.remove_agent_flow(&mut c, id);
                self.register_error(&mut c, request_id, Code::UNKNOWN_SERVICE, "no connector serves it");
                self.put(c);
            }
        }
    }

    /// Runs connection timers that expired by `now`.
    pub fn handle_timeouts(&mut self, now: Instant) {
        self.now = now;
        while let Some(&(t, slot)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(mut conn) = self.slots.get_mut(slot as usize).and_then(Option::take) else { continue };
            conn.timer = None;
            if conn.handshake_deadline.is_some_and(|d| d <= now) && !conn.quic.is_established() {
                // Half-open: drop it without a word (the source may be
                // spoofed); frees the slot, CIDs and per-IP count now.
                self.stats.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                self.reap(conn);
                continue;
            }
            if let Some((at, code)) = conn.close_at {
                if at <= now {
                    conn.close_at = None;
                    let _ = conn.quic.close(true, u64::from(code.0), code.name().as_bytes());
                }
            }
            conn.quic.on_timeout();
            self.after_io(&mut conn, now);
            self.put(conn);
        }
    }

    /// The earliest connection timer.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Sends what connections have to send, reaps closed ones, publishes
    /// cross-worker messages and wakes peers. Call once per loop turn.
    pub fn flush(&mut self, tx: &mut dyn Transmit, now: Instant) {
        self.now = now;
        if self.shared.security.generation() != self.generation {
            self.reload();
        }
        self.run_local_ctrl();
        while let Some(slot) = self.dirty.pop() {
            let Some(mut conn) = self.slots.get_mut(slot as usize).and_then(Option::take) else { continue };
            conn.dirty = false;
            self.flush_control(&mut conn);
            loop {
                let buf = tx.buf();
                let room = match conn.amplification {
                    // Enforced here, at the I/O boundary, because quiche's
                    // own limit leaks: see [`amplification_room`].
                    Some((rx, sent)) => amplification_room(rx, sent),
                    None => buf.len(),
                };
                if room < MIN_INITIAL_LEN {
                    if !conn.amplification_hit {
                        conn.amplification_hit = true;
                        self.stats.amplification_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                let len = buf.len().min(room);
                match conn.quic.send(&mut buf[..len]) {
                    Ok((n, info)) => {
                        tx.commit(n, info.to);
                        if let Some((_, sent)) = conn.amplification.as_mut() {
                            *sent += n as u64;
                        }
                        self.stats.packets_tx.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(quiche::Error::Done | quiche::Error::BufferTooShort) => break,
                    Err(e) => {
                        debug!(worker = self.cfg.index, error = %e, "send failed; closing");
                        let _ = conn.quic.close(false, 0x1, b"internal");
                        break;
                    }
                }
            }
            if conn.quic.is_closed() {
                self.reap(conn);
            } else {
                self.recharge(&mut conn);
                self.update_timer(&mut conn);
                if let Some(s) = self.slots.get_mut(slot as usize) {
                    *s = Some(conn);
                }
            }
            // Reaping may have queued local control work and new dirt.
            self.run_local_ctrl();
        }
        for (bytes, to) in self.pending_tx.drain(..) {
            let buf = tx.buf();
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            tx.commit(n, to);
        }
        self.publish();
        let since = now.saturating_duration_since(self.last_trim);
        if (self.released >= TRIM_AFTER_BYTES && since >= TRIM_INTERVAL)
            || (self.released >= PAGE_BYTES && since >= TRIM_IDLE_INTERVAL)
        {
            // A flood ended: give its memory back instead of keeping the
            // peak for the process's lifetime.
            budget::give_back_memory();
            self.released = 0;
            self.last_trim = now;
        }
        for t in self.delivered_at.drain(..) {
            self.latency.record(now.saturating_duration_since(t).as_secs_f64());
        }
    }

    fn update_timer(&mut self, conn: &mut Conn) {
        let close = conn.close_at.map(|(t, _)| t);
        let next = [conn.quic.timeout_instant(), close, conn.handshake_deadline].into_iter().flatten().min();
        if next != conn.timer {
            if let Some(old) = conn.timer {
                self.timers.remove(&(old, conn.key.slot));
            }
            if let Some(new) = next {
                self.timers.insert((new, conn.key.slot));
            }
            conn.timer = next;
        }
    }

    fn reap(&mut self, mut conn: Box<Conn>) {
        let key = conn.key;
        if let Some(t) = conn.timer {
            self.timers.remove(&(t, key.slot));
        }
        for k in &conn.cids {
            self.by_cid.remove(k);
        }
        for (_, f) in conn.flows.drain() {
            match f {
                Flow::Agent { service, binding, .. } => {
                    self.agents.remove(&service, key);
                    if let Binding::Bound { connector, flow } = binding {
                        self.send_ctrl(usize::from(connector.worker), Ctrl::Unbind { connector, connector_flow: flow });
                    }
                }
                Flow::Service { service } => self.broadcast(Ctrl::ConnectorDown { service, conn: key }),
                _ => {}
            }
        }
        if let Some(g) = self.gens.get_mut(key.slot as usize) {
            *g = g.wrapping_add(1);
        }
        self.shared.per_ip.close(conn.ip);
        if conn.identity_counted {
            self.shared.per_identity.close(&*conn.identity_uri);
        }
        self.charge(-((CONN_CHARGE + conn.charged_queues) as i64));
        self.shared.conns.fetch_sub(1, Ordering::Relaxed);
        if conn.identity.as_ref().is_some_and(|id| id.kind == Kind::Agent) {
            self.shared.agents.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(e) = conn.quic.local_error().filter(|e| !e.is_app && !conn.quic.is_established()) {
            self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            warn!(worker = self.cfg.index, peer = %conn.peer, code = format!("{:#x}", e.error_code),
                  reason = tls_alert_name(e.error_code), "TLS handshake failed; connection refused");
        }
        self.free.push(key.slot);
        self.stats.conns_closed.fetch_add(1, Ordering::Relaxed);
        self.stats.conns_active.fetch_sub(1, Ordering::Relaxed);
        let reason = conn.quic.peer_error().map(|e| e.error_code).or(conn.quic.local_error().map(|e| e.error_code));
        debug!(worker = self.cfg.index, peer = %conn.peer, ?reason, timed_out = conn.quic.is_timed_out(), "connection closed");
    }

    /// Moves outboxes into peers' inboxes and wakes them.
    fn publish(&mut self) {
        for (w, q) in self.outbox.iter_mut().enumerate() {
            let Some(inbox) = self.mesh.inboxes.get(w) else { continue };
            while let Some(m) = q.pop_front() {
                if let Err(m) = inbox.ctrl.push(m) {
                    // Full: keep it and retry next turn; never lost.
                    q.push_front(m);
                    break;
                }
                self.wake[w] = true;
            }
        }
        for (w, wake) in self.wake.iter_mut().enumerate() {
            if std::mem::take(wake) {
                if let Some(inbox) = self.mesh.inboxes.get(w) {
                    inbox.wake();
                }
            }
        }
    }

    /// True if some outbox still holds messages (retry soon).
    pub fn has_backlog(&self) -> bool {
        self.outbox.iter().any(|q| !q.is_empty())
    }

    /// Starts a drain: Goodbye{DRAINING} to every client, no new
    /// connections. Unlike a shutdown, connections stay fully served, so
    /// clients can move to another relay at their own pace and connectors
    /// keep serving the agents that have not moved yet; the driver ends the
    /// drain with [`Worker::begin_shutdown`].
    pub fn begin_drain(&mut self, now: Instant) {
        if self.draining || self.shutting_down {
            return;
        }
        self.now = now;
        self.draining = true;
        self.goodbye_all(&drain_goodbye(), |_| {});
    }

    /// Sends `goodbye` to every client past Hello that no Error stopped,
    /// then runs `then` on every connection.
    fn goodbye_all(&mut self, goodbye: &Message, mut then: impl FnMut(&mut Conn)) {
        let keys: Vec<ConnKey> = self.slots.iter().flatten().map(|c| c.key).collect();
        for key in keys {
            let Some(mut conn) = self.take(key) else { continue };
            if conn.hello && !conn.stopped {
                self.send_msg(&mut conn, goodbye);
                self.stats.goodbyes_sent.fetch_add(1, Ordering::Relaxed);
            }
            then(&mut conn);
            self.put(conn);
        }
    }

    /// Authenticated agent connections over all workers.
    pub fn agents_relay_wide(&self) -> usize {
        self.shared.agents.load(Ordering::Relaxed)
    }

    /// Goodbye to every client, CONNECTION_CLOSE `linger` later (so the
    /// Goodbye is delivered first); refuse new connections.
    pub fn begin_shutdown(&mut self, code: Code, reason: &str, linger: Duration, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.now = now;
        self.shutting_down = true;
        self.goodbye_all(&Message::Goodbye { code, reason: reason.to_owned() }, |conn| {
            conn.close_at = Some((now + linger, code));
            conn.stopped = true;
        });
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }
}

/// Bytes that may still be sent to an address not yet validated, after
/// `rx` bytes came from it and `sent` went to it (RFC 9000 §8.1: 3×).
///
/// quiche 0.30 has the same limit (`max_send_bytes`), but it leaks: in
/// `Connection::send_on_path` it caps the datagram at the remaining
/// allowance, lets `send_single` subtract the bytes it wrote, and then pads
/// datagrams that carry an Initial packet up to 1200 bytes *without*
/// subtracting the padding. Reproduction (server side, no I/O needed):
/// `quiche::accept`, `recv` one 1200-byte client Initial, then repeatedly
/// `send` into a 1350-byte buffer and call `on_timeout` at each
/// `timeout_instant` without ever delivering a client packet: the server
/// sends its first flight and then one padded Initial PTO probe after
/// another, ~6.4 kB in all (5.3×) instead of at most 3600 bytes. We
/// therefore count the bytes ourselves and hand quiche a buffer no larger
/// than what is left.
fn amplification_room(rx: u64, sent: u64) -> usize {
    usize::try_from(rx.saturating_mul(AMPLIFICATION_FACTOR).saturating_sub(sent)).unwrap_or(usize::MAX)
}

/// The Goodbye a draining relay sends.
fn drain_goodbye() -> Message {
    Message::Goodbye { code: Code::DRAINING, reason: "relay draining; reconnect to another relay".to_owned() }
}
