//! The Redis store, spoken over HTTP because a proxy-wasm filter cannot open
//! sockets. Every operation (claim, record, release, cancel, renew) is one
//! step of the store's one script ([`super::batch`]), atomic in Redis, and
//! Redis owns expiry (`PX`), so the filter needs no clock for it. This file
//! builds each operation and reads its answer; complete and release act only
//! if the key still holds *this* claim's marker (a claim that expired and was
//! taken over is never overwritten or deleted by the late original).
//!
//! Values (ASCII, so they survive JSON replies):
//! * in flight: `I|<token, 16 hex>|<fingerprint, 32 hex>`
//! * completed: `C|<fingerprint, 32 hex>|<base64 of the record bytes>`
//! * cancelled before it landed: `X|<token, 16 hex>` (any other claim
//!   overwrites it; it expires after the lock timeout)
//!
//! Redis keys are `key_prefix` + hex digest of (scope, key): nothing a client
//! sends reaches a URL or a script unencoded.

use super::batch::{OpKind, OpReply, RedisOp};
use super::webdis::StoreRequest;
use super::{Claim, ClaimOutcome, StoreError};
use crate::decision::{decide, Decision, Existing};
use crate::fingerprint::{hex, Digest16};
use crate::record::{DataRecord, StoredResponse};
use crate::wire::{base64_decode, base64_encode, hex_decode};

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
    /// The headers of a call carrying `request` to the front end.
    pub fn call_headers<'a>(&'a self, request: &'a StoreRequest) -> Vec<(&'a str, &'a str)> {
        let mut headers = vec![
            (":method", request.method),
            (":path", request.path.as_str()),
            (":authority", self.authority.as_str()),
        ];
        if let Some(auth) = &self.authorization {
            headers.push(("authorization", auth.as_str()));
        }
        headers
    }

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
}

fn marker_prefix(token: u64) -> String {
    format!("I|{token:016x}|")
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

/// `1`: done; `0`: the claim was no longer this request's.
fn flag(reply: OpReply) -> Result<bool, StoreError> {
    match reply?.as_str() {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(StoreError::Corrupt("unexpected script result")),
    }
}

impl RedisStore {
    pub fn new(config: RedisConfig) -> RedisStore {
        RedisStore { config }
    }

    pub fn redis_key(&self, digest: &Digest16) -> String {
        format!("{}{}", self.config.key_prefix, hex(digest))
    }

    fn op(&self, kind: OpKind, digest: &Digest16, args: Vec<String>) -> RedisOp {
        RedisOp {
            kind,
            key: self.redis_key(digest),
            args,
            record: None,
        }
    }

    pub fn claim_op(
        &self,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
        lock_ms: u64,
    ) -> RedisOp {
        let marker = format!("{}{}", marker_prefix(token), hex(fingerprint));
        self.op(
            OpKind::Claim,
            digest,
            vec![marker, lock_ms.max(1).to_string()],
        )
    }

    /// Cancels the claim `token` made, whose answer never came. The
    /// tombstone waits as long as the claim would have held the key.
    pub fn cancel_op(&self, digest: &Digest16, token: u64, lock_ms: u64) -> RedisOp {
        self.op(
            OpKind::Cancel,
            digest,
            vec![marker_prefix(token), lock_ms.max(1).to_string()],
        )
    }

    pub fn cancel_outcome(&self, reply: OpReply) -> Result<CancelOutcome, StoreError> {
        match reply?.as_str() {
            "1" => Ok(CancelOutcome::Deleted),
            "2" => Ok(CancelOutcome::Tombstoned),
            "0" => Ok(CancelOutcome::NothingToCancel),
            _ => Err(StoreError::Corrupt("unexpected cancel result")),
        }
    }

    /// What the claim's answer means for this request, with how long Redis
    /// keeps the record it returned (milliseconds; `None` unless a completed
    /// record came back).
    pub fn claim_outcome(
        &self,
        reply: OpReply,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
    ) -> Result<(ClaimOutcome, Option<u64>), StoreError> {
        let value = reply?;
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
                let rec =
                    DataRecord::decode_owned(bytes).map_err(|_| StoreError::Corrupt("record"))?;
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

    pub fn complete_op(
        &self,
        digest: &Digest16,
        fingerprint: &Digest16,
        claim: &Claim,
        response: StoredResponse,
        ttl_ms: u64,
    ) -> RedisOp {
        let record = DataRecord {
            epoch: 0,
            digest: *digest,
            response,
        }
        .encode();
        let value = format!("C|{}|{}", hex(fingerprint), base64_encode(&record)).into_bytes();
        let mut op = self.op(
            OpKind::Record,
            digest,
            vec![
                marker_prefix(claim.token),
                ttl_ms.max(1).to_string(),
                value.len().to_string(),
            ],
        );
        op.record = Some(value);
        op
    }

    /// `Ok(false)`: the claim was no longer ours (expired, maybe taken over).
    pub fn complete_outcome(&self, reply: OpReply) -> Result<bool, StoreError> {
        match reply {
            Ok(two) if two == "2" => Err(StoreError::Unavailable(
                "redis refused the record (maxmemory reached); the key stays in progress until its TTL"
                    .to_string(),
            )),
            other => flag(other),
        }
    }

    pub fn release_op(&self, digest: &Digest16, claim: &Claim) -> RedisOp {
        self.op(OpKind::Release, digest, vec![marker_prefix(claim.token)])
    }

    pub fn release_outcome(&self, reply: OpReply) -> Result<bool, StoreError> {
        flag(reply)
    }

    /// Renews the claim `token` holds on `digest`'s key, if it still does.
    pub fn renew_op(&self, digest: &Digest16, token: u64, lock_ms: u64) -> RedisOp {
        self.op(
            OpKind::Renew,
            digest,
            vec![marker_prefix(token), lock_ms.max(1).to_string()],
        )
    }

    /// Whether the claim was renewed (`false`: it was lost).
    pub fn renew_outcome(&self, reply: OpReply) -> Result<bool, StoreError> {
        flag(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> RedisStore {
        RedisStore::new(RedisConfig::with_defaults("webdis"))
    }

    fn ok(s: &str) -> OpReply {
        Ok(s.to_string())
    }

    const D: Digest16 = [0xab; 16];
    const FP: Digest16 = [0x01; 16];
    const CLAIM: Claim = Claim {
        slot: 0,
        epoch: 0,
        token: 0x1234,
    };

    #[test]
    fn a_record_redis_refuses_is_an_error_not_a_lost_claim() {
        let s = store();
        assert_eq!(s.complete_outcome(ok("1")), Ok(true));
        assert_eq!(s.complete_outcome(ok("0")), Ok(false));
        assert!(matches!(
            s.complete_outcome(ok("2")),
            Err(StoreError::Unavailable(m)) if m.contains("maxmemory")
        ));
    }

    #[test]
    fn operations_name_their_key_and_owner_and_records_ride_apart() {
        let s = store();
        let key = format!("idem:{}", hex(&D));
        let claim = s.claim_op(&D, &FP, 0x1234, 30_000);
        assert_eq!((claim.kind, &claim.key), (OpKind::Claim, &key));
        assert_eq!(
            claim.args,
            [format!("I|0000000000001234|{}", hex(&FP)), "30000".into()]
        );
        let record = s.complete_op(
            &D,
            &FP,
            &CLAIM,
            StoredResponse {
                status: 201,
                ..Default::default()
            },
            86_400_000,
        );
        let bytes = record.record.clone().unwrap();
        assert!(bytes.starts_with(format!("C|{}|", hex(&FP)).as_bytes()));
        assert_eq!(
            record.args,
            ["I|0000000000001234|", "86400000", &bytes.len().to_string()]
        );
        assert_eq!(s.release_op(&D, &CLAIM).args, ["I|0000000000001234|"]);
        assert_eq!(
            s.cancel_op(&D, 0x1234, 30_000).args,
            ["I|0000000000001234|", "30000"]
        );
        assert_eq!(s.renew_op(&D, 0x1234, 9).args, ["I|0000000000001234|", "9"]);
        assert_eq!(s.renew_outcome(ok("0")), Ok(false));
        // Only unreserved characters stay unencoded on the way: a prefix
        // cannot inject path segments.
        let mut odd = store();
        odd.config.key_prefix = "a/b.c:".into();
        let op = odd.claim_op(&D, &FP, 1, 1);
        let path =
            crate::store::batch::request(&[&op], crate::store::webdis::Script::Sha("s")).path;
        assert!(path.contains("/a%2Fb%2Ec%3A"), "{path}");
    }

    #[test]
    fn claim_replies_map_through_the_shared_decision() {
        let s = store();
        let out = |reply: &str| s.claim_outcome(ok(reply), &D, &FP, 7).map(|(o, _)| o);
        assert_eq!(
            out("claimed").unwrap(),
            ClaimOutcome::Claimed(Claim {
                slot: 0,
                epoch: 0,
                token: 7
            })
        );
        let inflight_same = format!("900|I|0000000000000009|{}", hex(&FP));
        assert_eq!(out(&inflight_same).unwrap(), ClaimOutcome::InFlight);
        let inflight_other = format!("900|I|0000000000000009|{}", hex(&[2; 16]));
        assert_eq!(out(&inflight_other).unwrap(), ClaimOutcome::Mismatch);
        // A completed record round-trips through the record operation.
        let resp = StoredResponse {
            status: 201,
            headers: vec![("x-b".into(), vec![0, 255])],
            body: vec![0, 1, 2, 255],
            body_omitted: false,
        };
        let put = s.complete_op(&D, &FP, &CLAIM, resp.clone(), 1000);
        let stored = String::from_utf8(put.record.unwrap()).unwrap();
        let completed = format!("86399000|{stored}");
        assert_eq!(out(&completed).unwrap(), ClaimOutcome::Replay(resp.clone()));
        // How long Redis keeps it comes along, for the gateway's cache.
        assert_eq!(
            s.claim_outcome(ok(&completed), &D, &FP, 7).unwrap(),
            (ClaimOutcome::Replay(resp.clone()), Some(86_399_000))
        );
        assert_eq!(
            s.claim_outcome(ok(&format!("-1|{stored}")), &D, &FP, 7)
                .unwrap(),
            (ClaimOutcome::Replay(resp), None)
        );
        // A value without the PTTL prefix is not this filter's answer.
        assert!(out(&stored).is_err());
        assert_eq!(
            s.claim_outcome(ok(&completed), &D, &[3; 16], 7).unwrap().0,
            ClaimOutcome::Mismatch
        );
        // A record filed under another digest is refused, not replayed.
        assert!(s
            .claim_outcome(ok(&completed), &[0xcd; 16], &FP, 7)
            .is_err());
    }

    #[test]
    fn failures_are_errors_never_panics() {
        let s = store();
        let out = |reply: OpReply| s.claim_outcome(reply, &D, &FP, 7).map(|(o, _)| o);
        let down = StoreError::Unavailable("redis: OOM".into());
        assert_eq!(out(Err(down.clone())), Err(down));
        for bad in ["", "1", "I|x", "1|I|x", "1|C|zz|AA==", "1|X|1|2", "x|C|a|b"] {
            assert!(out(ok(bad)).is_err(), "{bad}");
        }
        let c = format!("1|C|{}|not-base64!", hex(&FP));
        assert!(out(ok(&c)).is_err());
        assert!(s.release_outcome(ok("x")).is_err());
        // The answer to a claim that was cancelled before it landed.
        assert!(out(ok("cancelled")).is_err());
    }

    #[test]
    fn cancel_replies() {
        let s = store();
        assert_eq!(s.cancel_outcome(ok("1")), Ok(CancelOutcome::Deleted));
        assert_eq!(s.cancel_outcome(ok("2")), Ok(CancelOutcome::Tombstoned));
        assert_eq!(
            s.cancel_outcome(ok("0")),
            Ok(CancelOutcome::NothingToCancel)
        );
        for bad in ["3", "", "claimed"] {
            assert!(s.cancel_outcome(ok(bad)).is_err(), "{bad}");
        }
        assert!(matches!(
            s.cancel_outcome(Err(StoreError::Unavailable("redis: ERR busy".into()))),
            Err(StoreError::Unavailable(_))
        ));
    }
}
