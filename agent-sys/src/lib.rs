//! The agent: a sans-I/O core ([`agent_core::AgentCore`]) that routes tunneled IP
//! packets to services by destination, and a C API over it (`ffi`).

pub mod agent_core;
pub mod direct;
pub mod ffi;
mod ffi_direct;
mod ffi_stats;
pub mod route;
mod tunnel;

/// Protocol version the agent speaks (from `ztna-control`).
pub fn protocol_version() -> u16 {
    ztna_control::wire::VERSION
}

#[cfg(test)]
mod tests {
    #[test]
    fn speaks_protocol_v2() {
        assert_eq!(super::protocol_version(), 2);
        assert_eq!(ztna_control::wire::ALPN, b"ztna/1");
    }
}
