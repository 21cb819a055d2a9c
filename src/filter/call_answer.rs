//! What the answer to the filter's own call to the upstream (forwarding
//! mode) says about the request: did an upstream answer, did the request
//! never leave, or may it have acted without a whole answer coming back?
//!
//! On Envoy the call goes through its router, which marks what an upstream
//! sent with `x-envoy-upstream-service-time` (checked on 1.40) and answers
//! for itself otherwise, naming why: `upstream connect error or
//! disconnect/reset before headers. [retried and the latest ]reset reason:
//! <reason>[, transport failure reason: ...]`, or `no healthy upstream`. A
//! call it refuses outright (no such cluster, no healthy host, a circuit
//! breaker at dispatch) gets no answer at all: the filter learns it from the
//! failed dispatch. APISIX hands over only what an upstream sent.

use crate::config::Platform;
use crate::envoy_reply;
use crate::host::{CallResponse, HeaderList};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallAnswer {
    /// What an upstream sent, with this status.
    Upstream(u16),
    /// The proxy's own answer, saying the request never reached an
    /// upstream: no healthy upstream, a connection that could not be
    /// opened, a circuit breaker, a refused stream. On APISIX, which says
    /// nothing, also no answer at all before the call's timeout: it cannot
    /// be told from a connection that never opened.
    NeverSent,
    /// The request went out and nothing whole came back: a reset after it
    /// was sent, a stream cut after the answer had begun (no answer at
    /// all), a timeout or stream duration reached, a reply after retries
    /// (a retry's earlier tries may have reached the upstream), or a reply
    /// of a form not known here: the safe side.
    MayHaveActed,
}

impl CallAnswer {
    /// `response` came before the call's timeout (the caller decides a
    /// call that lasted that long).
    pub(super) fn of(platform: Platform, response: &CallResponse) -> CallAnswer {
        let marks = platform.marks_upstream_call_answers();
        let Some(status) = response.status else {
            return if marks {
                CallAnswer::MayHaveActed
            } else {
                CallAnswer::NeverSent
            };
        };
        // An interim answer (1xx) taken for the final one: the real answer,
        // and whether the operation ran, were never read (APISIX's
        // resty.http reads a 103 Early Hints as the status).
        if status < 200 {
            return CallAnswer::MayHaveActed;
        }
        if !marks || marked_by_the_router(&response.headers) {
            return CallAnswer::Upstream(status);
        }
        if envoy_reply::never_left(&response.body) {
            CallAnswer::NeverSent
        } else {
            CallAnswer::MayHaveActed
        }
    }
}

fn marked_by_the_router(headers: &HeaderList) -> bool {
    headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("x-envoy-upstream-service-time"))
}

#[cfg(test)]
mod tests {
    use super::CallAnswer::*;
    use super::*;

    fn answer(status: Option<u16>, marked: bool, body: &str) -> CallResponse {
        let mut headers = vec![("content-type".to_string(), b"text/plain".to_vec())];
        if marked {
            headers.push(("x-envoy-upstream-service-time".to_string(), b"3".to_vec()));
        }
        CallResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn envoys_own_answers_say_whether_the_request_left() {
        let reset = "upstream connect error or disconnect/reset before headers. reset reason: ";
        let retried = "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: ";
        let table: Vec<(Option<u16>, bool, String, CallAnswer)> = vec![
            // What an upstream sent, whatever its status.
            (Some(503), true, "busy".into(), Upstream(503)),
            (Some(201), true, "{}".into(), Upstream(201)),
            // Envoy's own, before the request left (bodies as Envoy 1.40 writes them).
            (
                Some(503),
                false,
                format!("{reset}remote connection failure"),
                NeverSent,
            ),
            (
                Some(503),
                false,
                format!("{reset}local connection failure"),
                NeverSent,
            ),
            (
                Some(503),
                false,
                format!("{reset}connection failure, transport failure reason: TLS error"),
                NeverSent,
            ),
            (
                Some(503),
                false,
                format!("{reset}connection timeout"),
                NeverSent,
            ),
            (Some(503), false, format!("{reset}overflow"), NeverSent),
            (
                Some(503),
                false,
                format!("{reset}remote refused stream reset"),
                NeverSent,
            ),
            (Some(503), false, "no healthy upstream".into(), NeverSent),
            // After it left, or nothing at all.
            (
                Some(503),
                false,
                format!("{reset}connection termination"),
                MayHaveActed,
            ),
            (
                Some(503),
                false,
                format!("{retried}remote reset"),
                MayHaveActed,
            ),
            (
                Some(503),
                false,
                format!("{retried}remote connection failure"),
                MayHaveActed,
            ),
            (
                Some(504),
                false,
                "upstream request timeout".into(),
                MayHaveActed,
            ),
            (
                Some(408),
                false,
                "upstream max stream duration reached".into(),
                MayHaveActed,
            ),
            (Some(204), false, String::new(), MayHaveActed),
            (Some(502), false, "something else".into(), MayHaveActed),
            (None, false, String::new(), MayHaveActed),
        ];
        for (status, marked, body, expected) in table {
            let got = CallAnswer::of(Platform::Envoy, &answer(status, marked, &body));
            assert_eq!(got, expected, "{status:?} {marked} {body}");
        }
        // APISIX hands over only what an upstream sent, but may take an
        // interim answer for the final one.
        let overflow = answer(Some(503), false, &format!("{reset}overflow"));
        assert_eq!(CallAnswer::of(Platform::Apisix, &overflow), Upstream(503));
        let early_hints = answer(Some(103), false, "");
        assert_eq!(CallAnswer::of(Platform::Apisix, &early_hints), MayHaveActed);
        // No answer before the timeout: APISIX cannot say whether it left.
        let silent = answer(None, false, "");
        assert_eq!(CallAnswer::of(Platform::Apisix, &silent), NeverSent);
    }
}
