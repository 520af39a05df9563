//! Connection-ID layout and packet steering.
//!
//! Every CID the relay issues is [`CID_LEN`] bytes, QUIC-LB style:
//!
//! ```text
//! byte 0      first octet: config rotation (3 bits, 0) | length-1 (5 bits, 15) = 0x0f
//! bytes 1..3  node id (u16 BE), room for a load balancer across relays
//! byte 3      worker index
//! bytes 4..16 random
//! ```
//!
//! The owner of a packet is the worker byte of its DCID modulo the worker
//! count. The client's first Initial carries a random DCID; the same rule
//! applied to it picks the worker that accepts the connection, and that
//! worker issues CIDs with its own index, so every later packet maps to it
//! too. [`owner`] is the software twin of the BPF program in `bpf.rs`.

/// Length of every relay-issued connection ID.
pub const CID_LEN: usize = 16;
/// First octet of relay CIDs (QUIC-LB: rotation 0, length 15).
pub const FIRST_OCTET: u8 = 0x0f;
/// Offset of the worker byte inside a CID.
pub const WORKER_BYTE: usize = 3;
/// Offset of the worker byte in a short-header packet (DCID at 1).
pub const SHORT_WORKER_OFFSET: usize = 1 + WORKER_BYTE;
/// Offset of the worker byte in a long-header packet (DCID at 6).
pub const LONG_WORKER_OFFSET: usize = 6 + WORKER_BYTE;

/// Builds a CID owned by `worker` on `node` from 12 random bytes.
pub fn make(node: u16, worker: u8, random: [u8; 12]) -> [u8; CID_LEN] {
    let mut cid = [0u8; CID_LEN];
    cid[0] = FIRST_OCTET;
    cid[1..3].copy_from_slice(&node.to_be_bytes());
    cid[WORKER_BYTE] = worker;
    cid[4..].copy_from_slice(&random);
    cid
}

/// Whether `cid` has the layout of a CID issued by relay `node` (what a
/// stateless reset may answer: never a client-chosen Initial DCID).
pub fn is_ours(cid: &[u8], node: u16) -> bool {
    cid.len() == CID_LEN && cid.first() == Some(&FIRST_OCTET) && cid.get(1..3) == Some(&node.to_be_bytes()[..])
}

/// The worker that owns a received UDP payload, or `None` when the packet is
/// too short to carry a DCID byte at the steering offset.
pub fn owner(packet: &[u8], workers: usize) -> Option<usize> {
    let first = *packet.first()?;
    let offset = if first & 0x80 != 0 { LONG_WORKER_OFFSET } else { SHORT_WORKER_OFFSET };
    let b = *packet.get(offset)?;
    Some(usize::from(b) % workers.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_headers_map_to_the_cid_worker() {
        let cid = make(0x0102, 3, [0xaa; 12]);
        assert_eq!(cid[..4], [0x0f, 0x01, 0x02, 3]);
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owner(&short, 4), Some(3));
        let mut long = vec![0xc0, 0, 0, 0, 1, CID_LEN as u8];
        long.extend_from_slice(&cid);
        long.extend_from_slice(&[0; 20]);
        assert_eq!(owner(&long, 4), Some(3));
        // Fewer workers than the byte: modulo, same as the BPF program.
        assert_eq!(owner(&short, 2), Some(1));
        assert_eq!(owner(&[0x40, 1, 2], 4), None);
        assert_eq!(owner(&[], 4), None);
        assert!(is_ours(&cid, 0x0102));
        assert!(!is_ours(&cid, 0x0103), "another relay's node id");
        assert!(!is_ours(&cid[..8], 0x0102));
        assert!(!is_ours(&[0u8; CID_LEN], 0x0102));
    }
}
