//! Digests: the request fingerprint (what "the same request" means) and the
//! key digest (which record a key addresses, namespaced by tenant scope).
//!
//! Both feed length-prefixed fields into a hash so that no two different
//! inputs can produce the same byte stream ("ab"+"c" vs "a"+"bc").
//!
//! The key digest is always SHA-256: a tenant must not be able to aim a key
//! of its own at another tenant's record, which is a second-preimage attack
//! on a value the attacker knows (the victim's key).
//!
//! The fingerprint is XXH3-128 by default (`fingerprint_hash`). It is only
//! ever compared with the fingerprint stored under the same scoped key, and
//! never leaves the gateway and its store. To get a stored response with a
//! different payload, a client would need a payload that collides with one
//! it cannot see; a client that knows the original payload can simply send
//! it, so a cryptographic hash adds nothing there, while it costs most of the
//! filter's time on large bodies (measured in Envoy's V8: SHA-256 about
//! 4.7 µs per KiB, XXH3 under 0.1 µs per KiB). `sha256` stays available for
//! policies that require it.

use sha2::{Digest as _, Sha256};
use xxhash_rust::xxh3::Xxh3;

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

/// The two hashers behind one way of feeding fields.
trait Feed {
    fn feed(&mut self, bytes: &[u8]);
}

impl Feed for Sha256 {
    fn feed(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Feed for Hasher {
    fn feed(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Xxh3(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }
}

fn feed_field(h: &mut impl Feed, bytes: &[u8]) {
    h.feed(&(bytes.len() as u64).to_le_bytes());
    h.feed(bytes);
}

/// Feeds an optional header value: absent and empty are different payloads.
fn feed_optional(h: &mut impl Feed, value: Option<&[u8]>) {
    match value {
        None => h.feed(&[0u8]),
        Some(v) => {
            h.feed(&[1u8]);
            feed_field(h, v);
        }
    }
}

/// Which hash fingerprints requests (`fingerprint_hash`). Every gateway
/// sharing a store must use the same one: a retry fingerprinted with the
/// other would not match its record and get 422.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FingerprintHash {
    #[default]
    Xxh3,
    Sha256,
}

#[derive(Clone)]
enum Hasher {
    // Boxed: the XXH3 state is 600 bytes and a request's phase holds it.
    Xxh3(Box<Xxh3>),
    Sha256(Sha256),
}

/// Incremental request fingerprint: method, path with query, the configured
/// fingerprint headers, then the body in whatever chunks it arrives.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Hasher,
    body_bytes: u64,
}

impl Fingerprinter {
    pub fn new(hash: FingerprintHash, method: &str, path: &str, headers: &[Option<&[u8]>]) -> Self {
        Self::with_headers(hash, method, path, headers.iter().copied())
    }

    /// As [`Fingerprinter::new`], the header values given one by one (the
    /// filter reads them straight from the request, without collecting).
    pub fn with_headers<V: AsRef<[u8]>>(
        hash: FingerprintHash,
        method: &str,
        path: &str,
        headers: impl ExactSizeIterator<Item = Option<V>>,
    ) -> Self {
        let mut hasher = match hash {
            FingerprintHash::Xxh3 => Hasher::Xxh3(Box::new(Xxh3::new())),
            FingerprintHash::Sha256 => Hasher::Sha256(Sha256::new()),
        };
        hasher.feed(b"idempotency-filter/fingerprint/v1");
        feed_field(&mut hasher, method.as_bytes());
        feed_field(&mut hasher, path.as_bytes());
        hasher.feed(&(headers.len() as u64).to_le_bytes());
        for value in headers {
            feed_optional(&mut hasher, value.as_ref().map(AsRef::as_ref));
        }
        Fingerprinter {
            hasher,
            body_bytes: 0,
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.body_bytes += chunk.len() as u64;
        self.hasher.feed(chunk);
    }

    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    pub fn finish(self) -> Digest16 {
        let mut h = self.hasher;
        // The body length closes the stream so the body cannot blur into
        // anything hashed after it in a later version.
        h.feed(&self.body_bytes.to_le_bytes());
        match h {
            Hasher::Xxh3(x) => x.digest128().to_le_bytes(),
            Hasher::Sha256(s) => truncate(&s.finalize()),
        }
    }
}

/// The record address: the key inside the scope given by the values of the
/// `scope_headers` (e.g. Authorization), so one tenant's key never reaches
/// another tenant's record even when both pick the same key.
pub fn key_digest(scope: &[Option<&[u8]>], key: &str) -> Digest16 {
    key_digest_of(scope.iter().copied(), key)
}

/// As [`key_digest`], the scope values given one by one.
pub fn key_digest_of<V: AsRef<[u8]>>(
    scope: impl ExactSizeIterator<Item = Option<V>>,
    key: &str,
) -> Digest16 {
    let mut h = Sha256::new();
    h.update(b"idempotency-filter/key/v1");
    h.update((scope.len() as u64).to_le_bytes());
    for value in scope {
        feed_optional(&mut h, value.as_ref().map(AsRef::as_ref));
    }
    feed_field(&mut h, key.as_bytes());
    truncate(&h.finalize())
}

/// Lower-case hex, as Redis keys and markers carry digests.
pub fn hex(d: &[u8]) -> String {
    hex::encode(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [FingerprintHash; 2] = [FingerprintHash::Xxh3, FingerprintHash::Sha256];

    fn fp_with(
        hash: FingerprintHash,
        method: &str,
        path: &str,
        ct: Option<&str>,
        chunks: &[&[u8]],
    ) -> Digest16 {
        let mut f = Fingerprinter::new(hash, method, path, &[ct.map(str::as_bytes)]);
        for c in chunks {
            f.update(c);
        }
        f.finish()
    }

    #[test]
    fn fingerprint_is_stable_across_chunkings() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for hash in BOTH {
            let fp =
                |chunks: &[&[u8]]| fp_with(hash, "POST", "/p", Some("application/json"), chunks);
            let whole = fp(&[&body]);
            for split in [1usize, 7, 100, 4096, 4999] {
                let (a, b) = body.split_at(split);
                assert_eq!(whole, fp(&[a, b]));
            }
            let pieces: Vec<&[u8]> = body.chunks(3).collect();
            assert_eq!(whole, fp(&pieces));
        }
    }

    /// Fingerprints are stored (Redis keeps them across gateway upgrades): a
    /// change of their byte stream or hash would make every retry of a
    /// request made before the upgrade a 422. These values must never move.
    #[test]
    fn fingerprints_are_stable_across_versions() {
        let x = fp_with(
            FingerprintHash::Xxh3,
            "POST",
            "/pay?x=1",
            Some("application/json"),
            &[b"{\"amount\":1}"],
        );
        let s = fp_with(
            FingerprintHash::Sha256,
            "POST",
            "/pay?x=1",
            Some("application/json"),
            &[b"{\"amount\":1}"],
        );
        assert_eq!(hex(&x), "949dd89de7c3fbcc9aa41bb8736b5fcf");
        assert_eq!(hex(&s), "21b75311ec869d6045b30ee30e9b0e38");
        assert_ne!(x, s);
    }

    #[test]
    fn every_part_of_the_request_changes_the_fingerprint() {
        for hash in BOTH {
            every_part_changes(hash);
        }
    }

    fn every_part_changes(hash: FingerprintHash) {
        let fp = |m: &str, p: &str, ct: Option<&str>, c: &[&[u8]]| fp_with(hash, m, p, ct, c);
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
