//! QUIC variable-length integers (RFC 9000 §16).
//!
//! The two high bits of the first byte give the encoded length (1, 2, 4 or 8
//! bytes); the rest, big-endian, is the value. Values up to 2^62-1.

/// Largest value a QUIC varint can carry.
pub const MAX: u64 = (1 << 62) - 1;

/// Number of bytes `v` takes when encoded, or `None` if `v > MAX`.
pub fn encoded_len(v: u64) -> Option<usize> {
    match v {
        0..=63 => Some(1),
        64..=16_383 => Some(2),
        16_384..=1_073_741_823 => Some(4),
        1_073_741_824..=MAX => Some(8),
        _ => None,
    }
}

/// Decodes a varint at the start of `buf`: `(value, bytes consumed)`.
/// `None` when `buf` is shorter than the length its first byte announces.
pub fn decode(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in bytes.iter().skip(1) {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// Encodes `v` into the start of `out`, returning the bytes written, or
/// `None` when `v > MAX` or `out` is too short.
pub fn encode(v: u64, out: &mut [u8]) -> Option<usize> {
    let len = encoded_len(v)?;
    let dst = out.get_mut(..len)?;
    let tag: u8 = match len {
        1 => 0x00,
        2 => 0x40,
        4 => 0x80,
        _ => 0xc0,
    };
    for (i, b) in dst.iter_mut().enumerate() {
        let shift = 8 * (len - 1 - i);
        *b = (v >> shift) as u8;
    }
    if let Some(b) = dst.first_mut() {
        *b |= tag;
    }
    Some(len)
}

/// Appends the encoding of `v` to `out`. Values above [`MAX`] are clamped to
/// it; callers only pass values that protocol invariants bound far lower.
pub fn push(v: u64, out: &mut Vec<u8>) {
    let mut tmp = [0u8; 8];
    let n = encode(v.min(MAX), &mut tmp).unwrap_or(0);
    out.extend_from_slice(&tmp[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 appendix A.1 sample encodings.
        let cases: [(&[u8], u64); 4] = [
            (&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c], 151_288_809_941_952_652),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(decode(bytes), Some((value, bytes.len())));
            let mut out = [0u8; 8];
            let n = encode(value, &mut out).unwrap();
            assert_eq!(&out[..n], bytes);
        }
        // A non-minimal two-byte encoding of 37 still decodes.
        assert_eq!(decode(&[0x40, 0x25]), Some((37, 2)));
    }

    #[test]
    fn short_input_is_none() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x40]), None);
        assert_eq!(decode(&[0xc0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(encode(MAX + 1, &mut [0u8; 8]), None);
        assert_eq!(encode(300, &mut [0u8; 1]), None);
    }

    proptest! {
        #[test]
        fn roundtrip(v in 0..=MAX) {
            let mut out = [0u8; 8];
            let n = encode(v, &mut out).unwrap();
            prop_assert_eq!(Some(n), encoded_len(v));
            prop_assert_eq!(decode(&out[..n]), Some((v, n)));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..12)) {
            if let Some((v, n)) = decode(&bytes) {
                prop_assert!(v <= MAX);
                prop_assert!(n <= bytes.len());
            }
        }
    }
}
