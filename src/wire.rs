//! Byte formats of the proxy-wasm ABI that the host module needs, kept pure so
//! that every malformed input is a tested error rather than a trap.
//!
//! Header maps: `u32 count`, then `count` pairs of `u32 name_len, u32 value_len`,
//! then each name and value followed by a NUL byte.

use crate::host::HeaderList;
use sha2::{Digest as _, Sha256};

pub fn encode_pairs(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let size: usize = 4 + pairs
        .iter()
        .map(|(n, v)| 10 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

pub fn decode_pairs(bytes: &[u8]) -> Option<HeaderList> {
    let u32_at = |pos: usize| -> Option<usize> {
        let b = bytes.get(pos..pos.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(0)?;
    let mut sizes = Vec::with_capacity(count.min(1024));
    let mut pos = 4usize;
    for _ in 0..count {
        sizes.push((u32_at(pos)?, u32_at(pos.checked_add(4)?)?));
        pos = pos.checked_add(8)?;
    }
    let mut out = Vec::with_capacity(sizes.len());
    for (nl, vl) in sizes {
        let name = bytes.get(pos..pos.checked_add(nl)?)?;
        pos = pos.checked_add(nl)?.checked_add(1)?;
        let value = bytes.get(pos..pos.checked_add(vl)?)?;
        pos = pos.checked_add(vl)?.checked_add(1)?;
        out.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
    if pos > bytes.len() {
        return None;
    }
    Some(out)
}

/// Random numbers for claim tokens and generated keys: SHA-256 over a seed
/// (from WASI `random_get`, mixed with the clock) and a counter. Generated keys
/// must not be guessable; tokens must not collide.
pub struct Rng {
    seed: [u8; 32],
    counter: u64,
}

impl Rng {
    pub fn new(seed_material: &[u8]) -> Rng {
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&Sha256::digest(seed_material));
        Rng { seed, counter: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        let mut h = Sha256::new();
        h.update(self.seed);
        h.update(self.counter.to_le_bytes());
        let out = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&out[..8]);
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_truncation_is_rejected() {
        let pairs: HeaderList = vec![
            (":status".into(), b"200".to_vec()),
            ("x-bin".into(), vec![0, 1, 255]),
            ("e".into(), vec![]),
        ];
        let bytes = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&bytes).unwrap(), pairs);
        for n in 1..bytes.len() {
            assert!(decode_pairs(&bytes[..n]).is_none(), "prefix {n}");
        }
        assert_eq!(decode_pairs(&[]).unwrap(), vec![]);
        assert!(decode_pairs(&[255, 255, 255, 255]).is_none());
    }

    #[test]
    fn rng_is_seeded_and_does_not_repeat() {
        let mut a = Rng::new(b"seed-a");
        let mut b = Rng::new(b"seed-b");
        let xs: Vec<u64> = (0..1000).map(|_| a.next_u64()).collect();
        let mut sorted = xs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 1000);
        assert_ne!(xs[0], b.next_u64());
    }
}
