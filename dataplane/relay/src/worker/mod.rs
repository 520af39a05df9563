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
use ztna_udp::Transmit;

use crate::budget::{self, BudgetShare};
use crate::cid::{self, CID_LEN};
use crate::limits::Limits;
use crate::mesh::{Ctrl, Data, Mesh};
use crate::ratelimit::TokenBucket;
use crate::routing::{AgentIndex, Binding, ConnKey, Directory, Flow, FlowTable, Serving};
use crate::security::{RetryMode, Security, Shared};
use crate::stats::WorkerStats;

mod accept;
mod forward;
mod lifecycle;
mod registry;
mod session;

/// Stream carrying the control channel.
const CONTROL_STREAM: u64 = 0;
/// Spare CIDs each connection is offered for migration.
const SPARE_CIDS: usize = 3;
/// Inbox data messages handled per loop turn (keeps the socket serviced).
const INBOX_BATCH: usize = 4096;
/// Smallest UDP payload that may carry a client Initial (RFC 9000 §14.1).
const MIN_INITIAL_LEN: usize = 1200;
/// quiche's pacing times (`SendInfo.at`) at most this far ahead are sent
/// at once; a later one holds the connection's sending until then. Below
/// a millisecond the loop's timers would cost more than the burst.
pub const PACING_SLACK: Duration = Duration::from_millis(1);
/// How long a connection that failed keeps running so its Error message
/// reaches the client before CONNECTION_CLOSE (quiche sends no stream data
/// once closing).
const ERROR_LINGER: Duration = Duration::from_millis(100);
/// Connectors tried for one agent flow before the registration is refused.
const MAX_BIND_ATTEMPTS: u8 = 4;
/// What one connection is charged to the memory budget for its own state
/// (quiche connection, TLS, flow table), from its first Initial on. A
/// half-open connection measured 12.4 KiB here (`tests/memory_budget.rs`,
/// which asserts the charge covers it) and 30.5 KiB in issue 10's review.
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
/// An address as clients should see it (IPv4-mapped IPv6 → IPv4).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
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
    /// quiche's pacer wants the next packet no earlier than this: nothing
    /// is sent before (the timer set releases it).
    paced_until: Option<Instant>,
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
    /// When the connection was accepted (`/status`).
    opened: Instant,
}

/// Sees (and may alter) every DATAGRAM a worker receives from a client,
/// flow id included, before it is forwarded: tests use it to check what a
/// relay can read, and to play a relay that tampers with payloads.
pub type DatagramTap = Box<dyn FnMut(&mut [u8]) + Send>;

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
    /// Packets outside any connection: (bytes, to, from our address).
    pending_tx: Vec<(Vec<u8>, SocketAddr, SocketAddr)>,
    delivered_at: Vec<Instant>,
    tap: Option<DatagramTap>,
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
    /// Handshake failures are logged once per cause and minute.
    handshake_log: ztna_control::tls_report::OncePerCause,
    /// When this worker last published its `/status` rows, and whether an
    /// authenticated connection ended since.
    last_status: Instant,
    status_dirty: bool,
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
        let mut quic_cfg = security.tls.server_config(Arc::clone(&stats))?;
        quic_cfg.set_cc_algorithm(cfg.limits.congestion_control.quiche());
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
            tap: None,
            stats,
            latency,
            shutting_down: false,
            draining: false,
            now,
            budget: BudgetShare::default(),
            released: 0,
            last_trim: now,
            handshake_log: ztna_control::tls_report::OncePerCause::new(Duration::from_secs(60)),
            last_status: now,
            status_dirty: false,
        })
    }

    pub fn index(&self) -> usize {
        self.cfg.index
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Installs (or removes) a [`DatagramTap`].
    pub fn set_datagram_tap(&mut self, tap: Option<DatagramTap>) {
        self.tap = tap;
    }

    /// Open connections.
    pub fn conn_count(&self) -> usize {
        self.slots.len() - self.free.len()
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
}

/// The Goodbye a draining relay sends.
fn drain_goodbye() -> Message {
    Message::Goodbye { code: Code::DRAINING, reason: "relay draining; reconnect to another relay".to_owned() }
}
