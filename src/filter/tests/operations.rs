//! The key-operations endpoint: an instance configured with `operations`
//! inspects and forgets keys that a protecting instance of the same table
//! recorded (one shared data, as in one Envoy `vm_id`).

use super::*;
use crate::fake_host::SentResponse;

const OPS: &str = r#"{"operations":{}}"#;

/// One operation: `method` at `path` with the key (and scope) headers;
/// returns what the endpoint answered. Nothing may reach the upstream.
fn op(
    host: &FakeHost,
    c: &Rc<FilterContext>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (SentResponse, serde_json::Value) {
    let mut hs = vec![(":method", method), (":path", path)];
    hs.extend_from_slice(headers);
    host.reset_exchange(&hs, b"");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(host, true), Verdict::Pause);
    let sent = host.sent().expect("the endpoint answers itself");
    let doc = serde_json::from_slice(&sent.body).unwrap_or_default();
    (sent, doc)
}

const PATH: &str = "/idempotency/key";

fn get(host: &FakeHost, c: &Rc<FilterContext>, key: &str) -> serde_json::Value {
    let (sent, doc) = op(host, c, "GET", PATH, &[("idempotency-key", key)]);
    assert_eq!(sent.status, 200, "{doc}");
    assert_eq!(
        sent.header("content-type").as_deref(),
        Some("application/json")
    );
    doc
}

fn delete(
    host: &FakeHost,
    c: &Rc<FilterContext>,
    path: &str,
    key: &str,
) -> (u16, serde_json::Value) {
    let (sent, doc) = op(host, c, "DELETE", path, &[("idempotency-key", key)]);
    (sent.status, doc)
}

#[test]
fn a_recorded_key_is_inspected_then_forgotten_and_its_retry_runs_again() {
    let (host, c) = setup("{}");
    let ops = ctx(OPS);
    let (mut f, _) = request(&host, &c, &post(Some("k1")), b"{}");
    respond(&host, &mut f, 201, b"{\"id\":1}");
    assert_eq!(host.metric(Metric::Entries), 1);
    host.advance_clock(1500);
    let doc = get(&host, &ops, "k1");
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["key"], "k1");
    assert_eq!(doc["status"], 201);
    assert_eq!(doc["body_bytes"], 8);
    assert_eq!(doc["body_omitted"], false);
    assert_eq!(doc["age_ms"], 1500);
    assert_eq!(doc["expires_in_ms"], 86_400_000 - 1500);
    assert_eq!(doc["digest"].as_str().map(str::len), Some(32));
    // The same key as the client quotes it is the same key (sf-string).
    assert_eq!(get(&host, &ops, "\"k1\"")["state"], "completed");

    let (status, doc) = delete(&host, &ops, PATH, "k1");
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["forgotten"], "completed");
    assert_eq!(doc["state"], "absent");
    assert_eq!(host.metric(Metric::Entries), 0);
    assert!(host
        .logs
        .borrow()
        .iter()
        .any(|(_, l)| l.starts_with("operations: forgot key digest")));
    assert_eq!(get(&host, &ops, "k1")["state"], "absent");
    let (_, forwarded) = request(&host, &c, &post(Some("k1")), b"{}");
    assert!(forwarded, "the retry runs again");
    // Forgetting a key that is not there.
    assert_eq!(delete(&host, &ops, PATH, "k2").0, 404);
}

#[test]
fn a_running_key_is_shown_and_kept_unless_forced() {
    let (host, c) = setup(r#"{"lock_timeout_seconds":10}"#);
    let ops = ctx(r#"{"lock_timeout_seconds":10,"operations":{}}"#);
    let (mut original, forwarded) = request(&host, &c, &post(Some("k")), b"{}");
    assert!(forwarded);
    host.advance_clock(2000);
    let doc = get(&host, &ops, "k");
    assert_eq!(doc["state"], "in-flight");
    assert_eq!(doc["age_ms"], 2000);
    assert_eq!(doc["expires_in_ms"], 8000);
    assert_eq!(doc.get("status"), None);

    let (sent, doc) = op(&host, &ops, "DELETE", PATH, &[("idempotency-key", "k")]);
    assert_eq!(sent.status, 409);
    assert_eq!(
        sent.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(doc["type"], "urn:idempotency-filter:problem:key-in-flight");
    assert!(doc["detail"].as_str().unwrap().contains("8000 ms"));
    assert_eq!(get(&host, &ops, "k")["state"], "in-flight", "unchanged");
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"{}");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(409), "retries still wait");

    // Forced: the retry runs, and the original can no longer record.
    let (status, doc) = delete(&host, &ops, &format!("{PATH}?force=true"), "k");
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["forgotten"], "in-flight");
    let (mut retry, forwarded) = request(&host, &c, &post(Some("k")), b"{}");
    assert!(forwarded, "the retry runs");
    respond(&host, &mut original, 201, b"old");
    assert_eq!(host.metric(Metric::ClaimsLost), 1);
    respond(&host, &mut retry, 201, b"new");
    request(&host, &c, &post(Some("k")), b"{}");
    assert_eq!(host.sent().unwrap().body, b"new");
}

/// The scope is part of the key's address: the endpoint sees a tenant's
/// key only with that tenant's scope header values.
#[test]
fn the_key_is_found_only_in_its_scope() {
    let (host, c) = setup("{}");
    let ops = ctx(OPS);
    let mut headers = post(Some("k"));
    headers.push(("authorization", "Bearer tenant-a".into()));
    let (mut f, _) = request(&host, &c, &headers, b"{}");
    respond(&host, &mut f, 201, b"{}");
    assert_eq!(get(&host, &ops, "k")["state"], "absent", "no scope");
    let scoped = |tenant: &str| {
        let (sent, doc) = op(
            &host,
            &ops,
            "GET",
            PATH,
            &[("idempotency-key", "k"), ("authorization", tenant)],
        );
        assert_eq!(sent.status, 200);
        doc["state"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(scoped("Bearer tenant-b"), "absent");
    assert_eq!(scoped("Bearer tenant-a"), "completed");
    let (_, doc) = delete(&host, &ops, PATH, "k");
    assert_eq!(doc["type"], "urn:idempotency-filter:problem:key-absent");
    assert!(doc["detail"].as_str().unwrap().contains("scope_headers"));
}

/// Every refusal: problem+json, and nothing reaches an upstream.
#[test]
fn refusals_are_problems() {
    let (host, _) = setup("{}");
    let ops = ctx(r#"{"operations":{"path":"/ops/key"},"required":true}"#);
    let cases: &[(&str, &str, &[(&str, &str)], u16, &str)] = &[
        (
            "GET",
            "/idempotency/key",
            &[("idempotency-key", "k")],
            404,
            "not-found",
        ),
        (
            "GET",
            "/ops/key/k",
            &[("idempotency-key", "k")],
            404,
            "not-found",
        ),
        (
            "POST",
            "/ops/key",
            &[("idempotency-key", "k")],
            405,
            "method-not-allowed",
        ),
        ("GET", "/ops/key", &[], 400, "missing-key"),
        (
            "DELETE",
            "/ops/key",
            &[("idempotency-key", "\"open")],
            400,
            "invalid-key",
        ),
        (
            "DELETE",
            "/ops/key",
            &[("idempotency-key", "k")],
            404,
            "key-absent",
        ),
    ];
    for (method, path, headers, status, kind) in cases {
        let (sent, doc) = op(&host, &ops, method, path, headers);
        assert_eq!(sent.status, *status, "{method} {path}: {doc}");
        assert_eq!(
            doc["type"],
            format!("urn:idempotency-filter:problem:{kind}"),
            "{method} {path}"
        );
        assert_eq!(
            sent.header("content-type").as_deref(),
            Some("application/problem+json")
        );
        assert_eq!(
            sent.header("allow").as_deref(),
            (*status == 405).then_some("GET, DELETE")
        );
    }
    assert_eq!(host.call_count(), 0);
    assert_eq!(host.resumed_requests.get(), 0);
    // The query string is not part of the path.
    let (sent, _) = op(
        &host,
        &ops,
        "GET",
        "/ops/key?x=1",
        &[("idempotency-key", "k")],
    );
    assert_eq!(sent.status, 200);
}

/// An endpoint whose table shape is not the protected listener's (another
/// max_entries) finds no table, says so, and creates none.
#[test]
fn another_max_entries_finds_no_table() {
    let (host, _) = setup("{}");
    let keys = host.shared.key_count();
    let ops = ctx(r#"{"operations":{},"store":{"type":"local","max_entries":64}}"#);
    let (sent, doc) = op(&host, &ops, "GET", PATH, &[("idempotency-key", "k")]);
    assert_eq!(sent.status, 503);
    assert_eq!(doc["type"], "urn:idempotency-filter:problem:no-table");
    assert!(doc["detail"].as_str().unwrap().contains("max_entries 64"));
    assert_eq!(delete(&host, &ops, PATH, "k").0, 503);
    assert_eq!(host.shared.key_count(), keys, "nothing created");
}

#[test]
fn a_store_failure_is_503_store_unavailable() {
    let (host, _) = setup("{}");
    let ops = ctx(OPS);
    host.shared.fail_with(10);
    let (sent, doc) = op(&host, &ops, "DELETE", PATH, &[("idempotency-key", "k")]);
    assert_eq!(sent.status, 503);
    assert_eq!(
        doc["type"],
        "urn:idempotency-filter:problem:store-unavailable"
    );
}

/// A protecting instance has no such endpoint: a DELETE (not a protected
/// method) passes to the upstream, and the record stays.
#[test]
fn a_protecting_instance_does_not_answer_operations() {
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"{}");
    respond(&host, &mut f, 201, b"{}");
    for method in ["GET", "DELETE"] {
        host.reset_exchange(
            &[
                (":method", method),
                (":path", PATH),
                ("idempotency-key", "k"),
            ],
            b"",
        );
        let mut f = Filter::new(c.clone());
        assert_eq!(f.on_request_headers(&host, true), Verdict::Continue);
        assert_eq!(host.sent(), None);
    }
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"{}");
    assert!(!forwarded, "still replayed");
}
