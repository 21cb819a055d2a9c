//! Forwarding mode: the filter sends the claimed request upstream itself
//! (an HTTP call), then records or releases the answer like any response
//! and answers the client with it once the store has answered.
//!
//! ```text
//! claimed ──call──▶ Waiting(Upstream) ──answer──▶ capture ──▶ record / release
//!                                                   └──▶ reply to the client
//! ```

use super::call_answer::CallAnswer;
use super::capture::Capture;
use super::reply::{problem_reply, Reply};
use super::{Filter, Phase, Then, Verdict};
use crate::config::Config;
use crate::host::{CallResponse, HeaderList, HeaderMap, Host, HostError, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::record::is_connection_header;
use crate::store::Held;

/// Whether a call that failed without an answer after `waited_ms` (by our
/// clock, from when it was sent) may have reached the upstream. A refused
/// connection fails in a millisecond or two; a timeout comes near
/// `timeout_ms`, but by the proxy's clock: nginx arms a socket's timer from
/// the time it cached when its event loop last woke, which is older than
/// ours by whatever that loop iteration ran before (other requests' Wasm
/// and Lua), so its timeout can fire well before `timeout_ms` by ours. Any
/// failure after half the timeout therefore counts as timed out: its
/// outcome is unknown, never "not sent".
fn may_have_timed_out(waited_ms: u64, timeout_ms: u64) -> bool {
    waited_ms >= timeout_ms / 2
}

/// Request headers the proxy sets itself on the forwarded request, besides
/// the connection-level ones.
const NOT_FORWARDED: &[&str] = &["host", "expect"];

/// The client's request as the filter re-sends it in forwarding mode.
#[derive(Debug, Clone, Default)]
pub struct ForwardRequest {
    method: String,
    path: String,
    authority: String,
    headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl ForwardRequest {
    /// The request's head, with the key the gateway assigned, if any.
    pub(super) fn from_headers(
        cfg: &Config,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        generated_key: Option<&str>,
    ) -> ForwardRequest {
        let mut forwarded: Vec<(String, String)> = headers
            .iter()
            .filter(|(n, _)| !is_connection_header(n) && !NOT_FORWARDED.contains(&n.as_ref()))
            // Control headers of Envoy's router (retries, timeouts,
            // alternative answers), which also handles the filter's own call:
            // a client must not steer it. (Envoy 1.40 did not retry on them
            // in the e2e test; they go whatever a version or setup does.)
            .filter(|(n, _)| {
                !(cfg.platform.calls_go_through_envoys_router() && n.starts_with("x-envoy-"))
            })
            .filter(|(n, _)| generated_key.is_none() || *n != cfg.header)
            .map(|(n, v)| (n.into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        if let Some(k) = generated_key {
            forwarded.push((cfg.header.clone(), k.to_string()));
        }
        ForwardRequest {
            method: method.to_string(),
            path: path.to_string(),
            authority: headers
                .get(":authority")
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default(),
            headers: forwarded,
            body: Vec::new(),
        }
    }
}

impl Filter {
    /// Forwarding mode: send the claimed request to the upstream ourselves.
    pub(super) fn forward_upstream(&mut self, host: &impl Host, held: Held) -> Verdict {
        let ctx = self.ctx.clone();
        let (Some(fwd), Some(req)) = (&ctx.config.forward, self.forward_request.take()) else {
            return self.answer(
                host,
                &Problem::internal("Forwarding is not configured."),
                None,
            );
        };
        let authority = fwd.authority.as_deref().unwrap_or(&req.authority);
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", &req.method),
            (":path", &req.path),
            (":authority", authority),
        ];
        headers.extend(req.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let body = if req.body.is_empty() {
            None
        } else {
            Some(req.body.as_slice())
        };
        // Before the call: the proxy starts the call's timer inside it.
        let sent_ms = host.now_ms();
        let dispatched = host.dispatch_http_call(&fwd.upstream, &headers, body, fwd.timeout_ms);
        // The call has the body now (the host's copy; on Envoy, when a
        // stream makes the call, the worker's queue until its root sends it
        // moments later), or the request ends: its bytes no longer count.
        let sent_bytes = req.body.len();
        drop(headers);
        drop(req);
        self.let_go(sent_bytes);
        match dispatched {
            Ok(call) => {
                self.phase = Phase::Waiting {
                    call,
                    then: Then::Upstream { held, sent_ms },
                };
                Verdict::Pause
            }
            Err(e) => {
                self.forward_failed(host, &e);
                self.upstream_not_reached(host, held)
            }
        }
    }

    /// The call to the upstream could not be sent (the host refused it: no
    /// such upstream, no healthy host, a circuit breaker): nothing ran, the
    /// key is released.
    pub(super) fn upstream_not_reached(&mut self, host: &impl Host, held: Held) -> Verdict {
        let reply = problem_reply(&Problem::upstream_unavailable());
        self.write_release(host, held, Some(reply))
    }

    pub(super) fn forward_failed(&self, host: &impl Host, e: &HostError) {
        let upstream = self
            .cfg()
            .forward
            .as_ref()
            .map_or("", |f| f.upstream.as_str());
        host.log(
            Level::Error,
            &format!("forwarding to {upstream} failed: {e}"),
        );
    }

    /// Forwarding mode: the upstream answered (or did not). Record or
    /// release like any response, then answer the client with it.
    ///
    /// A call that failed without an answer (or, where the proxy does not
    /// mark upstream answers, with a 504) after half of `forward.timeout_ms`
    /// or later may have been sent and acted: its outcome is unknown.
    /// Otherwise [`CallAnswer`] decides: on Envoy, which
    /// answers a failed call itself and says why, what it says; on APISIX,
    /// which says nothing, no answer releases the key.
    pub(super) fn upstream_answered(
        &mut self,
        host: &impl Host,
        held: Held,
        sent_ms: u64,
        response: &CallResponse,
    ) -> Verdict {
        let cfg = &self.ctx.config;
        let timeout_ms = cfg.forward.as_ref().map_or(u64::MAX, |f| f.timeout_ms);
        // Where the proxy marks what an upstream sent (Envoy), `CallAnswer`
        // reads any answer, a 504 included. Elsewhere a 504 may be the
        // proxy's own timeout (APISIX's profile on Envoy) and is judged by
        // time, as no answer at all is.
        let marks = cfg.platform.marks_upstream_call_answers();
        let no_answer = response.status.is_none_or(|s| s == 504 && !marks);
        let waited_ms = host.now_ms().saturating_sub(sent_ms);
        if no_answer && may_have_timed_out(waited_ms, timeout_ms) {
            return self.outcome_unknown(host, held, true);
        }
        let status = match CallAnswer::of(cfg.platform, response) {
            CallAnswer::Upstream(status) => status,
            CallAnswer::NeverSent => return self.upstream_not_reached(host, held),
            CallAnswer::MayHaveActed => return self.outcome_unknown(host, held, true),
        };
        let relayed: HeaderList = response
            .headers
            .iter()
            .filter(|(n, _)| !is_connection_header(n))
            .cloned()
            .collect();
        let mut capture = Capture::start(
            cfg,
            status,
            Some("via_upstream"),
            relayed.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            None,
        );
        // The answer is in the VM already, whole: counted whatever the
        // limit, so that new requests see it. The record keeps its body only
        // if the count stays within the limit (the record's copy is one of
        // the answer's few copies, README "Threat model").
        self.hold(response.body.len());
        let ctx = self.ctx.clone();
        let fits = ctx.in_flight.held() <= ctx.config.max_in_flight_bytes;
        if let Some(c) = capture.as_mut() {
            // The whole body is here: reading it cannot fail.
            let took = c.take(
                response.body.len(),
                ctx.config.recorded_body_limit(),
                |_| fits,
                || Ok(response.body.clone()),
            );
            if took.is_ok_and(|t| t.no_room) {
                host.metric_add(Metric::InFlightFull, 1);
            }
        }
        let reply = Reply {
            status,
            headers: relayed,
            body: response.body.clone(),
        };
        match capture {
            Some(capture) => self.write_complete(host, held, capture.into_record(), Some(reply)),
            None => self.write_release(host, held, Some(reply)),
        }
    }
}
