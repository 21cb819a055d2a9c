//! Recording a response as the key's outcome, or releasing the key so that
//! a retry runs again. The local store answers at once; the Redis store
//! later, and meanwhile the exchange is held: the response, or, in
//! forwarding mode, the answer to the client, which is sent once the store
//! has answered. If the store cannot be reached, the client still gets its
//! answer; the claim then lapses after its lock timeout.

use super::reply::{problem_reply, Reply};
use super::{Filter, Phase, Sent, Then, Verdict};
use crate::config::UnknownOutcome;
use crate::host::{Host, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::record::StoredResponse;
use crate::store::batch::OpReply;
use crate::store::{Held, StoreError, StoreStep, Write};

impl Filter {
    /// The streamed response is complete: record what was captured.
    pub(super) fn complete(&mut self, host: &impl Host) -> Verdict {
        let Phase::Forwarded {
            held,
            capture: Some(capture),
        } = std::mem::replace(&mut self.phase, Phase::Done)
        else {
            return Verdict::Continue;
        };
        self.write_complete(host, held, capture.into_record(), None)
    }

    /// Nobody can know whether the upstream acted: the exchange ended before
    /// the response completed, Envoy answered for an upstream that reset or
    /// timed out after the request was sent, or (forwarding mode) the call
    /// timed out. `unknown_outcome: record`: the `outcome-unknown` problem
    /// becomes the key's record, so its retries get that instead of running
    /// the operation again. `release-after-lock`: the claim stays until its
    /// lock timeout (409 meanwhile), then lapses. In forwarding mode
    /// (`answer_client`) the client is answered too.
    pub(super) fn outcome_unknown(
        &mut self,
        host: &impl Host,
        held: Held,
        answer_client: bool,
    ) -> Verdict {
        self.phase = Phase::Done;
        match self.cfg().unknown_outcome {
            UnknownOutcome::Record => {
                host.metric_add(Metric::OutcomesUnknown, 1);
                self.recording_unknown = true;
                let problem = Problem::outcome_unknown();
                let reply = answer_client.then(|| problem_reply(&problem));
                self.write_complete(host, held, problem.as_record(), reply)
            }
            UnknownOutcome::ReleaseAfterLock => {
                // Not renewed any more: the claim lapses at its lock timeout.
                self.stop_renewing();
                host.log(
                    Level::Debug,
                    "the upstream's outcome is unknown; claim kept until its lock timeout",
                );
                self.outcome(host, "claim-kept");
                if answer_client {
                    self.send_reply(host, problem_reply(&Problem::upstream_unavailable()))
                } else {
                    Verdict::Continue
                }
            }
        }
    }

    /// Counts a write's result and writes the request's outcome: a recorded
    /// `outcome-unknown` problem says so rather than "stored".
    fn write_outcome(&self, host: &impl Host, write: Write, result: &Result<bool, StoreError>) {
        let outcome = count_write(host, write, result);
        if self.recording_unknown && matches!(result, Ok(true)) {
            self.outcome(host, "outcome-unknown");
        } else {
            self.outcome(host, outcome);
        }
    }

    /// The streamed response is not to be recorded: free the key.
    pub(super) fn release(&mut self, host: &impl Host, held: Held) -> Verdict {
        self.write_release(host, held, None)
    }

    pub(super) fn write_complete(
        &mut self,
        host: &impl Host,
        held: Held,
        record: StoredResponse,
        reply: Option<Reply>,
    ) -> Verdict {
        if record.body_omitted {
            // Larger than what is captured: max_response_body_bytes, or
            // (local store) what a bucket's share of max_bytes can hold.
            host.metric_add(Metric::BodiesOmitted, 1);
        }
        let ctx = self.ctx.clone();
        let step = ctx.store.complete(host, &held, record, ctx.config.ttl_ms);
        self.write(host, Write::Complete, step, reply)
    }

    pub(super) fn write_release(
        &mut self,
        host: &impl Host,
        held: Held,
        reply: Option<Reply>,
    ) -> Verdict {
        let ctx = self.ctx.clone();
        let step = ctx.store.release(host, &held);
        self.write(host, Write::Release, step, reply)
    }

    /// The claim is renewed until the write's answer: a record on its way
    /// to Redis may wait for the batch in flight and then for its own.
    fn write(
        &mut self,
        host: &impl Host,
        write: Write,
        step: StoreStep<bool, Write>,
        reply: Option<Reply>,
    ) -> Verdict {
        self.phase = Phase::Done;
        match self.send(host, step) {
            Sent::Done(result) => {
                self.let_go_all();
                self.stop_renewing();
                self.write_outcome(host, write, &result);
                match reply {
                    Some(reply) => self.send_reply(host, reply),
                    None => Verdict::Continue,
                }
            }
            Sent::Waiting(call, write) => self.wait(call, Then::Write { write, reply }),
        }
    }

    /// The store's answer to a record or release: the held response (or
    /// forwarding mode's answer) goes on.
    pub(super) fn write_answered(
        &mut self,
        host: &impl Host,
        write: Write,
        reply: Option<Reply>,
        answer: OpReply,
    ) {
        let ctx = self.ctx.clone();
        let result = ctx.store.write_answered(write, answer);
        self.write_answered_with(host, write, result, reply);
    }

    /// A write's result arrived in a call's callback: the held response (or
    /// forwarding mode's answer) goes on, unless the client has gone.
    pub(super) fn write_answered_with(
        &mut self,
        host: &impl Host,
        write: Write,
        result: Result<bool, StoreError>,
        reply: Option<Reply>,
    ) {
        self.let_go_all();
        self.stop_renewing();
        self.write_outcome(host, write, &result);
        match reply {
            Some(reply) => {
                self.send_reply(host, reply);
            }
            None if self.client_gone => {}
            None => {
                if let Err(e) = host.resume_response() {
                    host.log(Level::Error, &format!("could not resume the response: {e}"));
                }
            }
        }
    }
}

/// Counts a write's result and names the request's outcome.
fn count_write(host: &impl Host, write: Write, result: &Result<bool, StoreError>) -> &'static str {
    match (write, result) {
        (Write::Complete, Ok(true)) => {
            host.metric_add(Metric::Stored, 1);
            "stored"
        }
        (Write::Release, Ok(true)) => {
            host.metric_add(Metric::Released, 1);
            "released"
        }
        (Write::Complete, Ok(false)) => {
            host.log(Level::Warn, "the claim expired before the response completed; response not recorded (raise lock_timeout_seconds above the upstream's response time)");
            host.metric_add(Metric::ClaimsLost, 1);
            "claim-lost"
        }
        (Write::Release, Ok(false)) => {
            host.metric_add(Metric::ClaimsLost, 1);
            "claim-lost"
        }
        (_, Err(e)) => {
            let what = if write == Write::Complete {
                "recording the response"
            } else {
                "releasing the key"
            };
            host.log(Level::Error, &format!("{what} failed: {e}"));
            host.metric_add(Metric::StoreErrors, 1);
            // Recording failed: the claim lapses after its lock timeout, or,
            // where the store had no room for the record (Redis full, a
            // local share reserved by others) or the local bucket's writes
            // kept losing to other workers', is held until the TTL.
            "not-recorded"
        }
    }
}
