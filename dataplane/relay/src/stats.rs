//! Per-worker counters: atomics written by the owning worker only (relaxed),
//! read by tests, the benchmark and the metrics publisher.

use ztna_ops::counters;

counters! {
    /// Counters of one worker.
    WorkerStats, StatsSnapshot {
    /// UDP packets received from the socket.
    packets_rx,
    /// UDP packets handed to the socket.
    packets_tx,
    /// Packets processed by this worker for connections it owns (incl. handed-in).
    packets_processed,
    /// Packets that failed header parsing (garbage, truncated).
    drop_bad_packet,
    /// Short-header packets for CIDs no connection owns.
    drop_unknown_cid,
    /// Initials refused (too small, unsupported version, limits).
    drop_initial,
    /// Packets handed to their owning worker.
    handoff_out,
    /// Packets received from another worker.
    handoff_in,
    /// Hand-offs dropped because the owner's queue was full.
    drop_handoff_queue_full,
    /// Connections accepted.
    conns_accepted,
    /// Connections closed.
    conns_closed,
    /// Connections currently open (gauge).
    conns_active,
    /// Registrations answered with RegisterOk.
    registrations_ok,
    /// Registrations answered with RegisterError.
    registrations_failed,
    /// Control-channel protocol errors (connection closed).
    control_errors,
    /// Datagrams forwarded (queued to the destination connection).
    datagrams_forwarded,
    /// Payload bytes of forwarded datagrams.
    bytes_forwarded,
    /// Datagrams sent to another worker.
    datagrams_cross_worker,
    /// Datagrams for a flow id the connection does not hold.
    drop_unknown_flow,
    /// Datagrams with an unparseable flow header.
    drop_bad_datagram,
    /// Datagrams for a service with no connector.
    drop_no_connector,
    /// Datagrams whose destination connection is gone.
    drop_peer_gone,
    /// Datagrams dropped: cross-worker data queue full.
    drop_queue_full,
    /// Datagrams dropped: destination's DATAGRAM send queue full.
    drop_dgram_queue_full,
    /// Datagrams dropped: too large for the destination path.
    drop_too_large,
    /// Packets the socket refused (buffer full, unreachable) or no send
    /// slot could take.
    drop_tx,
    /// UDP GSO in use on the worker's socket (gauge, 0 or 1; 0 after the
    /// kernel refused a segmented send).
    udp_gso,
    /// UDP GRO in use on the worker's socket (gauge, 0 or 1).
    udp_gro,
    /// GSO sends of more than one datagram, and the datagrams they carried.
    udp_gso_sends,
    udp_gso_segments,
    /// GSO sends the kernel refused (GSO is then turned off).
    udp_gso_errors,
    /// Receives that carried several coalesced datagrams (GRO), and those
    /// datagrams.
    udp_gro_receives,
    udp_gro_segments,
    /// Goodbyes sent.
    goodbyes_sent,
    /// Client certificates refused: not signed by the organisation CA.
    auth_rejected_unknown_ca,
    /// Client certificates refused: expired or not yet valid.
    auth_rejected_validity,
    /// Client certificates refused: not exactly one acceptable SPIFFE ID.
    auth_rejected_identity,
    /// Client certificates refused for another chain error.
    auth_rejected_other,
    /// Handshakes the relay itself failed in TLS (no or bad client
    /// certificate), counted when the connection is reaped. A client that
    /// refuses the relay's certificate is not counted here.
    handshakes_failed,
    /// Handshakes the client aborted with a TLS alert: it refused the
    /// relay's certificate (a `server_name` the certificate does not
    /// cover, or a CA the client does not trust).
    handshakes_refused_by_client,
    /// Registrations refused by policy (RegisterError{denied}).
    registrations_denied,
    /// Flows and registrations closed because a policy reload revoked them.
    revoked,
    /// Policy/certificate reloads applied by this worker.
    reloads,
    /// Retry packets sent (address validation).
    retries_sent,
    /// Initials with a Retry token that was forged, expired or minted for
    /// another address or connection ID.
    drop_bad_token,
    /// Initials refused: the source IP has too many connections.
    drop_ip_conn_limit,
    /// Initials refused: the source IP exceeds its handshake rate.
    drop_ip_handshake_rate,
    /// Initials refused: the relay's total or this worker's connection limit.
    drop_conn_limit,
    /// Connections dropped because their handshake did not complete in
    /// time (half-open).
    handshakes_timed_out,
    /// Stateless resets sent for packets with unknown CIDs.
    resets_sent,
    /// Stateless resets not sent because of their rate limit.
    drop_reset_rate,
    /// Datagrams dropped: the sending connection exceeded its datagram or
    /// byte rate.
    drop_dgram_rate,
    /// Initials and datagrams refused because the relay-wide memory budget
    /// is exhausted (`limits.memory_budget_mib`).
    drop_memory_budget,
    /// Connections closed with Error{LIMIT} after authentication: their
    /// identity already has `max_conns_per_identity` connections.
    drop_identity_conn_limit,
    /// Connections whose sending stopped at 3× the bytes received before
    /// their address was validated (counted once per connection).
    amplification_limited,
    /// Sends held back until quiche's pacing time (`SendInfo.at`) because
    /// it was more than [`crate::worker::PACING_SLACK`] ahead.
    paced_holds,
    /// Agent connections looked at to re-bind their flows after a
    /// ConnectorUp/Down (only those holding a flow for that service).
    rebind_visits,
    }
}
