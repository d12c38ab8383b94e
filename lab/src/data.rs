//! The deterministic test data shared by the lab's servers and clients.
//!
//! [`DataStream`] is an xorshift64 generator with a fixed seed, producing the
//! same byte sequence on both ends, and [`Fnv1a`] is the 64-bit FNV-1a hash
//! used to compare what was sent with what was received.

/// Seed of every [`DataStream`].
pub const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// Deterministic pseudo-random byte stream (xorshift64, little-endian words).
#[derive(Debug, Clone)]
pub struct DataStream {
    state: u64,
    /// Bytes of the current word not handed out yet.
    word: [u8; 8],
    /// Index of the next unused byte of `word` (8 = none left).
    pos: usize,
}

impl Default for DataStream {
    fn default() -> Self {
        Self::new()
    }
}

impl DataStream {
    pub fn new() -> Self {
        DataStream { state: SEED, word: [0; 8], pos: 8 }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        // Leftover bytes of the previous word first.
        while self.pos < 8 && i < buf.len() {
            buf[i] = self.word[self.pos];
            self.pos += 1;
            i += 1;
        }
        let rest = &mut buf[i..];
        let mut chunks = rest.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.pos = n;
        }
    }
}

/// 64-bit FNV-1a hash.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Fnv1a(Self::OFFSET)
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= b as u64;
            h = h.wrapping_mul(Self::PRIME);
        }
        self.0 = h;
    }

    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash as 16 lowercase hex digits (the sink server's reply format).
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_values() {
        let mut h = Fnv1a::new();
        assert_eq!(h.finish(), 0xcbf29ce484222325);
        h.update(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn stream_is_independent_of_chunking() {
        let mut whole = vec![0u8; 1000];
        DataStream::new().fill(&mut whole);
        let mut pieces = Vec::new();
        let mut s = DataStream::new();
        for n in [1usize, 3, 8, 13, 0, 7, 500, 468] {
            let mut b = vec![0u8; n];
            s.fill(&mut b);
            pieces.extend_from_slice(&b);
        }
        assert_eq!(whole, pieces);
    }
}
