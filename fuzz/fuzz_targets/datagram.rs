#![no_main]
//! DATAGRAM framing `[flow id: varint][payload]`, as parsed by the relay
//! (forwarding), the connector and the agent on every received datagram:
//! `datagram::parse`, `rewrite_in_place` (the relay's fast path) with an
//! arbitrary new flow id, `encode_into`/`write_header`, and the QUIC varint
//! codec beneath them.
//!
//! Input: `[new flow id: u32 LE][datagram]`.

use libfuzzer_sys::fuzz_target;
use ztna_control::datagram::{self, DatagramError, MAX_FLOW};
use ztna_control::varint;

fuzz_target!(|data: &[u8]| {
    let (flow_bytes, dgram) = data.split_at(data.len().min(4));
    let mut fb = [0u8; 4];
    fb[..flow_bytes.len()].copy_from_slice(flow_bytes);
    let new_flow = u32::from_le_bytes(fb);

    // Parse, on the whole input and on the datagram part.
    for buf in [data, dgram] {
        match datagram::parse(buf) {
            Ok((flow, payload)) => {
                assert!((1..=MAX_FLOW).contains(&flow));
                let (v, hl) = varint::decode(buf).expect("parsed datagram has a varint");
                assert_eq!(v, u64::from(flow));
                assert_eq!(payload, &buf[hl..]);
                assert!(hl >= datagram::header_len(flow), "varint shorter than minimal");
                // Re-encoding (minimal header) parses back to the same.
                let mut out = Vec::new();
                datagram::encode_into(flow, payload, &mut out);
                assert_eq!(out.len(), datagram::header_len(flow) + payload.len());
                assert_eq!(datagram::parse(&out), Ok((flow, payload)));
            }
            Err(DatagramError::Truncated) => assert!(varint::decode(buf).is_none()),
            Err(DatagramError::BadFlow) => {
                let (v, _) = varint::decode(buf).expect("BadFlow has a varint");
                assert!(v == 0 || v > u64::from(MAX_FLOW));
            }
        }
    }

    // The relay's in-place rewrite: either the header now carries new_flow
    // in the same number of bytes and the payload is untouched, or nothing
    // changed.
    // `old_header_len` is what `parse` consumed, as on the relay's path.
    if let Some((_, old_len)) = varint::decode(dgram) {
        let mut b = dgram.to_vec();
        if datagram::rewrite_in_place(&mut b, old_len, new_flow) {
            assert_eq!(varint::decode(&b), Some((u64::from(new_flow), old_len)));
            assert_eq!(b[old_len..], dgram[old_len..]);
            if (1..=MAX_FLOW).contains(&new_flow) {
                assert_eq!(datagram::parse(&b), Ok((new_flow, &dgram[old_len..])));
            }
        } else {
            assert_eq!(b, dgram);
            assert_ne!(datagram::header_len(new_flow), old_len);
        }
    }

    // Building: any valid flow id round-trips with any payload.
    let flow = new_flow % MAX_FLOW + 1;
    let mut out = vec![0xaa; 3];
    datagram::encode_into(flow, dgram, &mut out);
    assert_eq!(datagram::parse(&out), Ok((flow, dgram)));
    // write_header into a buffer of any size: written only when it fits.
    let mut h = dgram.to_vec();
    match datagram::write_header(flow, &mut h) {
        Some(n) => {
            assert_eq!(n, datagram::header_len(flow));
            assert_eq!(varint::decode(&h), Some((u64::from(flow), n)));
        }
        None => assert!(h.len() < datagram::header_len(flow)),
    }

    // The varint codec on its own.
    if let Some((v, n)) = varint::decode(data) {
        assert!(v <= varint::MAX && n <= data.len());
        let mut e = [0u8; 8];
        let m = varint::encode(v, &mut e).expect("decoded varint re-encodes");
        assert_eq!(varint::decode(&e[..m]), Some((v, m)));
        assert!(m <= n);
    }
});
