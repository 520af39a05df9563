//! The control stream of one connection: framing, Hello, Register and
//! Unregister, Error and the control backlog.

use super::*;

impl Worker {
    pub(super) fn read_control(&mut self, conn: &mut Conn) {
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
    pub(super) fn fail(&mut self, conn: &mut Conn, code: Code, reason: &str) {
        self.stats.control_errors.fetch_add(1, Ordering::Relaxed);
        warn!(worker = self.cfg.index, peer = %conn.peer, %code, reason, "closing connection");
        self.send_msg(conn, &Message::Error { code, reason: reason.to_owned() });
        conn.close_at = Some((self.now + ERROR_LINGER, code));
        conn.stopped = true;
    }

    pub(super) fn send_msg(&mut self, conn: &mut Conn, m: &Message) {
        m.encode(&mut conn.tx);
        self.flush_control(conn);
    }

    pub(super) fn flush_control(&mut self, conn: &mut Conn) {
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

    pub(super) fn on_message(&mut self, conn: &mut Conn, m: Message) {
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
    pub(super) fn on_flow_refused(&mut self, conn: &mut Conn, flow: u32, code: Code) {
        let Some(Flow::Peer { agent, agent_flow, .. }) = conn.flows.get(flow) else { return };
        let (agent, agent_flow) = (*agent, *agent_flow);
        conn.flows.remove(flow);
        info!(worker = self.cfg.index, connector = %conn.identity_uri, flow, %code, "connector refused a flow");
        // Whatever code the connector gave, the agent learns "denied".
        let msg = Ctrl::Refused { agent, agent_flow, connector: conn.key, connector_flow: flow, code: Code::DENIED };
        self.send_ctrl(usize::from(agent.worker), msg);
    }

    /// Refills and takes one Register/Unregister token.
    pub(super) fn take_reg_token(&mut self, conn: &mut Conn) -> bool {
        let (tokens, last) = conn.reg_tokens;
        let rate = f64::from(self.cfg.limits.registrations_per_sec);
        let burst = self.cfg.limits.max_registrations as f64;
        let refilled = (tokens + self.now.saturating_duration_since(last).as_secs_f64() * rate).min(burst);
        let ok = refilled >= 1.0;
        conn.reg_tokens = (if ok { refilled - 1.0 } else { refilled }, self.now);
        ok
    }

    pub(super) fn register_error(&mut self, conn: &mut Conn, request_id: u32, code: Code, reason: &str) {
        self.stats.registrations_failed.fetch_add(1, Ordering::Relaxed);
        self.send_msg(conn, &Message::RegisterError { request_id, code, reason: reason.to_owned() });
    }

    /// May this connection hold `role` for `service` under the current
    /// policy? (An agent certificate can never register as a connector, and
    /// the reverse: the policy checks the identity's kind.)
    pub(super) fn allowed(&self, conn: &Conn, role: Role, service: &str) -> bool {
        let Some(id) = &conn.identity else { return false };
        match role {
            Role::Connector => self.security.policy.may_serve(id, service),
            Role::Agent => self.security.policy.may_reach(id, service),
        }
    }

    pub(super) fn on_register(&mut self, conn: &mut Conn, request_id: u32, role: Role, service: wire::ServiceName) {
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

    pub(super) fn on_unregister(&mut self, conn: &mut Conn, flow: u32) {
        if matches!(conn.flows.get(flow), Some(Flow::Peer { .. }) | None) {
            // Connector legs are the relay's to close, not the client's.
            return;
        }
        self.drop_registration(conn, flow);
    }

    /// Removes an agent flow or a connector's service registration and
    /// tells the other side (Unbind, ConnectorDown).
    pub(super) fn drop_registration(&mut self, conn: &mut Conn, flow: u32) {
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
}
