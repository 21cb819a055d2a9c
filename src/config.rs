//! Plugin configuration: parsed with serde (unknown fields refused), defaulted,
//! then validated into [`Config`]. Every error names the field and the fix in one
//! line, because that line is all an operator sees in the proxy's log.

use crate::fingerprint::FingerprintHash;
pub use crate::key::KeySyntax;
use crate::record::is_recorded_header;
use crate::store::budget::Budget;
use crate::store::redis::RedisConfig;
use crate::store::renewals;
use std::fmt;

mod platform;
mod raw;
mod store;

pub use platform::Platform;

use raw::{RawConfig, RawFingerprintHash, RawForward, RawLocalStore, RawOperations};
pub use raw::{
    DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_MAX_BYTES, DEFAULT_MAX_BYTES, DEFAULT_MAX_IN_FLIGHT_BYTES,
};
use store::{local_store, parse_store};

/// Ways per bucket of the local slot table; `max_entries` is rounded down to a
/// multiple of this so the table never holds more than `max_entries` records.
pub const LOCAL_WAYS: u32 = 16;

const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
const MAX_BODY_LIMIT: u64 = 64 * 1024 * 1024;
/// Twice the default: its copies while records are encoded and sent still
/// leave part of a VM's 1 GiB (Envoy) to the rest
/// ([`DEFAULT_MAX_IN_FLIGHT_BYTES`]).
const MAX_IN_FLIGHT_LIMIT: u64 = 128 * 1024 * 1024;
const MAX_KEY_LENGTH_LIMIT: usize = 8192;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// `value` must lie in `min..=max`.
fn within(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(err(
            field,
            format!("must be between {min} and {max} (got {value})"),
        ))
    }
}

/// An `:authority` to send, when one is set.
fn check_authority(field: &str, authority: Option<&str>) -> Result<(), ConfigError> {
    match authority {
        Some(a) if !is_visible(a) => Err(err(
            field,
            "must be a host name or host:port without spaces",
        )),
        _ => Ok(()),
    }
}

/// Validated configuration. Header names are lower-case (both hosts hand
/// header names to the filter lower-cased), methods upper-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub header: String,
    pub methods: Vec<String>,
    pub required: bool,
    pub generate_missing: bool,
    pub max_key_length: usize,
    pub key_syntax: KeySyntax,
    pub ttl_ms: u64,
    pub lock_timeout_ms: u64,
    /// Where a tick renews running requests' claims: how long after its
    /// deadline was last set a claim is renewed (see `store::renewals`).
    pub renew_after_ms: u64,
    pub max_request_body_bytes: u64,
    pub max_response_body_bytes: u64,
    /// Bytes of bodies the running requests of one VM may hold (see
    /// [`crate::in_flight`]).
    pub max_in_flight_bytes: u64,
    pub scope_headers: Vec<String>,
    pub fingerprint_headers: Vec<String>,
    pub fingerprint_hash: FingerprintHash,
    pub record_server_errors: bool,
    /// What a key records when the gateway cannot know whether the upstream
    /// acted (the exchange ended mid-response, an upstream reset).
    pub unknown_outcome: UnknownOutcome,
    /// Response headers never recorded, so never replayed (lower-case).
    pub never_record_headers: Vec<String>,
    pub store: StoreConfig,
    pub platform: Platform,
    /// Forwarding mode: the filter itself sends the request upstream.
    pub forward: Option<Forward>,
    /// Where each protected request's outcome is written (`set_property`;
    /// Envoy filter state `wasm.<name>`, for access logs). `None`: nowhere.
    pub outcome_property: Option<String>,
    /// This instance is the key-operations endpoint (inspect and forget one
    /// key of the local store) and protects nothing. `None`: a protecting
    /// instance, the default.
    pub operations: Option<Operations>,
}

/// The key-operations endpoint: `GET` and `DELETE` at `path`, on a listener
/// the operator keeps internal (see README "Operations").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operations {
    pub path: String,
}

/// When the gateway cannot know whether the upstream acted: the client left
/// (Envoy then resets the upstream request), the upstream reset the
/// connection before answering, or the response was cut mid-body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownOutcome {
    /// Record a `502` problem (`outcome-unknown`) as the key's outcome for
    /// its TTL: retries get it replayed and never run the operation again.
    #[default]
    Record,
    /// Keep the claim until `lock_timeout_seconds`; the next retry after
    /// that runs again (it may be a second execution).
    ReleaseAfterLock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Envoy: a cluster name. APISIX: host:port.
    pub upstream: String,
    /// `:authority` sent upstream; the client's when unset.
    pub authority: Option<String>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Local {
        buckets: u32,
        ways: u32,
        /// Bytes of recorded responses the table may hold.
        max_bytes: u64,
    },
    Redis {
        redis: RedisConfig,
        /// Bytes of recorded responses the replay cache may hold.
        cache_max_bytes: u64,
    },
}

impl StoreConfig {
    /// Records the store can hold at once (Redis: as many as Redis holds).
    pub fn capacity(&self) -> Option<u64> {
        match self {
            StoreConfig::Local { buckets, ways, .. } => {
                Some(u64::from(*buckets) * u64::from(*ways))
            }
            StoreConfig::Redis { .. } => None,
        }
    }
}

impl Config {
    pub fn protects(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }

    /// How much of a response body is worth capturing for its record. The
    /// local store cannot keep a body larger than a bucket's share of
    /// `max_bytes` (it keeps such records without their body), so nothing
    /// more is held while the response streams. Redis keeps what
    /// `max_response_body_bytes` allows.
    pub fn recorded_body_limit(&self) -> u64 {
        match &self.store {
            StoreConfig::Local {
                buckets, max_bytes, ..
            } => self
                .max_response_body_bytes
                .min(Budget::new(*max_bytes, *buckets).largest_body()),
            StoreConfig::Redis { .. } => self.max_response_body_bytes,
        }
    }

    /// Whether a response header goes into the record (and so into replays).
    pub fn records_header(&self, name: &str) -> bool {
        is_recorded_header(name) && !self.never_record_headers.iter().any(|h| h == name)
    }

    /// Parses and validates the plugin configuration. An empty document means
    /// "all defaults", which is what Envoy passes when `configuration` is unset.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let trimmed = trim_ascii(bytes);
        let raw: RawConfig = if trimmed.is_empty() {
            RawConfig::default()
        } else if trimmed.first() != Some(&b'{') {
            // serde would read a JSON array as positional fields: refuse it.
            return Err(err(
                "(document)",
                "the configuration must be a JSON object, e.g. {\"required\": true}",
            ));
        } else {
            let mut de = serde_json::Deserializer::from_slice(trimmed);
            serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(&e))?
        };
        validate(raw)
    }
}

impl Default for Config {
    /// The documented defaults: `RawConfig::default()`, validated (the
    /// unit tests prove them valid). Should a default ever fail its checks,
    /// that test fails; this still returns the same defaults, unchecked,
    /// rather than panic.
    fn default() -> Self {
        validate(RawConfig::default()).unwrap_or_else(|_| {
            let raw = RawConfig::default();
            let local = RawLocalStore::default();
            assemble(
                raw,
                local_store(local.max_entries, local.max_bytes),
                None,
                None,
                None,
            )
        })
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    bytes.get(start..end).unwrap_or(&[])
}

/// serde_json's messages already name the offending field ("unknown field `x`,
/// expected one of ..."); this adds where it happened and what to do.
fn json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let inner = e.inner();
    // serde_json appends " at line L column C"; the field path says more.
    let text = inner.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) if inner.line() > 0 => text[..i].to_string(),
        _ => text,
    };
    let path = e.path().to_string();
    let field = if path == "." || path == "?" || path.is_empty() {
        "(document)".to_string()
    } else {
        path
    };
    let fix = if text.starts_with("unknown field") {
        "; remove it or fix its spelling"
    } else if text.starts_with("missing field") {
        "; it is required"
    } else if text.starts_with("invalid type")
        || text.starts_with("invalid value")
        || text.starts_with("unknown variant")
    {
        "; see the configuration table in README.md for each field's type"
    } else {
        ""
    };
    err(&field, format!("{text}{fix}"))
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_header_names<'a>(
    field: &str,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), ConfigError> {
    match names.into_iter().find(|name| !is_token(name)) {
        Some(name) => Err(err(
            field,
            format!(
                "{name:?} is not a header name; use token characters only, e.g. \"x-tenant-id\""
            ),
        )),
        None => Ok(()),
    }
}

/// Header names of a request, `:authority` included: a request's host is
/// its pseudo-header there, and keys used on two hosts are kept apart only
/// by naming it (scope or fingerprint).
fn check_request_header_names(field: &str, names: &[String]) -> Result<(), ConfigError> {
    check_header_names(field, names.iter().filter(|n| n.as_str() != ":authority"))
}

/// Each name once, in their first order.
fn unique(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Header names lower-cased, each once.
fn lower_unique(names: Vec<String>) -> Vec<String> {
    unique(names.iter().map(|n| n.to_ascii_lowercase()))
}

/// A host, cluster or host:port: printable, no spaces, not empty.
fn is_visible(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// An address as APISIX's calls take it (wasm-nginx-module puts
/// `http://` in front): a name, an IPv4 address or a bracketed IPv6 one,
/// then `:port` (1-65535), or no port for 80; no scheme, no path.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (host, Some(port)),
        _ => (s, None),
    };
    let bracketed = host.len() > 2 && host.starts_with('[') && host.ends_with(']');
    let plain = !host.is_empty() && !host.contains(['/', ':', '@', '[', ']', '?', '#']);
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    is_visible(s) && (bracketed || plain) && port_ok
}

/// On a host whose calls name addresses, `field` must be one.
fn check_address(
    platform: Platform,
    field: &str,
    value: &str,
    example: &str,
) -> Result<(), ConfigError> {
    if platform.calls_addresses() && !is_host_port(value) {
        return Err(err(
            field,
            format!("must be host:port (or a host, for port 80) on APISIX, which calls addresses, not Envoy clusters (got {value:?}); e.g. \"{example}\""),
        ));
    }
    Ok(())
}

/// `forward.timeout_ms` when not given. Envoy renews a running request's
/// claim, so the upstream may take long. APISIX cannot, and nginx applies
/// the timeout to each socket operation of the call (connect, send, read),
/// so the lock must outlast three of them: a third of the default lock,
/// less the store's calls, rounded down (see `validate`).
pub fn forward_timeout_default_ms(platform: Platform) -> u64 {
    if platform.has_tick() {
        25_000
    } else {
        8_000
    }
}

fn validate_forward(f: RawForward, platform: Platform) -> Result<Forward, ConfigError> {
    if !is_visible(&f.upstream) {
        return Err(err(
            "forward.upstream",
            "must name the upstream: an Envoy cluster name, or host:port on APISIX",
        ));
    }
    check_authority("forward.authority", f.authority.as_deref())?;
    let timeout_ms = f
        .timeout_ms
        .unwrap_or_else(|| forward_timeout_default_ms(platform));
    within("forward.timeout_ms", timeout_ms, 1, 600_000)?;
    Ok(Forward {
        upstream: f.upstream,
        authority: f.authority,
        timeout_ms,
    })
}

fn validate(mut raw: RawConfig) -> Result<Config, ConfigError> {
    if !is_token(&raw.header) {
        return Err(err(
            "header",
            format!(
                "{:?} is not a header name; use token characters only, e.g. \"Idempotency-Key\"",
                raw.header
            ),
        ));
    }
    if raw.methods.is_empty() {
        return Err(err(
            "methods",
            "must list at least one method, e.g. [\"POST\", \"PATCH\"]",
        ));
    }
    if let Some(m) = raw.methods.iter().find(|m| !is_token(m)) {
        return Err(err(
            "methods",
            format!("{m:?} is not an HTTP method; use a token such as \"POST\""),
        ));
    }
    if raw.required && raw.generate_missing {
        return Err(err(
            "generate_missing",
            "cannot be true together with \"required\": a generated key means a missing key is never rejected; set one of them to false",
        ));
    }
    within(
        "max_key_length",
        raw.max_key_length as u64,
        1,
        MAX_KEY_LENGTH_LIMIT as u64,
    )?;
    if raw.generate_missing && raw.max_key_length < 36 {
        return Err(err(
            "max_key_length",
            format!("must be at least 36 when generate_missing is true, the length of a generated UUID (got {})", raw.max_key_length),
        ));
    }
    within("ttl_seconds", raw.ttl_seconds, 1, MAX_TTL_SECONDS)?;
    if raw.lock_timeout_seconds == 0 {
        return Err(err(
            "lock_timeout_seconds",
            "must be at least 1 (got 0); set it above your upstream's longest response time",
        ));
    }
    if raw.lock_timeout_seconds > raw.ttl_seconds {
        return Err(err(
            "lock_timeout_seconds",
            format!(
                "must not exceed ttl_seconds ({}) (got {}); raise ttl_seconds or lower lock_timeout_seconds",
                raw.ttl_seconds, raw.lock_timeout_seconds
            ),
        ));
    }
    if raw.max_request_body_bytes > MAX_BODY_LIMIT {
        return Err(err(
            "max_request_body_bytes",
            format!(
                "must be at most {MAX_BODY_LIMIT} (got {})",
                raw.max_request_body_bytes
            ),
        ));
    }
    if raw.max_response_body_bytes > MAX_BODY_LIMIT {
        return Err(err(
            "max_response_body_bytes",
            format!(
                "must be at most {MAX_BODY_LIMIT} (got {})",
                raw.max_response_body_bytes
            ),
        ));
    }
    // A lone request must fit, or its body could never be forwarded, nor
    // its answer recorded whole.
    let largest_body = raw.max_request_body_bytes.max(raw.max_response_body_bytes);
    if raw.max_in_flight_bytes < largest_body {
        return Err(err(
            "max_in_flight_bytes",
            format!(
                "must be at least {largest_body}, the larger of max_request_body_bytes and max_response_body_bytes, so that one request's bodies fit (got {}); raise it or lower those limits",
                raw.max_in_flight_bytes
            ),
        ));
    }
    if raw.max_in_flight_bytes > MAX_IN_FLIGHT_LIMIT {
        return Err(err(
            "max_in_flight_bytes",
            format!(
                "must be at most {MAX_IN_FLIGHT_LIMIT} (got {})",
                raw.max_in_flight_bytes
            ),
        ));
    }
    check_request_header_names("scope_headers", &raw.scope_headers)?;
    check_request_header_names("fingerprint_headers", &raw.fingerprint_headers)?;
    check_header_names("never_record_headers", &raw.never_record_headers)?;
    let platform = raw.host.platform();
    let store = parse_store(std::mem::take(&mut raw.store), platform)?;
    let forward = raw
        .forward
        .take()
        .map(|f| validate_forward(f, platform))
        .transpose()?;
    let outcome_property =
        validate_outcome_property(std::mem::take(&mut raw.outcome_property), platform)?;
    let operations = raw
        .operations
        .take()
        .map(|o| validate_operations(o, platform, &store))
        .transpose()?;
    if !platform.has_shared_data() && matches!(store, StoreConfig::Local { .. }) {
        return Err(err(
                "store.type",
                "the local store needs shared data, which APISIX does not provide; use {\"type\": \"redis\", \"cluster\": \"host:port\"}",
            ));
    }
    if platform.calls_only_in_request_phases() && forward.is_none() {
        return Err(err(
            "forward",
            "is required on APISIX, which allows store calls only while handling the request: set {\"upstream\": \"host:port\"} so the filter forwards the request itself and records the answer",
        ));
    }
    if let StoreConfig::Redis { redis, .. } = &store {
        check_address(platform, "store.cluster", &redis.cluster, "127.0.0.1:7379")?;
    }
    if let Some(f) = &forward {
        check_address(platform, "forward.upstream", &f.upstream, "127.0.0.1:8081")?;
    }
    // Without a tick nothing renews a claim: it must outlast the longest the
    // filter waits for the upstream and then for the record's write, or a
    // slow answer loses its claim and a retry runs again.
    if let Some(f) = forward.as_ref().filter(|_| !platform.has_tick()) {
        // Redis starts the lock when it runs the claim: the claim's answer,
        // the forwarded call and the record's write all come after, and
        // the record goes twice (by SHA-1, then by source) if Redis lost
        // its scripts meanwhile. nginx times each socket operation of a
        // call on its own: a connect, a send and a read can each take up to
        // the call's timeout. (An upstream that trickles its answer can
        // still hold a call longer: README, "What changes on APISIX".)
        let store_ms = store_call_ms(&store);
        if raw.lock_timeout_seconds.saturating_mul(1000) <= 3 * (f.timeout_ms + 3 * store_ms) {
            return Err(err(
                "lock_timeout_seconds",
                format!("must be longer than three times forward.timeout_ms plus nine times store.timeout_ms on APISIX, which has no tick to renew the claims of running requests: nginx applies each timeout to every socket operation of a call (connect, send, read), and besides the forwarded call come three store calls (the claim's answer, and the record, sent twice after a NOSCRIPT) (got {} s for 3 x {} + 9 x {} ms): raise it, or lower the timeouts", raw.lock_timeout_seconds, f.timeout_ms, store_ms),
            ));
        }
    }
    // With a tick, a renewal must land before the lock runs out: sent at the
    // first tick after it is due, it may wait for the batch in flight (sent
    // twice after a NOSCRIPT) and then for its own answer.
    if platform.has_tick() && operations.is_none() {
        let call_ms = store_call_ms(&store);
        let shortest = renewals::shortest_lock_ms(call_ms);
        if raw.lock_timeout_seconds.saturating_mul(1000) <= shortest {
            let why = if call_ms > 0 {
                format!("a renewal is sent at the next one-second tick and may take three times store.timeout_ms ({call_ms} ms) to land, behind the batch in flight: raise it, or lower store.timeout_ms")
            } else {
                "a renewal is sent at the next one-second tick: raise it".to_string()
            };
            return Err(err(
                "lock_timeout_seconds",
                format!("must be longer than {} s on Envoy, where the claims of running requests are renewed from a tick, so that each renewal lands before the lock runs out (got {} s); {why}", shortest as f64 / 1000.0, raw.lock_timeout_seconds),
            ));
        }
    }
    Ok(assemble(raw, store, forward, outcome_property, operations))
}

/// The longest a store call may take (0: the local store answers at once).
fn store_call_ms(store: &StoreConfig) -> u64 {
    match store {
        StoreConfig::Redis { redis, .. } => redis.timeout_ms,
        StoreConfig::Local { .. } => 0,
    }
}

/// The configuration `raw` describes, once its checks have passed (the
/// parts checked separately come in checked).
fn assemble(
    raw: RawConfig,
    store: StoreConfig,
    forward: Option<Forward>,
    outcome_property: Option<String>,
    operations: Option<Operations>,
) -> Config {
    Config {
        header: raw.header.to_ascii_lowercase(),
        methods: unique(raw.methods.iter().map(|m| m.to_ascii_uppercase())),
        required: raw.required,
        generate_missing: raw.generate_missing,
        max_key_length: raw.max_key_length,
        key_syntax: raw.key_syntax,
        ttl_ms: raw.ttl_seconds * 1000,
        lock_timeout_ms: raw.lock_timeout_seconds * 1000,
        renew_after_ms: renewals::renew_after_ms(
            raw.lock_timeout_seconds * 1000,
            store_call_ms(&store),
        ),
        max_request_body_bytes: raw.max_request_body_bytes,
        max_response_body_bytes: raw.max_response_body_bytes,
        max_in_flight_bytes: raw.max_in_flight_bytes,
        scope_headers: lower_unique(raw.scope_headers),
        fingerprint_headers: lower_unique(raw.fingerprint_headers),
        fingerprint_hash: match raw.fingerprint_hash {
            RawFingerprintHash::Xxh3 => FingerprintHash::Xxh3,
            RawFingerprintHash::Sha256 => FingerprintHash::Sha256,
        },
        record_server_errors: raw.record_server_errors,
        unknown_outcome: raw.unknown_outcome,
        never_record_headers: lower_unique(raw.never_record_headers),
        store,
        platform: raw.host.platform(),
        forward,
        outcome_property,
        operations,
    }
}

/// The operations endpoint works on the local store's table in shared data:
/// refused where there is none (APISIX) and for the Redis store, whose
/// records an operator reaches with redis-cli.
fn validate_operations(
    raw: RawOperations,
    platform: Platform,
    store: &StoreConfig,
) -> Result<Operations, ConfigError> {
    const REDIS_WAY: &str = "with the Redis store, inspect a record with redis-cli GET on the name examples/redis_key prints, and delete one only with the README's script, which spares running keys (README \"Finding or deleting one record\")";
    if !platform.has_shared_data() {
        return Err(err(
            "operations",
            format!("works on the local store's shared data, which APISIX does not provide; leave it out: {REDIS_WAY}"),
        ));
    }
    if let StoreConfig::Redis { .. } = store {
        return Err(err(
            "operations",
            format!("inspects and forgets keys of the local store only; leave it out: {REDIS_WAY}"),
        ));
    }
    let valid = raw.path.starts_with('/')
        && raw.path.len() <= 256
        && is_visible(&raw.path)
        && !raw.path.contains(['?', '#']);
    if !valid {
        return Err(err(
            "operations.path",
            format!(
                "{:?} is not a request path; use one starting with '/', without spaces, '?' or '#', e.g. \"/idempotency/key\"",
                raw.path
            ),
        ));
    }
    Ok(Operations { path: raw.path })
}

const MAX_PROPERTY_NAME: usize = 64;

fn validate_outcome_property(
    name: String,
    platform: Platform,
) -> Result<Option<String>, ConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    if !platform.has_filter_state() {
        // wasm-nginx-module maps properties to nginx variables, which must be
        // declared in nginx.conf; not supported here.
        return Err(err(
            "outcome_property",
            "is Envoy only (APISIX has no filter state for it); leave it out and log APISIX's $status instead",
        ));
    }
    let valid = name.len() <= MAX_PROPERTY_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(err(
            "outcome_property",
            format!(
                "{name:?} is not a property name; use up to {MAX_PROPERTY_NAME} letters, digits, '_' or '-', e.g. \"idempotency_outcome\""
            ),
        ));
    }
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::OnUnavailable;

    #[test]
    fn empty_document_means_defaults() {
        let c = Config::parse(b"").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.header, "idempotency-key");
        assert_eq!(c.methods, vec!["POST", "PATCH"]);
        assert_eq!(c.ttl_ms, 86_400_000);
        assert_eq!(c.lock_timeout_ms, 30_000);
        assert_eq!(c.store.capacity(), Some(100_000));
        assert_eq!(Config::parse(b"  {} \n").unwrap(), c);
    }

    #[test]
    fn the_shortest_locks_envoy_accepts_and_when_their_claims_are_renewed() {
        let local = Config::parse(br#"{"lock_timeout_seconds":2}"#).unwrap();
        assert_eq!(local.renew_after_ms, 500);
        let redis = Config::parse(br#"{"lock_timeout_seconds":3,"store":{"type":"redis","cluster":"r","timeout_ms":200}}"#).unwrap();
        assert_eq!(redis.renew_after_ms, 900);
        // APISIX renews nothing: its lock is checked against its timeouts.
        let apisix = Config::parse(br#"{"host":"apisix","lock_timeout_seconds":2,"store":{"type":"redis","cluster":"r:1","timeout_ms":50},"forward":{"upstream":"u:1","timeout_ms":500}}"#);
        assert!(apisix.is_ok());
        assert_eq!(Config::default().renew_after_ms, 10_000);
    }

    #[test]
    fn fields_are_normalised() {
        let c = Config::parse(
            br#"{"header":"X-Idem","methods":["post","PUT","POST"],"scope_headers":["X-Tenant"],
                 "store":{"type":"local","max_entries":100}}"#,
        )
        .unwrap();
        assert_eq!(c.header, "x-idem");
        assert_eq!(c.methods, vec!["POST", "PUT"]);
        assert_eq!(c.scope_headers, vec!["x-tenant"]);
        // 100 rounds down to 6 buckets of 16: never more than asked for.
        assert_eq!(
            c.store,
            StoreConfig::Local {
                buckets: 6,
                ways: 16,
                max_bytes: DEFAULT_MAX_BYTES,
            }
        );
        assert!(c.protects("PUT") && !c.protects("GET"));
        assert_eq!(c.fingerprint_hash, FingerprintHash::Xxh3);
        let c = Config::parse(br#"{"fingerprint_hash":"sha256"}"#).unwrap();
        assert_eq!(c.fingerprint_hash, FingerprintHash::Sha256);
    }

    #[test]
    fn max_bytes_defaults_and_what_a_record_can_hold() {
        let c = Config::default();
        assert_eq!(
            c.store,
            StoreConfig::Local {
                buckets: 6250,
                ways: 16,
                max_bytes: 256 * 1024 * 1024
            }
        );
        // Each of the 6,250 buckets owns 42,949 bytes: bodies up to about
        // 32 KB are captured, larger ones are replayed without their body.
        assert_eq!(Budget::new(DEFAULT_MAX_BYTES, 6250).share(), 42_949);
        assert_eq!(c.recorded_body_limit(), 32_129);
        let c = Config::parse(br#"{"store":{"max_entries":160,"max_bytes":67108864}}"#).unwrap();
        assert_eq!(
            c.recorded_body_limit(),
            1_048_576,
            "max_response_body_bytes binds"
        );
        // Redis keeps whole records; its cache has its own budget.
        let c = Config::parse(br#"{"store":{"type":"redis","cluster":"w"}}"#).unwrap();
        assert_eq!(c.recorded_body_limit(), 1_048_576);
        let StoreConfig::Redis {
            cache_max_bytes, ..
        } = c.store
        else {
            panic!("redis")
        };
        assert_eq!(cache_max_bytes, DEFAULT_CACHE_MAX_BYTES);
        let c = Config::parse(
            br#"{"store":{"type":"redis","cluster":"w","cache_entries":32,"max_bytes":8192}}"#,
        )
        .unwrap();
        assert!(matches!(
            c.store,
            StoreConfig::Redis {
                cache_max_bytes: 8192,
                ..
            }
        ));
        // Without a cache the budget bounds nothing: any size is accepted.
        assert!(Config::parse(
            br#"{"store":{"type":"redis","cluster":"w","cache_entries":0,"max_bytes":1}}"#
        )
        .is_ok());
    }

    #[test]
    fn redis_store_defaults_and_auth() {
        let c = Config::parse(br#"{"store":{"type":"redis","cluster":"webdis"}}"#).unwrap();
        let StoreConfig::Redis { redis: r, .. } = c.store else {
            panic!("redis")
        };
        assert_eq!(r.cluster, "webdis");
        assert_eq!(r.authority, "webdis");
        assert_eq!(r.timeout_ms, 500);
        assert_eq!(r.key_prefix, "idem:");
        assert_eq!(r.on_unavailable, OnUnavailable::Reject);
        assert_eq!(r.authorization, None);
        assert_eq!(r.cache_entries, DEFAULT_CACHE_ENTRIES);
        let cache = |doc: &str| match Config::parse(doc.as_bytes()).unwrap().store {
            StoreConfig::Redis { redis, .. } => redis.cache_entries,
            StoreConfig::Local { .. } => panic!("redis"),
        };
        assert_eq!(
            cache(r#"{"store":{"type":"redis","cluster":"w","cache_entries":0}}"#),
            0
        );
        assert_eq!(
            cache(r#"{"store":{"type":"redis","cluster":"w","cache_entries":100}}"#),
            96
        );
        // APISIX has no shared data: no cache unless asked, and asking is refused.
        assert_eq!(
            cache(
                r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"w:1"}}"#
            ),
            0
        );
        let c = Config::parse(br#"{"store":{"type":"redis","cluster":"127.0.0.1:7379","authority":"redis.local","on_unavailable":"allow","auth":{"username":"u","password":"p"}}}"#).unwrap();
        let StoreConfig::Redis { redis: r, .. } = c.store else {
            panic!("redis")
        };
        assert_eq!(
            (r.authority.as_str(), r.on_unavailable),
            ("redis.local", OnUnavailable::Allow)
        );
        assert_eq!(r.authorization.as_deref(), Some("Basic dTpw"));
    }

    #[test]
    fn apisix_calls_host_and_port() {
        let ok = [
            "127.0.0.1:8081",
            "payments:8081",
            "[::1]:7379",
            "a.b-c.example:65535",
            "payments",
            "[::1]",
            "my_host:80",
        ];
        for address in ok {
            assert!(is_host_port(address), "{address}");
        }
        let bad = [
            "http://h:80",
            "h:0",
            "h:65536",
            "h:+80",
            ":80",
            "h:",
            "::1",
            "::1:80",
            "h:80/x",
            "u@h:80",
            "h :80",
            "h?x:80",
            "h#x",
        ];
        for address in bad {
            assert!(!is_host_port(address), "{address}");
        }
        // Envoy and its APISIX profile name clusters.
        for host in ["envoy", "apisix-profile"] {
            let json = format!(
                r#"{{"host":"{host}","store":{{"type":"redis","cluster":"webdis"}},"forward":{{"upstream":"payments"}}}}"#
            );
            assert!(Config::parse(json.as_bytes()).is_ok(), "{host}");
        }
    }

    #[test]
    fn apisix_needs_redis_and_forwarding() {
        let ok = Config::parse(br#"{"host":"apisix","store":{"type":"redis","cluster":"127.0.0.1:7379"},"forward":{"upstream":"127.0.0.1:8081"}}"#).unwrap();
        assert_eq!(ok.platform, Platform::Apisix);
        assert_eq!(
            ok.forward,
            Some(Forward {
                upstream: "127.0.0.1:8081".into(),
                authority: None,
                // A third of the default lock, less the store's calls.
                timeout_ms: 8_000
            })
        );
        let envoy = Config::parse(br#"{"forward":{"upstream":"payments"}}"#).unwrap();
        assert_eq!(
            envoy.forward.map(|f| f.timeout_ms),
            Some(25_000),
            "renewed on Envoy"
        );
        assert_eq!(Config::parse(b"{}").unwrap().platform, Platform::Envoy);
    }

    #[test]
    fn outcome_property_is_off_unless_named() {
        assert_eq!(Config::parse(b"{}").unwrap().outcome_property, None);
        assert_eq!(
            Config::parse(br#"{"outcome_property":""}"#)
                .unwrap()
                .outcome_property,
            None
        );
        assert_eq!(
            Config::parse(br#"{"outcome_property":"idempotency_outcome"}"#)
                .unwrap()
                .outcome_property
                .as_deref(),
            Some("idempotency_outcome")
        );
    }

    #[test]
    fn operations_are_off_unless_asked_and_take_a_path() {
        assert_eq!(Config::parse(b"{}").unwrap().operations, None);
        let default_path = Config::parse(br#"{"operations":{}}"#).unwrap();
        assert_eq!(
            default_path.operations,
            Some(Operations {
                path: "/idempotency/key".into()
            })
        );
        // The rest of the document is read as for the protected instance:
        // the key, its scope and the table must be the same.
        let c = Config::parse(
            br#"{"operations":{"path":"/ops/key"},"scope_headers":["x-tenant"],"store":{"type":"local","max_entries":64}}"#,
        )
        .unwrap();
        assert_eq!(c.operations.unwrap().path, "/ops/key");
        assert_eq!(c.scope_headers, vec!["x-tenant"]);
        assert_eq!(c.store.capacity(), Some(64));
    }

    /// APISIX JSON-encodes a table `conf` with cjson, which writes an empty
    /// list (a decoded `[]`) as `{}`: read as the empty list it was.
    #[test]
    fn an_empty_object_is_an_empty_list() {
        let c = Config::parse(
            br#"{"scope_headers":{},"fingerprint_headers":{},"never_record_headers":{}}"#,
        )
        .unwrap();
        assert!(c.scope_headers.is_empty());
        assert!(c.fingerprint_headers.is_empty());
        assert!(c.never_record_headers.is_empty());
    }

    /// Table-driven: every rejected document and the exact line it logs.
    #[test]
    fn rejected_configurations_name_the_field_and_the_fix() {
        let cases: &[(&str, &str)] = &[
            (r#"{"ttl_seconds":0}"#, "invalid configuration: ttl_seconds: must be between 1 and 31536000 (got 0)"),
            (r#"{"methods":[]}"#, "invalid configuration: methods: must list at least one method, e.g. [\"POST\", \"PATCH\"]"),
            (r#"{"methods":["PO ST"]}"#, "invalid configuration: methods: \"PO ST\" is not an HTTP method; use a token such as \"POST\""),
            (r#"{"ttl_seconds":10,"lock_timeout_seconds":11}"#, "invalid configuration: lock_timeout_seconds: must not exceed ttl_seconds (10) (got 11); raise ttl_seconds or lower lock_timeout_seconds"),
            (r#"{"lock_timeout_seconds":0}"#, "invalid configuration: lock_timeout_seconds: must be at least 1 (got 0); set it above your upstream's longest response time"),
            (r#"{"header":""}"#, "invalid configuration: header: \"\" is not a header name; use token characters only, e.g. \"Idempotency-Key\""),
            (r#"{"header":"Idem Key"}"#, "invalid configuration: header: \"Idem Key\" is not a header name; use token characters only, e.g. \"Idempotency-Key\""),
            (r#"{"max_key_length":0}"#, "invalid configuration: max_key_length: must be between 1 and 8192 (got 0)"),
            (r#"{"lock_timeout_seconds":1}"#, "invalid configuration: lock_timeout_seconds: must be longer than 1.5 s on Envoy, where the claims of running requests are renewed from a tick, so that each renewal lands before the lock runs out (got 1 s); a renewal is sent at the next one-second tick: raise it"),
            (r#"{"lock_timeout_seconds":4,"store":{"type":"redis","cluster":"r"}}"#, "invalid configuration: lock_timeout_seconds: must be longer than 4.5 s on Envoy, where the claims of running requests are renewed from a tick, so that each renewal lands before the lock runs out (got 4 s); a renewal is sent at the next one-second tick and may take three times store.timeout_ms (500 ms) to land, behind the batch in flight: raise it, or lower store.timeout_ms"),
            (r#"{"host":"apisix","lock_timeout_seconds":10,"store":{"type":"redis","cluster":"r:1"},"forward":{"upstream":"u:1","timeout_ms":2000}}"#, "invalid configuration: lock_timeout_seconds: must be longer than three times forward.timeout_ms plus nine times store.timeout_ms on APISIX, which has no tick to renew the claims of running requests: nginx applies each timeout to every socket operation of a call (connect, send, read), and besides the forwarded call come three store calls (the claim's answer, and the record, sent twice after a NOSCRIPT) (got 10 s for 3 x 2000 + 9 x 500 ms): raise it, or lower the timeouts"),
            // The default forward timeout, against a lock shorter than the default.
            (r#"{"host":"apisix","lock_timeout_seconds":28,"store":{"type":"redis","cluster":"r:1"},"forward":{"upstream":"u:1"}}"#, "invalid configuration: lock_timeout_seconds: must be longer than three times forward.timeout_ms plus nine times store.timeout_ms on APISIX, which has no tick to renew the claims of running requests: nginx applies each timeout to every socket operation of a call (connect, send, read), and besides the forwarded call come three store calls (the claim's answer, and the record, sent twice after a NOSCRIPT) (got 28 s for 3 x 8000 + 9 x 500 ms): raise it, or lower the timeouts"),
            (r#"{"generate_missing":true,"max_key_length":20}"#, "invalid configuration: max_key_length: must be at least 36 when generate_missing is true, the length of a generated UUID (got 20)"),
            (r#"{"required":true,"generate_missing":true}"#, "invalid configuration: generate_missing: cannot be true together with \"required\": a generated key means a missing key is never rejected; set one of them to false"),
            (r#"{"max_request_body_bytes":100000000}"#, "invalid configuration: max_request_body_bytes: must be at most 67108864 (got 100000000)"),
            (r#"{"max_response_body_bytes":100000000}"#, "invalid configuration: max_response_body_bytes: must be at most 67108864 (got 100000000)"),
            (r#"{"max_in_flight_bytes":1048575}"#, "invalid configuration: max_in_flight_bytes: must be at least 1048576, the larger of max_request_body_bytes and max_response_body_bytes, so that one request's bodies fit (got 1048575); raise it or lower those limits"),
            (r#"{"max_request_body_bytes":2000000,"max_in_flight_bytes":1999999}"#, "invalid configuration: max_in_flight_bytes: must be at least 2000000, the larger of max_request_body_bytes and max_response_body_bytes, so that one request's bodies fit (got 1999999); raise it or lower those limits"),
            (r#"{"max_in_flight_bytes":134217729}"#, "invalid configuration: max_in_flight_bytes: must be at most 134217728 (got 134217729)"),
            (r#"{"scope_headers":["x tenant"]}"#, "invalid configuration: scope_headers: \"x tenant\" is not a header name; use token characters only, e.g. \"x-tenant-id\""),
            (r#"{"fingerprint_headers":[""]}"#, "invalid configuration: fingerprint_headers: \"\" is not a header name; use token characters only, e.g. \"x-tenant-id\""),
            (r#"{"scope_headers":[":path"]}"#, "invalid configuration: scope_headers: \":path\" is not a header name; use token characters only, e.g. \"x-tenant-id\""),
            (r#"{"store":{"type":"local","max_entries":7}}"#, "invalid configuration: store.max_entries: must be between 16 and 10000000 (got 7)"),
            (r#"{"store":{"type":"local","max_bytes":1000}}"#, "invalid configuration: store.max_bytes: must be at least 25600000 for max_entries 100000 (4096 per bucket of 16 entries) (got 1000); raise it or lower max_entries"),
            (r#"{"store":{"max_entries":1600,"max_bytes":409599}}"#, "invalid configuration: store.max_bytes: must be at least 409600 for max_entries 1600 (4096 per bucket of 16 entries) (got 409599); raise it or lower max_entries"),
            (r#"{"store":{"type":"local","max_bytes":2000000000000}}"#, "invalid configuration: store.max_bytes: must be at most 1099511627776 (got 2000000000000)"),
            (r#"{"store":{"type":"local","max_bytes":"256MiB"}}"#, "invalid configuration: store.max_bytes: invalid type: string \"256MiB\", expected u64; see the configuration table in README.md for each field's type"),
            (r#"{"store":{"type":"redis","cluster":"w","max_bytes":1000}}"#, "invalid configuration: store.max_bytes: must be at least 2560000 for cache_entries 10000 (4096 per bucket of 16 entries) (got 1000); raise it or lower cache_entries"),
            (r#"{"store":{"type":"redis","cluster":"w","cache_entries":0,"max_bytes":2000000000000}}"#, "invalid configuration: store.max_bytes: must be at most 1099511627776 (got 2000000000000)"),
            (r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"w:1","max_bytes":100000000}}"#, "invalid configuration: store.max_bytes: bounds the replay cache, which APISIX cannot have (it has no shared data); leave it out: Redis's own memory is bounded by its maxmemory"),
            (r#"{"scope_headers":{"authorization":true}}"#, "invalid configuration: scope_headers: invalid type: map, expected a list of strings; see the configuration table in README.md for each field's type"),
            (r#"{"methods":"POST"}"#, "invalid configuration: methods: invalid type: string \"POST\", expected a list of strings; see the configuration table in README.md for each field's type"),
            (r#"{"ttl":5}"#, "invalid configuration: ttl: unknown field `ttl`, expected one of `header`, `methods`, `required`, `generate_missing`, `max_key_length`, `key_syntax`, `ttl_seconds`, `lock_timeout_seconds`, `max_request_body_bytes`, `max_response_body_bytes`, `max_in_flight_bytes`, `scope_headers`, `fingerprint_headers`, `fingerprint_hash`, `record_server_errors`, `unknown_outcome`, `never_record_headers`, `host`, `forward`, `outcome_property`, `operations`, `store`; remove it or fix its spelling"),
            (r#"{"store":{"type":"local","max_entry":5}}"#, "invalid configuration: store.max_entry: unknown field `max_entry`, expected `max_entries` or `max_bytes`; remove it or fix its spelling"),
            (r#"{"ttl_seconds":"60"}"#, "invalid configuration: ttl_seconds: invalid type: string \"60\", expected u64; see the configuration table in README.md for each field's type"),
            (r#"{"required":"yes"}"#, "invalid configuration: required: invalid type: string \"yes\", expected a boolean; see the configuration table in README.md for each field's type"),
            (r#"{"store":{"type":"memcached"}}"#, "invalid configuration: store.type: unknown store type \"memcached\"; use \"local\" (one gateway) or \"redis\" (a fleet)"),
            (r#"{"store":"redis"}"#, "invalid configuration: store: must be an object, e.g. {\"type\": \"local\"}"),
            (r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"webdis/"}}"#, "invalid configuration: store.cluster: must be host:port (or a host, for port 80) on APISIX, which calls addresses, not Envoy clusters (got \"webdis/\"); e.g. \"127.0.0.1:7379\""),
            (r#"{"host":"apisix","forward":{"upstream":"http://127.0.0.1:8081"},"store":{"type":"redis","cluster":"w:1"}}"#, "invalid configuration: forward.upstream: must be host:port (or a host, for port 80) on APISIX, which calls addresses, not Envoy clusters (got \"http://127.0.0.1:8081\"); e.g. \"127.0.0.1:8081\""),
            (r#"{"host":"apisix","forward":{"upstream":"127.0.0.1:notaport"},"store":{"type":"redis","cluster":"w:1"}}"#, "invalid configuration: forward.upstream: must be host:port (or a host, for port 80) on APISIX, which calls addresses, not Envoy clusters (got \"127.0.0.1:notaport\"); e.g. \"127.0.0.1:8081\""),
            (r#"{"host":"apisix"}"#, "invalid configuration: store.type: the local store needs shared data, which APISIX does not provide; use {\"type\": \"redis\", \"cluster\": \"host:port\"}"),
            (r#"{"host":"apisix","store":{"type":"redis","cluster":"w:1"}}"#, "invalid configuration: forward: is required on APISIX, which allows store calls only while handling the request: set {\"upstream\": \"host:port\"} so the filter forwards the request itself and records the answer"),
            (r#"{"fingerprint_hash":"md5"}"#, "invalid configuration: fingerprint_hash: unknown variant `md5`, expected `xxh3` or `sha256`; see the configuration table in README.md for each field's type"),
            (r#"{"store":{"type":"redis","cluster":"w","cache_entries":8}}"#, "invalid configuration: store.cache_entries: must be 0 (no cache) or between 16 and 10000000 (got 8)"),
            (r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"w:1","cache_entries":16}}"#, "invalid configuration: store.cache_entries: the replay cache needs shared data, which APISIX does not provide; set it to 0 or leave it out"),
            (r#"{"host":"nginx"}"#, "invalid configuration: host: unknown variant `nginx`, expected one of `envoy`, `apisix`, `apisix-profile`; see the configuration table in README.md for each field's type"),
            (r#"{"forward":{"upstream":""}}"#, "invalid configuration: forward.upstream: must name the upstream: an Envoy cluster name, or host:port on APISIX"),
            (r#"{"forward":{"upstream":"u","timeout_ms":0}}"#, "invalid configuration: forward.timeout_ms: must be between 1 and 600000 (got 0)"),
            (r#"{"forward":{}}"#, "invalid configuration: forward: missing field `upstream`; it is required"),
            (r#"{"store":{"type":"redis"}}"#, "invalid configuration: store: missing field `cluster`; it is required"),
            (r#"{"store":{"type":"redis","cluster":""}}"#, "invalid configuration: store.cluster: must name where Webdis is reached: an Envoy cluster name (e.g. \"webdis\"), or host:port on APISIX"),
            (r#"{"store":{"type":"redis","cluster":"w","timeout_ms":0}}"#, "invalid configuration: store.timeout_ms: must be between 1 and 60000 (got 0)"),
            (r#"{"store":{"type":"redis","cluster":"w","key_prefix":"a b"}}"#, "invalid configuration: store.key_prefix: must be at most 128 printable ASCII characters without spaces, e.g. \"idem:\""),
            (r#"{"store":{"type":"redis","cluster":"w","on_unavailable":"maybe"}}"#, "invalid configuration: store.on_unavailable: unknown variant `maybe`, expected `reject` or `allow`; see the configuration table in README.md for each field's type"),
            (r#"{"store":{"type":"redis","cluster":"w","auth":{"username":"a:b","password":"p"}}}"#, "invalid configuration: store.auth.username: must not contain ':' (HTTP basic authentication)"),
            (r#"{"store":{"type":"redis","cluster":"w","max_entries":5}}"#, "invalid configuration: store.max_entries: unknown field `max_entries`, expected one of `cluster`, `authority`, `timeout_ms`, `key_prefix`, `on_unavailable`, `auth`, `cache_entries`, `max_bytes`; remove it or fix its spelling"),
            (r#"{"ttl_seconds":-1}"#, "invalid configuration: ttl_seconds: invalid value: integer `-1`, expected u64; see the configuration table in README.md for each field's type"),
            (r#"[1]"#, "invalid configuration: (document): the configuration must be a JSON object, e.g. {\"required\": true}"),
            (r#""x""#, "invalid configuration: (document): the configuration must be a JSON object, e.g. {\"required\": true}"),
            (r#"{"#, "invalid configuration: (document): EOF while parsing an object"),
            (r#"{"outcome_property":"wasm.outcome"}"#, "invalid configuration: outcome_property: \"wasm.outcome\" is not a property name; use up to 64 letters, digits, '_' or '-', e.g. \"idempotency_outcome\""),
            (r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"w:1"},"outcome_property":"o"}"#, "invalid configuration: outcome_property: is Envoy only (APISIX has no filter state for it); leave it out and log APISIX's $status instead"),
            (r#"{"operations":{},"store":{"type":"redis","cluster":"w"}}"#, "invalid configuration: operations: inspects and forgets keys of the local store only; leave it out: with the Redis store, inspect a record with redis-cli GET on the name examples/redis_key prints, and delete one only with the README's script, which spares running keys (README \"Finding or deleting one record\")"),
            (r#"{"host":"apisix","forward":{"upstream":"u:1"},"store":{"type":"redis","cluster":"w:1"},"operations":{}}"#, "invalid configuration: operations: works on the local store's shared data, which APISIX does not provide; leave it out: with the Redis store, inspect a record with redis-cli GET on the name examples/redis_key prints, and delete one only with the README's script, which spares running keys (README \"Finding or deleting one record\")"),
            (r#"{"host":"apisix-profile","operations":{}}"#, "invalid configuration: operations: works on the local store's shared data, which APISIX does not provide; leave it out: with the Redis store, inspect a record with redis-cli GET on the name examples/redis_key prints, and delete one only with the README's script, which spares running keys (README \"Finding or deleting one record\")"),
            (r#"{"operations":{"path":"keys"}}"#, "invalid configuration: operations.path: \"keys\" is not a request path; use one starting with '/', without spaces, '?' or '#', e.g. \"/idempotency/key\""),
            (r#"{"operations":{"path":"/keys?x=1"}}"#, "invalid configuration: operations.path: \"/keys?x=1\" is not a request path; use one starting with '/', without spaces, '?' or '#', e.g. \"/idempotency/key\""),
            (r#"{"operations":{"prefix":"/keys"}}"#, "invalid configuration: operations.prefix: unknown field `prefix`, expected `path`; remove it or fix its spelling"),
            (r#"{"operations":true}"#, "invalid configuration: operations: invalid type: boolean `true`, expected an object, e.g. {} or {\"path\": \"/idempotency/key\"}; see the configuration table in README.md for each field's type"),
        ];
        for (doc, expected) in cases {
            let got = Config::parse(doc.as_bytes()).expect_err(doc).to_string();
            assert_eq!(&got, expected, "for {doc}");
        }
    }
}
