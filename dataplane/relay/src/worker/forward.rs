//! The forwarding hot path: datagrams from one leg to the other, across
//! workers through the mesh, and admission to the destination's queue.

use super::*;

impl Worker {
    /// Whether a datagram of `len` bytes may join `dst`'s send queue:
    /// within the per-connection byte cap, and, once the memory budget is
    /// exhausted, only while the queue is short (counted when refused).
    pub(super) fn admit(&self, dst: &Conn, len: usize) -> bool {
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

    pub(super) fn read_datagrams(&mut self, conn: &mut Conn, now: Instant) {
        // quiche hands over the buffer it parsed the frame into, and the
        // rewritten datagram goes back to it as is: no copy on the way
        // through (dgram_recv/dgram_send would copy twice).
        while let Ok(mut d) = conn.quic.dgram_recv_buf() {
            if let Some(tap) = self.tap.as_mut() {
                tap(d.as_mut_slice());
            }
            self.forward(conn, d, now);
        }
    }

    /// Forwards one datagram received on `conn` to the other leg of its
    /// flow. Its flow id is decoded once, here: the rewrite and the
    /// receiving worker (after a hand-off) use the lengths found now.
    pub(super) fn forward(&mut self, conn: &mut Conn, mut d: Vec<u8>, now: Instant) {
        let (flow, payload_len) = match datagram::parse(&d) {
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
        let header_len = d.len().saturating_sub(payload_len);
        if !datagram::rewrite_in_place(&mut d, header_len, to_flow) {
            // The other leg's flow id has another varint length.
            let mut re = Vec::with_capacity(payload_len + 8);
            datagram::encode_into(to_flow, d.get(header_len..).unwrap_or_default(), &mut re);
            d = re;
        }
        self.deliver(conn, to, d, payload_len, now);
    }

    /// Queues `bytes` (a whole datagram, flow id rewritten) on `to`. On
    /// this worker the buffer moves into quiche's send queue as it is;
    /// across workers it is copied into a mesh buffer.
    pub(super) fn deliver(&mut self, conn: &mut Conn, to: ConnKey, bytes: Vec<u8>, payload_len: usize, now: Instant) {
        if usize::from(to.worker) == self.cfg.index {
            if to == conn.key {
                if self.admit(conn, bytes.len()) {
                    let r = conn.quic.dgram_send_buf(bytes);
                    self.count_delivery(r, payload_len, now);
                }
            } else if let Some(mut dst) = self.take(to) {
                if self.admit(&dst, bytes.len()) {
                    let r = dst.quic.dgram_send_buf(bytes);
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
            // A copy into a buffer of this worker's recycle queue: the
            // quiche buffer is freed here, so no allocation crosses threads.
            bytes: self.mesh.buffer(self.cfg.index, &bytes),
            payload_len,
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

    pub(super) fn count_delivery(&mut self, r: quiche::Result<()>, payload_len: usize, received: Instant) {
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
                Data::Datagram { to, bytes, payload_len, received, sender } => {
                    self.charge(-(bytes.len() as i64));
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
                Data::Packet { from, local, mut bytes, sender } => {
                    self.charge(-(bytes.len() as i64));
                    self.stats.handoff_in.fetch_add(1, Ordering::Relaxed);
                    self.process_packet(&mut bytes, from, local, now);
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
}
