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
//! out, the request waits in one phase, [`Phase::Waiting`], which carries
//! what the answer is for ([`Then`]); `on_call_response` checks the call
//! once and hands the answer on.
//!
//! Where each job lives: `inspect` (is the request protected, its digest and
//! fingerprint), `claim` (the claim, its answer, cancelling a timed-out one),
//! `capture` (what of a response is recorded, for streaming and forwarding
//! alike), `write` (recording or releasing the key), `forward` (forwarding
//! mode's upstream call), `reply` (answers the filter gives itself, and the
//! outcome of each protected request). The stores are behind
//! [`crate::store::Store`].

mod capture;
mod claim;
mod forward;
mod inspect;
mod reply;
mod write;

#[cfg(test)]
mod tests;

pub use crate::host::CallResponse;
pub use capture::should_record;
pub use inspect::{inspect, Inspection, Protected};

use crate::config::Config;
use crate::fingerprint::{Digest16, Fingerprinter};
use crate::host::{Host, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::store::{Held, PendingClaim, PendingWrite, Store, StoreError, StoreStep};
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
}

impl FilterContext {
    pub fn new(config: Config) -> FilterContext {
        FilterContext {
            store: Store::new(&config.store),
            config,
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
    /// callback is held until it answers. Envoy runs the call on the root
    /// context, so the write itself would complete anyway, but once the
    /// stream has ended its answer has no context to reach: holding keeps
    /// the counters right and tells the client only what was recorded.
    Write {
        pending: PendingWrite,
        /// Forwarding mode: the answer to send once the store has answered.
        reply: Option<Reply>,
    },
    /// A platform that answers after a cancel (store calls chained within
    /// the request): a timed-out claim is being cancelled; the 503 goes out
    /// once the store has answered.
    Cancel,
    /// Forwarding mode: the upstream has the request.
    Upstream(Held),
}

/// A store step once its call, if it has one, has been sent.
enum Sent<T, P> {
    /// The result, now (a call that could not be sent fails the operation).
    Done(Result<T, StoreError>),
    /// The call that was sent, and what its answer needs.
    Waiting(u32, P),
}

pub struct Filter {
    ctx: Rc<FilterContext>,
    phase: Phase,
    generated_key: Option<String>,
    forward_request: Option<ForwardRequest>,
}

impl Filter {
    pub fn new(ctx: Rc<FilterContext>) -> Filter {
        Filter {
            ctx,
            phase: Phase::Start,
            generated_key: None,
            forward_request: None,
        }
    }

    fn cfg(&self) -> &Config {
        &self.ctx.config
    }

    /// The one path of every store operation: send the call if it asks
    /// for one; otherwise (or if it cannot be sent) its result is here.
    fn send<T, P>(&self, host: &impl Host, step: StoreStep<T, P>) -> Sent<T, P> {
        match step {
            StoreStep::Done(result) => Sent::Done(result),
            StoreStep::Call(request, pending) => match self.ctx.store.send(host, &request) {
                Ok(call) => Sent::Waiting(call, pending),
                Err(e) => Sent::Done(Err(e)),
            },
        }
    }

    /// Holds the exchange until call `call` answers; `then` says what for.
    fn wait(&mut self, call: u32, then: Then) -> Verdict {
        self.phase = Phase::Waiting { call, then };
        Verdict::Pause
    }

    pub fn on_request_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        let headers = match host.request_headers() {
            Ok(h) => h,
            Err(e) => return self.host_failure(host, e),
        };
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
        let protected = match inspect(cfg, &headers, || inspect::uuid_v4(host)) {
            Inspection::Pass => {
                self.phase = Phase::Passthrough;
                return Verdict::Continue;
            }
            Inspection::Unkeyed => {
                host.metric_add(Metric::Unkeyed, 1);
                self.outcome(host, "unkeyed");
                self.phase = Phase::Passthrough;
                return Verdict::Continue;
            }
            Inspection::Refuse(problem) => {
                return self.answer(host, &problem, Some(Metric::InvalidKey))
            }
            Inspection::Protect(p) => p,
        };
        if let Some(k) = protected.generated_key {
            if let Err(e) = host.set_request_header(&cfg.header, &k) {
                return self.host_failure(host, e);
            }
            self.generated_key = Some(k);
        }
        host.metric_add(Metric::Protected, 1);
        if protected.declared_too_large {
            return self.answer(
                host,
                &Problem::too_large(cfg.max_request_body_bytes),
                Some(Metric::TooLarge),
            );
        }
        self.forward_request = protected.forward;
        let expects_body = !cfg.platform.headers_end_of_stream_is_final() || !end_of_stream;
        if !expects_body {
            return self.claim(host, protected.digest, protected.fingerprint.finish());
        }
        if cfg.platform.solicits_body() {
            if let Err(e) = host.set_property("wasm_process_req_body", b"true") {
                return self.host_failure(host, e);
            }
        }
        self.phase = Phase::Buffering {
            digest: protected.digest,
            fingerprint: protected.fingerprint,
            hashed: 0,
        };
        Verdict::AwaitBody
    }

    /// `body_size` is everything buffered so far; only the new bytes are read.
    pub fn on_request_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        let limit = self.cfg().max_request_body_bytes;
        let Phase::Buffering {
            fingerprint,
            hashed,
            ..
        } = &mut self.phase
        else {
            return match self.phase {
                Phase::Answered => Verdict::Pause,
                _ => Verdict::Continue,
            };
        };
        if body_size as u64 > limit {
            return self.answer(host, &Problem::too_large(limit), Some(Metric::TooLarge));
        }
        if body_size > *hashed {
            match host.request_body(*hashed, body_size - *hashed) {
                Ok(chunk) => {
                    fingerprint.update(&chunk);
                    *hashed += chunk.len();
                    if let Some(fwd) = self.forward_request.as_mut() {
                        fwd.body.extend_from_slice(&chunk);
                    }
                }
                Err(e) => return self.host_failure(host, e),
            }
        }
        if end_of_stream {
            return self.finish_request(host);
        }
        Verdict::AwaitBody
    }

    /// Trailers end the request when the body did not.
    pub fn on_request_trailers(&mut self, host: &impl Host) -> Verdict {
        match self.phase {
            Phase::Buffering { .. } => self.finish_request(host),
            Phase::Answered => Verdict::Pause,
            _ => Verdict::Continue,
        }
    }

    fn finish_request(&mut self, host: &impl Host) -> Verdict {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Buffering {
                digest,
                fingerprint,
                ..
            } => self.claim(host, digest, fingerprint.finish()),
            other => {
                self.phase = other;
                Verdict::Continue
            }
        }
    }

    pub fn on_response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        let Phase::Forwarded { held, .. } = &self.phase else {
            return Verdict::Continue;
        };
        let held = *held;
        if let Some(k) = &self.generated_key {
            if let Err(e) = host.add_response_header(&self.ctx.config.header, k) {
                host.log(
                    Level::Warn,
                    &format!("could not return the generated key: {e}"),
                );
            }
        }
        let headers = match host.response_headers() {
            Ok(h) => h,
            Err(e) => return self.capture_failed(host, e),
        };
        match Capture::of_response(&self.ctx.config, host, &headers) {
            None => {
                self.phase = Phase::Done;
                self.release(host, held)
            }
            Some(capture) => {
                self.phase = Phase::Forwarded {
                    held,
                    capture: Some(capture),
                };
                if end_of_stream {
                    return self.complete(host);
                }
                Verdict::Continue
            }
        }
    }

    /// Chunks are copied as they stream to the client; nothing is held back.
    pub fn on_response_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        // Envoy calls again with what it buffered (and the end of stream)
        // while a write is pending: keep holding until the store answers.
        if self.writing() {
            return Verdict::Pause;
        }
        let limit = self.ctx.config.max_response_body_bytes;
        let Phase::Forwarded {
            capture: Some(capture),
            ..
        } = &mut self.phase
        else {
            return Verdict::Continue;
        };
        if let Err(e) = capture.take(body_size, limit, || host.response_body(0, body_size)) {
            return self.capture_failed(host, e);
        }
        // The response is complete when its last byte is here. With a
        // Content-Length that is before Envoy's (separate, empty) end-of-stream
        // frame, and only holding this chunk keeps the client waiting until
        // the record is written.
        if end_of_stream || capture.complete() {
            return self.complete(host);
        }
        Verdict::Continue
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

    /// The answer to an HTTP call this request made: the Redis store's, or
    /// the upstream's in forwarding mode.
    pub fn on_call_response(&mut self, host: &impl Host, call: u32, response: &CallResponse) {
        let then = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Waiting {
                call: expected,
                then,
            } if expected == call => then,
            // An answer to a call this request no longer waits for.
            other => {
                self.phase = other;
                return;
            }
        };
        match then {
            Then::Claim(pending) => self.claim_answered(host, &pending, response),
            Then::Cancel => self.cancel_answered(host, response),
            Then::Upstream(held) => {
                self.upstream_answered(host, held, response);
            }
            Then::Write { pending, reply } => self.write_answered(host, pending, reply, response),
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
    /// completed (the client left, or the upstream reset mid-body): the
    /// upstream may have acted, so the claim stays until its lock timeout and
    /// an immediate retry gets 409, never a second execution.
    pub fn on_done(&mut self, host: &impl Host) {
        if matches!(self.phase, Phase::Forwarded { .. }) {
            host.log(
                Level::Debug,
                "exchange ended before the response completed; claim kept until its lock timeout",
            );
        }
        self.phase = Phase::Done;
    }
}
