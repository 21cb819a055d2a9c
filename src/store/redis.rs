//! The Redis store, spoken over HTTP because a proxy-wasm filter cannot open
//! sockets. Every step is one `EVAL` (atomic in Redis), and Redis owns expiry
//! (`PX`), so the filter needs no clock for it:
//!
//! * claim: return the key's value if there is one, else set the in-flight
//!   marker with `PX` = lock timeout and answer `claimed`;
//! * complete / release: only if the key still holds *this* claim's marker
//!   (a claim that expired and was taken over is never overwritten or deleted
//!   by the late original); complete sets the record with `PX` = TTL;
//! * cancel: a claim whose call timed out (the request was refused, so the
//!   upstream never saw it) may still be queued in Redis. Its marker is
//!   deleted if it landed; if it has not, a tombstone naming its token is left
//!   so that it deletes itself when it lands. Either order frees the key, which
//!   matters because Webdis spreads calls over a pool of Redis connections and
//!   the cancel can overtake the claim.
//!
//! Values (ASCII, so they survive JSON replies):
//! * in flight: `I|<token, 16 hex>|<fingerprint, 32 hex>`
//! * completed: `C|<fingerprint, 32 hex>|<base64 of the record bytes>`
//! * cancelled before it landed: `X|<token, 16 hex>` (any other claim
//!   overwrites it; it expires after the lock timeout)
//!
//! Redis keys are `key_prefix` + hex digest of (scope, key): nothing a client
//! sends reaches a URL or a script unencoded.
//!
//! HTTP dialects live behind [`Dialect`]: Webdis today; another front end
//! (an Upstash-style JSON `POST /`) is one more implementation of it.

use super::{Claim, ClaimOutcome, StoreError};
use crate::decision::{decide, Decision, Existing};
use crate::fingerprint::{hex, Digest16};
use crate::record::{DataRecord, StoredResponse};
use crate::wire::{base64_decode, base64_encode, hex_decode, percent_encode_segment};

/// ARGV[1]: the in-flight marker, ARGV[2]: lock ms, ARGV[3]: this claim's
/// tombstone. An existing value comes back as `<PTTL ms>|<value>`: a gateway
/// that caches a completed record must not keep it past Redis's own expiry.
/// A tombstone is no value: another claim's is overwritten, this claim's own
/// (it was cancelled before it landed) is deleted and nothing is claimed.
pub(crate) const CLAIM_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if v == ARGV[3] then redis.call('DEL', KEYS[1]) return 'cancelled' end \
if v and string.sub(v, 1, 2) ~= 'X|' then return redis.call('PTTL', KEYS[1]) .. '|' .. v end \
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
return 'claimed'";

/// ARGV[1]: the owner's marker prefix, ARGV[2]: TTL ms, ARGV[3]: the record.
/// 1: recorded; 0: the claim was no longer ours. 2: Redis refused the record
/// (over `maxmemory` with `noeviction`, which refuses SET but not PEXPIRE):
/// the in-flight marker is kept for the TTL instead, so retries get 409 and
/// the request, which ran, never runs again.
pub(crate) const COMPLETE_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then \
local ok = redis.pcall('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) \
if type(ok) == 'table' and ok.err then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 2 end \
return 1 end \
return 0";

/// ARGV[1]: the claim's marker prefix, ARGV[2]: its tombstone, ARGV[3]: how
/// long the tombstone waits for the claim (ms). 1: the claim was deleted;
/// 2: it had not landed, the tombstone waits for it; 0: the key holds
/// something else (the claim found a value and set nothing).
pub(crate) const CANCEL_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if not v then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 2 end \
if string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then \
redis.call('DEL', KEYS[1]) return 1 end \
return 0";

/// KEYS: claims' keys; ARGV[1]: lock ms; ARGV[i + 1]: claim i's marker
/// prefix. Extends every claim its owner still holds; one digit per key
/// (`1` renewed, `0` lost), as text: one call renews a worker's claims.
pub(crate) const RENEW_SCRIPT: &str = "local out = {} \
for i, k in ipairs(KEYS) do local v = redis.call('GET', k) local p = ARGV[i + 1] \
if v and string.sub(v, 1, string.len(p)) == p then redis.call('PEXPIRE', k, ARGV[1]) out[i] = '1' \
else out[i] = '0' end end \
return table.concat(out)";

pub(crate) const RELEASE_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then \
redis.call('DEL', KEYS[1]) return 1 end \
return 0";

/// A Redis reply, as far as the scripts need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisValue {
    Nil,
    Int(i64),
    Text(String),
    /// A Redis error reply (script error, OOM, ...).
    Error(String),
}

/// One HTTP request to the store's front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Vec<u8>>,
}

/// How `EVAL` travels over HTTP to one kind of front end.
pub trait Dialect {
    /// `EVAL script numkeys keys... args... [last]`; `last`, when given, is the
    /// final argument, sent in the body where the dialect allows (records can
    /// be large).
    fn eval(&self, script: &str, keys: &[&str], args: &[&str], last: Option<&[u8]>)
        -> StoreRequest;
    /// Parses the front end's answer to an `eval` request.
    fn parse(&self, status: u16, body: &[u8]) -> Result<RedisValue, StoreError>;
}

/// Webdis: `GET /EVAL/<script>/<numkeys>/<key>/<arg>...` with every segment
/// percent-encoded; a `PUT` body is appended as the last argument. Replies are
/// JSON: `{"EVAL": <value>}`, errors as `{"EVAL": [false, "ERR ..."]}`.
///
/// Webdis reads a dot in the *last* path segment as a format suffix
/// (`.json`, `.raw`): every last segment built here is digits or a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Webdis;

impl Dialect for Webdis {
    fn eval(
        &self,
        script: &str,
        keys: &[&str],
        args: &[&str],
        last: Option<&[u8]>,
    ) -> StoreRequest {
        let mut path = String::from("/EVAL/");
        path.push_str(&percent_encode_segment(script.as_bytes()));
        path.push('/');
        path.push_str(&keys.len().to_string());
        for part in keys.iter().chain(args.iter()) {
            path.push('/');
            path.push_str(&percent_encode_segment(part.as_bytes()));
        }
        StoreRequest {
            method: if last.is_some() { "PUT" } else { "GET" },
            path,
            body: last.map(<[u8]>::to_vec),
        }
    }

    fn parse(&self, status: u16, body: &[u8]) -> Result<RedisValue, StoreError> {
        if status != 200 {
            return Err(StoreError::Unavailable(format!(
                "webdis answered HTTP {status}"
            )));
        }
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| StoreError::Corrupt("webdis reply is not JSON"))?;
        let value = doc
            .get("EVAL")
            .ok_or(StoreError::Corrupt("webdis reply without EVAL"))?;
        match value {
            serde_json::Value::Null => Ok(RedisValue::Nil),
            serde_json::Value::String(s) => Ok(RedisValue::Text(s.clone())),
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(RedisValue::Int)
                .ok_or(StoreError::Corrupt("webdis number")),
            serde_json::Value::Array(a) if a.first() == Some(&serde_json::Value::Bool(false)) => {
                Ok(RedisValue::Error(
                    a.get(1)
                        .and_then(|m| m.as_str())
                        .unwrap_or("unknown error")
                        .to_string(),
                ))
            }
            _ => Err(StoreError::Corrupt("unexpected webdis reply")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Fail closed: 503, the upstream is not called.
    Reject,
    /// Fail open: forward unprotected, counted in `store_bypassed`.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Envoy: a cluster name. APISIX: `host:port`.
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub key_prefix: String,
    pub on_unavailable: OnUnavailable,
    /// A ready `Authorization` header value (HTTP basic).
    pub authorization: Option<String>,
    /// Size of the gateway's replay cache (0: none); a multiple of 16.
    pub cache_entries: u32,
}

impl RedisConfig {
    /// The documented defaults for a front end at `cluster`.
    pub fn with_defaults(cluster: &str) -> RedisConfig {
        RedisConfig {
            cluster: cluster.to_string(),
            authority: cluster.to_string(),
            timeout_ms: 500,
            key_prefix: "idem:".to_string(),
            on_unavailable: OnUnavailable::Reject,
            authorization: None,
            cache_entries: crate::config::DEFAULT_CACHE_ENTRIES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStore {
    pub config: RedisConfig,
    dialect: Webdis,
}

fn marker_prefix(token: u64) -> String {
    format!("I|{token:016x}|")
}

fn tombstone(token: u64) -> String {
    format!("X|{token:016x}")
}

/// What cancelling a timed-out claim found in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The claim had landed; its marker is gone.
    Deleted,
    /// The claim had not landed yet; it will delete itself when it does.
    Tombstoned,
    /// The key holds another request's claim or a record: the timed-out
    /// claim set nothing.
    NothingToCancel,
}

fn parse_fingerprint(hex_text: &str) -> Result<Digest16, StoreError> {
    let bytes = hex_decode(hex_text.as_bytes()).ok_or(StoreError::Corrupt("fingerprint"))?;
    let mut fp = [0u8; 16];
    if bytes.len() != 16 {
        return Err(StoreError::Corrupt("fingerprint length"));
    }
    fp.copy_from_slice(&bytes);
    Ok(fp)
}

fn expect_flag(v: Result<RedisValue, StoreError>) -> Result<bool, StoreError> {
    match v? {
        RedisValue::Int(1) => Ok(true),
        RedisValue::Int(0) => Ok(false),
        RedisValue::Error(e) => Err(StoreError::Unavailable(format!("redis: {e}"))),
        _ => Err(StoreError::Corrupt("unexpected script result")),
    }
}

impl RedisStore {
    pub fn new(config: RedisConfig) -> RedisStore {
        RedisStore {
            config,
            dialect: Webdis,
        }
    }

    pub fn redis_key(&self, digest: &Digest16) -> String {
        format!("{}{}", self.config.key_prefix, hex(digest))
    }

    pub fn claim_request(
        &self,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
        lock_ms: u64,
    ) -> StoreRequest {
        let key = self.redis_key(digest);
        let marker = format!("{}{}", marker_prefix(token), hex(fingerprint));
        // The tombstone last: it ends in hex digits, never a dot (Webdis).
        self.dialect.eval(
            CLAIM_SCRIPT,
            &[&key],
            &[&marker, &lock_ms.max(1).to_string(), &tombstone(token)],
            None,
        )
    }

    /// Cancels the claim `token` made, whose answer never came. The
    /// tombstone waits as long as the claim would have held the key.
    pub fn cancel_request(&self, digest: &Digest16, token: u64, lock_ms: u64) -> StoreRequest {
        let key = self.redis_key(digest);
        self.dialect.eval(
            CANCEL_SCRIPT,
            &[&key],
            &[
                &marker_prefix(token),
                &tombstone(token),
                &lock_ms.max(1).to_string(),
            ],
            None,
        )
    }

    pub fn cancel_outcome(&self, status: u16, body: &[u8]) -> Result<CancelOutcome, StoreError> {
        match self.dialect.parse(status, body)? {
            RedisValue::Int(1) => Ok(CancelOutcome::Deleted),
            RedisValue::Int(2) => Ok(CancelOutcome::Tombstoned),
            RedisValue::Int(0) => Ok(CancelOutcome::NothingToCancel),
            RedisValue::Error(e) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            _ => Err(StoreError::Corrupt("unexpected cancel result")),
        }
    }

    /// What the claim script's answer means for this request, with how long
    /// Redis keeps the record it returned (milliseconds; `None` unless a
    /// completed record came back).
    pub fn claim_outcome(
        &self,
        status: u16,
        body: &[u8],
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
    ) -> Result<(ClaimOutcome, Option<u64>), StoreError> {
        let value = match self.dialect.parse(status, body)? {
            RedisValue::Text(t) => t,
            RedisValue::Error(e) => return Err(StoreError::Unavailable(format!("redis: {e}"))),
            _ => return Err(StoreError::Corrupt("unexpected claim result")),
        };
        if value == "cancelled" {
            // Only a claim that was cancelled before it landed gets this, and
            // nobody waits for that answer any more.
            return Err(StoreError::Corrupt("claim answered after its cancel"));
        }
        if value == "claimed" {
            return Ok((
                ClaimOutcome::Claimed(Claim {
                    slot: 0,
                    epoch: 0,
                    token,
                }),
                None,
            ));
        }
        // Redis expires records itself, so whatever it returns is live.
        let (pttl, value) = value
            .split_once('|')
            .and_then(|(t, v)| Some((t.parse::<i64>().ok()?, v)))
            .ok_or(StoreError::Corrupt("unrecognised record"))?;
        // -1: no expiry (not set by this filter); -2: gone since the GET.
        let remaining_ms = u64::try_from(pttl).ok().filter(|ms| *ms > 0);
        let mut parts = value.splitn(3, '|');
        let (kind, a, b) = (parts.next(), parts.next(), parts.next());
        let (existing, record) = match (kind, a, b) {
            (Some("I"), Some(_token), Some(fp)) => (
                Existing::InFlight {
                    fingerprint: parse_fingerprint(fp)?,
                    lock_deadline_ms: u64::MAX,
                },
                None,
            ),
            (Some("C"), Some(fp), Some(rec)) => (
                Existing::Completed {
                    fingerprint: parse_fingerprint(fp)?,
                    expires_ms: u64::MAX,
                },
                Some(rec),
            ),
            _ => return Err(StoreError::Corrupt("unrecognised record")),
        };
        match decide(Some(&existing), fingerprint, 0) {
            Decision::Conflict => Ok((ClaimOutcome::InFlight, None)),
            Decision::Mismatch => Ok((ClaimOutcome::Mismatch, None)),
            Decision::Replay => {
                let bytes = base64_decode(record.unwrap_or("").as_bytes())
                    .ok_or(StoreError::Corrupt("record encoding"))?;
                let rec = DataRecord::decode(&bytes).map_err(|_| StoreError::Corrupt("record"))?;
                if rec.digest != *digest {
                    return Err(StoreError::Corrupt("record belongs to another key"));
                }
                Ok((ClaimOutcome::Replay(rec.response), remaining_ms))
            }
            Decision::Execute | Decision::TakeOver => {
                Err(StoreError::Corrupt("expired record returned"))
            }
        }
    }

    pub fn complete_request(
        &self,
        digest: &Digest16,
        fingerprint: &Digest16,
        claim: &Claim,
        response: StoredResponse,
        ttl_ms: u64,
    ) -> StoreRequest {
        let key = self.redis_key(digest);
        let record = DataRecord {
            epoch: 0,
            digest: *digest,
            response,
        }
        .encode();
        let value = format!("C|{}|{}", hex(fingerprint), base64_encode(&record));
        self.dialect.eval(
            COMPLETE_SCRIPT,
            &[&key],
            &[&marker_prefix(claim.token), &ttl_ms.max(1).to_string()],
            Some(value.as_bytes()),
        )
    }

    /// `Ok(false)`: the claim was no longer ours (expired, maybe taken over).
    pub fn complete_outcome(&self, status: u16, body: &[u8]) -> Result<bool, StoreError> {
        match self.dialect.parse(status, body) {
            Ok(RedisValue::Int(2)) => Err(StoreError::Unavailable(
                "redis refused the record (maxmemory reached); the key stays in progress until its TTL"
                    .to_string(),
            )),
            other => expect_flag(other),
        }
    }

    pub fn release_request(&self, digest: &Digest16, claim: &Claim) -> StoreRequest {
        let key = self.redis_key(digest);
        // The marker prefix ends in '|', so the last segment has no dot.
        self.dialect.eval(
            RELEASE_SCRIPT,
            &[&key],
            &[&marker_prefix(claim.token)],
            None,
        )
    }

    pub fn release_outcome(&self, status: u16, body: &[u8]) -> Result<bool, StoreError> {
        expect_flag(self.dialect.parse(status, body))
    }

    /// Renews the claims `(key digest, token)` still held, in one call.
    pub fn renew_request(&self, claims: &[(Digest16, u64)], lock_ms: u64) -> StoreRequest {
        let keys: Vec<String> = claims.iter().map(|(d, _)| self.redis_key(d)).collect();
        let mut args = vec![lock_ms.max(1).to_string()];
        // Marker prefixes end in '|': the last segment has no dot (Webdis).
        args.extend(claims.iter().map(|(_, token)| marker_prefix(*token)));
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dialect.eval(RENEW_SCRIPT, &keys, &args, None)
    }

    /// Which of `count` claims were renewed (the others were lost).
    pub fn renew_outcome(
        &self,
        status: u16,
        body: &[u8],
        count: usize,
    ) -> Result<Vec<bool>, StoreError> {
        let digits = match self.dialect.parse(status, body)? {
            RedisValue::Text(t) => t,
            // Redis turns an empty Lua string into an empty bulk string.
            RedisValue::Nil if count == 0 => String::new(),
            RedisValue::Error(e) => return Err(StoreError::Unavailable(format!("redis: {e}"))),
            _ => return Err(StoreError::Corrupt("unexpected renew result")),
        };
        if digits.len() != count {
            return Err(StoreError::Corrupt("renew result of the wrong length"));
        }
        digits
            .bytes()
            .map(|c| match c {
                b'1' => Ok(true),
                b'0' => Ok(false),
                _ => Err(StoreError::Corrupt("renew result")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> RedisStore {
        RedisStore::new(RedisConfig::with_defaults("webdis"))
    }

    fn json(v: &str) -> Vec<u8> {
        format!("{{\"EVAL\":{v}}}").into_bytes()
    }

    const D: Digest16 = [0xab; 16];
    const FP: Digest16 = [0x01; 16];

    #[test]
    fn a_record_redis_refuses_is_an_error_not_a_lost_claim() {
        let s = store();
        assert_eq!(s.complete_outcome(200, &json("1")), Ok(true));
        assert_eq!(s.complete_outcome(200, &json("0")), Ok(false));
        assert!(matches!(
            s.complete_outcome(200, &json("2")),
            Err(StoreError::Unavailable(m)) if m.contains("maxmemory")
        ));
    }

    #[test]
    fn one_renew_call_carries_every_claim_and_answers_each() {
        let s = store();
        let other: Digest16 = [0xcd; 16];
        let r = s.renew_request(&[(D, 0x1), (other, 0x2)], 30_000);
        assert_eq!(r.method, "GET");
        assert!(
            r.path.ends_with(&format!(
                "/2/idem%3A{}/idem%3A{}/30000/I%7C0000000000000001%7C/I%7C0000000000000002%7C",
                hex(&D),
                hex(&other)
            )),
            "{}",
            r.path
        );
        assert_eq!(
            s.renew_outcome(200, &json("\"10\""), 2),
            Ok(vec![true, false])
        );
        assert_eq!(s.renew_outcome(200, &json("null"), 0), Ok(vec![]));
        assert!(s.renew_outcome(200, &json("\"1\""), 2).is_err());
        assert!(s.renew_outcome(200, &json("\"1x\""), 2).is_err());
        assert!(matches!(
            s.renew_outcome(200, &json("[false,\"OOM\"]"), 1),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn requests_encode_everything_and_put_records_in_the_body() {
        let s = store();
        let r = s.claim_request(&D, &FP, 0x1234, 30_000);
        assert_eq!(r.method, "GET");
        assert!(
            r.path
                .starts_with("/EVAL/local%20v%20%3D%20redis%2Ecall%28"),
            "{}",
            r.path
        );
        assert!(
            r.path.ends_with(&format!(
                "/1/idem%3A{}/I%7C0000000000001234%7C{}/30000/X%7C0000000000001234",
                hex(&D),
                hex(&FP)
            )),
            "{}",
            r.path
        );
        let c = s.complete_request(
            &D,
            &FP,
            &Claim {
                slot: 0,
                epoch: 0,
                token: 0x1234,
            },
            StoredResponse {
                status: 201,
                ..Default::default()
            },
            86_400_000,
        );
        assert_eq!(c.method, "PUT");
        assert!(
            c.path.ends_with("/I%7C0000000000001234%7C/86400000"),
            "{}",
            c.path
        );
        assert!(c
            .body
            .as_ref()
            .unwrap()
            .starts_with(format!("C|{}|", hex(&FP)).as_bytes()));
        let rel = s.release_request(
            &D,
            &Claim {
                slot: 0,
                epoch: 0,
                token: 0x1234,
            },
        );
        assert!(rel.path.ends_with("/I%7C0000000000001234%7C"));
        let cancel = s.cancel_request(&D, 0x1234, 30_000);
        assert_eq!(cancel.method, "GET");
        assert!(
            cancel.path.ends_with(&format!(
                "/1/idem%3A{}/I%7C0000000000001234%7C/X%7C0000000000001234/30000",
                hex(&D)
            )),
            "{}",
            cancel.path
        );
        // Only unreserved characters stay unencoded: a prefix cannot inject path segments.
        let mut odd = store();
        odd.config.key_prefix = "a/b.c:".into();
        assert!(odd
            .claim_request(&D, &FP, 1, 1)
            .path
            .contains("/a%2Fb%2Ec%3A"));
    }

    #[test]
    fn claim_replies_map_through_the_shared_decision() {
        let s = store();
        let out = |body: &[u8]| s.claim_outcome(200, body, &D, &FP, 7).map(|(o, _)| o);
        assert_eq!(
            out(&json("\"claimed\"")).unwrap(),
            ClaimOutcome::Claimed(Claim {
                slot: 0,
                epoch: 0,
                token: 7
            })
        );
        let inflight_same = json(&format!("\"900|I|0000000000000009|{}\"", hex(&FP)));
        assert_eq!(out(&inflight_same).unwrap(), ClaimOutcome::InFlight);
        let inflight_other = json(&format!("\"900|I|0000000000000009|{}\"", hex(&[2; 16])));
        assert_eq!(out(&inflight_other).unwrap(), ClaimOutcome::Mismatch);
        // A completed record round-trips through the complete request's body.
        let resp = StoredResponse {
            status: 201,
            headers: vec![("x-b".into(), vec![0, 255])],
            body: vec![0, 1, 2, 255],
            body_omitted: false,
        };
        let put = s.complete_request(
            &D,
            &FP,
            &Claim {
                slot: 0,
                epoch: 0,
                token: 7,
            },
            resp.clone(),
            1000,
        );
        let stored = String::from_utf8(put.body.unwrap()).unwrap();
        let completed = json(&serde_json::to_string(&format!("86399000|{stored}")).unwrap());
        assert_eq!(out(&completed).unwrap(), ClaimOutcome::Replay(resp.clone()));
        // How long Redis keeps it comes along, for the gateway's cache.
        assert_eq!(
            s.claim_outcome(200, &completed, &D, &FP, 7).unwrap(),
            (ClaimOutcome::Replay(resp.clone()), Some(86_399_000))
        );
        let no_expiry = json(&serde_json::to_string(&format!("-1|{stored}")).unwrap());
        assert_eq!(
            s.claim_outcome(200, &no_expiry, &D, &FP, 7).unwrap(),
            (ClaimOutcome::Replay(resp), None)
        );
        // A value without the PTTL prefix is not this filter's answer.
        let bare = json(&serde_json::to_string(&stored).unwrap());
        assert!(out(&bare).is_err());
        let other = RedisStore::new(s.config.clone());
        assert_eq!(
            other
                .claim_outcome(200, &completed, &D, &[3; 16], 7)
                .unwrap()
                .0,
            ClaimOutcome::Mismatch
        );
        // A record filed under another digest is refused, not replayed.
        assert!(other
            .claim_outcome(200, &completed, &[0xcd; 16], &FP, 7)
            .is_err());
    }

    #[test]
    fn failures_are_errors_never_panics() {
        let s = store();
        let out =
            |status: u16, body: &[u8]| s.claim_outcome(status, body, &D, &FP, 7).map(|(o, _)| o);
        assert!(matches!(out(503, b""), Err(StoreError::Unavailable(_))));
        assert!(matches!(
            out(200, &json("[false,\"ERR oom\"]")),
            Err(StoreError::Unavailable(_))
        ));
        for bad in [
            "null",
            "1",
            "\"I|x\"",
            "\"C|zz|AA==\"",
            "\"X|1|2\"",
            "{}",
            "[true]",
        ] {
            assert!(out(200, &json(bad)).is_err(), "{bad}");
        }
        assert!(out(200, b"not json").is_err());
        assert!(out(200, b"{}").is_err());
        let c = format!("\"C|{}|not-base64!\"", hex(&FP));
        assert!(out(200, &json(&c)).is_err());
        assert_eq!(s.complete_outcome(200, &json("1")).unwrap(), true);
        assert_eq!(s.complete_outcome(200, &json("0")).unwrap(), false);
        assert!(s.release_outcome(200, &json("\"x\"")).is_err());
        // The answer to a claim that was cancelled before it landed.
        assert!(out(200, &json("\"cancelled\"")).is_err());
    }

    #[test]
    fn cancel_replies() {
        let s = store();
        assert_eq!(
            s.cancel_outcome(200, &json("1")).unwrap(),
            CancelOutcome::Deleted
        );
        assert_eq!(
            s.cancel_outcome(200, &json("2")).unwrap(),
            CancelOutcome::Tombstoned
        );
        assert_eq!(
            s.cancel_outcome(200, &json("0")).unwrap(),
            CancelOutcome::NothingToCancel
        );
        for bad in ["3", "\"1\"", "null"] {
            assert!(s.cancel_outcome(200, &json(bad)).is_err(), "{bad}");
        }
        assert!(matches!(
            s.cancel_outcome(200, &json("[false,\"ERR busy\"]")),
            Err(StoreError::Unavailable(_))
        ));
        assert!(s.cancel_outcome(504, b"upstream request timeout").is_err());
    }
}
