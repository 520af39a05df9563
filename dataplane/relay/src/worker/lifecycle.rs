//! Timers, sending (with the amplification limit), reaping, drain and
//! shutdown.

use super::*;

/// How often a worker refreshes its `/status` rows.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// After a connection closed, sooner, but not more often than this (a
/// client that reconnects in a loop must not make every turn O(connections)).
const STATUS_DIRTY_EVERY: Duration = Duration::from_millis(100);

impl Worker {
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
            // Paced: its timer releases it (`SendInfo.at`, RFC 9002 §7.7).
            if conn.paced_until.is_some_and(|t| t <= now) {
                conn.paced_until = None;
            }
            while conn.paced_until.is_none() {
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
                        tx.commit_from(n, info.to, Some(info.from.ip()));
                        if let Some((_, sent)) = conn.amplification.as_mut() {
                            *sent += n as u64;
                        }
                        self.stats.packets_tx.fetch_add(1, Ordering::Relaxed);
                        // quiche's pacer spaces packets after this one: the
                        // rest waits rather than leaving as a burst (one
                        // packet may leave early by up to the slack).
                        // `info.at` is on quiche's clock (its own
                        // Instant::now()), not this turn's `now`: only a
                        // time ahead of `now` (rare) is measured against a
                        // fresh reading, which is never earlier than `now`.
                        let ahead = info.at > now + PACING_SLACK;
                        let wait =
                            if ahead { info.at.saturating_duration_since(Instant::now()) } else { Duration::ZERO };
                        if wait > PACING_SLACK {
                            conn.paced_until = Some(now + wait);
                            self.stats.paced_holds.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
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
        for (bytes, to, from) in self.pending_tx.drain(..) {
            let buf = tx.buf();
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            tx.commit_from(n, to, Some(from.ip()));
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
        let since = now.saturating_duration_since(self.last_status);
        if since >= STATUS_EVERY || (self.status_dirty && since >= STATUS_DIRTY_EVERY) {
            self.status_dirty = false;
            self.last_status = now;
            self.publish_status(now);
        }
    }

    /// One `/status` row per authenticated connection of this worker.
    fn publish_status(&self, now: Instant) {
        use crate::routing::Flow;
        use std::collections::BTreeMap;
        let rows = self
            .slots
            .iter()
            .flatten()
            .filter_map(|c| {
                let id = c.identity.as_ref()?;
                let (mut agent, mut connector, mut flows) = (false, false, 0);
                // Service → this connection's flows of it (an agent's
                // relay flows; a connector's legs, by their handle).
                let mut services: BTreeMap<String, usize> = BTreeMap::new();
                for (_, f) in c.flows.iter() {
                    let (service, flow) = match f {
                        Flow::Agent { service, .. } => {
                            agent = true;
                            (Some(service), 1)
                        }
                        Flow::Service { service } => {
                            connector = true;
                            (Some(service), 0)
                        }
                        Flow::Peer { handle, .. } => match c.flows.get(*handle) {
                            Some(Flow::Service { service }) => (Some(service), 1),
                            _ => (None, 1),
                        },
                    };
                    flows += flow;
                    if let Some(service) = service {
                        *services.entry(service.to_string()).or_default() += flow;
                    }
                }
                let role = match (agent, connector) {
                    (true, true) => "agent+connector",
                    (true, false) => "agent",
                    (false, true) => "connector",
                    (false, false) => "none",
                };
                Some(crate::status::ConnStatus {
                    identity: id.to_string(),
                    role,
                    observed: canonical(c.peer),
                    services,
                    flows,
                    connected_secs: now.saturating_duration_since(c.opened).as_secs(),
                    worker: self.cfg.index,
                })
            })
            .collect();
        self.shared.status.publish(self.cfg.index, rows);
    }

    pub(super) fn update_timer(&mut self, conn: &mut Conn) {
        let close = conn.close_at.map(|(t, _)| t);
        let next =
            [conn.quic.timeout_instant(), close, conn.handshake_deadline, conn.paced_until].into_iter().flatten().min();
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

    pub(super) fn reap(&mut self, mut conn: Box<Conn>) {
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
        if !conn.quic.is_established() {
            self.log_failed_handshake(&conn);
        }
        // Its /status row goes within STATUS_DIRTY_EVERY, not a second later.
        self.status_dirty |= conn.identity.is_some();
        self.free.push(key.slot);
        self.stats.conns_closed.fetch_add(1, Ordering::Relaxed);
        self.stats.conns_active.fetch_sub(1, Ordering::Relaxed);
        let reason = conn.quic.peer_error().map(|e| e.error_code).or(conn.quic.local_error().map(|e| e.error_code));
        debug!(worker = self.cfg.index, peer = %conn.peer, ?reason, timed_out = conn.quic.is_timed_out(), "connection closed");
    }

    /// Why a handshake failed, once per cause and minute: the relay refused
    /// the client (its certificate: the verify hook logged the details),
    /// or the client refused the relay's certificate (most often a
    /// `server_name` the certificate does not cover).
    fn log_failed_handshake(&mut self, conn: &Conn) {
        use ztna_control::tls_report::{alert_name, close_code_text, describe};
        if let Some(e) = conn.quic.local_error().filter(|e| !e.is_app) {
            self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            let reason = close_code_text(e.error_code);
            if self.handshake_log.allow(&reason, self.now) {
                warn!(worker = self.cfg.index, peer = %conn.peer, reason, "TLS handshake failed; connection refused");
            }
        } else if let Some(e) = conn.quic.peer_error().filter(|e| !e.is_app && alert_name(e.error_code).is_some()) {
            self.stats.handshakes_refused_by_client.fetch_add(1, Ordering::Relaxed);
            let reason = close_code_text(e.error_code);
            if self.handshake_log.allow(&format!("peer {reason}"), self.now) {
                let ours = self.security.tls.chain.first().map(|c| describe(c)).unwrap_or_default();
                warn!(worker = self.cfg.index, peer = %conn.peer, reason, certificate = ours,
                      "a client refused the relay's certificate: clients must name the relay (server_name) by a \
                       DNS name or IP address the certificate covers, and trust the CA that signed it");
            }
        }
    }

    /// Moves outboxes into peers' inboxes and wakes them.
    pub(super) fn publish(&mut self) {
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
    pub(super) fn goodbye_all(&mut self, goodbye: &Message, mut then: impl FnMut(&mut Conn)) {
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
