//! Connection-ID layout and packet steering.
//!
//! Every CID the relay issues is [`CID_LEN`] bytes, QUIC-LB style:
//!
//! ```text
//! byte 0      first octet: config rotation (3 bits, 0) | length-1 (5 bits, 15) = 0x0f
//! bytes 1..3  node id (u16 BE) of the relay process: see [`Instance`]
//! byte 3      worker index
//! bytes 4..16 random
//! ```
//!
//! The owner of a packet is the worker byte of its DCID modulo the worker
//! count. The client's first Initial carries a random DCID; the same rule
//! applied to it picks the worker that accepts the connection, and that
//! worker issues CIDs with its own index, so every later packet maps to it
//! too. [`owner`] is the software twin of the BPF program in `bpf.rs`.

/// This relay process, as its CIDs and stateless resets name it.
///
/// Relay replicas usually share one private key (one Kubernetes Secret), so
/// the key alone cannot tell them apart, and a replica that answered
/// another's CIDs with stateless resets keyed by the shared key alone would
/// end that replica's connections (RFC 9000 §10.3, §21.11). An instance is
/// therefore mixed into the reset key and checked before any reset:
///
/// * `node_id` unset (the default): a random non-zero node id and a random
///   32-byte nonce drawn at every start. Replicas from one key and one
///   config never produce a valid reset for each other's CIDs (if their
///   node ids collide, 1 in 65 535, the nonce still makes the other's
///   tokens wrong). The price: a restarted relay cannot reset its
///   predecessor's connections; their clients notice by the idle timeout.
/// * `node_id` configured: no nonce, so the reset key is stable across
///   restarts and a restarted relay resets its predecessor's connections at
///   once. Every replica sharing a key must then get its own node id (for
///   example a StatefulSet ordinal); two with the same one reset each other.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    node_id: u16,
    nonce: Option<[u8; 32]>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("node_id", &self.node_id).field("stable", &self.is_stable()).finish()
    }
}

impl Instance {
    /// The operator's node id (stable across restarts).
    pub fn configured(node_id: u16) -> Instance {
        Instance { node_id, nonce: None }
    }

    /// A random non-zero node id and nonce for this start.
    pub fn random() -> anyhow::Result<Instance> {
        let mut nonce = [0u8; 32];
        boring::rand::rand_bytes(&mut nonce)?;
        let mut id = [0u8; 2];
        let node_id = loop {
            boring::rand::rand_bytes(&mut id)?;
            match u16::from_be_bytes(id) {
                0 => continue,
                n => break n,
            }
        };
        Ok(Instance { node_id, nonce: Some(nonce) })
    }

    /// `configured` when set, else [`Instance::random`].
    pub fn new(node_id: Option<u16>) -> anyhow::Result<Instance> {
        node_id.map_or_else(Instance::random, |n| Ok(Instance::configured(n)))
    }

    /// Bytes 1..3 of every CID this instance issues.
    pub fn node_id(&self) -> u16 {
        self.node_id
    }

    /// Whether a restart with the same config is the same instance (its
    /// reset key survives, so it resets its predecessor's connections).
    pub fn is_stable(&self) -> bool {
        self.nonce.is_none()
    }

    /// What the reset key derivation mixes in: a kind byte, the node id
    /// and, for a random instance, its nonce (the kind fixes the length).
    pub fn reset_label(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(35);
        v.push(u8::from(self.nonce.is_some()));
        v.extend_from_slice(&self.node_id.to_be_bytes());
        if let Some(n) = &self.nonce {
            v.extend_from_slice(n);
        }
        v
    }
}

/// Length of every relay-issued connection ID.
pub const CID_LEN: usize = 16;
/// First octet of relay CIDs (QUIC-LB: rotation 0, length 15).
pub const FIRST_OCTET: u8 = 0x0f;
/// Offset of the worker byte inside a CID.
pub const WORKER_BYTE: usize = 3;

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
    ztna_udp::steering::owner(packet, workers, WORKER_BYTE as u8)
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

    #[test]
    fn random_instances_differ_and_configured_ones_are_stable() {
        let a = Instance::random().unwrap();
        let b = Instance::random().unwrap();
        assert_ne!(a.node_id(), 0);
        assert!(!a.is_stable());
        assert_ne!(a.reset_label(), b.reset_label(), "the nonce differs even if node ids collide");
        assert_eq!(Instance::new(Some(7)).unwrap(), Instance::configured(7));
        assert!(Instance::configured(7).is_stable());
        assert_eq!(Instance::configured(7).reset_label(), Instance::configured(7).reset_label());
        assert_ne!(Instance::configured(7).reset_label(), Instance::configured(8).reset_label());
        assert!(!Instance::new(None).unwrap().is_stable());
    }
}
