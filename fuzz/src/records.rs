//! One fuzz input as a sequence of records `[tag: u8][len: u16 BE][bytes]`.
//!
//! Targets that drive a stateful API (a session, a device) read their input
//! this way: the tag picks the operation, the bytes are its argument. A last
//! record whose length runs past the end of the input takes what is left,
//! so every input is valid.

/// Iterates over the records of `buf`.
pub fn records(mut buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&tag, rest) = buf.split_first()?;
        let (len, rest) = match rest {
            [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
            _ => (0, &[][..]),
        };
        let (data, tail) = rest.split_at(len.min(rest.len()));
        buf = tail;
        Some((tag, data))
    })
}

/// Appends one record (for the corpus generator). `data` must fit a u16.
pub fn push_record(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..usize::from(len)]);
}

/// Splits `data` at every `sep` byte (for inputs that carry several strings).
pub fn fields(data: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    data.split(move |&b| b == sep)
}
