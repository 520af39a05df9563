//! The registry across workers: Bind/Bound/Unbind messages, connector
//! up/down and re-binding of agent flows, policy reloads.

use super::*;

impl Worker {
    pub(super) fn send_bind(
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

    pub(super) fn send_ctrl(&mut self, worker: usize, msg: Ctrl) {
        if worker == self.cfg.index {
            self.local_ctrl.push_back(msg);
        } else if let Some(q) = self.outbox.get_mut(worker) {
            q.push_back(msg);
        }
    }

    pub(super) fn broadcast(&mut self, msg: Ctrl) {
        for w in 0..self.cfg.workers {
            self.send_ctrl(w, msg.clone());
        }
    }

    pub(super) fn run_local_ctrl(&mut self) {
        while let Some(c) = self.local_ctrl.pop_front() {
            self.on_ctrl(c);
        }
    }

    pub(super) fn on_ctrl(&mut self, c: Ctrl) {
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
                        let connector_id = Arc::clone(&c.identity_uri);
                        let bound = Ctrl::Bound { agent, agent_flow, connector, connector_flow: flow, connector_id };
                        self.send_ctrl(reply_to, bound);
                    }
                    None => self.send_ctrl(reply_to, failed),
                }
                self.put(c);
            }
            Ctrl::Bound { agent, agent_flow, connector, connector_flow, connector_id } => {
                let unbind = Ctrl::Unbind { connector, connector_flow };
                let Some(mut a) = self.take(agent) else {
                    return self.send_ctrl(usize::from(connector.worker), unbind);
                };
                let mut reply = None;
                let mut bound = false;
                match a.flows.get_mut(agent_flow) {
                    Some(Flow::Agent { binding, pending_request, .. }) if *binding == Binding::Pending(connector) => {
                        *binding = Binding::Bound { connector, flow: connector_flow };
                        reply = pending_request.take();
                        bound = true;
                    }
                    _ => self.send_ctrl(usize::from(connector.worker), unbind),
                }
                if bound {
                    // Before RegisterOk, and again on every rebind: the agent
                    // starts (or restarts) its end-to-end session with this
                    // connector and checks its certificate against the name.
                    let msg = Message::FlowBound { flow: agent_flow, connector_id: connector_id.to_string() };
                    self.send_msg(&mut a, &msg);
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
    pub(super) fn reload(&mut self) {
        let (generation, security) = self.shared.security.current();
        self.generation = generation;
        match security.tls.server_config(Arc::clone(&self.stats)) {
            Ok(mut cfg) => {
                cfg.set_cc_algorithm(self.cfg.limits.congestion_control.quiche());
                self.quic_cfg = cfg;
            }
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
    pub(super) fn remove_agent_flow(&mut self, conn: &mut Conn, id: u32) {
        if let Some(Flow::Agent { service, .. }) = conn.flows.remove(id) {
            self.agents.remove(&service, conn.key);
        }
    }

    /// Re-binds every local agent flow for `service` whose binding matches
    /// `pred` to a connector picked from the directory (skipping
    /// `exclude`), or marks it unbound. Visits only the connections that
    /// hold an agent flow for `service` ([`AgentIndex`]).
    pub(super) fn rebind_where(
        &mut self,
        service: &wire::ServiceName,
        pred: impl Fn(&Binding) -> bool,
        exclude: Option<ConnKey>,
    ) {
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
}
