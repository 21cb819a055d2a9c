//! RFC 9457 problem details, the body of every error the filter returns.

use crate::record::StoredResponse;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    slug: &'static str,
    title: &'static str,
    detail: String,
    retry_after_seconds: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    fn new(
        status: u16,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after_seconds: None,
        }
    }

    fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }

    pub fn missing_key(header: &str) -> Self {
        Problem::new(
            400,
            "missing-key",
            "Idempotency key missing",
            format!("This operation requires an idempotency key in the {header} header."),
        )
    }

    /// A protected request whose headers the host cannot read (APISIX, an
    /// HTTP/1.0 request without `Host`: see `HostError::no_host`).
    pub fn host_required() -> Self {
        Problem::new(
            400,
            "host-required",
            "Host header required",
            "A request protected by an idempotency key must carry a Host header. Send one (HTTP/1.1 clients always do).",
        )
    }

    pub fn invalid_key(reason: &str) -> Self {
        Problem::new(
            400,
            "invalid-key",
            "Invalid idempotency key",
            format!("{reason}."),
        )
    }

    pub fn in_flight() -> Self {
        Problem::new(
            409,
            "request-in-progress",
            "A request with this idempotency key is being processed",
            "The original request has not completed yet. Retry later to receive its response.",
        )
        .retry_after(1)
    }

    pub fn mismatch() -> Self {
        Problem::new(422, "key-reused", "Idempotency key reused with a different request",
            "This idempotency key was already used for a request with another method, path or payload. Use a new key for a new request.")
    }

    pub fn too_large(limit: u64) -> Self {
        Problem::new(
            413,
            "body-too-large",
            "Request body too large",
            format!(
                "Requests protected by an idempotency key may carry at most {limit} bytes of body."
            ),
        )
    }

    pub fn store_full() -> Self {
        Problem::new(
            503,
            "store-full",
            "Idempotency store full",
            "Every slot of the idempotency store is held by a request in progress. Retry later.",
        )
        .retry_after(1)
    }

    /// One title for the type, as RFC 9457 asks; which store is in `detail`.
    pub fn store_unavailable(store: &'static str) -> Self {
        Problem::new(
            503,
            "store-unavailable",
            "Idempotency store unavailable",
            format!("The {store} idempotency store could not be used, so the request was not forwarded. Retry later."),
        )
        .retry_after(1)
    }

    /// Forwarding mode: the worker holds `max_in_flight_bytes` of bodies
    /// already; nothing was claimed or sent.
    pub fn in_flight_full() -> Self {
        Problem::new(
            503,
            "in-flight-full",
            "Gateway busy",
            "This gateway worker holds as many request and response bodies as it may. The request was not forwarded; retry later.",
        )
        .retry_after(1)
    }

    pub fn upstream_unavailable() -> Self {
        Problem::new(
            502,
            "upstream-unavailable",
            "Upstream unavailable",
            "The upstream did not answer. The request may be retried with the same key.",
        )
        .retry_after(1)
    }

    /// The key's outcome when the gateway cannot know whether the upstream
    /// acted (`unknown_outcome: record`): retries get it replayed.
    pub fn outcome_unknown() -> Self {
        Problem::new(
            502,
            "outcome-unknown",
            "Outcome of the original request unknown",
            "The original request reached the upstream, but its response never completed, so whether it took effect is unknown. It will not run again with this key: check the state of the resource before repeating the operation with a new key.",
        )
    }

    /// `record` is the `outcome-unknown` problem recorded for a key (by any
    /// version: its type is what counts, not its wording).
    pub fn is_outcome_unknown_record(record: &StoredResponse) -> bool {
        let problem = Problem::outcome_unknown();
        let kind = problem.type_urn();
        record.status == problem.status
            && record
                .body
                .windows(kind.len())
                .any(|w| w == kind.as_bytes())
    }

    /// This problem as a key's record (what its retries are replayed).
    pub fn as_record(&self) -> StoredResponse {
        StoredResponse {
            status: self.status,
            headers: self.headers(),
            body: self.body(),
            body_omitted: false,
        }
    }

    /// Operations endpoint: a path other than its own.
    pub fn not_found(path: &str) -> Self {
        Problem::new(
            404,
            "not-found",
            "Not a key-operations path",
            format!("This is the idempotency key-operations endpoint: GET or DELETE {path}, with the key in its header and the client's scope headers."),
        )
    }

    /// Operations endpoint: a method other than GET and DELETE.
    pub fn method_not_allowed() -> Self {
        Problem::new(
            405,
            "method-not-allowed",
            "Method not allowed",
            "GET shows what the local store holds for the key; DELETE forgets it.",
        )
    }

    /// Operations endpoint: nothing to forget.
    pub fn key_absent() -> Self {
        Problem::new(
            404,
            "key-absent",
            "No such key in the local store",
            "The store holds no record and no running request for this key in this scope, so nothing was forgotten. The scope is the values of scope_headers (default Authorization): send the client's.",
        )
    }

    /// Operations endpoint: the key's request is still running.
    pub fn key_running(lock_lapses_in_ms: u64) -> Self {
        Problem::new(
            409,
            "key-in-flight",
            "The key's request is still running",
            format!("Forgetting the key now would let a retry run while the original may still act. Wait until it completes (GET shows its state), or until its claim lapses ({lock_lapses_in_ms} ms from now, unless its gateway renews it), or repeat with ?force=true if the original is known to have stopped."),
        )
    }

    /// Operations endpoint: this `vm_id` has no table of this shape.
    pub fn no_table(capacity: u64) -> Self {
        Problem::new(
            503,
            "no-table",
            "No local store table to operate on",
            format!("This Envoy holds no local store of max_entries {capacity} in this vm_id. Give the operations endpoint the vm_id and store.max_entries of the protected listener's filter."),
        )
    }

    pub fn internal(detail: &str) -> Self {
        Problem::new(500, "internal", "Idempotency filter error", detail)
    }

    /// The problem type's last segment (`urn:idempotency-filter:problem:<slug>`).
    pub fn slug(&self) -> &'static str {
        self.slug
    }

    /// The problem's `type`.
    fn type_urn(&self) -> String {
        format!("urn:idempotency-filter:problem:{}", self.slug)
    }

    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            kind: self.type_urn(),
            title: self.title,
            status: self.status,
            detail: &self.detail,
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
    }

    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut h = vec![
            (
                "content-type".to_string(),
                b"application/problem+json".to_vec(),
            ),
            ("cache-control".to_string(), b"no-store".to_vec()),
        ];
        if let Some(s) = self.retry_after_seconds {
            h.push(("retry-after".to_string(), s.to_string().into_bytes()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9457: a type's title does not change from one occurrence to the
    /// next; what differs goes in the detail.
    #[test]
    fn one_type_has_one_title() {
        let (redis, local) = (
            Problem::store_unavailable("redis"),
            Problem::store_unavailable("local"),
        );
        assert_eq!(redis.type_urn(), local.type_urn());
        assert_eq!(redis.title, local.title);
        assert!(redis.detail.contains("redis") && local.detail.contains("local"));
    }

    #[test]
    fn problem_bodies_are_rfc9457_json() {
        let p = Problem::in_flight();
        let v: serde_json::Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!(v["status"], 409);
        assert_eq!(
            v["type"],
            "urn:idempotency-filter:problem:request-in-progress"
        );
        assert!(v["title"].as_str().unwrap().contains("being processed"));
        assert!(p.headers().contains(&("retry-after".into(), b"1".to_vec())));
        assert!(p
            .headers()
            .contains(&("content-type".into(), b"application/problem+json".to_vec())));
        // Details are JSON-escaped, never spliced.
        let q = Problem::invalid_key("bad \"quote\"");
        let v: serde_json::Value = serde_json::from_slice(&q.body()).unwrap();
        assert_eq!(v["detail"], "bad \"quote\".");
    }
}
