//! Registry and routing state, pure and lock-free by construction: each
//! worker owns one [`Directory`] replica and the [`FlowTable`]s of its own
//! connections, and changes reach other workers only as messages
//! (`mesh::Ctrl`). No I/O here; tested in memory.

use std::collections::HashMap;
use std::net::SocketAddr;

use ztna_control::datagram::MAX_FLOW;
use ztna_control::ServiceName;

/// A connection's address anywhere in the relay: the worker that owns it,
/// its slot there, and the slot's generation (so a stale key never reaches a
/// newer connection in a reused slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub worker: u16,
    pub slot: u32,
    pub gen: u32,
}

impl ConnKey {
    fn hash_with(&self, other: &ConnKey) -> u64 {
        // SplitMix64 finaliser over both keys: cheap, well mixed, stable
        // across workers and runs (the rule must not depend on a random
        // per-process hasher seed).
        let mut z = (u64::from(self.worker) << 48 ^ u64::from(self.slot) << 16 ^ u64::from(self.gen))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (u64::from(other.worker) << 48 ^ u64::from(other.slot) << 16 ^ u64::from(other.gen));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A connector serving a service, as every worker's directory sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    pub conn: ConnKey,
    /// The service handle on that connector's connection.
    pub handle: u32,
}

/// Which connectors serve which services (one replica per worker).
#[derive(Debug, Default)]
pub struct Directory {
    services: HashMap<ServiceName, Vec<Serving>>,
}

impl Directory {
    pub fn add(&mut self, service: ServiceName, s: Serving) {
        let v = self.services.entry(service).or_default();
        if !v.iter().any(|x| x.conn == s.conn) {
            v.push(s);
        }
    }

    pub fn remove(&mut self, service: &ServiceName, conn: ConnKey) {
        if let Some(v) = self.services.get_mut(service) {
            v.retain(|x| x.conn != conn);
            if v.is_empty() {
                self.services.remove(service);
            }
        }
    }

    pub fn serves(&self, service: &ServiceName) -> bool {
        self.services.contains_key(service)
    }

    pub fn connectors(&self, service: &ServiceName) -> &[Serving] {
        self.services.get(service).map(Vec::as_slice).unwrap_or_default()
    }

    /// Selection rule: rendezvous (highest random weight) hashing of
    /// (agent, connector). Stable for an agent while the set is unchanged;
    /// a join or leave moves only the agents that hash to that connector.
    /// `exclude` skips a connector that just refused a bind.
    pub fn pick(&self, service: &ServiceName, agent: ConnKey, exclude: Option<ConnKey>) -> Option<Serving> {
        self.connectors(service)
            .iter()
            .filter(|s| Some(s.conn) != exclude)
            .max_by_key(|s| (agent.hash_with(&s.conn), s.conn))
            .copied()
    }
}

/// Where an agent flow currently leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// A Bind is in flight to this connector.
    Pending(ConnKey),
    /// Datagrams go to `connector` on `flow`.
    Bound { connector: ConnKey, flow: u32 },
    /// No connector serves the service right now; datagrams are dropped.
    Unbound,
}

/// One entry of a connection's flow-id space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// An agent registration: its flow id tags the agent's datagrams.
    Agent {
        service: ServiceName,
        /// Register request awaiting RegisterOk once the first bind lands.
        pending_request: Option<u32>,
        binding: Binding,
    },
    /// A connector registration (the handle named in FlowOpen).
    Service { service: ServiceName },
    /// Connector leg of an agent's flow.
    Peer { agent: ConnKey, agent_flow: u32, handle: u32, agent_addr: SocketAddr },
}

/// A connection's flows, keyed by the flow id (or handle) the relay assigned.
/// Ids share one space per connection so a connection may be agent and
/// connector at once without ambiguity.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<u32, Flow>,
    next: u32,
    limit: usize,
}

impl FlowTable {
    pub fn new(limit: usize) -> Self {
        FlowTable { flows: HashMap::new(), next: 1, limit }
    }

    /// Allocates the lowest-numbered free id at or after the cursor;
    /// `None` when the table is at its limit.
    pub fn insert(&mut self, flow: Flow) -> Option<u32> {
        if self.flows.len() >= self.limit || self.flows.len() >= MAX_FLOW as usize {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next >= MAX_FLOW { 1 } else { self.next + 1 };
            if let std::collections::hash_map::Entry::Vacant(e) = self.flows.entry(id) {
                e.insert(flow);
                return Some(id);
            }
        }
    }

    pub fn get(&self, id: u32) -> Option<&Flow> {
        self.flows.get(&id)
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Flow> {
        self.flows.get_mut(&id)
    }

    pub fn remove(&mut self, id: u32) -> Option<Flow> {
        self.flows.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Flow)> {
        self.flows.iter().map(|(k, v)| (*k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Flow)> {
        self.flows.iter_mut().map(|(k, v)| (*k, v))
    }

    pub fn drain(&mut self) -> impl Iterator<Item = (u32, Flow)> + '_ {
        self.flows.drain()
    }

    /// Count of registrations (agent flows and service handles).
    pub fn registrations(&self) -> usize {
        self.flows.values().filter(|f| !matches!(f, Flow::Peer { .. })).count()
    }

    /// Whether this connection already holds a registration for (role, service).
    pub fn has_agent(&self, service: &ServiceName) -> bool {
        self.flows.values().any(|f| matches!(f, Flow::Agent { service: s, .. } if s == service))
    }

    pub fn has_service(&self, service: &ServiceName) -> bool {
        self.flows.values().any(|f| matches!(f, Flow::Service { service: s } if s == service))
    }
}

/// The connections of one worker that hold an agent flow for a service,
/// so that a ConnectorUp/Down visits only those instead of every flow of
/// every connection. A connection holds at most one agent flow per
/// service (DUPLICATE otherwise), so the key identifies the flow.
#[derive(Debug, Default)]
pub struct AgentIndex {
    by_service: HashMap<ServiceName, std::collections::HashSet<ConnKey>>,
}

impl AgentIndex {
    pub fn add(&mut self, service: &ServiceName, conn: ConnKey) {
        self.by_service.entry(service.clone()).or_default().insert(conn);
    }

    /// Forgets `conn`'s agent flow for `service` (empty sets are dropped,
    /// so the index holds only what is registered now).
    pub fn remove(&mut self, service: &ServiceName, conn: ConnKey) {
        if let Some(set) = self.by_service.get_mut(service) {
            set.remove(&conn);
            if set.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Connections holding an agent flow for `service`.
    pub fn conns(&self, service: &ServiceName) -> Vec<ConnKey> {
        self.by_service.get(service).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    /// Agent flows indexed, over all services.
    pub fn len(&self) -> usize {
        self.by_service.values().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_index_tracks_connections_per_service() {
        let (web, db) = (ServiceName::new("web").unwrap(), ServiceName::new("db").unwrap());
        let mut ix = AgentIndex::default();
        ix.add(&web, key(0, 1));
        ix.add(&web, key(0, 2));
        ix.add(&web, key(0, 2));
        ix.add(&db, key(0, 1));
        let mut w = ix.conns(&web);
        w.sort_by_key(|k| k.slot);
        assert_eq!(w, vec![key(0, 1), key(0, 2)]);
        assert_eq!(ix.len(), 3);
        ix.remove(&web, key(0, 1));
        ix.remove(&web, key(0, 2));
        ix.remove(&db, key(0, 9));
        assert!(ix.conns(&web).is_empty());
        assert_eq!(ix.conns(&db), vec![key(0, 1)]);
        ix.remove(&db, key(0, 1));
        assert!(ix.is_empty(), "nothing left behind");
    }

    fn key(worker: u16, slot: u32) -> ConnKey {
        ConnKey { worker, slot, gen: 1 }
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn rendezvous_spreads_and_is_stable() {
        let mut d = Directory::default();
        let echo = svc("echo");
        for c in 0..4 {
            d.add(echo.clone(), Serving { conn: key(c % 2, 100 + u32::from(c)), handle: 1 });
        }
        let agents: Vec<_> = (0..400).map(|i| key((i % 2) as u16, i)).collect();
        let before: Vec<_> = agents.iter().map(|a| d.pick(&echo, *a, None).unwrap().conn).collect();
        // Every connector gets a fair share (400 agents, 4 connectors).
        for c in 0..4u16 {
            let n = before.iter().filter(|k| k.slot == 100 + u32::from(c)).count();
            assert!((60..=140).contains(&n), "connector {c} got {n}");
        }
        // Removing one connector moves only its own agents.
        let gone = key(1, 101);
        d.remove(&echo, gone);
        for (a, b) in agents.iter().zip(&before) {
            let now = d.pick(&echo, *a, None).unwrap().conn;
            if *b != gone {
                assert_eq!(now, *b);
            } else {
                assert_ne!(now, gone);
            }
        }
    }

    #[test]
    fn pick_excludes_and_handles_empty() {
        let mut d = Directory::default();
        let echo = svc("echo");
        assert_eq!(d.pick(&echo, key(0, 1), None), None);
        d.add(echo.clone(), Serving { conn: key(0, 9), handle: 3 });
        d.add(echo.clone(), Serving { conn: key(0, 9), handle: 3 });
        assert_eq!(d.connectors(&echo).len(), 1);
        assert_eq!(d.pick(&echo, key(0, 1), Some(key(0, 9))), None);
        assert_eq!(d.pick(&echo, key(0, 1), None), Some(Serving { conn: key(0, 9), handle: 3 }));
        d.remove(&echo, key(0, 9));
        assert!(!d.serves(&echo));
    }

    #[test]
    fn flow_table_limits_and_reuse() {
        let mut t = FlowTable::new(2);
        let a = t.insert(Flow::Service { service: svc("a") }).unwrap();
        let b = t.insert(Flow::Agent { service: svc("b"), pending_request: None, binding: Binding::Unbound }).unwrap();
        assert_eq!((a, b), (1, 2));
        assert!(t.insert(Flow::Service { service: svc("c") }).is_none());
        assert!(t.has_service(&svc("a")) && t.has_agent(&svc("b")) && !t.has_agent(&svc("a")));
        t.remove(1);
        let c = t.insert(Flow::Service { service: svc("c") }).unwrap();
        assert_eq!(c, 3, "ids are not reused immediately");
        assert_eq!(t.registrations(), 2);
    }

    #[test]
    fn flow_ids_wrap_and_skip_used() {
        let mut t = FlowTable::new(10);
        t.next = MAX_FLOW;
        let a = t.insert(Flow::Service { service: svc("a") }).unwrap();
        let b = t.insert(Flow::Service { service: svc("b") }).unwrap();
        assert_eq!((a, b), (MAX_FLOW, 1));
        t.next = MAX_FLOW;
        assert_eq!(t.insert(Flow::Service { service: svc("c") }), Some(2));
    }
}
