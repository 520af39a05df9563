//! The Internet checksum (RFC 1071) and the IPv4 pseudo-header checksum.

use std::net::Ipv4Addr;

/// One's-complement sum (RFC 1071) over a byte stream fed in pieces of any
/// length, including odd ones.
#[derive(Default)]
struct Sum {
    acc: u64,
    /// The high byte of a 16-bit word whose low byte is in the next piece.
    odd: Option<u8>,
}

impl Sum {
    fn add_word(&mut self, w: u64) {
        // End-around carry keeps the 64-bit sum congruent modulo 0xffff.
        let (s, carry) = self.acc.overflowing_add(w);
        self.acc = s + u64::from(carry);
    }

    fn add(&mut self, mut data: &[u8]) {
        if let Some(hi) = self.odd.take() {
            match data.split_first() {
                Some((&lo, rest)) => {
                    self.add_word(u64::from(u16::from_be_bytes([hi, lo])));
                    data = rest;
                }
                None => {
                    self.odd = Some(hi);
                    return;
                }
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            if let Ok(w) = <[u8; 8]>::try_from(w) {
                self.add_word(u64::from_be_bytes(w));
            }
        }
        let mut rest = words.remainder();
        while let Some((&hi, tail)) = rest.split_first() {
            match tail.split_first() {
                Some((&lo, tail)) => {
                    self.add_word(u64::from(u16::from_be_bytes([hi, lo])));
                    rest = tail;
                }
                None => {
                    self.odd = Some(hi);
                    rest = tail;
                }
            }
        }
    }

    /// The checksum: the complement of the folded sum.
    fn finish(mut self) -> u16 {
        if let Some(hi) = self.odd.take() {
            self.add_word(u64::from(hi) << 8);
        }
        let mut x = self.acc;
        while x > 0xffff {
            x = (x & 0xffff) + (x >> 16);
        }
        !(x as u16)
    }
}

/// The Internet checksum (RFC 1071) of `chunks` taken as one byte stream.
///
/// To compute a checksum, pass the data with the checksum field zeroed and
/// store the result big-endian. To verify, pass the data including the
/// checksum field: the result is 0 when it is correct.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = Sum::default();
    for c in chunks {
        sum.add(c);
    }
    sum.finish()
}

/// The Internet checksum of `chunks` preceded by the IPv4 pseudo-header
/// (source, destination, zero, protocol, length = total length of
/// `chunks`), as used by UDP and TCP. Compute and verify as with
/// [`internet_checksum`]. A computed UDP checksum of 0 is sent as 0xffff.
pub fn pseudo_header_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, chunks: &[&[u8]]) -> u16 {
    let mut sum = Sum::default();
    sum.add(&src.octets());
    sum.add(&dst.octets());
    sum.add_word(u64::from(protocol));
    let len: usize = chunks.iter().map(|c| c.len()).fold(0, usize::saturating_add);
    sum.add_word(len as u64);
    for c in chunks {
        sum.add(c);
    }
    sum.finish()
}
