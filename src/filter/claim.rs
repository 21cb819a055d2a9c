//! The claim: one atomic step in the store that decides a protected
//! request (run it, replay, 409, 422, or refuse), its answer when the store
//! is remote, and the cancel of a claim whose answer never came.
//!
//! ```text
//! claim ──Done──────────────────────────▶ claimed
//!   └──Call──▶ Waiting(Claim) ──answer──▶ claimed
//!                 └──no answer / 504──▶ cancel ──▶ 503 (at once, or after
//!                                       the cancel's answer where the
//!                                       platform answers after cancel)
//! ```

use super::reply::replay;
use super::{Filter, Phase, Sent, Then, Verdict};
use crate::fingerprint::Digest16;
use crate::host::{Host, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::store::batch::OpReply;
use crate::store::{ClaimOutcome, Claimed, Held, PendingClaim, StoreError, StoreStep};

impl Filter {
    /// The request is complete (its body hashed): claim its key.
    pub(super) fn claim(
        &mut self,
        host: &impl Host,
        digest: Digest16,
        fingerprint: Digest16,
    ) -> Verdict {
        let ctx = self.ctx.clone();
        // Zero means "no owner" in a record, so a token is never zero.
        let token = host.random_u64() | 1;
        // The clock is a host call: read only where something uses it (the
        // local store, the replay cache, the tick's renewals).
        let now_ms = if ctx.config.platform.has_tick() || ctx.store.claim_uses_clock() {
            host.now_ms()
        } else {
            0
        };
        let step = ctx.store.claim(
            host,
            &digest,
            &fingerprint,
            token,
            ctx.config.lock_timeout_ms,
            now_ms,
        );
        match self.send(host, step) {
            Sent::Done(result) => self.claimed(host, result, digest, fingerprint, now_ms),
            Sent::Waiting(call, pending) => self.wait(call, Then::Claim(pending)),
        }
    }

    /// The store's answer to the claim.
    pub(super) fn claim_answered(
        &mut self,
        host: &impl Host,
        pending: &PendingClaim,
        reply: OpReply,
    ) {
        let ctx = self.ctx.clone();
        // Redis may still run a claim that got no answer, or may have run one
        // answered 503 after sending (`batch::answer`). Any other failure (a
        // connection that never opened, Webdis's other errors) is taken as
        // not having reached Redis; where it did after all (a reply that does
        // not parse), the claim holds its key until the lock times out: too
        // long, never twice (README, "How the Redis store works").
        let maybe_applied = matches!(reply, Err(StoreError::NoAnswer(_)));
        let result = ctx.store.claim_answered(host, pending, reply);
        if let (Err(e), true) = (&result, maybe_applied) {
            let verdict = self.cancel_timed_out_claim(host, e, &pending.digest, pending.token);
            self.resume_request_if(host, verdict);
            return;
        }
        let verdict = self.claimed(
            host,
            result,
            pending.digest,
            pending.fingerprint,
            pending.sent_ms,
        );
        self.resume_request_if(host, verdict);
    }

    /// `claimed_ms`: when the claim was made (local) or sent (Redis).
    fn claimed(
        &mut self,
        host: &impl Host,
        result: Result<Claimed, StoreError>,
        digest: Digest16,
        fingerprint: Digest16,
        claimed_ms: u64,
    ) -> Verdict {
        match result {
            Ok((ClaimOutcome::Claimed(claim), effects)) => {
                if effects.new_entry {
                    host.metric_add(Metric::Entries, 1);
                }
                if effects.evicted {
                    host.metric_add(Metric::Evicted, 1);
                }
                if effects.expired {
                    host.metric_add(Metric::Expired, 1);
                }
                let held = Held {
                    claim,
                    digest,
                    fingerprint,
                };
                // Nobody is left to run the request for: free the key.
                if self.client_gone {
                    return self.release(host, held);
                }
                self.start_renewing(held, claimed_ms);
                if self.ctx.config.forward.is_some() {
                    return self.forward_upstream(host, held);
                }
                self.phase = Phase::Forwarded {
                    held,
                    capture: None,
                };
                Verdict::Continue
            }
            Ok((ClaimOutcome::InFlight, _)) => {
                self.answer(host, &Problem::in_flight(), Some(Metric::Conflicts))
            }
            Ok((ClaimOutcome::Mismatch, _)) => {
                self.answer(host, &Problem::mismatch(), Some(Metric::Mismatches))
            }
            Ok((ClaimOutcome::Full, _)) => {
                self.answer(host, &Problem::store_full(), Some(Metric::StoreFull))
            }
            Ok((ClaimOutcome::Replay(response), _)) => {
                host.metric_add(Metric::Replays, 1);
                self.outcome(host, "replayed");
                self.send_reply(host, replay(response))
            }
            Err(e) => self.store_failed(host, &e),
        }
    }

    /// The store could not decide. Fail closed (503), or, for a store
    /// configured with `on_unavailable: allow`, forward unprotected.
    pub(super) fn store_failed(&mut self, host: &impl Host, e: &StoreError) -> Verdict {
        let name = self.ctx.store.name();
        host.metric_add(Metric::StoreErrors, 1);
        if self.ctx.store.fails_open() {
            host.log(
                Level::Warn,
                &format!("{name} store: {e}; forwarded unprotected (on_unavailable: allow)"),
            );
            host.metric_add(Metric::StoreBypassed, 1);
            self.outcome(host, "store-bypassed");
            self.phase = Phase::Passthrough;
            return Verdict::Continue;
        }
        host.log(Level::Error, &format!("{name} store: {e}; request refused"));
        self.answer(host, &Problem::store_unavailable(name), None)
    }

    /// The claim call timed out: the request is refused (or, with
    /// `on_unavailable: allow`, forwarded), and Redis may still apply the
    /// claim once it catches up, which would hold the key for the whole lock
    /// timeout (409s) although the upstream never saw the request. Unless
    /// the request goes on unprotected, the claim is cancelled.
    ///
    /// On Envoy calls outlive the request, so the 503 goes out at once and
    /// the cancel completes on its own (nothing waits for its answer;
    /// `claims_cancelled` counts cancels sent). A platform whose calls run
    /// only within the request answers after the cancel has its answer.
    fn cancel_timed_out_claim(
        &mut self,
        host: &impl Host,
        e: &StoreError,
        digest: &Digest16,
        token: u64,
    ) -> Verdict {
        let ctx = self.ctx.clone();
        // Forwarded unprotected: a claim that lands late at least turns a
        // quick retry into a 409 rather than a second run.
        if ctx.store.fails_open() {
            return self.store_failed(host, e);
        }
        let op = match ctx.store.cancel(digest, token, ctx.config.lock_timeout_ms) {
            StoreStep::Call(op, ()) => op,
            // Nothing to cancel.
            StoreStep::Done(_) => return self.store_failed(host, e),
        };
        let call = match self.send_op(host, op) {
            Ok(call) => call,
            Err(cancel_error) => {
                host.log(
                    Level::Warn,
                    &format!("could not cancel the timed-out claim: {cancel_error}"),
                );
                return self.store_failed(host, e);
            }
        };
        host.metric_add(Metric::ClaimsCancelled, 1);
        if !ctx.config.platform.answers_after_cancel() {
            return self.store_failed(host, e);
        }
        // Counted and logged now, as store_failed would; answered later.
        host.metric_add(Metric::StoreErrors, 1);
        host.log(
            Level::Error,
            &format!("{} store: {e}; request refused", ctx.store.name()),
        );
        self.wait(call, Then::Cancel)
    }

    /// The cancel answered (or did not): the refusal goes out now.
    pub(super) fn cancel_answered(&mut self, host: &impl Host, reply: OpReply) {
        let ctx = self.ctx.clone();
        // A failure is logged; the claim, if it landed, lapses after its
        // lock timeout.
        let _ = ctx.store.cancel_answered(host, reply);
        self.answer(host, &Problem::store_unavailable(ctx.store.name()), None);
    }
}
