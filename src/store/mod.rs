//! Where key state lives. The local store keeps it in the proxy's shared data
//! through the [`SharedData`] seam; every store hands its records to
//! [`crate::decision::decide`], so they agree on semantics.
//!
//! Every operation (claim, complete, release, cancel) answers in one shape,
//! a [`StoreStep`]: done now (the local store), or one Redis operation to
//! send, whose answer goes back to the store with what it was for (Redis):
//! ```text
//! filter ──op──▶ Store ──▶ Done(result) ──────────────────────────▶ apply
//!                      └─▶ Call(op, pending) ──send──▶ … its reply
//!                            filter ──pending + reply──▶ Store ──▶ apply
//! ```
//! An operation is sent alone (one call), or joins the worker's next batch
//! where the host groups them ([`group_commit`], Envoy).
//! A backend is one file and one [`Store`] variant.

pub mod batch;
pub mod bucket;
pub mod budget;
pub mod cached;
pub mod group_commit;
pub mod local;
mod reclaim;
pub mod redis;
pub mod renewals;
pub mod sweep;
#[cfg(test)]
pub(crate) mod testing;
pub mod webdis;

use crate::config::StoreConfig;
use crate::fingerprint::Digest16;
use crate::host::{Host, HostError, Level};
use crate::metrics::Metric;
use crate::record::StoredResponse;
use batch::{OpReply, RedisOp};
use budget::SpaceEffects;
use cached::CachedRedis;
pub use cached::SentOp;
use local::LocalTable;
use redis::{CancelOutcome, OnUnavailable};
use std::fmt;
use sweep::Sweep;

/// What a store operation did: finished (`Done`), or needs `op` sent;
/// its reply then goes to the store's `*_answered` with `P`.
#[derive(Debug)]
pub enum StoreStep<T, P> {
    Done(Result<T, StoreError>),
    Call(RedisOp, P),
}

/// Renewing the claims that are due: done (local: each claim's token and
/// whether it is still held, or why the store could not say), or one
/// operation per claim to send (Redis), each with its claim's token.
#[derive(Debug)]
pub enum Renewal {
    Done(Vec<(u64, Result<bool, StoreError>)>),
    Ops(Vec<(u64, RedisOp)>),
}

/// A claim's outcome with its side effects (for metrics).
pub type Claimed = (ClaimOutcome, ClaimEffects);

/// A claim this request holds: what completing or releasing it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub claim: Claim,
    pub digest: Digest16,
    pub fingerprint: Digest16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Record the response: the key's outcome.
    Complete,
    /// Free the key so that a retry runs again.
    Release,
}

/// A claim sent to the store, for reading its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingClaim {
    pub digest: Digest16,
    pub fingerprint: Digest16,
    pub token: u64,
    /// When the claim was sent: Redis's lock and a record's expiry count
    /// from after it (the claim's renewals and the replay cache use it).
    pub sent_ms: u64,
}

/// The store a configuration names.
#[derive(Debug)]
pub enum Store {
    /// This gateway's shared data, swept on the tick.
    Local { table: LocalTable, sweep: Sweep },
    /// Redis over HTTP, behind this gateway's replay cache (if any).
    Redis(CachedRedis),
}

fn no_call() -> StoreError {
    StoreError::Unavailable("the local store makes no calls".to_string())
}

impl Store {
    pub fn new(config: &StoreConfig) -> Store {
        match config {
            StoreConfig::Local {
                buckets,
                ways,
                max_bytes,
            } => Store::Local {
                table: LocalTable::new(*buckets, *ways, *max_bytes),
                sweep: Sweep::default(),
            },
            StoreConfig::Redis {
                redis,
                cache_max_bytes,
            } => Store::Redis(CachedRedis::new(redis.clone(), *cache_max_bytes)),
        }
    }

    /// Prepares the store in the proxy (once per configuration). `Err`
    /// carries the line to log, and the configuration is then refused. The
    /// local store's sweep runs on the tick, which every platform that has
    /// shared data (so the local store) has; Redis expires records itself.
    pub fn init(&mut self, host: &impl Host) -> Result<(), String> {
        match self {
            Store::Local { table, sweep } => sweep.start(host, table),
            Store::Redis(redis) => {
                redis.init(host);
                Ok(())
            }
        }
    }

    /// Once per tick. Returns the entries gauge's value when a full sweep
    /// pass has just ended.
    pub fn tick(&self, host: &impl Host, now_ms: u64) -> Option<u64> {
        match self {
            Store::Local { table, sweep } => sweep.tick(host, table, now_ms),
            Store::Redis(_) => None,
        }
    }

    /// The Redis store's settings (where its calls go), if it is Redis.
    pub fn redis_config(&self) -> Option<&redis::RedisConfig> {
        match self {
            Store::Local { .. } => None,
            Store::Redis(redis) => Some(&redis.redis.config),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Store::Local { .. } => "local",
            Store::Redis(_) => "redis",
        }
    }

    /// A claim reads the time: the local store's deadlines, the replay
    /// cache's expiry. Redis alone keeps its own time (`PX`).
    pub fn claim_uses_clock(&self) -> bool {
        match self {
            Store::Local { .. } => true,
            Store::Redis(redis) => redis.has_cache(),
        }
    }

    /// When the store cannot decide, the request goes on unprotected
    /// (`on_unavailable: allow`) instead of being refused.
    pub fn fails_open(&self) -> bool {
        match self {
            Store::Local { .. } => false,
            Store::Redis(redis) => redis.redis.config.on_unavailable == OnUnavailable::Allow,
        }
    }

    /// Sends a step's operation; its reply comes back with the call's id.
    pub fn send(&self, host: &impl Host, op: RedisOp) -> Result<SentOp, StoreError> {
        match self {
            Store::Local { .. } => Err(no_call()),
            Store::Redis(redis) => redis.send(host, op),
        }
    }

    /// Sends again by source an operation sent alone by SHA-1 that Redis
    /// answered `NOSCRIPT`.
    pub fn send_by_source(&self, host: &impl Host, op: &RedisOp) -> Result<u32, StoreError> {
        match self {
            Store::Local { .. } => Err(no_call()),
            Store::Redis(redis) => redis.send_by_source(host, op),
        }
    }

    /// The one atomic step of a request: claim the key, or learn what holds it.
    pub fn claim(
        &self,
        host: &impl Host,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
        lock_ms: u64,
        now_ms: u64,
    ) -> StoreStep<Claimed, PendingClaim> {
        match self {
            Store::Local { table, .. } => {
                StoreStep::Done(table.claim(host, digest, fingerprint, token, now_ms, lock_ms))
            }
            Store::Redis(redis) => redis.claim(host, digest, fingerprint, token, lock_ms, now_ms),
        }
    }

    pub fn claim_answered(
        &self,
        host: &impl Host,
        pending: &PendingClaim,
        reply: OpReply,
    ) -> Result<Claimed, StoreError> {
        match self {
            Store::Local { .. } => Err(no_call()),
            Store::Redis(redis) => redis.claim_answered(host, pending, reply),
        }
    }

    /// Records `response` as the outcome of the claim `held`.
    pub fn complete(
        &self,
        host: &impl Host,
        held: &Held,
        response: StoredResponse,
        ttl_ms: u64,
    ) -> StoreStep<bool, Write> {
        match self {
            Store::Local { table, .. } => {
                let mut space = SpaceEffects::default();
                let result = table.complete(
                    host,
                    &held.claim,
                    &held.digest,
                    response,
                    host.now_ms(),
                    ttl_ms,
                    &mut space,
                );
                // What was committed counts, whatever the result.
                space.report(host);
                StoreStep::Done(result)
            }
            Store::Redis(redis) => redis.complete(held, response, ttl_ms),
        }
    }

    /// Frees the key of the claim `held`.
    pub fn release(&self, host: &impl Host, held: &Held) -> StoreStep<bool, Write> {
        match self {
            Store::Local { table, .. } => {
                let r = table.release(host, &held.claim);
                if r == Ok(true) {
                    host.metric_add(Metric::Entries, -1);
                }
                StoreStep::Done(r)
            }
            Store::Redis(redis) => redis.release(held),
        }
    }

    pub fn write_answered(&self, write: Write, reply: OpReply) -> Result<bool, StoreError> {
        match self {
            Store::Local { .. } => Err(no_call()),
            Store::Redis(redis) => redis.write_answered(write, reply),
        }
    }

    /// Renews the claims `due` (from the tick): the local store now, one CAS
    /// each; Redis with one operation each, sent together. Each claim's
    /// answer: `(token, still held)`.
    pub fn renew(&self, host: &impl Host, due: &[Held], lock_ms: u64) -> Renewal {
        match self {
            Store::Local { table, .. } => {
                let now_ms = host.now_ms();
                // Each claim on its own: one that meets contention does not
                // keep the others from being renewed.
                Renewal::Done(
                    due.iter()
                        .map(|h| (h.claim.token, table.renew(host, &h.claim, now_ms, lock_ms)))
                        .collect(),
                )
            }
            Store::Redis(redis) => Renewal::Ops(
                due.iter()
                    .map(|h| {
                        let token = h.claim.token;
                        (token, redis.redis.renew_op(&h.digest, token, lock_ms))
                    })
                    .collect(),
            ),
        }
    }

    /// Whether a renewal operation kept its claim.
    pub fn renew_answered(&self, reply: OpReply) -> Result<bool, StoreError> {
        match self {
            Store::Local { .. } => Err(no_call()),
            Store::Redis(redis) => redis.redis.renew_outcome(reply),
        }
    }

    /// Cancels a claim whose answer never came. A store that answers at
    /// once has nothing to cancel.
    pub fn cancel(
        &self,
        digest: &Digest16,
        token: u64,
        lock_ms: u64,
    ) -> StoreStep<CancelOutcome, ()> {
        match self {
            Store::Local { .. } => StoreStep::Done(Ok(CancelOutcome::NothingToCancel)),
            Store::Redis(redis) => {
                StoreStep::Call(redis.redis.cancel_op(digest, token, lock_ms), ())
            }
        }
    }

    pub fn cancel_answered(
        &self,
        host: &impl Host,
        reply: OpReply,
    ) -> Result<CancelOutcome, StoreError> {
        let result = match self {
            Store::Redis(redis) => redis.redis.cancel_outcome(reply),
            Store::Local { .. } => Err(no_call()),
        };
        if let Err(e) = &result {
            // The claim, if it landed, lapses after its lock timeout.
            host.log(
                Level::Warn,
                &format!("cancelling the timed-out claim failed: {e}"),
            );
        }
        result
    }
}

/// Proxy shared data with Envoy's semantics: values carry a CAS token; a set
/// with a stale CAS fails; a set on a missing key succeeds whatever CAS is
/// given; there is no delete, no TTL and no listing.
pub trait SharedData {
    /// `Ok(None)` when the key does not exist.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// `Ok(false)` when `cas` is stale (another writer came first). `None`
    /// writes whatever is there: for tests; the filter writes only with
    /// [`SharedData::set_if_unchanged`].
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError>;

    /// Writes `value` only if `key` is still as it was read: with CAS
    /// `seen`, or still missing (`None`). A missing key ignores CAS, so
    /// "still missing" is a set with [`ABSENT_CAS`], which a key someone
    /// created meanwhile refuses. A plain set there would let two workers
    /// that both found a bucket missing each create it and each believe
    /// it claimed a slot in it: one operation run twice.
    fn set_if_unchanged(
        &self,
        key: &str,
        value: &[u8],
        seen: Option<u32>,
    ) -> Result<bool, HostError> {
        self.shared_set(key, value, Some(seen.unwrap_or(ABSENT_CAS)))
    }
}

/// The CAS that stands for "missing when read". Envoy numbers its sets
/// process-wide from 1 (proxy-wasm-cpp-host, `SharedData::nextCas`) and a
/// value's CAS is the number of its last set, so a key refuses this one
/// unless it was last written by exactly the 4,294,967,295th set of the
/// process (or of each 2^32 - 1 after): then a creation race that also
/// needs two workers to find one key missing at once would go unnoticed.
pub const ABSENT_CAS: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Host(HostError),
    /// Bytes in the store that this version cannot read.
    Corrupt(&'static str),
    /// Every bounded CAS attempt lost to another writer.
    Contention,
    /// A completed record whose response bytes are gone.
    Inconsistent,
    /// The store could not be reached or answered an error (Redis store).
    Unavailable(String),
    /// No answer came (a timeout, a lost connection): Redis may still run
    /// the operation.
    NoAnswer(&'static str),
    /// A record that cannot be kept within the byte budget (local store):
    /// why.
    NoRoom(&'static str),
}

impl StoreError {
    /// A store call the host refused to send: it never reached Redis.
    pub fn not_sent(e: HostError) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<HostError> for StoreError {
    fn from(e: HostError) -> Self {
        StoreError::Host(e)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Host(e) => write!(f, "{e}"),
            StoreError::Corrupt(what) => write!(f, "unreadable store data: {what}"),
            StoreError::Contention => write!(f, "store contention: every CAS attempt lost"),
            StoreError::Inconsistent => write!(f, "a completed record's response is missing"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::NoAnswer(why) => write!(f, "store unavailable: {why}"),
            StoreError::NoRoom(why) => write!(f, "no room for the record: {why}"),
        }
    }
}

/// Ownership of an in-flight key: only the holder may complete or release it,
/// and a claim that was abandoned and taken over is recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub slot: u32,
    pub epoch: u64,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed(Claim),
    InFlight,
    Mismatch,
    Replay(StoredResponse),
    /// No slot can take the key: all are held by live in-flight claims.
    Full,
}

/// Side effects of a claim, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimEffects {
    /// A free slot became occupied (the entries gauge grows).
    pub new_entry: bool,
    /// A live completed record was evicted to make room.
    pub evicted: bool,
    /// An expired record or abandoned claim was reused.
    pub expired: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Expired records and abandoned claims freed.
    pub freed: u32,
    /// Data slots whose response bytes were released.
    pub data_reclaimed: u32,
    /// Occupied slots seen in the swept buckets (resyncs the entries gauge).
    pub occupied: u64,
    /// Buckets whose sweep failed (host error, unreadable data).
    pub errors: u32,
    /// Bytes reclaimed, and records evicted where a bucket was over its
    /// share of `max_bytes` (after it was lowered).
    pub space: SpaceEffects,
}
