//! The per-request filter: proxy callbacks in, decisions out. It knows the
//! proxy only through [`Host`], so every path here runs in unit tests.
//!
//! A protected request goes through these phases:
//! ```text
//! headers ──no key / other method──▶ Passthrough
//!    │ key parsed, scope + fingerprint started
//!    ▼
//! Buffering (body hashed chunk by chunk, held back from the upstream)
//!    │ end of request: one atomic claim in the store
//!    ├──▶ Answered (400 / 409 / 413 / 422 / 503, or the replay)
//!    ▼
//! Forwarded (we own the claim) ──response──▶ record, or release on 5xx
//! ```
//! Whenever the store (Redis) or the upstream (forwarding mode) has a call
//! out, the request waits in one phase, `Phase::Waiting`, which carries
//! what the answer is for (`Then`); `on_call_response` checks the call
//! once and hands the answer on.
//!
//! Where each job lives:
//! * `inspect`: is the request protected; its key digest and fingerprint
//!   (a pure function of headers and configuration);
//! * `buffer`: holding the request while its body is hashed;
//! * `claim`: the claim, its answer, and cancelling a claim that timed out;
//! * `capture`: which responses are recorded ([`should_record`]) and their
//!   capture, shared by the streaming path and forwarding mode;
//! * `write`: recording the response, or releasing the key;
//! * `forward`: forwarding mode's upstream call;
//! * `reply`: answers the filter gives itself, and each request's outcome;
//! * `operations`: an instance configured as the key-operations endpoint
//!   answers every request there, and protects nothing.
//!
//! The stores (local, Redis, the replay cache) are behind
//! [`crate::store::Store`], whose every operation finishes now or asks for
//! one call; the platform's abilities are [`crate::config::Platform`]'s.

mod buffer;
mod call_answer;
mod capture;
mod claim;
mod forward;
mod inspect;
mod operations;
mod reply;
mod write;

#[cfg(test)]
mod tests;

pub use crate::host::CallResponse;
pub use capture::should_record;
pub use inspect::{inspect, Inspection, Protected};

use crate::config::Config;
use crate::fingerprint::{Digest16, Fingerprinter};
use crate::host::{Host, HostError};
use crate::in_flight::InFlightBytes;
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::store::batch::{single_answer, OpReply, RedisOp};
use crate::store::renewals::Renewals;
use crate::store::{Held, PendingClaim, Store, StoreError, StoreStep, Write};
use capture::Capture;
use forward::ForwardRequest;
use reply::Reply;
use std::rc::Rc;

/// What the proxy should do after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// Hold the request until its body has been seen. Envoy: pause (the
    /// request is buffered). APISIX: continue; the body callback comes
    /// because the filter set `wasm_process_req_body`, and a pause without a
    /// pending call would stall APISIX's driver.
    AwaitBody,
    /// Hold the request (and buffer its body) or stop after a local reply.
    Pause,
}

/// Per-plugin state shared by every request of one VM.
#[derive(Debug)]
pub struct FilterContext {
    pub config: Config,
    pub store: Store,
    /// The claims this VM's requests hold, renewed on the tick.
    pub renewals: Renewals,
    /// The bodies this VM's running requests hold (one count per VM,
    /// against this configuration's `max_in_flight_bytes`).
    pub in_flight: Rc<InFlightBytes>,
}

impl FilterContext {
    pub fn new(config: Config) -> FilterContext {
        FilterContext {
            store: Store::new(&config.store),
            in_flight: InFlightBytes::of_this_vm(),
            config,
            renewals: Renewals::default(),
        }
    }
}

enum Phase {
    Start,
    Passthrough,
    Buffering {
        digest: Digest16,
        fingerprint: Fingerprinter,
        hashed: usize,
    },
    /// We own the claim; the response streams to the client and is
    /// captured when it is to be recorded.
    Forwarded {
        held: Held,
        capture: Option<Capture>,
    },
    /// An HTTP call is out; the exchange is held until it answers.
    Waiting {
        call: u32,
        then: Then,
    },
    Answered,
    Done,
}

/// What a call's answer is for.
enum Then {
    /// The claim (Redis); the request is held.
    Claim(PendingClaim),
    /// The store is recording or releasing (Redis); the response's last
    /// callback is held until it answers, so that the client is told only
    /// what was recorded. (On Envoy the answer is handled even if the
    /// client leaves meanwhile: the worker owns the call.)
    Write {
        write: Write,
        /// Forwarding mode: the answer to send once the store has answered.
        reply: Option<Reply>,
    },
    /// A platform that answers after a cancel (store calls chained within
    /// the request): a timed-out claim is being cancelled; the 503 goes out
    /// once the store has answered.
    Cancel,
    /// Forwarding mode: the upstream has had the request since `sent_ms`.
    Upstream { held: Held, sent_ms: u64 },
}

/// A store step once its call, if it has one, has been sent.
enum Sent<T, P> {
    /// The result, now (a call that could not be sent fails the operation).
    Done(Result<T, StoreError>),
    /// The call that was sent, and what its answer needs.
    Waiting(u32, P),
}

/// Takes `n` bytes from the VM's count for a request that holds `held` so
/// far, if they stay within `limit`.
fn admit(budget: &InFlightBytes, limit: u64, held: &mut u64, n: usize) -> bool {
    let admitted = budget.try_hold(n as u64, limit);
    if admitted {
        *held += n as u64;
    }
    admitted
}

pub struct Filter {
    ctx: Rc<FilterContext>,
    phase: Phase,
    generated_key: Option<String>,
    forward_request: Option<ForwardRequest>,
    /// The exchange ended while a call was out. On a host whose calls
    /// outlive their stream, the answer still comes: the filter records,
    /// releases or cancels as it requires, and answers no one.
    client_gone: bool,
    /// The token of the claim this request has the tick renew, if any.
    renewing: Option<u64>,
    /// The record being written is the `outcome-unknown` problem.
    recording_unknown: bool,
    /// The store operation out, where it went alone by SHA-1 (APISIX): sent
    /// again by source if Redis answers `NOSCRIPT`.
    noscript_resend: Option<RedisOp>,
    /// Bytes of bodies this request holds, counted in `ctx.in_flight`
    /// until it lets them go (`let_go`), or ends.
    held_bytes: u64,
}

impl Drop for Filter {
    fn drop(&mut self) {
        self.stop_renewing();
        self.let_go_all();
    }
}

impl Filter {
    pub fn new(ctx: Rc<FilterContext>) -> Filter {
        Filter {
            ctx,
            phase: Phase::Start,
            generated_key: None,
            forward_request: None,
            client_gone: false,
            renewing: None,
            recording_unknown: false,
            noscript_resend: None,
            held_bytes: 0,
        }
    }

    /// Holds `n` more bytes of bodies if they fit in the VM's count.
    fn try_hold(&mut self, n: usize) -> bool {
        let limit = self.ctx.config.max_in_flight_bytes;
        admit(&self.ctx.in_flight, limit, &mut self.held_bytes, n)
    }

    /// Counts `n` bytes of a body already in the VM.
    fn hold(&mut self, n: usize) {
        self.ctx.in_flight.hold(n as u64);
        self.held_bytes += n as u64;
    }

    /// The request holds no body any more (it is answered, or its record
    /// written): its bytes no longer count.
    fn let_go_all(&mut self) {
        self.forward_request = None;
        self.let_go(self.held_bytes as usize);
    }

    /// Lets go of `n` bytes this request held.
    fn let_go(&mut self, n: usize) {
        let n = (n as u64).min(self.held_bytes);
        self.ctx.in_flight.release(n);
        self.held_bytes -= n;
    }

    /// The request holds `held` from now on: where the platform ticks, the
    /// tick renews it until the request records, releases or abandons it.
    /// `set_ms`: when the claim was sent (its deadline is counted from then).
    fn start_renewing(&mut self, held: Held, set_ms: u64) {
        if self.cfg().platform.has_tick() {
            self.ctx.renewals.hold(held, set_ms);
            self.renewing = Some(held.claim.token);
        }
    }

    /// The claim is recorded, released, or left to lapse.
    fn stop_renewing(&mut self) {
        if let Some(token) = self.renewing.take() {
            self.ctx.renewals.forget(token);
        }
    }

    fn cfg(&self) -> &Config {
        &self.ctx.config
    }

    /// The one path of every store operation: send the call if it asks
    /// for one; otherwise (or if it cannot be sent) its result is here.
    fn send<T, P>(&mut self, host: &impl Host, step: StoreStep<T, P>) -> Sent<T, P> {
        match step {
            StoreStep::Done(result) => Sent::Done(result),
            StoreStep::Call(op, pending) => match self.send_op(host, op) {
                Ok(call) => Sent::Waiting(call, pending),
                Err(e) => Sent::Done(Err(e)),
            },
        }
    }

    /// Sends one store operation, keeping it where it may have to go again.
    fn send_op(&mut self, host: &impl Host, op: RedisOp) -> Result<u32, StoreError> {
        let sent = self.ctx.store.send(host, op)?;
        self.noscript_resend = sent.by_sha;
        Ok(sent.call)
    }

    /// Holds the exchange until call `call` answers; `then` says what for.
    fn wait(&mut self, call: u32, then: Then) -> Verdict {
        self.phase = Phase::Waiting { call, then };
        Verdict::Pause
    }

    pub fn on_request_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        let headers = match host.request_headers() {
            Ok(h) => h,
            Err(e) if e.is_no_host() => return self.without_host(host),
            Err(e) => return self.host_failure(host, e),
        };
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
        if let Some(ops) = &cfg.operations {
            return self.operate(host, &headers, ops);
        }
        let protected = match inspect(cfg, &headers, || inspect::uuid_v4(host)) {
            Inspection::Pass => {
                self.phase = Phase::Passthrough;
                return Verdict::Continue;
            }
            Inspection::Unkeyed => return self.unkeyed(host),
            Inspection::Refuse(problem) => {
                return self.answer(host, &problem, Some(Metric::InvalidKey))
            }
            Inspection::Protect(p) => p,
        };
        self.protect(host, protected, end_of_stream)
    }

    /// A protected method without a key, where keys are optional: it goes
    /// on unprotected.
    fn unkeyed(&mut self, host: &impl Host) -> Verdict {
        host.metric_add(Metric::Unkeyed, 1);
        self.outcome(host, "unkeyed");
        self.phase = Phase::Passthrough;
        Verdict::Continue
    }

    /// A request whose headers the host cannot list (no `Host`: see
    /// [`HostError::no_host`]). Single headers can be read: a method not
    /// protected goes on, as it would without the filter (health checks
    /// often speak HTTP/1.0), and so does a protected one without a key
    /// where keys are optional; a keyed one is refused, since its payload's
    /// headers cannot all be read.
    fn without_host(&mut self, host: &impl Host) -> Verdict {
        let cfg = self.ctx.clone();
        let cfg = &cfg.config;
        let method = match host.request_header(":method") {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => return self.host_failure(host, e),
        };
        if !std::str::from_utf8(&method).is_ok_and(|m| cfg.protects(m)) {
            self.phase = Phase::Passthrough;
            return Verdict::Continue;
        }
        let keyless = match host.request_header(&cfg.header) {
            Ok(key) => key.is_none(),
            Err(e) => return self.host_failure(host, e),
        };
        if keyless && !cfg.required && !cfg.generate_missing {
            return self.unkeyed(host);
        }
        self.answer(host, &Problem::host_required(), None)
    }

    /// `body_size` is everything buffered so far; only the new bytes are read.
    pub fn on_request_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        self.buffer(host, body_size, end_of_stream)
    }

    /// Trailers end the request when the body did not.
    pub fn on_request_trailers(&mut self, host: &impl Host) -> Verdict {
        match self.phase {
            Phase::Buffering { .. } => self.finish_request(host),
            Phase::Answered => Verdict::Pause,
            _ => Verdict::Continue,
        }
    }

    pub fn on_response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        self.response_started(host, end_of_stream)
    }

    /// Chunks are copied as they stream to the client; nothing is held back.
    pub fn on_response_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        self.response_chunk(host, body_size, end_of_stream)
    }

    pub fn on_response_trailers(&mut self, host: &impl Host) -> Verdict {
        if self.writing() {
            return Verdict::Pause;
        }
        if matches!(
            self.phase,
            Phase::Forwarded {
                capture: Some(_),
                ..
            }
        ) {
            return self.complete(host);
        }
        Verdict::Continue
    }

    /// A record or release is out (the response is held until it answers).
    fn writing(&self) -> bool {
        matches!(
            self.phase,
            Phase::Waiting {
                then: Then::Write { .. },
                ..
            }
        )
    }

    /// The answer to an HTTP call this request made: the upstream's in
    /// forwarding mode, or a store operation's that went alone.
    pub fn on_call_response(&mut self, host: &impl Host, call: u32, response: &CallResponse) {
        let Some(then) = self.take_waiting(call) else {
            return;
        };
        match then {
            Then::Upstream { held, sent_ms } => {
                self.upstream_answered(host, held, sent_ms, response);
            }
            then => match single_answer(response.status, &response.body) {
                Some(reply) => {
                    self.noscript_resend = None;
                    self.store_replied(host, then, reply);
                }
                None => self.resend_by_source(host, then),
            },
        }
    }

    /// Redis answered `NOSCRIPT` to an operation sent alone by SHA-1 (it
    /// restarted, or its scripts were flushed): nothing ran, so the same
    /// operation goes again, once, with the script's source.
    fn resend_by_source(&mut self, host: &impl Host, then: Then) {
        let reply = match self.noscript_resend.take() {
            Some(op) => match self.ctx.store.send_by_source(host, &op) {
                Ok(call) => {
                    self.wait(call, then);
                    return;
                }
                Err(e) => Err(e),
            },
            None => Err(StoreError::Unavailable(
                "redis: NOSCRIPT for a script sent by source".to_string(),
            )),
        };
        self.store_replied(host, then, reply);
    }

    /// The reply to a store operation this request sent in a batch.
    pub fn on_store_reply(&mut self, host: &impl Host, call: u32, reply: OpReply) {
        if let Some(then) = self.take_waiting(call) {
            self.store_replied(host, then, reply);
        }
    }

    fn store_replied(&mut self, host: &impl Host, then: Then, reply: OpReply) {
        match then {
            Then::Claim(pending) => self.claim_answered(host, &pending, reply),
            Then::Cancel => self.cancel_answered(host, reply),
            Then::Write {
                write,
                reply: answer,
            } => {
                self.write_answered(host, write, answer, reply);
            }
            // Never: upstream calls are not store operations. As no answer.
            Then::Upstream { held, sent_ms } => {
                self.upstream_answered(host, held, sent_ms, &CallResponse::default());
            }
        }
    }

    /// Convenience for a store answer without headers (tests).
    #[cfg(test)]
    pub fn on_store_response(
        &mut self,
        host: &impl Host,
        call: u32,
        status: Option<u16>,
        body: &[u8],
    ) {
        let response = CallResponse {
            status,
            headers: Vec::new(),
            body: body.to_vec(),
        };
        self.on_call_response(host, call, &response);
    }

    /// The exchange ended. A claim still held here means the response never
    /// completed (the client left, so Envoy reset the upstream request, or
    /// the upstream reset mid-body): the upstream may have acted. Per
    /// `unknown_outcome`, the key records the `outcome-unknown` problem for
    /// its TTL, or keeps the claim until its lock timeout (a retry gets 409
    /// until then, and runs after).
    ///
    /// A call still out keeps its phase: where the host routes its answer to
    /// a filter whose stream has gone, the answer is still applied.
    pub fn on_done(&mut self, host: &impl Host) {
        if let Phase::Forwarded { held, .. } = self.phase {
            self.client_gone = true;
            self.outcome_unknown(host, held, false);
        }
        if matches!(self.phase, Phase::Waiting { .. }) {
            self.client_gone = true;
            return;
        }
        self.phase = Phase::Done;
    }

    /// What the answer to `call` is for, if this request waits for it; the
    /// phase is left as it was for a call it no longer waits for.
    fn take_waiting(&mut self, call: u32) -> Option<Then> {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Waiting {
                call: expected,
                then,
            } if expected == call => Some(then),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Whether a call is still out (its answer would be applied).
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. })
    }

    /// A call this request made could not be sent after all (a host that
    /// sends calls after the callback that made them): the same decision
    /// as when sending fails at once.
    pub fn on_call_failed(&mut self, host: &impl Host, call: u32, error: HostError) {
        let Some(then) = self.take_waiting(call) else {
            return;
        };
        let e = StoreError::Unavailable(error.to_string());
        match then {
            Then::Claim(_) => {
                let verdict = self.store_failed(host, &e);
                self.resume_request_if(host, verdict);
            }
            Then::Write { write, reply } => self.write_answered_with(host, write, Err(e), reply),
            Then::Cancel => self.cancel_answered(host, Err(e)),
            Then::Upstream { held, .. } => {
                self.forward_failed(host, &error);
                let verdict = self.upstream_not_reached(host, held);
                self.resume_request_if(host, verdict);
            }
        }
    }
}
