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

/// A header map as the host serialised it, read in place: one buffer and a
/// table of offsets, not two allocations per header. Reading the request's
/// and the response's headers is on every protected request's path, and in
/// Wasm the allocations cost more than the host call (about half of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    buf: Vec<u8>,
    /// (name start, name length, value start, value length) into `buf`.
    spans: Vec<(usize, usize, usize, usize)>,
}

impl HeaderMap {
    /// `None` when the bytes are not a well-formed map (see the module note).
    pub fn decode(buf: Vec<u8>) -> Option<HeaderMap> {
        if buf.is_empty() {
            return Some(HeaderMap::default());
        }
        let u32_at = |pos: usize| -> Option<usize> {
            let b = buf.get(pos..pos.checked_add(4)?)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = u32_at(0)?;
        // The sizes table alone needs 8 bytes a header: a count beyond that
        // is malformed, and must not size an allocation.
        if count > buf.len() / 8 {
            return None;
        }
        let mut spans = Vec::with_capacity(count);
        let mut pos = 4usize.checked_add(count.checked_mul(8)?)?;
        for i in 0..count {
            let (nl, vl) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
            let name = pos;
            pos = pos.checked_add(nl)?.checked_add(1)?;
            let value = pos;
            pos = pos.checked_add(vl)?.checked_add(1)?;
            spans.push((name, nl, value, vl));
        }
        if pos > buf.len() {
            return None;
        }
        Some(HeaderMap { buf, spans })
    }

    /// Names as text (lossily, but header names are ASCII tokens on every
    /// host, so this borrows), values as bytes; in the host's order.
    pub fn iter(&self) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, &[u8])> + '_ {
        self.raw()
            .map(|(name, value)| (String::from_utf8_lossy(name), value))
    }

    /// Names and values as the host wrote them. Lookups compare bytes: a
    /// name need not be checked as UTF-8 to be found, and every protected
    /// request looks up half a dozen names.
    fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().map(|&(n, nl, v, vl)| {
            let name = self.buf.get(n..n + nl).unwrap_or_default();
            let value = self.buf.get(v..v + vl).unwrap_or_default();
            (name, value)
        })
    }

    /// The values of `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.raw()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.raw()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    pub fn to_list(&self) -> HeaderList {
        self.iter()
            .map(|(n, v)| (n.into_owned(), v.to_vec()))
            .collect()
    }

    pub fn from_list(list: &[(String, Vec<u8>)]) -> HeaderMap {
        HeaderMap::decode(encode_pairs(list)).unwrap_or_default()
    }
}

/// Random numbers for claim tokens and generated keys: SHA-256 over a seed
/// (from WASI `random_get`, mixed with the clock) and a counter, each digest
/// giving four numbers (a claim takes one, a generated key two: one
/// compression per four numbers, not per number). Generated keys must not be
/// guessable; tokens must not collide.
/// Hand-written (sha2 is already linked): getrandom per token would be a host
/// call per request, and `rand`'s generators add code for nothing more.
pub struct Rng {
    seed: [u8; 32],
    counter: u64,
    /// The current digest, and how many of its four numbers are used.
    block: [u8; 32],
    used: usize,
}

impl Rng {
    pub fn new(seed_material: &[u8]) -> Rng {
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&Sha256::digest(seed_material));
        Rng {
            seed,
            counter: 0,
            block: [0; 32],
            used: 4,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        if self.used == 4 {
            self.counter = self.counter.wrapping_add(1);
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.block.copy_from_slice(&h.finalize());
            self.used = 0;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.block[self.used * 8..self.used * 8 + 8]);
        self.used += 1;
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_pairs(bytes: &[u8]) -> Option<HeaderList> {
        HeaderMap::decode(bytes.to_vec()).map(|m| m.to_list())
    }

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
    fn header_maps_are_read_in_place() {
        let list: HeaderList = vec![
            (":method".into(), b"POST".to_vec()),
            ("x-a".into(), b"1".to_vec()),
            ("x-b".into(), vec![0, 255]),
            ("x-a".into(), b"2".to_vec()),
        ];
        let map = HeaderMap::from_list(&list);
        assert_eq!(map.get("x-a"), Some(&b"1"[..]));
        assert_eq!(
            map.values("x-a").collect::<Vec<_>>(),
            vec![&b"1"[..], &b"2"[..]]
        );
        assert_eq!(map.get("x-b"), Some(&[0u8, 255][..]));
        assert_eq!(map.get("x-c"), None);
        assert_eq!(map.to_list(), list, "order and repeats kept");
        // A count the buffer cannot hold is refused before anything is sized by it.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(HeaderMap::decode(huge).is_none());
        // A name that is not UTF-8 (no host sends one) is read lossily.
        let mut raw = 1u32.to_le_bytes().to_vec();
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&[0xff, 0, b'v', 0]);
        let map = HeaderMap::decode(raw).unwrap();
        assert_eq!(map.to_list(), vec![("\u{fffd}".to_string(), b"v".to_vec())]);
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

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding: stored records must survive Webdis's JSON
/// replies, which are not binary-safe.
/// Hand-written, not the `base64` crate: it adds 6.6 KB to the module (measured).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.chunks(4);
    let last = text.len() / 4;
    for (i, q) in quads.enumerate() {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        // Canonical only: the bits padding leaves unused must be zero
        // (the filter writes canonical base64; anything else is corrupt).
        if n & ((1u32 << (2 * pad)) - 1) != 0 {
            return None;
        }
        n <<= 6 * pad as u32;
        // Byte by byte: a slice copy per group was a `memory.copy` call per
        // three bytes, hundreds per record read from Redis, which cost APISIX's
        // runtime about 30 µs per replay.
        out.push((n >> 16) as u8);
        if pad < 2 {
            out.push((n >> 8) as u8);
        }
        if pad < 1 {
            out.push(n as u8);
        }
    }
    Some(out)
}

/// Hex of either case; `None` for an odd length or a non-hex digit.
pub fn hex_decode(text: &[u8]) -> Option<Vec<u8>> {
    hex::decode(text).ok()
}

/// Everything but RFC 3986's unreserved characters, less the dot: Webdis
/// reads a dot in a path segment as a format suffix (`.json`), so a dot is
/// encoded too (see store/redis.rs).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~');

/// Appends `s` to `out` as one percent-encoded URL path segment (everything
/// but unreserved characters). Chunk by chunk rather than through `Display`
/// (`to_string`), whose formatter machinery per chunk cost most of a store
/// call's path on APISIX's runtime.
pub fn push_percent_encoded(out: &mut String, s: &[u8]) {
    for chunk in percent_encoding::percent_encode(s, SEGMENT) {
        out.push_str(chunk);
    }
}

#[cfg(test)]
mod codec_tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length_and_rejects_garbage() {
        for n in 0..70usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let enc = base64_encode(&data);
            assert_eq!(base64_decode(enc.as_bytes()).unwrap(), data, "len {n}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        // "uu==": found by the store_reply fuzzer, non-zero padding bits.
        for bad in [
            &b"Zm8"[..],
            b"Zm8=Zm8=",
            b"Z===",
            b"Zm!=",
            b"====",
            b"uu==",
            b"Zm9=",
            b"Zm9",
        ] {
            assert!(
                base64_decode(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn percent_encode_segment(s: &[u8]) -> String {
        let mut out = String::new();
        push_percent_encoded(&mut out, s);
        out
    }

    #[test]
    fn hex_and_percent_encoding() {
        assert_eq!(hex_decode(b"00abFF").unwrap(), vec![0, 0xab, 0xff]);
        assert!(hex_decode(b"0g").is_none() && hex_decode(b"abc").is_none());
        assert_eq!(percent_encode_segment(b"a/b c.d|e~"), "a%2Fb%20c%2Ed%7Ce~");
        // Every byte: kept if unreserved and not a dot (Webdis), else %XX.
        for b in 0..=255u8 {
            let kept = b.is_ascii_alphanumeric() || b"-_~".contains(&b);
            let want = if kept {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            };
            assert_eq!(percent_encode_segment(&[b]), want, "byte {b}");
        }
    }
}
