//! The agent's end-to-end tunnel for one service: its current relay flow,
//! the connector identity the relay bound the flow to, and the inner
//! session with that connector. The session outlives relay flows: when the
//! agent moves to another relay and the new flow is bound to the same
//! connector identity, the same session goes on over it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_control::backoff::Backoff;
use ztna_control::e2e::E2eSession;
use ztna_control::rng::SplitMix64;

/// First and longest wait before a failed session is tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub(crate) struct Tunnel {
    /// The relay flow carrying the session now (None between relay legs).
    pub flow: Option<u32>,
    /// The connector identity the relay named for the flow.
    pub connector: Option<String>,
    /// Connector identities this service accepts (empty: any the relay names).
    pub pins: Vec<String>,
    pub session: Option<E2eSession>,
    backoff: Backoff,
    /// A failed session is retried no earlier than this.
    pub retry_at: Option<Instant>,
    /// The path last reported (PathChanged), and whether the session's
    /// time to direct was counted.
    pub reported_path: Option<SocketAddr>,
    pub direct_counted: bool,
}

impl Tunnel {
    pub fn new(pins: Vec<String>) -> Tunnel {
        Tunnel {
            flow: None,
            connector: None,
            pins,
            session: None,
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            retry_at: None,
            reported_path: None,
            direct_counted: false,
        }
    }

    /// Whether the relay's choice of connector is acceptable here.
    pub fn accepts(&self, connector: &str) -> bool {
        self.pins.is_empty() || self.pins.iter().any(|p| p == connector)
    }

    /// The session is up (traffic flows).
    pub fn is_up(&self) -> bool {
        self.session.as_ref().is_some_and(E2eSession::is_up)
    }

    /// The session ended: try again after the backoff.
    pub fn failed(&mut self, now: Instant, rng: &mut SplitMix64) {
        self.retry_at = Some(now + self.backoff.next_delay(rng));
    }

    /// The connector refused the session (DENIED: its allow-list or the
    /// service's rules): that does not change in a second, so wait the
    /// longest backoff. A policy fix still takes effect within
    /// [`RETRY_MAX`], without restarting the agent.
    pub fn refused(&mut self, now: Instant) {
        self.retry_at = Some(now + RETRY_MAX);
    }

    /// The session came up: the next failure starts the backoff afresh.
    pub fn succeeded(&mut self) {
        self.backoff.reset();
        self.retry_at = None;
    }
}
