//! The configuration document exactly as operators write it, with its
//! defaults: the one place they live ([`super::Config::default()`] is these,
//! validated).

use super::{Platform, UnknownOutcome};
use crate::key::KeySyntax;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;

/// The JSON document exactly as operators write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) header: String,
    #[serde(deserialize_with = "string_list")]
    pub(super) methods: Vec<String>,
    pub(super) required: bool,
    pub(super) generate_missing: bool,
    pub(super) max_key_length: usize,
    pub(super) key_syntax: KeySyntax,
    pub(super) ttl_seconds: u64,
    pub(super) lock_timeout_seconds: u64,
    pub(super) max_request_body_bytes: u64,
    pub(super) max_response_body_bytes: u64,
    pub(super) max_in_flight_bytes: u64,
    #[serde(deserialize_with = "string_list")]
    pub(super) scope_headers: Vec<String>,
    #[serde(deserialize_with = "string_list")]
    pub(super) fingerprint_headers: Vec<String>,
    pub(super) fingerprint_hash: RawFingerprintHash,
    pub(super) record_server_errors: bool,
    pub(super) unknown_outcome: UnknownOutcome,
    #[serde(deserialize_with = "string_list")]
    pub(super) never_record_headers: Vec<String>,
    pub(super) host: RawHost,
    pub(super) forward: Option<RawForward>,
    pub(super) outcome_property: String,
    pub(super) operations: Option<RawOperations>,
    /// Parsed in a second step ([`parse_store`]): the store's fields depend
    /// on its `type`, and errors must still name e.g. `store.timeout_ms`.
    pub(super) store: serde_json::Value,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            header: "Idempotency-Key".to_string(),
            methods: vec!["POST".to_string(), "PATCH".to_string()],
            required: false,
            generate_missing: false,
            max_key_length: 255,
            key_syntax: KeySyntax::Structured,
            ttl_seconds: 86_400,
            lock_timeout_seconds: 30,
            max_request_body_bytes: 1_048_576,
            max_response_body_bytes: 1_048_576,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            scope_headers: vec!["authorization".to_string()],
            fingerprint_headers: vec!["content-type".to_string()],
            fingerprint_hash: RawFingerprintHash::Xxh3,
            record_server_errors: false,
            unknown_outcome: UnknownOutcome::Record,
            never_record_headers: vec!["set-cookie".to_string()],
            host: RawHost::Envoy,
            forward: None,
            outcome_property: String::new(),
            operations: None,
            store: serde_json::json!({"type": "local"}),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisStore {
    pub(super) cluster: String,
    #[serde(default)]
    pub(super) authority: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub(super) timeout_ms: u64,
    #[serde(default = "default_key_prefix")]
    pub(super) key_prefix: String,
    #[serde(default)]
    pub(super) on_unavailable: RawOnUnavailable,
    #[serde(default)]
    pub(super) auth: Option<RawAuth>,
    /// Unset: [`DEFAULT_CACHE_ENTRIES`] on Envoy, 0 (off) on APISIX.
    #[serde(default)]
    pub(super) cache_entries: Option<u32>,
    /// The replay cache's byte budget. Unset: [`DEFAULT_CACHE_MAX_BYTES`]
    /// (Envoy); refused on APISIX, which has no cache.
    #[serde(default)]
    pub(super) max_bytes: Option<u64>,
}

/// Completed records a gateway keeps in its own shared data in front of
/// Redis, so that replays need no store round trip (Envoy only).
pub const DEFAULT_CACHE_ENTRIES: u32 = 10_000;

/// The local store's byte budget for recorded responses: 256 MiB. The
/// table's memory was bounded in entries only, and `max_entries` (100,000)
/// x `max_response_body_bytes` (1 MiB) is about 100 GB: one client could
/// have Envoy killed by the kernel. 256 MiB, with the default table's own
/// 27 MB, stays far inside the memory a gateway is commonly given (Istio's
/// sidecar limit is 1 GiB) and leaves room for Envoy itself and for the
/// requests in flight, whose bodies are not part of it. It holds the
/// default 100,000 records while they average 2 KB (charged 2.6 KB with
/// Envoy's allocation): with 1-2 KiB JSON answers, the common case for
/// payment APIs, `max_entries` stays the bound that binds first. The cost: each of the 6,250 buckets owns 1/6,250 of
/// it (42 KB), so by default the largest body replayed whole is about
/// 32 KB; larger ones are replayed without their body unless `max_bytes`
/// is raised or `max_entries` lowered (README, "How the local store works").
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Bytes of bodies the running requests of one Wasm VM may hold: 64 MiB.
/// A VM has at most 1 GiB on Envoy (proxy-wasm-cpp-host's
/// `PROXY_WASM_HOST_MAX_WASM_MEMORY_SIZE_BYTES`), and a counted byte is
/// copied up to about four more times while its record is encoded and sent
/// (the Redis store: the record as ASCII, the batch's body and the call's
/// request built from it), so 64 MiB keeps the worst case under a third of
/// the VM. It holds 64 responses of the largest default size (1 MiB) at
/// once, and tens of thousands of the usual 1-2 KiB ones.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 64 * 1024 * 1024;

/// The replay cache's byte budget: 64 MiB. Smaller than the local store's
/// because nothing is lost when the cache evicts (Redis still has the
/// record, one round trip away); with the default 10,000 entries each
/// bucket's share is 107 KB, so records up to about 80 KB are cached and
/// larger ones are always read from Redis.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 64 * 1024 * 1024;

fn default_timeout_ms() -> u64 {
    500
}

fn default_key_prefix() -> String {
    "idem:".to_string()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawOnUnavailable {
    #[default]
    Reject,
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) username: String,
    pub(super) password: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawFingerprintHash {
    #[default]
    Xxh3,
    Sha256,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum RawHost {
    #[default]
    Envoy,
    Apisix,
    ApisixProfile,
}

impl RawHost {
    pub(super) fn platform(self) -> Platform {
        match self {
            RawHost::Envoy => Platform::Envoy,
            RawHost::Apisix => Platform::Apisix,
            RawHost::ApisixProfile => Platform::ApisixProfile,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawForward {
    pub(super) upstream: String,
    #[serde(default)]
    pub(super) authority: Option<String>,
    /// Default by platform: [`super::forward_timeout_default_ms`].
    #[serde(default)]
    pub(super) timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLocalStore {
    pub(super) max_entries: u32,
    pub(super) max_bytes: u64,
}

impl Default for RawLocalStore {
    fn default() -> Self {
        RawLocalStore {
            max_entries: 100_000,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// `operations`: this filter instance is the key-operations endpoint.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object, e.g. {} or {\"path\": \"/idempotency/key\"}"
)]
pub(super) struct RawOperations {
    #[serde(default = "default_operations_path")]
    pub(super) path: String,
}

fn default_operations_path() -> String {
    "/idempotency/key".to_string()
}

/// A list of strings, or `{}` for an empty one: APISIX JSON-encodes a
/// route's `conf` with cjson, which writes an empty Lua table (a YAML or
/// JSON `[]` once decoded) as an object.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct ListOrEmptyObject;
    impl<'de> Visitor<'de> for ListOrEmptyObject {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of strings")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            match map.next_key::<IgnoredAny>()? {
                None => Ok(Vec::new()),
                Some(_) => Err(serde::de::Error::invalid_type(Unexpected::Map, &self)),
            }
        }
    }
    d.deserialize_any(ListOrEmptyObject)
}
