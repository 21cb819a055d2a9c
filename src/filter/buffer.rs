//! Buffering: a protected request is held back from the upstream until its
//! body has been seen, hashed chunk by chunk into the fingerprint (and, in
//! forwarding mode, kept to be re-sent). Its end (body or trailers) starts
//! the claim.

use super::inspect::Protected;
use super::{Filter, Phase, Verdict};
use crate::host::Host;
use crate::metrics::Metric;
use crate::problem::Problem;

impl Filter {
    /// A request inspection found protected: set the key the gateway
    /// assigned, then claim at once (no body) or buffer the body first.
    pub(super) fn protect(
        &mut self,
        host: &impl Host,
        protected: Protected,
        end_of_stream: bool,
    ) -> Verdict {
        let ctx = self.ctx.clone();
        let cfg = &ctx.config;
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
        // Forwarding mode holds the request until it is sent, and its
        // answer: none starts while the VM's count is at the limit.
        if protected.forward.is_some() && !ctx.in_flight.has_room(cfg.max_in_flight_bytes) {
            return self.answer(host, &Problem::in_flight_full(), Some(Metric::InFlightFull));
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

    /// A body chunk: `body_size` is everything buffered so far; only the
    /// new bytes are read (hashed, and kept for forwarding mode).
    pub(super) fn buffer(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        let limit = self.cfg().max_request_body_bytes;
        let hashed = match self.phase {
            Phase::Buffering { hashed, .. } => hashed,
            Phase::Answered => return Verdict::Pause,
            _ => return Verdict::Continue,
        };
        if body_size as u64 > limit {
            return self.answer(host, &Problem::too_large(limit), Some(Metric::TooLarge));
        }
        if body_size > hashed {
            // Forwarding mode keeps the body to send it: it must fit in the
            // worker's budget. Refused before the claim, so nothing ran.
            let wanted = body_size - hashed;
            let forwarding = self.forward_request.is_some();
            if forwarding && !self.try_hold(wanted) {
                return self.answer(host, &Problem::in_flight_full(), Some(Metric::InFlightFull));
            }
            let chunk = match host.request_body(hashed, wanted) {
                Ok(chunk) => chunk,
                Err(e) => return self.host_failure(host, e),
            };
            if forwarding {
                // A shorter read is read again from where it stopped.
                self.let_go(wanted.saturating_sub(chunk.len()));
            }
            if let Phase::Buffering {
                fingerprint,
                hashed,
                ..
            } = &mut self.phase
            {
                fingerprint.update(&chunk);
                *hashed += chunk.len();
            }
            if let Some(fwd) = self.forward_request.as_mut() {
                fwd.body.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            return self.finish_request(host);
        }
        Verdict::AwaitBody
    }

    /// The request is complete: claim its key.
    pub(super) fn finish_request(&mut self, host: &impl Host) -> Verdict {
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
}
