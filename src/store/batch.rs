//! The Redis store's one script, which runs a batch of operations (claims,
//! records, releases, cancels, renewals), each on its own key, atomically
//! and in order, and answers one string per operation. A request's
//! operation alone is a batch of one (APISIX, whose calls run inside each
//! request); on Envoy the worker's call owner sends many requests'
//! operations in one call ([`super::group_commit`]).
//!
//! What each operation does (Redis owns expiry, `PX`):
//! * `C` claim (marker, lock ms): the key's value if it has one, as
//!   `<PTTL ms>|<value>`; else set the in-flight marker: `claimed`.
//!   Tombstones are no value: other claims' are overwritten; if this
//!   claim's own is among them (it was cancelled before it landed), it is
//!   taken out and the claim sets nothing: `cancelled`.
//! * `W` record (owner prefix, TTL ms, record length; the record is cut from
//!   the body): only if the key still holds this claim's marker (`1`, else
//!   `0`); a record Redis refuses (over `maxmemory` with `noeviction`, which
//!   refuses SET but not PEXPIRE) keeps the marker for the TTL instead (`2`),
//!   so retries get 409 and the request, which ran, never runs again.
//! * `R` release (owner prefix): deletes this claim's marker (`1`, else `0`).
//! * `X` cancel (owner prefix, lock ms), for a claim whose answer never came:
//!   deletes its marker if it landed (`1`); if it has not, adds its token
//!   to the key's tombstones (`X|<token>|<token>...`), kept for the lock
//!   time, so the claim takes itself out when it lands (`2`); `0`: the key
//!   holds a claim or a record. Either order frees the key, which matters
//!   because Webdis spreads calls over a pool of Redis connections and the
//!   cancel can overtake the claim; one tombstone per token, because two
//!   requests with one key can both time out, and each late claim must
//!   find its own.
//! * `N` renew (owner prefix, lock ms): extends the claim if still held,
//!   never shortens it: a renewal sent before its record was answered may
//!   land after a refused record set the marker to live for the TTL.
//!
//! A write Redis refuses is that operation's error (`E|<error>`), never the
//! batch's: a script stopped by an error keeps what it already did, so one
//! refused claim must not turn its batch's other claims into errors that
//! still hold keys.

use super::webdis::{Dialect, RedisValue, Script, StoreRequest, Webdis};
use super::StoreError;
use crate::envoy_reply;

/// KEYS[i]: operation i's key. ARGV[1]: the operations' kinds, one letter
/// each; then each operation's arguments in order; the last argument is the
/// body (the records, back to back) when there are records.
pub const BATCH_SCRIPT: &str = "local kinds, a, at, out = ARGV[1], 2, 1, {} \
local function owned(v, p) return v and string.sub(v, 1, #p) == p end \
local function put(k, v, ms) local r = redis.pcall('SET', k, v, 'PX', ms) \
if type(r) == 'table' and r.err then return r.err end end \
for i = 1, #kinds do \
local kind, k = string.sub(kinds, i, i), KEYS[i] \
local v = redis.call('GET', k) \
if kind == 'C' then local m, ms = ARGV[a], ARGV[a + 1] a = a + 2 \
local t, rest, mine = string.sub(m, 3, 18), {}, false \
if v and string.sub(v, 1, 2) == 'X|' then \
for x in string.gmatch(string.sub(v, 3), '[^|]+') do if x == t then mine = true else rest[#rest + 1] = x end end end \
if mine then local left = redis.call('PTTL', k) \
if #rest == 0 or left <= 0 then redis.call('DEL', k) else put(k, 'X|' .. table.concat(rest, '|'), left) end \
out[i] = 'cancelled' \
elseif v and string.sub(v, 1, 2) ~= 'X|' then out[i] = redis.call('PTTL', k) .. '|' .. v \
else local e = put(k, m, ms) out[i] = e and ('E|' .. e) or 'claimed' end \
elseif kind == 'W' then local p, ms, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]) a = a + 3 \
local rec = string.sub(ARGV[#ARGV], at, at + n - 1) at = at + n \
if not owned(v, p) then out[i] = '0' \
elseif put(k, rec, ms) then redis.call('PEXPIRE', k, ms) out[i] = '2' \
else out[i] = '1' end \
elseif kind == 'R' then local p = ARGV[a] a = a + 1 \
if owned(v, p) then redis.call('DEL', k) out[i] = '1' else out[i] = '0' end \
elseif kind == 'X' then local p, ms = ARGV[a], ARGV[a + 1] a = a + 2 \
local t = string.sub(p, 3, 18) \
if owned(v, p) then redis.call('DEL', k) out[i] = '1' \
elseif v and string.sub(v, 1, 2) ~= 'X|' then out[i] = '0' \
else local tomb, left = 'X|' .. t, tonumber(ms) \
if v then left = math.max(left, redis.call('PTTL', k)) \
if string.find(v .. '|', '|' .. t .. '|', 1, true) then tomb = v else tomb = v .. '|' .. t end end \
local e = put(k, tomb, left) out[i] = e and ('E|' .. e) or '2' end \
else local p, ms = ARGV[a], ARGV[a + 1] a = a + 2 \
if owned(v, p) then if redis.call('PTTL', k) < tonumber(ms) then redis.call('PEXPIRE', k, ms) end \
out[i] = '1' else out[i] = '0' end end \
end \
return out";

/// SHA-1 of [`BATCH_SCRIPT`], for `EVALSHA` (checked by a unit test).
pub const BATCH_SCRIPT_SHA1: &str = "665e120a7caa4ace7ee90cfbb6ccf468afade94b";

/// What an operation does (the script's letter for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Claim,
    Record,
    Release,
    Cancel,
    Renew,
}

impl OpKind {
    fn letter(self) -> char {
        match self {
            OpKind::Claim => 'C',
            OpKind::Record => 'W',
            OpKind::Release => 'R',
            OpKind::Cancel => 'X',
            OpKind::Renew => 'N',
        }
    }
}

/// One operation on one key, ready to join a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOp {
    pub kind: OpKind,
    pub key: String,
    /// Its arguments, in the script's order. The last is digits or ends in
    /// `|`: it may be the last path segment (Webdis).
    pub args: Vec<String>,
    /// A record's bytes (ASCII), which travel in the body.
    pub record: Option<Vec<u8>>,
}

impl RedisOp {
    /// The bytes this operation adds to a call (bounds a batch's size).
    pub fn size(&self) -> usize {
        self.key.len()
            + self.args.iter().map(String::len).sum::<usize>()
            + self.record.as_ref().map_or(0, Vec::len)
    }
}

/// One operation's answer: the script's string for it, or why there is none.
pub type OpReply = Result<String, StoreError>;

/// The call that runs `ops` in one script execution.
pub fn request(ops: &[&RedisOp], script: Script) -> StoreRequest {
    let kinds: String = ops.iter().map(|op| op.kind.letter()).collect();
    let keys: Vec<&str> = ops.iter().map(|op| op.key.as_str()).collect();
    let mut args: Vec<&str> = vec![&kinds];
    args.extend(ops.iter().flat_map(|op| op.args.iter().map(String::as_str)));
    // Back to back, one copy each: a batch carries kilobytes of records,
    // and byte by byte this took half of building a batch (self-profile:
    // 20 µs of a 16-operation batch's 20 went to 9).
    let recorded = || ops.iter().filter_map(|op| op.record.as_deref());
    let records = recorded().next().is_some().then(|| {
        let mut all = Vec::with_capacity(recorded().map(<[u8]>::len).sum());
        recorded().for_each(|r| all.extend_from_slice(r));
        all
    });
    Webdis.eval(script, &keys, &args, records)
}

/// What a batch's call brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchAnswer {
    /// One answer per operation, in order.
    Each(Vec<OpReply>),
    /// Sent by SHA-1 to a Redis that does not have the script (restarted,
    /// `SCRIPT FLUSH`): nothing ran; send it again with the source.
    NoScript,
}

/// Reads the answer to a batch of `count` operations. A failure of the
/// whole call is each operation's failure, as it would have been for a call
/// of its own: no answer at all, Envoy's 504 past the timeout, or a 503
/// that does not say the call never left means Redis may have run it, or
/// may still run it ([`StoreError::NoAnswer`]). Webdis answers 503 with no
/// body when its link to Redis fails, whether before or after it sent the
/// command (checked on Debian's webdis 0.1.9: the same answer with Redis
/// stopped); Envoy's own 503 names why ([`envoy_reply::never_left`]).
pub fn answer(status: Option<u16>, body: &[u8], count: usize) -> BatchAnswer {
    let each = |e: StoreError| BatchAnswer::Each(vec![Err(e); count]);
    let status = match status {
        None => {
            return each(StoreError::NoAnswer(
                "no answer (timeout or connection failure)",
            ))
        }
        Some(504) => return each(StoreError::NoAnswer("webdis answered HTTP 504 (timeout)")),
        Some(503) if !envoy_reply::never_left(body) => {
            return each(StoreError::NoAnswer(
                "HTTP 503 (Webdis's link to Redis, or the connection to Webdis, failed, perhaps after sending)",
            ))
        }
        Some(status) => status,
    };
    match Webdis.parse(status, body) {
        Err(e) => each(e),
        Ok(RedisValue::Error(e)) if e.starts_with("NOSCRIPT") => BatchAnswer::NoScript,
        Ok(RedisValue::Error(e)) => each(StoreError::Unavailable(format!("redis: {e}"))),
        Ok(RedisValue::List(items)) if items.len() == count => BatchAnswer::Each(
            items
                .into_iter()
                .map(|item| match item.strip_prefix("E|") {
                    Some(e) => Err(StoreError::Unavailable(format!("redis: {e}"))),
                    None => Ok(item),
                })
                .collect(),
        ),
        Ok(_) => each(StoreError::Corrupt("batch reply of the wrong shape")),
    }
}

/// The answer to a call that carried one operation: its reply, or `None`
/// where Redis answered `NOSCRIPT` (sent by SHA-1; nothing ran).
pub fn single_answer(status: Option<u16>, body: &[u8]) -> Option<OpReply> {
    match answer(status, body, 1) {
        BatchAnswer::Each(mut replies) => Some(
            replies
                .pop()
                .unwrap_or(Err(StoreError::Corrupt("batch reply of the wrong shape"))),
        ),
        BatchAnswer::NoScript => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, key: &str, args: &[&str], record: Option<&str>) -> RedisOp {
        RedisOp {
            kind,
            key: key.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            record: record.map(|r| r.as_bytes().to_vec()),
        }
    }

    #[test]
    fn the_sha_is_the_scripts() {
        use sha1_smol::Sha1;
        assert_eq!(
            Sha1::from(BATCH_SCRIPT).digest().to_string(),
            BATCH_SCRIPT_SHA1
        );
    }

    #[test]
    fn one_call_carries_every_operation_and_records_ride_in_the_body() {
        let claim = op(OpKind::Claim, "k1", &["I|1|f", "30000"], None);
        let record = op(OpKind::Record, "k2", &["I|2|", "900", "3"], Some("C|a"));
        let release = op(OpKind::Release, "k3", &["I|3|"], None);
        let second = op(OpKind::Record, "k4", &["I|4|", "900", "2"], Some("C|"));
        let r = request(&[&claim, &record, &release, &second], Script::Sha("5ha"));
        assert_eq!(
            r.path,
            "/EVALSHA/5ha/4/k1/k2/k3/k4/CWRW/I%7C1%7Cf/30000/I%7C2%7C/900/3/I%7C3%7C/I%7C4%7C/900/2"
        );
        assert_eq!((r.method, r.body.as_deref()), ("PUT", Some(&b"C|aC|"[..])));
        let alone = request(&[&claim], Script::Source("s"));
        assert_eq!((alone.method, alone.body), ("GET", None));
        assert!(alone.path.starts_with("/EVAL/s/1/k1/C/"));
    }

    #[test]
    fn each_operation_gets_its_own_answer_and_a_failed_call_fails_each() {
        assert_eq!(
            answer(Some(200), br#"{"EVALSHA":["claimed","E|OOM no","1"]}"#, 3),
            BatchAnswer::Each(vec![
                Ok("claimed".into()),
                Err(StoreError::Unavailable("redis: OOM no".into())),
                Ok("1".into()),
            ])
        );
        let none = StoreError::NoAnswer("no answer (timeout or connection failure)");
        assert_eq!(
            answer(None, b"", 2),
            BatchAnswer::Each(vec![Err(none.clone()), Err(none)])
        );
        assert!(matches!(
            answer(Some(504), b"upstream request timeout", 1),
            BatchAnswer::Each(v) if matches!(v[0], Err(StoreError::NoAnswer(_)))
        ));
        // Webdis answers 503 when its link to Redis broke, perhaps after
        // sending: the operation may have run.
        assert!(matches!(
            answer(Some(503), b"", 1),
            BatchAnswer::Each(v) if matches!(v[0], Err(StoreError::NoAnswer(_)))
        ));
        // Envoy's own 503, after a connection reset once the call was sent.
        assert!(matches!(
            answer(Some(503), b"upstream connect error or disconnect/reset before headers. reset reason: connection termination", 1),
            BatchAnswer::Each(v) if matches!(v[0], Err(StoreError::NoAnswer(_)))
        ));
        // Envoy's own 503s for calls that never left.
        for body in [
            &b"no healthy upstream"[..],
            b"upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: delayed connect error: Connection refused",
            b"upstream connect error or disconnect/reset before headers. reset reason: connection timeout",
            b"upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset",
            b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
        ] {
            assert!(matches!(
                answer(Some(503), body, 1),
                BatchAnswer::Each(v) if matches!(v[0], Err(StoreError::Unavailable(_)))
            ));
        }
        assert!(matches!(
            answer(Some(500), b"", 1),
            BatchAnswer::Each(v) if matches!(v[0], Err(StoreError::Unavailable(_)))
        ));
        assert_eq!(
            answer(
                Some(200),
                br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#,
                2
            ),
            BatchAnswer::NoScript
        );
        assert!(matches!(
            answer(Some(200), br#"{"EVALSHA":[false,"BUSY"]}"#, 1),
            BatchAnswer::Each(v) if v[0] == Err(StoreError::Unavailable("redis: BUSY".into()))
        ));
        // One answer too few or too many is no answer for anyone.
        assert!(matches!(
            answer(Some(200), br#"{"EVALSHA":["1"]}"#, 2),
            BatchAnswer::Each(v) if v.iter().all(|r| matches!(r, Err(StoreError::Corrupt(_))))
        ));
        assert_eq!(
            single_answer(Some(200), br#"{"EVAL":["1"]}"#),
            Some(Ok("1".into()))
        );
        assert_eq!(
            single_answer(
                Some(200),
                br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#
            ),
            None
        );
    }
}
