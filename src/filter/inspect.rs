//! Request inspection, a pure function of the request headers and the
//! configuration: is the request protected, and if so under which key
//! (digest of scope and key) and with which fingerprint (started here,
//! finished once the body has been hashed).
//!
//! ```text
//! method not protected ─────────────▶ Pass
//! no key ──required──▶ Refuse (400)   ──optional──▶ Unkeyed
//!        ──generate_missing──▶ a new key ─┐
//! invalid key ───────▶ Refuse (400)       │
//! key ────────────────────────────────────┴──▶ Protect
//! ```

use super::capture::header_number;
use super::forward::ForwardRequest;
use crate::config::Config;
use crate::fingerprint::{key_digest_of, Digest16, Fingerprinter};
use crate::host::{HeaderMap, Host};
use crate::key::{to_sf_string, KeyError, KeySyntax};
use crate::problem::Problem;
use std::borrow::Cow;

/// What the filter does with a request, by its headers. Returned once per
/// request and taken apart at once: not worth boxing the large variant.
#[allow(clippy::large_enum_variant)]
pub enum Inspection {
    /// A method the filter does not protect.
    Pass,
    /// A protected method without a key, where keys are optional.
    Unkeyed,
    /// A missing (where required) or invalid key.
    Refuse(Problem),
    Protect(Protected),
}

/// A protected request, as its headers describe it.
pub struct Protected {
    /// The key the gateway assigned, when the client sent none
    /// (`generate_missing`); the filter sets it on the request.
    pub generated_key: Option<String>,
    /// Digest of the scope headers and the key: the store's key.
    pub digest: Digest16,
    /// Started on the method, path and fingerprint headers; the body follows.
    pub fingerprint: Fingerprinter,
    /// The declared Content-Length exceeds `max_request_body_bytes`.
    pub declared_too_large: bool,
    /// Forwarding mode: the request to send upstream (its body follows).
    pub forward: Option<ForwardRequest>,
}

/// Inspects a request. `new_key` makes a key when the configuration asks
/// the gateway to assign missing ones.
pub fn inspect(cfg: &Config, headers: &HeaderMap, new_key: impl FnOnce() -> String) -> Inspection {
    let method = headers
        .get(":method")
        .and_then(|m| std::str::from_utf8(m).ok())
        .unwrap_or("");
    if !cfg.protects(method) {
        return Inspection::Pass;
    }
    let values: Vec<&[u8]> = headers.values(&cfg.header).collect();
    let (key, generated_key) = match cfg.key_syntax.parse_headers(&values, cfg.max_key_length) {
        Ok(Some(k)) => (k, None),
        Ok(None) if cfg.required => return Inspection::Refuse(Problem::missing_key(&cfg.header)),
        // The header carries it as the client would have sent it: an
        // sf-string under the draft's syntax, so that strict parsers
        // upstream read it and a client can send it back as it came.
        Ok(None) if cfg.generate_missing => {
            let k = new_key();
            let header = match cfg.key_syntax {
                KeySyntax::Structured => to_sf_string(&k),
                KeySyntax::Opaque => k.clone(),
            };
            (k, Some(header))
        }
        Ok(None) => return Inspection::Unkeyed,
        Err(e) => {
            return Inspection::Refuse(Problem::invalid_key(&key_error_detail(&e, &cfg.header)))
        }
    };
    let declared: Option<u64> = header_number(headers, "content-length");
    let digest = scoped_digest(cfg, headers, &key);
    let path = headers
        .get(":path")
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("");
    let fp_values = cfg
        .fingerprint_headers
        .iter()
        .map(|h| header_joined(headers, h));
    let fingerprint = Fingerprinter::with_headers(cfg.fingerprint_hash, method, path, fp_values);
    let forward = cfg.forward.as_ref().map(|_| {
        ForwardRequest::from_headers(cfg, headers, method, path, generated_key.as_deref())
    });
    Inspection::Protect(Protected {
        generated_key,
        digest,
        fingerprint,
        declared_too_large: declared.is_some_and(|n| n > cfg.max_request_body_bytes),
        forward,
    })
}

/// The store's key of `key`: its digest within the scope the request's
/// `scope_headers` values name.
pub(super) fn scoped_digest(cfg: &Config, headers: &HeaderMap, key: &str) -> Digest16 {
    let scope = cfg.scope_headers.iter().map(|h| header_joined(headers, h));
    key_digest_of(scope, key)
}

/// All values of a header joined as one list (RFC 9110 5.3), so a header
/// split in two does not change the meaning, and joined exactly as Envoy
/// joins the repeated headers it keeps as one (`,`, and `; ` for cookies):
/// APISIX hands each one over, and a key's scope and fingerprint must come
/// out the same on both hosts of a fleet, or a retry that crosses them gets
/// another scope (and runs again) or a 422. A header sent once (the usual
/// case) is borrowed, not copied.
fn header_joined<'a>(headers: &'a HeaderMap, name: &'a str) -> Option<Cow<'a, [u8]>> {
    let separator: &[u8] = if name == "cookie" { b"; " } else { b"," };
    let mut out: Option<Cow<'a, [u8]>> = None;
    for v in headers.values(name) {
        match out.as_mut() {
            None => out = Some(Cow::Borrowed(v)),
            Some(o) => {
                let o = o.to_mut();
                o.extend_from_slice(separator);
                o.extend_from_slice(v);
            }
        }
    }
    out
}

pub(super) fn key_error_detail(e: &KeyError, header: &str) -> String {
    format!("{e} (header {header})")
}

/// A random (version 4) UUID, for `generate_missing`. From the host's
/// generator, not uuid's `v4` feature (a getrandom host call per key).
pub(super) fn uuid_v4(host: &impl Host) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&host.random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&host.random_u64().to_le_bytes());
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let list: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        HeaderMap::from_list(&list)
    }

    /// As Envoy hands them over already joined: a retry on the other host
    /// of a mixed fleet must find the same scope and fingerprint.
    #[test]
    fn repeated_headers_are_joined_as_envoy_joins_them() {
        let apisix = map(&[
            ("content-type", "application/json"),
            ("content-type", "charset=utf-8"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ]);
        let envoy = map(&[
            ("content-type", "application/json,charset=utf-8"),
            ("cookie", "a=1; b=2"),
        ]);
        for name in ["content-type", "cookie"] {
            assert_eq!(
                header_joined(&apisix, name),
                header_joined(&envoy, name),
                "{name}"
            );
        }
        assert!(matches!(
            header_joined(&envoy, "cookie"),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(header_joined(&envoy, "authorization"), None);
    }
}
