//! Accepting connections: packets in, steering hand-off, Version Negotiation,
//! stateless resets, Retry, admission (limits, memory budget) and the
//! identity check once the handshake is done.

use super::*;
use std::net::IpAddr;

impl Worker {
    /// A packet read from this worker's socket; `dst` is the local address
    /// it was sent to when the socket reports it (bound to a wildcard).
    pub fn handle_packet(&mut self, buf: &mut [u8], from: SocketAddr, dst: Option<IpAddr>, now: Instant) {
        self.now = now;
        let local = self.local_for(dst);
        self.stats.packets_rx.fetch_add(1, Ordering::Relaxed);
        let Some(owner) = cid::owner(buf, self.cfg.workers) else {
            self.stats.drop_bad_packet.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if owner != self.cfg.index {
            // Steering missed (no BPF, or the worker count changed): hand the
            // packet to its owner instead of dropping it.
            let msg = Data::Packet {
                from,
                local,
                bytes: self.mesh.buffer(self.cfg.index, buf),
                sender: self.cfg.index as u16,
            };
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
        self.process_packet(buf, from, local, now);
    }

    /// The relay's address as the client sees it: the socket's, with the
    /// IP the packet was sent to when the socket is bound to a wildcard (in
    /// the socket's family, IPv4 mapped on a dual-stack socket).
    fn local_for(&self, dst: Option<IpAddr>) -> SocketAddr {
        let bound = self.cfg.local_addr;
        let ip = match dst {
            Some(IpAddr::V4(a)) if bound.is_ipv6() => IpAddr::V6(a.to_ipv6_mapped()),
            Some(ip) if !ip.is_unspecified() => ip,
            _ => bound.ip(),
        };
        SocketAddr::new(ip, bound.port())
    }

    pub(super) fn process_packet(&mut self, buf: &mut [u8], from: SocketAddr, local: SocketAddr, now: Instant) {
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
                        self.stateless_reset(&dcid, buf.len(), (from, local), now);
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
                        self.pending_tx.push((out, from, local));
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
                match self.accept(&initial, (from, local), buf.len(), now) {
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
        let info = quiche::RecvInfo { from, to: local };
        if let Err(e) = conn.quic.recv(buf, info) {
            debug!(worker = self.cfg.index, error = %e, "packet rejected by connection");
        }
        self.after_io(&mut conn, now);
        self.put(conn);
    }

    /// Answers a short-header packet for an unknown CID with a stateless
    /// reset (rate-limited), so a client of a relay that restarted or lost
    /// the connection learns it at once instead of after the idle timeout.
    pub(super) fn stateless_reset(&mut self, dcid: &[u8], len: usize, path: (SocketAddr, SocketAddr), now: Instant) {
        let (from, local) = path;
        if !cid::is_ours(dcid, self.cfg.node_id) {
            return;
        }
        if !self.reset_rate.take(1.0, now) {
            self.stats.drop_reset_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut out = [0u8; 64];
        if let Some(n) = self.security.reset.write_reset(dcid, len, &mut out) {
            self.pending_tx.push((out[..n].to_vec(), from, local));
            self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends a Retry carrying a token bound to the client's address.
    pub(super) fn send_retry(&mut self, initial: &Initial, path: (SocketAddr, SocketAddr), now: Instant) {
        let (from, local) = path;
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
            self.pending_tx.push((out, from, local));
            self.stats.retries_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A new connection for an Initial with an unknown CID, after the
    /// limits, the per-IP limits and (when required) address validation.
    /// `path`: the client's address and ours as it sent to it.
    pub(super) fn accept(
        &mut self,
        initial: &Initial,
        path: (SocketAddr, SocketAddr),
        len: usize,
        now: Instant,
    ) -> Option<u32> {
        let (from, local) = path;
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
                self.send_retry(initial, (from, local), now);
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
        let scid_key = CidKey::new(&scid)?;
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
        // The check above is cheap but racy: two workers may both see one
        // slot left. Reserving it atomically keeps the total exact.
        let reserved = self
            .shared
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limits.max_conns).then_some(n + 1));
        if reserved.is_err() {
            per_ip.close(ip);
            self.stats.drop_conn_limit.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.quic_cfg.set_stateless_reset_token(Some(self.security.reset.token(&scid)));
        let odcid_ref = odcid.as_deref().map(quiche::ConnectionId::from_ref);
        let quic = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            odcid_ref.as_ref(),
            local,
            from,
            &mut self.quic_cfg,
        ) {
            Ok(q) => q,
            Err(_) => {
                per_ip.close(ip);
                self.shared.conns.fetch_sub(1, Ordering::Relaxed);
                self.stats.drop_initial.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
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
            paced_until: None,
            close_at: None,
            stopped: false,
            reg_tokens: (self.cfg.limits.max_registrations as f64, self.now),
            identity: None,
            identity_uri: Arc::from(""),
            ip,
            is_connector: false,
            dgram_rate: self.cfg.limits.dgram_buckets(false, now),
            handshake_deadline: Some(now + self.cfg.limits.handshake_timeout()),
            // A valid Retry token proves the address.
            amplification: if odcid.is_some() { None } else { Some((0, 0)) },
            amplification_hit: false,
            charged_queues: 0,
            identity_counted: false,
            opened: now,
        };
        self.charge(CONN_CHARGE as i64);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some(Box::new(conn));
        }
        self.stats.conns_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.conns_active.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Reads the identity of an established connection. TLS has already
    /// verified the chain and the identity rule (`tls::verify`); this only
    /// fails if the certificate vanished, which closes the connection.
    pub(super) fn authenticate(&mut self, conn: &mut Conn) {
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
}
