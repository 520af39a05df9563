//! `ZtnaStats` and `ZtnaPathStats`, the C API's counters, and the calls
//! that read them from the core.

use ztna_control::e2e::path_telemetry::TIME_TO_DIRECT_BUCKETS_MS;

use crate::agent_core::AgentCore;
use crate::ffi::{guard, ZtnaAgent, ZTNA_ERR_NULL, ZTNA_OK};

/// Counters. `reserved` keeps room for new fields without an ABI break.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ZtnaStats {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub drop_malformed: u64,
    pub drop_unmapped: u64,
    pub drop_no_flow: u64,
    pub drop_too_large: u64,
    pub drop_backpressure: u64,
    pub drop_unknown_flow: u64,
    pub drop_truncated: u64,
    pub connects: u64,
    pub disconnects: u64,
    /// 1 while connected to the relay.
    pub connected: u64,
    /// Inbound packets whose source is outside their flow's service.
    pub drop_spoofed: u64,
    pub drop_not_pinned: u64,
    /// Datagrams from an address other than the relay's.
    pub drop_direct: u64,
    pub e2e_handshakes: u64,
    pub e2e_established: u64,
    pub e2e_cert_rejected: u64,
    pub e2e_identity_mismatch: u64,
    pub e2e_packets_rejected: u64,
    pub e2e_pending_dropped: u64,
    /// End-to-end sessions up now.
    pub e2e_sessions_up: u64,
    /// Direct paths (3.2): inner packets authenticated over direct paths
    /// and sent over them, punch packets of a session's round, sessions on
    /// a direct path now, and sessions' moves onto a direct path and back
    /// to the relay.
    pub direct_packets_in: u64,
    pub direct_packets_out: u64,
    pub direct_punches_in: u64,
    pub e2e_sessions_direct: u64,
    pub path_to_direct: u64,
    pub path_to_relay: u64,
    pub reserved: [u64; 2],
}

impl ZtnaStats {
    pub(crate) fn of(core: &AgentCore) -> ZtnaStats {
        let s = core.stats();
        ZtnaStats {
            packets_out: s.packets_out,
            bytes_out: s.bytes_out,
            packets_in: s.packets_in,
            bytes_in: s.bytes_in,
            drop_malformed: s.drop_malformed,
            drop_unmapped: s.drop_unmapped,
            drop_no_flow: s.drop_no_flow,
            drop_too_large: s.drop_too_large,
            drop_backpressure: s.drop_backpressure,
            drop_unknown_flow: s.drop_unknown_flow,
            drop_truncated: s.drop_truncated,
            connects: s.connects,
            disconnects: s.disconnects,
            connected: u64::from(core.is_connected()),
            drop_spoofed: s.drop_spoofed,
            drop_not_pinned: s.drop_not_pinned,
            drop_direct: s.drop_direct,
            e2e_handshakes: s.e2e_handshakes,
            e2e_established: s.e2e_established,
            e2e_cert_rejected: s.e2e_cert_rejected,
            e2e_identity_mismatch: s.e2e_identity_mismatch,
            e2e_packets_rejected: s.e2e_packets_rejected,
            e2e_pending_dropped: s.e2e_pending_dropped,
            e2e_sessions_up: core.sessions_up() as u64,
            direct_packets_in: s.direct_packets_in,
            direct_packets_out: s.direct_packets_out,
            direct_punches_in: s.direct_punches_in,
            e2e_sessions_direct: core.sessions_direct() as u64,
            path_to_direct: s.path_to_direct,
            path_to_relay: s.path_to_relay,
            reserved: [0; 2],
        }
    }
}

/// Copies the counters into `*out`.
///
/// # Safety
/// `agent` and `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_stats(agent: *const ZtnaAgent, out: *mut ZtnaStats) -> i32 {
    guard(|| {
        if agent.is_null() || out.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &*agent };
        let st = ZtnaStats::of(&a.core);
        // SAFETY: checked non-NULL.
        unsafe { *out = st };
        ZTNA_OK
    })
}

/// Direct-path telemetry (3.3): punching rounds and their outcomes, bytes
/// over direct paths, and the time-to-direct histogram of the sessions so
/// far. `reserved` keeps room for new fields without an ABI break.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ZtnaPathStats {
    /// Sessions on a direct path now.
    pub sessions_direct: u64,
    /// Rounds run, those that ended with the session on a direct path, and
    /// those that validated none.
    pub punch_rounds: u64,
    pub punch_rounds_direct: u64,
    pub punch_rounds_failed: u64,
    /// UDP payload bytes over direct paths: inner QUIC packets (data,
    /// acknowledgements, probes) and, outbound, punch packets.
    pub direct_bytes_in: u64,
    pub direct_bytes_out: u64,
    /// Moves onto a direct path, and back to the relay.
    pub path_to_direct: u64,
    pub path_to_relay: u64,
    /// Sessions that went direct, and the sum of their times to direct
    /// (ms; from the session's first tunneled packet).
    pub time_to_direct_count: u64,
    pub time_to_direct_sum_ms: u64,
    /// Cumulative: sessions that went direct within 50, 100, 250, 500,
    /// 1000, 2000, 3000, 10000 and 60000 ms; the tenth is
    /// `time_to_direct_count` (+Inf).
    pub time_to_direct_buckets: [u64; 10],
    pub reserved: [u64; 6],
}

const _: () = assert!(TIME_TO_DIRECT_BUCKETS_MS.len() + 1 == 10);

impl ZtnaPathStats {
    pub(crate) fn of(core: &AgentCore) -> ZtnaPathStats {
        let s = core.stats();
        let h = core.time_to_direct();
        let mut buckets = [h.count; 10];
        buckets[..h.buckets.len()].copy_from_slice(&h.buckets);
        ZtnaPathStats {
            sessions_direct: core.sessions_direct() as u64,
            punch_rounds: s.punch_rounds,
            punch_rounds_direct: s.punch_rounds_direct,
            punch_rounds_failed: s.punch_rounds_failed,
            direct_bytes_in: s.direct_bytes_in,
            direct_bytes_out: s.direct_bytes_out,
            path_to_direct: s.path_to_direct,
            path_to_relay: s.path_to_relay,
            time_to_direct_count: h.count,
            time_to_direct_sum_ms: h.sum_ms,
            time_to_direct_buckets: buckets,
            reserved: [0; 6],
        }
    }
}

/// Copies the direct-path telemetry into `*out` (3.3).
///
/// # Safety
/// `agent` and `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ztna_agent_path_stats(agent: *const ZtnaAgent, out: *mut ZtnaPathStats) -> i32 {
    guard(|| {
        if agent.is_null() || out.is_null() {
            return ZTNA_ERR_NULL;
        }
        // SAFETY: checked non-NULL.
        let a = unsafe { &*agent };
        let st = ZtnaPathStats::of(&a.core);
        // SAFETY: checked non-NULL.
        unsafe { *out = st };
        ZTNA_OK
    })
}
