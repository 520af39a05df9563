//! Agent core and C API. The edges issue builds the sans-I/O agent core, the
//! zero-copy C API and the Linux TUN agent here; for now this crate only
//! pins the protocol version the agent will speak.

/// Protocol version the agent speaks (from `ztna-control`).
pub fn protocol_version() -> u16 {
    ztna_control::wire::VERSION
}

#[cfg(test)]
mod tests {
    #[test]
    fn speaks_protocol_v1() {
        assert_eq!(super::protocol_version(), 1);
        assert_eq!(ztna_control::wire::ALPN, b"ztna/1");
    }
}
