//! Who is connected: each worker publishes one row per authenticated
//! connection about once a second; `/status` (on the metrics listener,
//! so as private as the address it is bound to) serves them as JSON, and
//! the metrics publisher turns them into gauges per role and service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// One authenticated connection.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnStatus {
    /// The client's SPIFFE ID.
    pub identity: String,
    /// `agent`, `connector`, or `agent+connector` (by its registrations);
    /// `none` before the first.
    pub role: &'static str,
    /// The client's address as the relay sees it (what it was told).
    pub observed: SocketAddr,
    /// Services it registered for (as agent or connector), each with this
    /// connection's flows of it; served as the list of names.
    #[serde(serialize_with = "service_names")]
    pub services: BTreeMap<String, usize>,
    /// Flows: an agent's relay flows, a connector's agent legs.
    pub flows: usize,
    pub connected_secs: u64,
    pub worker: usize,
}

fn service_names<S: serde::Serializer>(m: &BTreeMap<String, usize>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(m.keys())
}

/// Per service: how many agents and connectors hold it, and its flows.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub agents: usize,
    pub connectors: usize,
    pub flows: usize,
}

/// At most this many connections are listed in `/status` (the counts
/// cover all of them; `connections_omitted` says how many were left out).
pub const MAX_LISTED: usize = 1000;

#[derive(Debug, Serialize)]
struct Report<'a> {
    uptime_secs: u64,
    agents: usize,
    connectors: usize,
    flows: usize,
    services: BTreeMap<&'a str, ServiceStatus>,
    connections: &'a [ConnStatus],
    connections_omitted: usize,
}

/// The rows of every worker.
#[derive(Debug)]
pub struct StatusBoard {
    started: Instant,
    workers: Vec<Mutex<Vec<ConnStatus>>>,
}

impl StatusBoard {
    pub fn new(workers: usize, started: Instant) -> StatusBoard {
        StatusBoard { started, workers: (0..workers).map(|_| Mutex::new(Vec::new())).collect() }
    }

    /// Replaces worker `w`'s rows.
    pub fn publish(&self, w: usize, rows: Vec<ConnStatus>) {
        if let Some(slot) = self.workers.get(w) {
            *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = rows;
        }
    }

    /// Every row, by identity.
    pub fn rows(&self) -> Vec<ConnStatus> {
        let mut all: Vec<ConnStatus> = self
            .workers
            .iter()
            .flat_map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .collect();
        all.sort_by(|a, b| (&a.identity, a.observed).cmp(&(&b.identity, b.observed)));
        all
    }

    /// Counts per service (agents, connectors, flows).
    pub fn services(rows: &[ConnStatus]) -> BTreeMap<&str, ServiceStatus> {
        let mut m: BTreeMap<&str, ServiceStatus> = BTreeMap::new();
        for r in rows {
            for (s, flows) in &r.services {
                let e = m.entry(s.as_str()).or_default();
                if r.role.contains("agent") {
                    e.agents += 1;
                }
                if r.role.contains("connector") {
                    e.connectors += 1;
                }
                e.flows += flows;
            }
        }
        m
    }

    /// The `/status` document.
    pub fn render_json(&self, now: Instant) -> String {
        let rows = self.rows();
        let count = |role: &str| rows.iter().filter(|r| r.role.contains(role)).count();
        let report = Report {
            uptime_secs: now.saturating_duration_since(self.started).as_secs(),
            agents: count("agent"),
            connectors: count("connector"),
            flows: rows.iter().map(|r| r.flows).sum(),
            services: Self::services(&rows),
            connections: rows.get(..MAX_LISTED).unwrap_or(&rows),
            connections_omitted: rows.len().saturating_sub(MAX_LISTED),
        };
        serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row whose `flows` are all of its first service.
    fn row(id: &str, role: &'static str, services: &[&str], flows: usize, w: usize) -> ConnStatus {
        ConnStatus {
            identity: id.into(),
            role,
            observed: "192.0.2.1:5000".parse().unwrap_or_else(|_| unreachable!()),
            services: services
                .iter()
                .enumerate()
                .map(|(i, s)| (s.to_string(), if i == 0 { flows } else { 0 }))
                .collect(),
            flows,
            connected_secs: 3,
            worker: w,
        }
    }

    #[test]
    fn rows_of_all_workers_are_counted_per_role_and_service() {
        let b = StatusBoard::new(2, Instant::now());
        b.publish(0, vec![row("spiffe://t/agent/a", "agent", &["echo"], 1, 0)]);
        b.publish(1, vec![row("spiffe://t/connector/c", "connector", &["echo"], 1, 1), row("x", "none", &[], 0, 1)]);
        b.publish(7, vec![row("lost", "agent", &[], 0, 7)]);
        let rows = b.rows();
        assert_eq!(rows.len(), 3);
        let s = StatusBoard::services(&rows);
        assert_eq!(s.get("echo"), Some(&ServiceStatus { agents: 1, connectors: 1, flows: 2 }));
        let json: serde_json::Value = serde_json::from_str(&b.render_json(Instant::now())).unwrap_or_default();
        assert_eq!(json["agents"], 1);
        assert_eq!(json["connectors"], 1);
        assert_eq!(json["connections"].as_array().map(Vec::len), Some(3));
        assert_eq!(json["connections_omitted"], 0);
        // Replacing a worker's rows drops the old ones.
        b.publish(1, Vec::new());
        assert_eq!(b.rows().len(), 1);
    }

    #[test]
    fn a_long_list_is_cut_but_counted() {
        let b = StatusBoard::new(1, Instant::now());
        b.publish(
            0,
            (0..MAX_LISTED + 5).map(|i| row(&format!("spiffe://t/agent/{i}"), "agent", &["echo"], 1, 0)).collect(),
        );
        let json: serde_json::Value = serde_json::from_str(&b.render_json(Instant::now())).unwrap_or_default();
        assert_eq!(json["agents"], MAX_LISTED + 5);
        assert_eq!(json["services"]["echo"]["flows"], MAX_LISTED + 5);
        assert_eq!(json["connections"].as_array().map(Vec::len), Some(MAX_LISTED));
        assert_eq!(json["connections_omitted"], 5);
    }
}
