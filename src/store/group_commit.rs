//! Group commit for the Redis store (Envoy): every call to the store costs
//! Envoy about as much as proxying a request, so a worker sends the
//! operations its requests need in one call, as databases do with their log.
//!
//! Batching is natural, with no timer: a batch goes out at once when none is
//! out, and what arrives meanwhile waits for the next one. At low load every
//! operation goes alone and nothing waits; under load the calls per request
//! fall toward 2/N. One batch at a time keeps a worker's operations in order
//! (a cancel never overtakes its own claim here) and Redis's work per call
//! predictable.
//!
//! ```text
//! push(op) ─▶ waiting ─next_batch()─▶ in flight (one call) ─answered()─▶ each op's reply
//!                                  └─ NOSCRIPT ─▶ sent again by source (once)
//! ```
//! Which caller each operation belongs to (`T`) is the owner's business.
//!
//! Renewals go first into the next batch: a running request's claim must
//! be renewed before its lock runs out, so a renewal waits for the batch
//! in flight only, never behind other requests' operations. That bound
//! (`store::renewals::shortest_lock_ms`) holds while a worker has no more
//! than [`MAX_BATCH_OPS`] renewals due at once; more wait one more round
//! trip for each batch they fill. A renewal that overtakes its own claim's
//! record is harmless: it finds the marker and extends it.

use super::batch::{self, BatchAnswer, OpKind, OpReply, RedisOp, BATCH_SCRIPT, BATCH_SCRIPT_SHA1};
use super::webdis::{Script, StoreRequest};
use super::StoreError;
use std::collections::VecDeque;

/// Most operations in one call: bounds a call's path (a claim adds about
/// 150 bytes) and Redis's time in one script.
pub const MAX_BATCH_OPS: usize = 64;
/// Most bytes of records in one call, unless a single record is larger.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

struct InFlight<T> {
    callers: Vec<T>,
    ops: Vec<RedisOp>,
    /// Sent by source already: a second `NOSCRIPT` is an error, not a loop.
    by_source: bool,
}

/// An operation waiting for the next batch; a claim, since when (only a
/// claim can expire: [`GroupCommit::expire_claims`]).
struct Queued<T> {
    caller: T,
    op: RedisOp,
    claim_since_ms: Option<u64>,
}

pub struct GroupCommit<T> {
    /// Renewals, sent before anything else.
    renewals: VecDeque<Queued<T>>,
    waiting: VecDeque<Queued<T>>,
    in_flight: Option<InFlight<T>>,
}

/// What to do with a batch's answer.
pub enum Answered<T> {
    /// Each operation's answer, for its caller.
    Replies(Vec<(T, OpReply)>),
    /// Redis lacked the script: send this instead (the batch stays out).
    Resend(StoreRequest),
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        GroupCommit {
            renewals: VecDeque::new(),
            waiting: VecDeque::new(),
            in_flight: None,
        }
    }
}

impl<T> GroupCommit<T> {
    /// Queues `op` for the next batch; `now_ms` reads the clock, for a
    /// claim only (a clock read is a host call).
    pub fn push(&mut self, caller: T, op: RedisOp, now_ms: impl FnOnce() -> u64) {
        let claim_since_ms = (op.kind == OpKind::Claim).then(now_ms);
        let queued = Queued {
            caller,
            op,
            claim_since_ms,
        };
        if queued.op.kind == OpKind::Renew {
            self.renewals.push_back(queued);
        } else {
            self.waiting.push_back(queued);
        }
    }

    /// Takes out the claims that have waited longer than `max_wait_ms`
    /// (the store's timeout) for a batch, each failed as never sent: a
    /// store that does not answer lets a batch go out only every timeout,
    /// so without this the queue, the requests it holds (and in forwarding
    /// mode their bodies) and each new request's wait would grow for as
    /// long as requests keep coming. A claim that never left needs no
    /// cancel; records, releases and cancels of claims already sent stay,
    /// bounded by those claims.
    pub fn expire_claims(&mut self, now_ms: u64, max_wait_ms: u64) -> Vec<(T, OpReply)> {
        let stale = |q: &Queued<T>| {
            q.claim_since_ms
                .is_some_and(|since| now_ms.saturating_sub(since) > max_wait_ms)
        };
        if !self.waiting.iter().any(stale) {
            return Vec::new();
        }
        let error = StoreError::Unavailable(format!(
            "not sent: waited over store.timeout_ms ({max_wait_ms} ms) behind the batch in flight"
        ));
        let (expired, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(stale);
        self.waiting = kept;
        expired
            .into_iter()
            .map(|q| (q.caller, Err(error.clone())))
            .collect()
    }

    /// A batch is out: what arrives now goes in the next one.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// No batch is out and no operation waits.
    pub fn is_empty(&self) -> bool {
        !self.busy() && self.renewals.is_empty() && self.waiting.is_empty()
    }

    /// The call for the next batch, when none is out and operations wait.
    pub fn next_batch(&mut self) -> Option<StoreRequest> {
        if self.busy() || (self.renewals.is_empty() && self.waiting.is_empty()) {
            return None;
        }
        let (mut callers, mut ops) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for queue in [&mut self.renewals, &mut self.waiting] {
            while let Some(Queued { op, .. }) = queue.front() {
                let fits = ops.is_empty()
                    || (ops.len() < MAX_BATCH_OPS && bytes + op.size() <= MAX_BATCH_BYTES);
                if !fits {
                    break;
                }
                bytes += op.size();
                if let Some(q) = queue.pop_front() {
                    callers.push(q.caller);
                    ops.push(q.op);
                }
            }
        }
        let request = batch::request(
            &ops.iter().collect::<Vec<_>>(),
            Script::Sha(BATCH_SCRIPT_SHA1),
        );
        self.in_flight = Some(InFlight {
            callers,
            ops,
            by_source: false,
        });
        Some(request)
    }

    /// How many operations the batch that is out carries.
    pub fn in_flight_ops(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |b| b.ops.len())
    }

    /// The answer to the batch that is out.
    pub fn answered(&mut self, status: Option<u16>, body: &[u8]) -> Answered<T> {
        let Some(mut out) = self.in_flight.take() else {
            return Answered::Replies(Vec::new());
        };
        match batch::answer(status, body, out.ops.len()) {
            BatchAnswer::NoScript if !out.by_source => {
                let request = batch::request(
                    &out.ops.iter().collect::<Vec<_>>(),
                    Script::Source(BATCH_SCRIPT),
                );
                out.by_source = true;
                self.in_flight = Some(out);
                Answered::Resend(request)
            }
            BatchAnswer::NoScript => Answered::Replies(fail_all(
                out.callers,
                &StoreError::Unavailable("redis: NOSCRIPT for a script sent by source".to_string()),
            )),
            BatchAnswer::Each(replies) => {
                Answered::Replies(out.callers.into_iter().zip(replies).collect())
            }
        }
    }

    /// The batch that is out could not be sent: each operation fails.
    pub fn send_failed(&mut self, error: &StoreError) -> Vec<(T, OpReply)> {
        self.in_flight
            .take()
            .map_or_else(Vec::new, |out| fail_all(out.callers, error))
    }
}

fn fail_all<T>(callers: Vec<T>, error: &StoreError) -> Vec<(T, OpReply)> {
    callers
        .into_iter()
        .map(|c| (c, Err(error.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_redis::FakeRedis;
    use crate::fingerprint::Digest16;
    use crate::record::StoredResponse;
    use crate::store::redis::{RedisConfig, RedisStore};
    use crate::store::{Claim, ClaimOutcome};

    const FP: Digest16 = [1; 16];

    fn store() -> RedisStore {
        RedisStore::new(RedisConfig::with_defaults("webdis"))
    }

    fn claim(s: &RedisStore, key: u8, fingerprint: Digest16, token: u64) -> RedisOp {
        s.claim_op(&[key; 16], &fingerprint, token, 30_000)
    }

    /// Runs `request` on `redis` and hands the answer to `group`.
    fn round_trip(
        group: &mut GroupCommit<u64>,
        redis: &FakeRedis,
        request: &StoreRequest,
    ) -> Answered<u64> {
        let body = redis.run_request(request);
        group.answered(Some(200), &body)
    }

    fn replies(answered: Answered<u64>) -> Vec<(u64, OpReply)> {
        match answered {
            Answered::Replies(r) => r,
            Answered::Resend(_) => panic!("expected replies"),
        }
    }

    #[test]
    fn one_batch_answers_claimed_conflict_mismatch_and_replay_each_to_its_caller() {
        let s = store();
        let redis = FakeRedis::default();
        redis.script_loaded.set(true);
        let mut group = GroupCommit::default();
        // Key 1 runs (token 10), key 2 is recorded: set up by earlier batches.
        group.push(10, claim(&s, 1, FP, 10), || 0);
        group.push(20, claim(&s, 2, FP, 20), || 0);
        let first = group.next_batch().unwrap();
        assert!(replies(round_trip(&mut group, &redis, &first))
            .iter()
            .all(|(_, r)| r.as_deref() == Ok("claimed")));
        let held = Claim {
            slot: 0,
            epoch: 0,
            token: 20,
        };
        let paid = StoredResponse {
            status: 201,
            body: b"paid".to_vec(),
            ..Default::default()
        };
        group.push(
            20,
            s.complete_op(&[2; 16], &FP, &held, paid.clone(), 60_000),
            || 0,
        );
        let record = group.next_batch().unwrap();
        assert_eq!(
            replies(round_trip(&mut group, &redis, &record)),
            vec![(20, Ok("1".into()))]
        );

        for (caller, op) in [
            (1, claim(&s, 3, FP, 1)),      // a fresh key
            (2, claim(&s, 1, FP, 2)),      // the same request, still running
            (3, claim(&s, 1, [9; 16], 3)), // the same key, another request
            (4, claim(&s, 2, FP, 4)),      // recorded
            (5, claim(&s, 3, FP, 5)),      // claimed earlier in this very batch
        ] {
            group.push(caller, op, || 0);
        }
        let batch = group.next_batch().unwrap();
        assert_eq!(group.in_flight_ops(), 5, "one call for all five");
        let answers = replies(round_trip(&mut group, &redis, &batch));
        let outcome = |i: usize, key: u8, fp: Digest16| {
            let (caller, reply) = answers[i].clone();
            s.claim_outcome(reply, &[key; 16], &fp, caller)
                .map(|(o, _)| o)
        };
        assert_eq!(
            outcome(0, 3, FP),
            Ok(ClaimOutcome::Claimed(Claim {
                slot: 0,
                epoch: 0,
                token: 1
            }))
        );
        assert_eq!(outcome(1, 1, FP), Ok(ClaimOutcome::InFlight));
        assert_eq!(outcome(2, 1, [9; 16]), Ok(ClaimOutcome::Mismatch));
        assert_eq!(outcome(3, 2, FP), Ok(ClaimOutcome::Replay(paid)));
        assert_eq!(
            outcome(4, 3, FP),
            Ok(ClaimOutcome::InFlight),
            "in order, atomically"
        );
        assert_eq!(
            answers.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }

    /// A store that does not answer lets a batch go only every timeout:
    /// claims that waited longer than that fail as never sent, so the
    /// queue (and each new request's wait) stays bounded by the arrival
    /// rate times the timeout. Writes of claims already sent stay.
    #[test]
    fn claims_that_waited_past_the_timeout_fail_unsent_and_writes_stay() {
        let s = store();
        let mut group = GroupCommit::default();
        let held = Claim {
            slot: 0,
            epoch: 0,
            token: 9,
        };
        group.push(1, claim(&s, 1, FP, 1), || 0);
        group.push(2, s.release_op(&[9; 16], &held), || 0);
        group.push(3, claim(&s, 3, FP, 3), || 400);
        assert!(
            group.expire_claims(500, 500).is_empty(),
            "none over 500 ms yet"
        );
        let expired = group.expire_claims(600, 500);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, 1);
        assert!(
            matches!(&expired[0].1, Err(StoreError::Unavailable(e)) if e.starts_with("not sent"))
        );
        group.next_batch().unwrap();
        assert_eq!(
            group.in_flight_ops(),
            2,
            "the release and the younger claim"
        );
        let answered = replies(group.answered(None, b""));
        assert_eq!(
            answered.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn renewals_go_first_into_the_next_batch() {
        let s = store();
        let redis = FakeRedis::default();
        redis.script_loaded.set(true);
        let mut group = GroupCommit::default();
        group.push(1, claim(&s, 1, FP, 1), || 0);
        let out = group.next_batch().unwrap();
        // While that batch is out, a full batch of other operations waits;
        // a renewal due now still goes in the very next call, first.
        for i in 0..MAX_BATCH_OPS as u64 {
            group.push(100 + i, claim(&s, 2, FP, 100 + i), || 0);
        }
        group.push(7, s.renew_op(&[1; 16], 1, 30_000), || 0);
        replies(round_trip(&mut group, &redis, &out));
        let next = group.next_batch().unwrap();
        let answers = replies(round_trip(&mut group, &redis, &next));
        assert_eq!(answers.len(), MAX_BATCH_OPS);
        assert_eq!(answers[0], (7, Ok("1".into())), "renewed, first");
        // The one claim it displaced goes in the batch after.
        group.next_batch().unwrap();
        assert_eq!(group.in_flight_ops(), 1);
    }

    #[test]
    fn what_arrives_while_a_batch_is_out_goes_in_the_next_one() {
        let s = store();
        let mut group = GroupCommit::default();
        assert!(group.next_batch().is_none(), "nothing to send");
        group.push(1, claim(&s, 1, FP, 1), || 0);
        let out = group.next_batch().unwrap();
        assert!(out.path.starts_with("/EVALSHA/"));
        group.push(2, claim(&s, 2, FP, 2), || 0);
        group.push(3, claim(&s, 3, FP, 3), || 0);
        assert!(
            group.busy() && group.next_batch().is_none(),
            "one batch at a time"
        );
        let redis = FakeRedis::default();
        redis.script_loaded.set(true);
        assert_eq!(replies(round_trip(&mut group, &redis, &out)).len(), 1);
        group.next_batch().unwrap();
        assert_eq!(group.in_flight_ops(), 2);
    }

    #[test]
    fn a_batch_holds_at_most_its_bounds() {
        let s = store();
        let mut group = GroupCommit::default();
        for i in 0..100 {
            group.push(i, claim(&s, i as u8, FP, i), || 0);
        }
        group.next_batch().unwrap();
        assert_eq!(group.in_flight_ops(), MAX_BATCH_OPS);
        // A record larger than the byte bound still goes, alone.
        let mut group = GroupCommit::default();
        let big = StoredResponse {
            status: 200,
            body: vec![7; MAX_BATCH_BYTES],
            ..Default::default()
        };
        let held = Claim {
            slot: 0,
            epoch: 0,
            token: 1,
        };
        group.push(1, s.complete_op(&[1; 16], &FP, &held, big, 1000), || 0);
        group.push(2, claim(&s, 2, FP, 2), || 0);
        group.next_batch().unwrap();
        assert_eq!(group.in_flight_ops(), 1);
    }

    #[test]
    fn a_batch_without_answer_fails_each_operation_as_maybe_applied() {
        let s = store();
        let mut group = GroupCommit::default();
        group.push(1, claim(&s, 1, FP, 1), || 0);
        group.push(
            2,
            s.release_op(
                &[2; 16],
                &Claim {
                    slot: 0,
                    epoch: 0,
                    token: 2,
                },
            ),
            || 0,
        );
        group.next_batch().unwrap();
        let answers = replies(group.answered(None, b""));
        assert_eq!(answers.len(), 2);
        assert!(answers
            .iter()
            .all(|(_, r)| matches!(r, Err(StoreError::NoAnswer(_)))));
        assert!(!group.busy(), "the next batch may go");
        // A batch that cannot be sent at all fails each operation too.
        group.push(3, claim(&s, 3, FP, 3), || 0);
        group.next_batch().unwrap();
        let down = StoreError::Unavailable("http_call failed".into());
        assert_eq!(group.send_failed(&down), vec![(3, Err(down))]);
    }

    #[test]
    fn noscript_after_a_redis_restart_sends_the_batch_again_by_source_once() {
        let s = store();
        let redis = FakeRedis::default(); // restarted: no script cached
        let mut group = GroupCommit::default();
        group.push(1, claim(&s, 1, FP, 1), || 0);
        let by_sha = group.next_batch().unwrap();
        let again = match round_trip(&mut group, &redis, &by_sha) {
            Answered::Resend(request) => request,
            Answered::Replies(_) => panic!("NOSCRIPT must resend"),
        };
        assert!(again.path.starts_with("/EVAL/"), "by source");
        assert!(redis.data.borrow().is_empty(), "nothing ran on NOSCRIPT");
        assert_eq!(
            replies(round_trip(&mut group, &redis, &again)),
            vec![(1, Ok("claimed".into()))]
        );
        // Loaded now: the next batch goes by SHA and runs.
        group.push(2, claim(&s, 2, FP, 2), || 0);
        let next = group.next_batch().unwrap();
        assert_eq!(
            replies(round_trip(&mut group, &redis, &next)),
            vec![(2, Ok("claimed".into()))]
        );
        // A front end that answers NOSCRIPT even to the source is an error, not a loop.
        group.push(3, claim(&s, 3, FP, 3), || 0);
        group.next_batch().unwrap();
        let noscript = br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#;
        assert!(matches!(
            group.answered(Some(200), noscript),
            Answered::Resend(_)
        ));
        let answers = replies(group.answered(Some(200), noscript));
        assert!(matches!(answers[0].1, Err(StoreError::Unavailable(_))));
    }
}
