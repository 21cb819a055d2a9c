//! The `store` section: parsed by its `type`, then validated (local table
//! shape and byte budget, or the Redis store's front end and replay cache).

use super::raw::{RawLocalStore, RawOnUnavailable, RawRedisStore};
use super::raw::{DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_MAX_BYTES};
use super::{check_authority, err, is_visible, json_error, within, ConfigError, Platform};
use super::{StoreConfig, LOCAL_WAYS};
use crate::store::redis::{OnUnavailable, RedisConfig};
use crate::wire::base64_encode;

pub(super) const MAX_ENTRIES_LIMIT: u32 = 10_000_000;
/// `store.max_bytes` at most: 1 TiB, far above any gateway's memory (a
/// larger number is a typo).
const MAX_BYTES_LIMIT: u64 = 1 << 40;
/// `store.max_bytes` at least, per bucket of [`LOCAL_WAYS`] entries: a
/// bucket's share must hold a record without its body (status and headers;
/// about 3 KB of them at this share), so that every response can be kept.
const MIN_BYTES_PER_BUCKET: u64 = 4096;

pub(super) fn local_store(max_entries: u32, max_bytes: u64) -> StoreConfig {
    StoreConfig::Local {
        buckets: max_entries / LOCAL_WAYS,
        ways: LOCAL_WAYS,
        max_bytes,
    }
}

/// `store.max_bytes` for a table of `entries` entries (`entries_field`
/// names them): every bucket's share must hold a record without its body.
fn check_max_bytes(max_bytes: u64, entries: u32, entries_field: &str) -> Result<(), ConfigError> {
    let min = u64::from(entries / LOCAL_WAYS) * MIN_BYTES_PER_BUCKET;
    if max_bytes < min {
        return Err(err(
            "store.max_bytes",
            format!(
                "must be at least {min} for {entries_field} {entries} ({MIN_BYTES_PER_BUCKET} per bucket of {LOCAL_WAYS} entries) (got {max_bytes}); raise it or lower {entries_field}"
            ),
        ));
    }
    if max_bytes > MAX_BYTES_LIMIT {
        return Err(err(
            "store.max_bytes",
            format!("must be at most {MAX_BYTES_LIMIT} (got {max_bytes})"),
        ));
    }
    Ok(())
}

/// Reads `store` by its `type`, with error paths under `store.`.
pub(super) fn parse_store(
    value: serde_json::Value,
    platform: Platform,
) -> Result<StoreConfig, ConfigError> {
    let serde_json::Value::Object(mut fields) = value else {
        return Err(err(
            "store",
            "must be an object, e.g. {\"type\": \"local\"}",
        ));
    };
    let kind = match fields.remove("type") {
        None => "local".to_string(),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(err("store.type", "must be \"local\" or \"redis\"")),
    };
    fn typed<T: serde::de::DeserializeOwned>(
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(serde_json::Value::Object(fields)).map_err(|e| {
            let mut c = json_error(&e);
            c.field = if c.field == "(document)" {
                "store".to_string()
            } else {
                format!("store.{}", c.field)
            };
            c
        })
    }
    match kind.as_str() {
        "local" => {
            let local: RawLocalStore = typed(fields)?;
            within(
                "store.max_entries",
                u64::from(local.max_entries),
                u64::from(LOCAL_WAYS),
                u64::from(MAX_ENTRIES_LIMIT),
            )?;
            check_max_bytes(local.max_bytes, local.max_entries, "max_entries")?;
            Ok(local_store(local.max_entries, local.max_bytes))
        }
        "redis" => {
            let raw: RawRedisStore = typed(fields)?;
            let cache_max_bytes = match (raw.max_bytes, platform.has_shared_data()) {
                (Some(_), false) => {
                    return Err(err(
                        "store.max_bytes",
                        "bounds the replay cache, which APISIX cannot have (it has no shared data); leave it out: Redis's own memory is bounded by its maxmemory",
                    ))
                }
                (Some(n), true) => n,
                (None, _) => DEFAULT_CACHE_MAX_BYTES,
            };
            let redis = validate_redis(raw, platform)?;
            if redis.cache_entries > 0 {
                check_max_bytes(cache_max_bytes, redis.cache_entries, "cache_entries")?;
            } else if cache_max_bytes > MAX_BYTES_LIMIT {
                check_max_bytes(cache_max_bytes, 0, "cache_entries")?;
            }
            Ok(StoreConfig::Redis {
                redis,
                cache_max_bytes,
            })
        }
        other => Err(err(
            "store.type",
            format!(
                "unknown store type {other:?}; use \"local\" (one gateway) or \"redis\" (a fleet)"
            ),
        )),
    }
}

fn validate_redis(raw: RawRedisStore, platform: Platform) -> Result<RedisConfig, ConfigError> {
    let cache_entries = match (raw.cache_entries, platform.has_shared_data()) {
        (None, false) | (Some(0), _) => 0,
        (None, true) => DEFAULT_CACHE_ENTRIES,
        (Some(_), false) => {
            return Err(err(
                "store.cache_entries",
                "the replay cache needs shared data, which APISIX does not provide; set it to 0 or leave it out",
            ))
        }
        (Some(n), true) if !(LOCAL_WAYS..=MAX_ENTRIES_LIMIT).contains(&n) => {
            return Err(err(
                "store.cache_entries",
                format!("must be 0 (no cache) or between {LOCAL_WAYS} and {MAX_ENTRIES_LIMIT} (got {n})"),
            ))
        }
        // Whole buckets, never more than asked for.
        (Some(n), true) => n / LOCAL_WAYS * LOCAL_WAYS,
    };
    if !is_visible(&raw.cluster) {
        return Err(err(
            "store.cluster",
            "must name where Webdis is reached: an Envoy cluster name (e.g. \"webdis\"), or host:port on APISIX",
        ));
    }
    check_authority("store.authority", raw.authority.as_deref())?;
    within("store.timeout_ms", raw.timeout_ms, 1, 60_000)?;
    if raw.key_prefix.len() > 128 || !raw.key_prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            "store.key_prefix",
            "must be at most 128 printable ASCII characters without spaces, e.g. \"idem:\"",
        ));
    }
    let authorization = match raw.auth {
        None => None,
        Some(a) => {
            if a.username.contains(':') {
                return Err(err(
                    "store.auth.username",
                    "must not contain ':' (HTTP basic authentication)",
                ));
            }
            Some(format!(
                "Basic {}",
                base64_encode(format!("{}:{}", a.username, a.password).as_bytes())
            ))
        }
    };
    Ok(RedisConfig {
        cache_entries,
        authority: raw.authority.unwrap_or_else(|| raw.cluster.clone()),
        cluster: raw.cluster,
        timeout_ms: raw.timeout_ms,
        key_prefix: raw.key_prefix,
        on_unavailable: match raw.on_unavailable {
            RawOnUnavailable::Reject => OnUnavailable::Reject,
            RawOnUnavailable::Allow => OnUnavailable::Allow,
        },
        authorization,
    })
}
