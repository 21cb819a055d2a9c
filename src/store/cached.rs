//! The Redis store behind this gateway's replay cache (Envoy): completed
//! records this gateway has replayed are kept in its shared data, so that
//! their further retries need no store round trip. A completed record never
//! changes in Redis before it expires, and a cached copy expires no later
//! than Redis's, so the cache can only answer what Redis would have answered.
//!
//! ```text
//! claim ──cache hit──▶ Done(replay or mismatch)      (no call)
//!   └──miss──▶ Call(claim) ──answer: a record──▶ fill the cache
//! ```
//!
//! The cache is filled by a key's first retry here, not when this gateway
//! records the key: most keys are never retried, and in a fleet a retry
//! lands on the gateway that recorded it only now and then, while a fill is
//! a claim, a reservation and a record in shared data (about 30 µs of Envoy
//! per fresh request in `make bench` when it was made at every record).

use super::batch::{self, OpReply, RedisOp, BATCH_SCRIPT, BATCH_SCRIPT_SHA1};
use super::budget::SpaceEffects;
use super::local::LocalTable;
use super::redis::{RedisConfig, RedisStore};
use super::webdis::Script;
use super::{
    ClaimEffects, ClaimOutcome, Claimed, Held, PendingClaim, StoreError, StoreStep, Write,
};
use crate::config::LOCAL_WAYS;
use crate::fingerprint::Digest16;
use crate::host::{Host, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::record::StoredResponse;

/// A store operation on its way: the call its answer comes back with and,
/// where it went alone by SHA-1, the operation, to send again by source
/// should Redis not have the script.
#[derive(Debug)]
pub struct SentOp {
    pub call: u32,
    pub by_sha: Option<RedisOp>,
}

/// A completed record on its way into the replay cache.
#[derive(Debug)]
struct CacheFill {
    digest: Digest16,
    fingerprint: Digest16,
    response: StoredResponse,
    /// Until when Redis keeps it, at the latest (this gateway's clock).
    expires_ms: u64,
}

#[derive(Debug)]
pub struct CachedRedis {
    pub redis: RedisStore,
    cache: Option<LocalTable>,
}

impl CachedRedis {
    pub fn new(config: RedisConfig, cache_max_bytes: u64) -> CachedRedis {
        // Named by the Redis namespace it mirrors: two configurations in
        // one vm_id that use different Redis stores keep separate caches.
        let cache = (config.cache_entries > 0).then(|| {
            LocalTable::named(
                &format!("cache/{}/{}", config.cluster, config.key_prefix),
                config.cache_entries / LOCAL_WAYS,
                LOCAL_WAYS,
                cache_max_bytes,
            )
        });
        CachedRedis {
            redis: RedisStore::new(config),
            cache,
        }
    }

    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// Creates the cache's table. Without it the cache is off; Redis still
    /// decides everything.
    pub fn init(&mut self, host: &impl Host) {
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.init(host) {
                host.log(
                    Level::Warn,
                    &format!("replay cache disabled: cannot create it in shared data: {e}"),
                );
                self.cache = None;
            }
        }
    }

    /// Sends `op`: in the worker's next batch where the host groups them
    /// (Envoy, whose group commit answers `NOSCRIPT` itself), else as a call
    /// of its own by SHA-1, the operation kept to go again by source.
    pub fn send(&self, host: &impl Host, op: RedisOp) -> Result<SentOp, StoreError> {
        if host.groups_store_ops() {
            let call = host.send_store_op(op).map_err(StoreError::not_sent)?;
            return Ok(SentOp { call, by_sha: None });
        }
        let call = self.call_alone(host, &op, Script::Sha(BATCH_SCRIPT_SHA1))?;
        Ok(SentOp {
            call,
            by_sha: Some(op),
        })
    }

    /// Sends again, with the script's source, an operation Redis answered
    /// `NOSCRIPT` (restarted, or `SCRIPT FLUSH`): nothing of it ran. Redis
    /// then keeps the script for every later call.
    pub fn send_by_source(&self, host: &impl Host, op: &RedisOp) -> Result<u32, StoreError> {
        self.call_alone(host, op, Script::Source(BATCH_SCRIPT))
    }

    /// One operation, one call. By SHA-1 first: the 1.5 KB source on every
    /// call cost, on APISIX in `make bench`, about a quarter of nginx's time
    /// per replay and a third of Webdis's, for a second round trip only
    /// after Redis has lost its scripts.
    fn call_alone(
        &self,
        host: &impl Host,
        op: &RedisOp,
        script: Script,
    ) -> Result<u32, StoreError> {
        let request = batch::request(&[op], script);
        let cfg = &self.redis.config;
        let call = host
            .dispatch_http_call(
                &cfg.cluster,
                &cfg.call_headers(&request),
                request.body.as_deref(),
                cfg.timeout_ms,
            )
            .map_err(StoreError::not_sent)?;
        host.metric_add(Metric::StoreCalls, 1);
        host.metric_add(Metric::StoreOperations, 1);
        Ok(call)
    }

    pub fn claim(
        &self,
        host: &impl Host,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
        lock_ms: u64,
        now: u64,
    ) -> StoreStep<Claimed, PendingClaim> {
        if let Some(cache) = &self.cache {
            // Any failure to read the cache is a miss: Redis decides.
            if let Ok(Some((stored, response))) = cache.lookup(host, digest, now) {
                host.metric_add(Metric::CacheHits, 1);
                let outcome = if stored == *fingerprint {
                    ClaimOutcome::Replay(response)
                } else {
                    ClaimOutcome::Mismatch
                };
                return StoreStep::Done(Ok((outcome, ClaimEffects::default())));
            }
        }
        StoreStep::Call(
            self.redis.claim_op(digest, fingerprint, token, lock_ms),
            PendingClaim {
                digest: *digest,
                fingerprint: *fingerprint,
                token,
                sent_ms: now,
            },
        )
    }

    pub fn claim_answered(
        &self,
        host: &impl Host,
        pending: &PendingClaim,
        reply: OpReply,
    ) -> Result<Claimed, StoreError> {
        let result =
            self.redis
                .claim_outcome(reply, &pending.digest, &pending.fingerprint, pending.token);
        // A retry of a completed key (recorded here or elsewhere): keep the
        // record, so that the key's next retries stay here. Not an
        // `outcome-unknown` record: support forgets such a key in Redis once
        // it has checked what happened (README, "Operations"), and a cached
        // copy would go on answering for the TTL.
        if let (Some(_), Ok((ClaimOutcome::Replay(response), Some(remaining_ms)))) =
            (&self.cache, &result)
        {
            let forgettable = Problem::is_outcome_unknown_record(response);
            if !forgettable {
                self.fill(
                    host,
                    CacheFill {
                        digest: pending.digest,
                        fingerprint: pending.fingerprint,
                        response: response.clone(),
                        expires_ms: pending.sent_ms.saturating_add(*remaining_ms),
                    },
                );
            }
        }
        result.map(|(outcome, _)| (outcome, ClaimEffects::default()))
    }

    /// Records the response in Redis; the cache keeps it only once a retry
    /// asks for it (see the module note).
    pub fn complete(
        &self,
        held: &Held,
        response: StoredResponse,
        ttl_ms: u64,
    ) -> StoreStep<bool, Write> {
        StoreStep::Call(
            self.redis.complete_op(
                &held.digest,
                &held.fingerprint,
                &held.claim,
                response,
                ttl_ms,
            ),
            Write::Complete,
        )
    }

    pub fn release(&self, held: &Held) -> StoreStep<bool, Write> {
        StoreStep::Call(
            self.redis.release_op(&held.digest, &held.claim),
            Write::Release,
        )
    }

    pub fn write_answered(&self, write: Write, reply: OpReply) -> Result<bool, StoreError> {
        match write {
            Write::Complete => self.redis.complete_outcome(reply),
            Write::Release => self.redis.release_outcome(reply),
        }
    }

    /// Puts a completed record into the replay cache. Best effort: a record
    /// that does not fit (slots, or bytes: `store.max_bytes`) is simply
    /// asked of Redis next time.
    fn fill(&self, host: &impl Host, fill: CacheFill) {
        let Some(cache) = &self.cache else { return };
        let now = host.now_ms();
        let ttl_ms = fill.expires_ms.saturating_sub(now);
        if ttl_ms == 0 {
            return;
        }
        let token = host.random_u64() | 1;
        let mut space = SpaceEffects::default();
        if let Err(e) = cache.remember(
            host,
            &fill.digest,
            &fill.fingerprint,
            fill.response,
            token,
            now,
            ttl_ms,
            &mut space,
        ) {
            host.log(Level::Debug, &format!("replay cache not filled: {e}"));
        }
        space.report_bytes(host);
    }
}
