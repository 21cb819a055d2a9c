//! Digests: the request fingerprint (what "the same request" means) and the
//! key digest (which record a key addresses, namespaced by tenant scope).
//!
//! Both feed length-prefixed fields into SHA-256 so that no two different
//! inputs can produce the same byte stream ("ab"+"c" vs "a"+"bc").

use sha2::{Digest as _, Sha256};

/// 128 bits of SHA-256: collisions between honest keys are out of reach
/// (birthday bound 2^64) and a tenant cannot aim at another's digest
/// (second preimage, 2^128), while records stay compact.
pub type Digest16 = [u8; 16];

fn truncate(full: &[u8]) -> Digest16 {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(full.iter()) {
        *o = *b;
    }
    out
}

fn feed_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Feeds an optional header value: absent and empty are different payloads.
fn feed_optional(h: &mut Sha256, value: Option<&[u8]>) {
    match value {
        None => h.update([0u8]),
        Some(v) => {
            h.update([1u8]);
            feed_field(h, v);
        }
    }
}

/// Incremental request fingerprint: method, path with query, the configured
/// fingerprint headers, then the body in whatever chunks it arrives.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Sha256,
    body_bytes: u64,
}

impl Fingerprinter {
    pub fn new(method: &str, path: &str, headers: &[Option<&[u8]>]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"idempotency-filter/fingerprint/v1");
        feed_field(&mut hasher, method.as_bytes());
        feed_field(&mut hasher, path.as_bytes());
        hasher.update((headers.len() as u64).to_le_bytes());
        for value in headers {
            feed_optional(&mut hasher, *value);
        }
        Fingerprinter {
            hasher,
            body_bytes: 0,
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.body_bytes += chunk.len() as u64;
        self.hasher.update(chunk);
    }

    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    pub fn finish(self) -> Digest16 {
        let mut h = self.hasher;
        // The body length closes the stream so the body cannot blur into
        // anything hashed after it in a later version.
        h.update(self.body_bytes.to_le_bytes());
        truncate(&h.finalize())
    }
}

/// The record address: the key inside the scope given by the values of the
/// `scope_headers` (e.g. Authorization), so one tenant's key never reaches
/// another tenant's record even when both pick the same key.
pub fn key_digest(scope: &[Option<&[u8]>], key: &str) -> Digest16 {
    let mut h = Sha256::new();
    h.update(b"idempotency-filter/key/v1");
    h.update((scope.len() as u64).to_le_bytes());
    for value in scope {
        feed_optional(&mut h, *value);
    }
    feed_field(&mut h, key.as_bytes());
    truncate(&h.finalize())
}

pub fn hex(d: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: &str, path: &str, ct: Option<&str>, chunks: &[&[u8]]) -> Digest16 {
        let mut f = Fingerprinter::new(method, path, &[ct.map(str::as_bytes)]);
        for c in chunks {
            f.update(c);
        }
        f.finish()
    }

    #[test]
    fn fingerprint_is_stable_across_chunkings() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let whole = fp("POST", "/p", Some("application/json"), &[&body]);
        for split in [1usize, 7, 100, 4096, 4999] {
            let (a, b) = body.split_at(split);
            assert_eq!(whole, fp("POST", "/p", Some("application/json"), &[a, b]));
        }
        let pieces: Vec<&[u8]> = body.chunks(3).collect();
        assert_eq!(whole, fp("POST", "/p", Some("application/json"), &pieces));
    }

    #[test]
    fn every_part_of_the_request_changes_the_fingerprint() {
        let base = fp("POST", "/p?a=1", Some("application/json"), &[b"{}"]);
        assert_ne!(
            base,
            fp("PATCH", "/p?a=1", Some("application/json"), &[b"{}"])
        );
        assert_ne!(
            base,
            fp("POST", "/p?a=2", Some("application/json"), &[b"{}"])
        );
        assert_ne!(base, fp("POST", "/p?a=1", Some("text/plain"), &[b"{}"]));
        assert_ne!(base, fp("POST", "/p?a=1", None, &[b"{}"]));
        assert_ne!(
            base,
            fp("POST", "/p?a=1", Some("application/json"), &[b"{ }"])
        );
        // Absent and empty headers differ; field boundaries cannot shift.
        assert_ne!(fp("POST", "/p", None, &[]), fp("POST", "/p", Some(""), &[]));
        assert_ne!(fp("POS", "T/p", None, &[]), fp("POST", "/p", None, &[]));
    }

    #[test]
    fn key_digest_is_scoped() {
        let a = key_digest(&[Some(b"Bearer alice")], "k1");
        assert_eq!(a, key_digest(&[Some(b"Bearer alice")], "k1"));
        assert_ne!(a, key_digest(&[Some(b"Bearer bob")], "k1"));
        assert_ne!(a, key_digest(&[None], "k1"));
        assert_ne!(a, key_digest(&[Some(b"Bearer alice")], "k2"));
        assert_ne!(key_digest(&[None], "k"), key_digest(&[Some(b"")], "k"));
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
