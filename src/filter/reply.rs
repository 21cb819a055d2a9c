//! Answers the filter gives itself (refusals, replays, and in forwarding
//! mode the upstream's answer), and the outcome each protected request
//! leaves for access logs.

use super::{Filter, Phase, Verdict};
use crate::host::{HeaderList, Host, HostError, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::record::StoredResponse;

/// An answer the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: HeaderList,
    pub(super) body: Vec<u8>,
}

pub(super) fn problem_reply(problem: &Problem) -> Reply {
    Reply {
        status: problem.status,
        headers: problem.headers(),
        body: problem.body(),
    }
}

/// A recorded response, as a retry gets it.
pub(super) fn replay(mut response: StoredResponse) -> Reply {
    Reply {
        status: response.status,
        headers: response.take_replay_headers(),
        body: response.body,
    }
}

impl Filter {
    /// Refuses the request with `problem`, counted under `metric`.
    pub(super) fn answer(
        &mut self,
        host: &impl Host,
        problem: &Problem,
        metric: Option<Metric>,
    ) -> Verdict {
        if let Some(m) = metric {
            host.metric_add(m, 1);
        }
        self.outcome(host, problem.slug());
        self.send_reply(host, problem_reply(problem))
    }

    /// Writes what became of a protected request where the operator asked
    /// for it (`outcome_property`: Envoy filter state, for access logs).
    /// Best effort: a proxy that refuses the property changes nothing else.
    pub(super) fn outcome(&self, host: &impl Host, outcome: &str) {
        if let Some(name) = &self.cfg().outcome_property {
            if let Err(e) = host.set_property(name, outcome.as_bytes()) {
                host.log(Level::Debug, &format!("outcome_property not set: {e}"));
            }
        }
    }

    /// Every answer the filter gives itself goes out here, with the key the
    /// gateway assigned, if it assigned one.
    pub(super) fn send_reply(&mut self, host: &impl Host, mut reply: Reply) -> Verdict {
        // The host takes the answer; nothing of the request is held after.
        self.let_go_all();
        if let Some(k) = &self.generated_key {
            reply
                .headers
                .push((self.cfg().header.clone(), k.clone().into_bytes()));
        }
        if self.client_gone {
            self.phase = Phase::Answered;
            return Verdict::Pause;
        }
        if let Err(e) = host.send_response(reply.status, &reply.headers, &reply.body) {
            host.log(
                Level::Error,
                &format!("could not send the {} answer: {e}", reply.status),
            );
        }
        self.phase = Phase::Answered;
        Verdict::Pause
    }

    /// A host call failed before anything reached the upstream: fail closed.
    pub(super) fn host_failure(&mut self, host: &impl Host, e: HostError) -> Verdict {
        host.log(Level::Error, &format!("{e}; request refused"));
        self.answer(
            host,
            &Problem::internal("The idempotency filter could not read the request."),
            None,
        )
    }

    /// A decision reached in a call's callback: the request was paused for
    /// it, and goes on only if the decision is to continue.
    pub(super) fn resume_request_if(&self, host: &impl Host, verdict: Verdict) {
        if verdict == Verdict::Continue && !self.client_gone {
            if let Err(e) = host.resume_request() {
                host.log(Level::Error, &format!("could not resume the request: {e}"));
            }
        }
    }
}
