//! The connector's end-to-end sessions: one per agent and service, found
//! by the connection ID its packets carry, bounded in total and per
//! identity.
//!
//! The engine never scans every session per packet: a session it touched
//! (received a packet, ran its timer, was handed an IP packet) goes on the
//! send list that the next flush works through, and each session's next
//! deadline sits in one ordered timer set, so finding what is due costs
//! O(log n).
//!
//! A session is created only by an inner Initial arriving on a relay flow
//! (never from anywhere else). It remembers the relay flow that carries it
//! now; an authenticated packet on another flow (the agent moved to
//! another relay) moves it there. Its gateway state (TCP connections, UDP
//! flows) is keyed by its slot and a generation, so it survives the move
//! and a reused slot never sees a predecessor's state.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use ztna_control::e2e::{E2eSession, CID_LEN};

use crate::gateway::FlowKey;

/// A relay flow: (relay link index, connector-leg flow id).
pub(crate) type RelayFlow = (usize, u32);

pub(crate) struct Peer {
    pub session: E2eSession,
    /// The relay flow carrying the session now (None after it closed).
    pub via: Option<RelayFlow>,
    /// The agent identity: as the relay named it until the handshake
    /// ends, then as the agent proved it.
    pub agent_id: Arc<str>,
    pub proven: bool,
    /// The admitted service (index into the configuration).
    pub service: Option<usize>,
    pub key: FlowKey,
    /// Connection IDs it issued for direct paths (besides its first).
    cids: Vec<[u8; CID_LEN]>,
    /// The session's path counters as last counted into the stats.
    pub paths_seen: ztna_control::e2e::PathCounters,
    /// Its entry in the timer set, and whether it is on the send list.
    armed: Option<Instant>,
    queued: bool,
}

/// Limits of [`Peers`] (from the configuration).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerLimits {
    pub sessions: usize,
    pub sessions_per_identity: usize,
    pub handshakes: usize,
    pub handshakes_per_identity: usize,
}

/// Why a new session was not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Limit,
}

pub(crate) struct Peers {
    slots: Vec<Option<Peer>>,
    free: Vec<usize>,
    by_cid: HashMap<[u8; CID_LEN], usize>,
    /// Sessions still handshaking, by the relay flow their Initial came on
    /// (an agent's Initials carry its own random DCID, not ours).
    by_flow: HashMap<RelayFlow, usize>,
    handshakes: HashMap<Arc<str>, usize>,
    sessions: HashMap<Arc<str>, usize>,
    handshaking: usize,
    generation: u32,
    limits: PeerLimits,
    /// (deadline, slot) of every session with a timer.
    timers: BTreeSet<(Instant, usize)>,
    /// Sessions that may have something to send (module docs).
    send_list: Vec<usize>,
}

impl Peers {
    pub fn new(limits: PeerLimits) -> Peers {
        Peers {
            slots: Vec::new(),
            free: Vec::new(),
            by_cid: HashMap::new(),
            by_flow: HashMap::new(),
            handshakes: HashMap::new(),
            sessions: HashMap::new(),
            handshaking: 0,
            generation: 0,
            limits,
            timers: BTreeSet::new(),
            send_list: Vec::new(),
        }
    }

    /// The session in `slot` changed: its timer is re-read and it goes on
    /// the send list.
    pub fn touch(&mut self, slot: usize) {
        self.rearm(slot);
        self.mark(slot);
    }

    /// Puts the session in `slot` on the send list (once).
    pub fn mark(&mut self, slot: usize) {
        if let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            if !p.queued {
                p.queued = true;
                self.send_list.push(slot);
            }
        }
    }

    /// Re-reads the session's next deadline into the timer set.
    pub fn rearm(&mut self, slot: usize) {
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else { return };
        let next = p.session.next_deadline();
        if p.armed == next {
            return;
        }
        if let Some(old) = p.armed {
            self.timers.remove(&(old, slot));
        }
        if let Some(t) = next {
            self.timers.insert((t, slot));
        }
        p.armed = next;
    }

    /// The send list, emptied (each session's mark cleared): the caller
    /// flushes them and [`Peers::mark`]s again those it could not finish.
    pub fn take_send_list(&mut self, out: &mut Vec<usize>) {
        out.clear();
        std::mem::swap(out, &mut self.send_list);
        for &slot in out.iter() {
            if let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                p.queued = false;
            }
        }
    }

    /// Sessions whose timer is due at `now`.
    pub fn due(&self, now: Instant, out: &mut Vec<usize>) {
        out.clear();
        out.extend(self.timers.range(..=(now, usize::MAX)).map(|&(_, slot)| slot));
    }

    /// The earliest session timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|&(t, _)| t)
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn get(&self, slot: usize) -> Option<&Peer> {
        self.slots.get(slot)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Peer> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// The session of gateway key `key` (generation checked).
    pub fn by_key(&mut self, key: FlowKey) -> Option<&mut Peer> {
        self.get_mut(key.session).filter(|p| p.key == key)
    }

    pub fn by_cid(&self, cid: &[u8]) -> Option<usize> {
        let cid: [u8; CID_LEN] = cid.try_into().ok()?;
        self.by_cid.get(&cid).copied()
    }

    /// The session of a CID it issued for direct paths (not its first,
    /// which the relay path uses).
    pub fn by_direct_cid(&self, cid: &[u8]) -> Option<usize> {
        let slot = self.by_cid(cid)?;
        let p = self.slots.get(slot)?.as_ref()?;
        p.cids.iter().any(|c| c[..] == *cid).then_some(slot)
    }

    /// The session in `slot` issued `cid` (for a direct path). A session
    /// holds at most [`ztna_control::e2e::ACTIVE_CIDS`] at a time.
    pub fn add_cid(&mut self, slot: usize, cid: [u8; CID_LEN]) {
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else { return };
        if p.cids.len() < 2 * ztna_control::e2e::ACTIVE_CIDS as usize && !self.by_cid.contains_key(&cid) {
            p.cids.push(cid);
            self.by_cid.insert(cid, slot);
        }
    }

    /// The agent retired `cid` of the session in `slot`.
    pub fn remove_cid(&mut self, slot: usize, cid: [u8; CID_LEN]) {
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else { return };
        if let Some(i) = p.cids.iter().position(|c| *c == cid) {
            p.cids.swap_remove(i);
            self.by_cid.remove(&cid);
        }
    }

    pub fn handshaking_on(&self, via: RelayFlow) -> Option<usize> {
        self.by_flow.get(&via).copied()
    }

    /// Whether a new session for `agent_id` (the relay's name) fits.
    pub fn admits_handshake(&self, agent_id: &Arc<str>) -> Result<(), Refused> {
        let mine = self.handshakes.get(agent_id).copied().unwrap_or(0);
        if self.len() >= self.limits.sessions
            || self.handshaking >= self.limits.handshakes
            || mine >= self.limits.handshakes_per_identity
        {
            return Err(Refused::Limit);
        }
        Ok(())
    }

    /// Adds a handshaking session that came on `via`; returns its slot.
    pub fn insert(&mut self, session: E2eSession, via: RelayFlow, agent_id: Arc<str>) -> usize {
        self.generation = self.generation.wrapping_add(1);
        let slot = self.free.pop().unwrap_or(self.slots.len());
        let key = FlowKey { session: slot, flow: self.generation };
        self.by_cid.insert(session.source_id(), slot);
        self.by_flow.insert(via, slot);
        *self.handshakes.entry(Arc::clone(&agent_id)).or_default() += 1;
        self.handshaking += 1;
        let peer = Peer {
            session,
            via: Some(via),
            agent_id,
            proven: false,
            service: None,
            key,
            cids: Vec::new(),
            paths_seen: Default::default(),
            armed: None,
            queued: false,
        };
        match self.slots.get_mut(slot) {
            Some(s) => *s = Some(peer),
            None => self.slots.push(Some(peer)),
        }
        slot
    }

    fn end_handshake(&mut self, slot: usize) {
        let Some(p) = self.slots.get(slot).and_then(Option::as_ref) else { return };
        if p.proven {
            return;
        }
        let id = Arc::clone(&p.agent_id);
        if let Some(via) = p.via {
            if self.by_flow.get(&via) == Some(&slot) {
                self.by_flow.remove(&via);
            }
        }
        if let Some(n) = self.handshakes.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.handshakes.remove(&id);
            }
        }
        self.handshaking = self.handshaking.saturating_sub(1);
    }

    /// The handshake of `slot` proved `agent`: it now counts against that
    /// identity's sessions. `Err` when the identity holds its share.
    pub fn prove(&mut self, slot: usize, agent: Arc<str>) -> Result<(), Refused> {
        self.end_handshake(slot);
        let held = self.sessions.get(&agent).copied().unwrap_or(0);
        let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else { return Err(Refused::Limit) };
        p.proven = true;
        if held >= self.limits.sessions_per_identity {
            // Counted as proven with no session: removal must not
            // decrement another session's share.
            p.agent_id = Arc::from("");
            return Err(Refused::Limit);
        }
        *self.sessions.entry(Arc::clone(&agent)).or_default() += 1;
        p.agent_id = agent;
        Ok(())
    }

    /// The session's packets now come on `via` (it moved relays).
    pub fn move_to(&mut self, slot: usize, via: RelayFlow, now: Instant) {
        if let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            p.via = Some(via);
            p.session.set_carried(true, now);
            // Its packet just came through this relay: it is alive.
            p.session.set_stalled(false, now);
        }
        self.touch(slot);
    }

    /// Applies `f` to every session that `pick` selects, then touches them
    /// (relay events: rare, so a scan is fine here); returns their slots.
    fn each_then_touch(&mut self, pick: impl Fn(&Peer) -> bool, mut f: impl FnMut(&mut Peer)) -> Vec<usize> {
        let mut changed = Vec::new();
        for (slot, p) in self.slots.iter_mut().enumerate() {
            if let Some(p) = p.as_mut().filter(|p| pick(p)) {
                f(p);
                changed.push(slot);
            }
        }
        for &slot in &changed {
            self.touch(slot);
        }
        changed
    }

    /// A relay flow closed: sessions on it wait for their agent's next.
    pub fn flow_closed(&mut self, via: RelayFlow, now: Instant) {
        self.by_flow.remove(&via);
        self.each_then_touch(
            |p| p.via == Some(via),
            |p| {
                p.via = None;
                p.session.set_carried(false, now);
            },
        );
    }

    /// A relay link was lost: none of its flows carry sessions now.
    pub fn link_lost(&mut self, link: usize, now: Instant) {
        self.by_flow.retain(|(l, _), _| *l != link);
        self.each_then_touch(
            |p| p.via.is_some_and(|(l, _)| l == link),
            |p| {
                p.via = None;
                p.session.set_carried(false, now);
            },
        );
    }

    /// Link `link`'s relay was heard again: its sessions resume loss
    /// recovery ([`ztna_control::e2e::E2eSession::set_stalled`]).
    /// Returns the sessions it resumed.
    pub fn link_heard(&mut self, link: usize, now: Instant) -> Vec<usize> {
        self.each_then_touch(|p| p.via.is_some_and(|(l, _)| l == link), |p| p.session.set_stalled(false, now))
    }

    /// Removes a session; returns it (the caller drops its gateway state).
    pub fn remove(&mut self, slot: usize) -> Option<Peer> {
        self.end_handshake(slot);
        let p = self.slots.get_mut(slot)?.take()?;
        if let Some(t) = p.armed {
            self.timers.remove(&(t, slot));
        }
        self.by_cid.remove(&p.session.source_id());
        for c in &p.cids {
            self.by_cid.remove(c);
        }
        if p.proven && !p.agent_id.is_empty() {
            if let Some(n) = self.sessions.get_mut(&p.agent_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.sessions.remove(&p.agent_id);
                }
            }
        }
        self.free.push(slot);
        Some(p)
    }

    /// Slots in use.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(i, _)| i)
    }

    /// Sessions up.
    pub fn up(&self) -> usize {
        self.slots.iter().flatten().filter(|p| p.session.is_up()).count()
    }

    /// Inner handshakes in progress.
    pub fn handshaking(&self) -> usize {
        self.handshaking
    }
}
