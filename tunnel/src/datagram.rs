//! UDP payloads carried in QUIC datagrams: a QUIC variable-length integer naming the
//! flow, followed by the payload.
//!
//! ```text
//! +----------------------+-----------------------+
//! | flow id (varint 1-8) | UDP payload (rest)    |
//! +----------------------+-----------------------+
//! ```

use crate::{Error, Result};

/// Largest value a QUIC varint can carry (2^62 - 1).
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Encoded length of `v` as a QUIC varint.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..=63 => 1,
        64..=16383 => 2,
        16384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// Appends `v` (at most [`VARINT_MAX`]; larger values are clamped) as a QUIC varint.
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Reads a QUIC varint from the start of `buf`, returning it and its length.
pub fn get_varint(buf: &[u8]) -> Result<(u64, usize)> {
    let first = *buf.first().ok_or(Error::Truncated { need: 1, have: 0 })?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return Err(Error::Truncated { need: len, have: buf.len() });
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Ok((v, len))
}

/// A zero-copy view of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub flow_id: u64,
    pub payload: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Parses a datagram; fails only when the flow id is truncated.
    pub fn parse(buf: &'a [u8]) -> Result<Self> {
        let (flow_id, n) = get_varint(buf)?;
        Ok(Datagram { flow_id, payload: &buf[n..] })
    }

    /// Bytes `emit` writes.
    pub fn buffer_len(&self) -> usize {
        varint_len(self.flow_id) + self.payload.len()
    }

    /// Appends the encoded datagram to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.reserve(self.buffer_len());
        put_varint(out, self.flow_id);
        out.extend_from_slice(self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_at_every_boundary() {
        for v in [0, 63, 64, 16383, 16384, 1_073_741_823, 1_073_741_824, VARINT_MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v));
            assert_eq!(get_varint(&out).unwrap(), (v, out.len()));
        }
    }

    #[test]
    fn datagram_round_trip_and_truncation() {
        let d = Datagram { flow_id: 70000, payload: b"hello" };
        let mut out = Vec::new();
        d.emit(&mut out);
        assert_eq!(Datagram::parse(&out).unwrap(), d);
        assert!(matches!(Datagram::parse(&out[..2]), Err(Error::Truncated { .. })));
        assert!(Datagram::parse(&[]).is_err());
    }
}
