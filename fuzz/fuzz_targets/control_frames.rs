#![no_main]
//! Control channel (stream 0, both directions): `FrameDecoder` fed the
//! stream in arbitrary chunk splits must yield exactly what `decode_frame`
//! yields on the whole stream, and every message that decodes must encode
//! back to the very bytes it came from (`Unknown` extension frames: to an
//! equal message). `Message::decode_body` is also run directly, with the
//! first byte as the type.
//!
//! Input: `[n][n chunk sizes][stream]`, n = first byte % 8; each chunk is
//! (size byte + 1) bytes, cycled; n = 0 feeds the stream as fast as the
//! decoder takes it.

use libfuzzer_sys::fuzz_target;
use ztna_control::wire::{self, DecodeError, FrameDecoder, Message, HEADER_LEN, MAX_BODY};

#[derive(Debug, PartialEq)]
enum Item {
    Msg(Message),
    BadServiceName(u32),
    Fatal(DecodeError),
}

/// `m` was decoded from `frame` (header included).
fn check_reencode(m: &Message, frame: &[u8]) {
    assert_eq!(frame.first(), Some(&m.ty()));
    let mut out = Vec::new();
    m.encode(&mut out);
    let (back, n) = wire::decode_frame(&out).expect("re-encoded frame decodes").expect("re-encoded frame is whole");
    assert_eq!(n, out.len());
    assert_eq!(&back, m);
    if !matches!(m, Message::Unknown { .. }) {
        assert_eq!(out, frame, "{m:?} re-encodes differently");
    }
}

/// `decode_frame` over the whole stream.
fn reference(stream: &[u8]) -> Vec<Item> {
    let mut items = Vec::new();
    let mut rest = stream;
    loop {
        match wire::decode_frame(rest) {
            Ok(Some((m, n))) => {
                assert!((HEADER_LEN..=HEADER_LEN + MAX_BODY).contains(&n));
                check_reencode(&m, &rest[..n]);
                items.push(Item::Msg(m));
                rest = &rest[n..];
            }
            Ok(None) => {
                // Only an incomplete frame is left.
                let len = rest.get(1..3).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
                assert!(rest.len() < HEADER_LEN || rest.len() < HEADER_LEN + len.unwrap_or(0));
                return items;
            }
            Err(DecodeError::BadServiceName { request_id }) => {
                items.push(Item::BadServiceName(request_id));
                let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
                rest = &rest[HEADER_LEN + len..];
            }
            Err(e) => {
                let _ = e.code();
                items.push(Item::Fatal(e));
                return items;
            }
        }
    }
}

/// The stream through a `FrameDecoder`, pushed in chunks of `sizes`.
fn chunked(stream: &[u8], sizes: &[u8]) -> Vec<Item> {
    let mut d = FrameDecoder::default();
    let mut items = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    loop {
        loop {
            match d.next_message() {
                Ok(Some(m)) => items.push(Item::Msg(m)),
                Ok(None) => break,
                Err(DecodeError::BadServiceName { request_id }) => items.push(Item::BadServiceName(request_id)),
                Err(e) => {
                    items.push(Item::Fatal(e));
                    return items;
                }
            }
        }
        if pos == stream.len() {
            return items;
        }
        let want = if sizes.is_empty() { usize::MAX } else { usize::from(sizes[i % sizes.len()]) + 1 };
        i += 1;
        // The caller contract: never more than `room()` at a time.
        let n = want.min(d.room()).min(stream.len() - pos);
        assert!(n > 0, "decoder full ({} bytes buffered) without a complete frame", d.buffered());
        d.push(&stream[pos..pos + n]);
        pos += n;
        assert!(d.buffered() <= 2 * (HEADER_LEN + MAX_BODY));
    }
}

fuzz_target!(|data: &[u8]| {
    let n = usize::from(data.first().copied().unwrap_or(0) % 8);
    let (sizes, stream) = data.get(1..).unwrap_or_default().split_at(n.min(data.len().saturating_sub(1)));
    let want = reference(stream);
    let got = chunked(stream, sizes);
    assert_eq!(got, want, "chunked decoding differs from whole-stream decoding");

    // One body of type data[0], without the frame header (no length limit).
    if let Some((&ty, body)) = data.split_first() {
        match Message::decode_body(ty, body) {
            Ok(m) => {
                assert_eq!(m.ty(), ty);
                if !matches!(m, Message::Unknown { .. }) {
                    let mut frame = vec![ty];
                    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
                    frame.extend_from_slice(body);
                    check_reencode(&m, &frame);
                }
            }
            Err(e) => {
                let _ = e.code();
            }
        }
    }
});
