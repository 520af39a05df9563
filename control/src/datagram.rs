//! DATAGRAM framing: `[flow id: QUIC varint][opaque payload]`.

use crate::varint;

/// Flow id 0 is never assigned; a datagram carrying it is dropped.
pub const INVALID_FLOW: u32 = 0;

/// Largest flow id the relay assigns: ids stay below 2^30 so they always
/// encode in at most 4 bytes and fit a `u32` in control messages.
pub const MAX_FLOW: u32 = (1 << 30) - 1;

/// Why a datagram could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramError {
    /// Empty, or the varint is cut short.
    Truncated,
    /// Flow id 0 or above [`MAX_FLOW`].
    BadFlow,
}

/// Splits a received datagram into its flow id and payload.
pub fn parse(buf: &[u8]) -> Result<(u32, &[u8]), DatagramError> {
    let (flow, n) = varint::decode(buf).ok_or(DatagramError::Truncated)?;
    let flow = u32::try_from(flow).map_err(|_| DatagramError::BadFlow)?;
    if flow == INVALID_FLOW || flow > MAX_FLOW {
        return Err(DatagramError::BadFlow);
    }
    let payload = buf.get(n..).ok_or(DatagramError::Truncated)?;
    Ok((flow, payload))
}

/// Bytes the header for `flow` takes (1, 2 or 4).
pub fn header_len(flow: u32) -> usize {
    varint::encoded_len(u64::from(flow)).unwrap_or(4)
}

/// Writes the header for `flow` at the start of `out`; returns its length or
/// `None` if `out` is too short.
pub fn write_header(flow: u32, out: &mut [u8]) -> Option<usize> {
    varint::encode(u64::from(flow), out)
}

/// Rewrites the flow id of a datagram in place when the new id encodes in
/// the same number of bytes as the old header, `old_header_len` (what
/// [`parse`] consumed: `buf.len()` minus the payload's length), returning
/// `true`; otherwise returns `false` and leaves `buf` unchanged. The header
/// is not decoded again.
pub fn rewrite_in_place(buf: &mut [u8], old_header_len: usize, new_flow: u32) -> bool {
    if header_len(new_flow) != old_header_len || buf.len() < old_header_len {
        return false;
    }
    write_header(new_flow, buf).is_some()
}

/// Builds a datagram into `out` (cleared first).
pub fn encode_into(flow: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    varint::push(u64::from(flow), out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(parse(&[0x05, 0xaa]), Ok((5, &[0xaa][..])));
        assert_eq!(parse(&[0x40, 0x05]), Ok((5, &[][..])));
        assert_eq!(parse(&[]), Err(DatagramError::Truncated));
        assert_eq!(parse(&[0x00, 1]), Err(DatagramError::BadFlow));
        assert_eq!(parse(&[0xc0, 0, 0, 0, 0x40, 0, 0, 0]), Err(DatagramError::BadFlow));
    }

    #[test]
    fn in_place_rewrite() {
        let mut d = Vec::new();
        encode_into(7, b"hello", &mut d);
        assert!(rewrite_in_place(&mut d, 1, 9));
        assert_eq!(parse(&d), Ok((9, &b"hello"[..])));
        assert!(!rewrite_in_place(&mut d, 1, 1000));
        assert_eq!(parse(&d), Ok((9, &b"hello"[..])));
    }

    proptest! {
        #[test]
        fn roundtrip(flow in 1..=MAX_FLOW, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = Vec::new();
            encode_into(flow, &payload, &mut d);
            prop_assert_eq!(d.len(), header_len(flow) + payload.len());
            prop_assert_eq!(parse(&d), Ok((flow, &payload[..])));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32), flow in any::<u32>()) {
            let _ = parse(&bytes);
            let mut b = bytes.clone();
            if let Ok((_, payload)) = parse(&bytes) {
                let header = bytes.len() - payload.len();
                if rewrite_in_place(&mut b, header, flow) {
                    prop_assert_eq!(parse(&b).ok().map(|(f, p)| (f, p.len())), Some((flow, payload.len())));
                }
            }
        }
    }
}
