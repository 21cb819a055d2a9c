//! The filter's unit tests: every path runs against the in-memory host.

use super::*;
use crate::fake_host::{Call, FakeHost};
use crate::fake_redis::{last_call, op, FakeRedis, Op};

fn ctx(json: &str) -> Rc<FilterContext> {
    Rc::new(FilterContext::new(Config::parse(json.as_bytes()).unwrap()))
}

fn post(key: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        (":method", "POST".to_string()),
        (":path", "/payments".to_string()),
        ("content-type", "application/json".to_string()),
    ];
    if let Some(k) = key {
        h.push(("idempotency-key", k.to_string()));
    }
    h
}

/// Runs one request through the filter; returns the filter and what
/// reached the upstream (true when forwarded).
fn request(
    host: &FakeHost,
    c: &Rc<FilterContext>,
    headers: &[(&str, String)],
    body: &[u8],
) -> (Filter, bool) {
    let hs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    host.reset_exchange(&hs, body);
    let mut f = Filter::new(c.clone());
    let mut v = f.on_request_headers(host, body.is_empty());
    if v == Verdict::AwaitBody {
        // Body in two chunks, as a proxy would deliver it (cumulative size).
        let half = body.len() / 2;
        v = f.on_request_body(host, half, false);
        if v == Verdict::AwaitBody {
            v = f.on_request_body(host, body.len(), true);
        }
    }
    (f, v == Verdict::Continue)
}

fn respond(host: &FakeHost, f: &mut Filter, status: u16, body: &[u8]) {
    host.set_response(&[
        (":status", &status.to_string()),
        ("content-type", "application/json"),
        ("content-length", &body.len().to_string()),
        ("set-cookie", "s=1"),
    ]);
    f.on_response_headers(host, false);
    for chunk in body.chunks(3) {
        host.set_response_chunk(chunk);
        f.on_response_body(host, chunk.len(), false);
    }
    host.set_response_chunk(b"");
    f.on_response_body(host, 0, true);
    f.on_done(host);
}

fn sent_status(host: &FakeHost) -> Option<u16> {
    host.sent_status()
}

fn setup(json: &str) -> (FakeHost, Rc<FilterContext>) {
    let host = FakeHost::default();
    host.set_clock(1_000_000);
    let mut c = FilterContext::new(Config::parse(json.as_bytes()).unwrap());
    c.store.init(&host).unwrap();
    (host, Rc::new(c))
}

/// Shared-data calls are the bulk of a protected request's host calls
/// (BENCHMARKS.md, "where the filter's time goes"); one more per request
/// is a measurable cost, so their number is pinned here.
#[test]
fn shared_data_calls_per_request_are_pinned() {
    let (host, c) = setup("{}");
    let calls = || (host.shared.gets.get(), host.shared.sets.get());
    let before = calls();
    let (mut f, _) = request(&host, &c, &post(Some("k1")), b"{}");
    assert_eq!(
        calls(),
        (before.0 + 1, before.1 + 1),
        "claim: read and CAS the bucket"
    );
    let before = calls();
    respond(&host, &mut f, 201, b"{\"id\":1}");
    assert_eq!(
        calls(),
        (before.0 + 2, before.1 + 2),
        "complete: the slot's data (owner check) and its bucket"
    );
    let before = calls();
    request(&host, &c, &post(Some("k1")), b"{}");
    assert_eq!(sent_status(&host), Some(201));
    assert_eq!(
        calls(),
        (before.0 + 2, before.1),
        "replay: bucket and data, no write"
    );
}

#[test]
fn outcomes_are_written_to_the_named_property() {
    let (host, c) = setup(r#"{"outcome_property":"idem_outcome"}"#);
    let last = || {
        let props = host.properties.borrow();
        let (name, value) = props.last().cloned().unwrap_or_default();
        assert!(name.is_empty() || name == "idem_outcome", "{name}");
        String::from_utf8(value).unwrap()
    };
    let count = || host.properties.borrow().len();
    let (mut f, _) = request(&host, &c, &post(Some("k1")), b"{}");
    assert_eq!(count(), 0, "nothing is final while the request runs");
    respond(&host, &mut f, 201, b"{}");
    assert_eq!(last(), "stored");
    request(&host, &c, &post(Some("k1")), b"{}");
    assert_eq!(last(), "replayed");
    request(&host, &c, &post(Some("k1")), b"{\"a\":1}");
    assert_eq!(last(), "key-reused");
    let (_running, _) = request(&host, &c, &post(Some("k2")), b"{}");
    request(&host, &c, &post(Some("k2")), b"{}");
    assert_eq!(last(), "request-in-progress");
    let (mut f, _) = request(&host, &c, &post(Some("k3")), b"{}");
    respond(&host, &mut f, 503, b"{}");
    assert_eq!(last(), "released");
    request(&host, &c, &post(None), b"{}");
    assert_eq!(last(), "unkeyed");
    request(&host, &c, &post(Some("")), b"{}");
    assert_eq!(last(), "invalid-key");
    let n = count();
    let mut get = post(Some("k4"));
    get[0].1 = "GET".into();
    request(&host, &c, &get, b"");
    assert_eq!(count(), n, "unprotected methods have no outcome");
    // Off by default: no property call at all (each is a host call).
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("k1")), b"{}");
    respond(&host, &mut f, 201, b"{}");
    request(&host, &c, &post(Some("k1")), b"{}");
    assert!(host.properties.borrow().is_empty());
}

#[test]
fn redis_outcomes_follow_the_store_answers() {
    let last = |host: &FakeHost| {
        let props = host.properties.borrow();
        String::from_utf8(props.last().unwrap().1.clone()).unwrap()
    };
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = ctx(
        r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","cache_entries":0}}"#,
    );
    let start = |c: &Rc<FilterContext>, key: &str| {
        host.reset_exchange(&keyed(key), b"");
        let mut f = Filter::new(c.clone());
        f.on_request_headers(&host, true);
        f
    };
    let mut f = redis_post(&host, &redis, &c, "k");
    complete_paid(&host, &redis, &mut f);
    assert_eq!(last(&host), "stored");
    // The record write fails: the response still goes out, unrecorded.
    let mut f = redis_post(&host, &redis, &c, "k2");
    host.set_response(&[(":status", "201")]);
    f.on_response_headers(&host, false);
    host.set_response_chunk(b"paid");
    f.on_response_body(&host, 4, true);
    store_answers(&host, &mut f, Op::Complete, None, b"");
    assert_eq!(last(&host), "not-recorded");
    // A timed-out claim.
    let mut f = start(&c, "k3");
    store_answers(&host, &mut f, Op::Claim, None, b"");
    assert_eq!(last(&host), "store-unavailable");
    // Fail open.
    let c = ctx(
        r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","on_unavailable":"allow"}}"#,
    );
    let mut f = start(&c, "k");
    store_answers(&host, &mut f, Op::Claim, Some(503), b"");
    assert_eq!(last(&host), "store-bypassed");
}

#[test]
fn first_request_forwards_and_retry_replays() {
    let (host, c) = setup("{}");
    let (mut f, forwarded) = request(&host, &c, &post(Some("k1")), b"{\"amount\":10}");
    assert!(forwarded);
    respond(&host, &mut f, 201, b"{\"id\":1}");
    assert_eq!(host.metric(Metric::Stored), 1);
    let (_, forwarded) = request(&host, &c, &post(Some("\"k1\"")), b"{\"amount\":10}");
    assert!(!forwarded, "the replay must not reach the upstream");
    let sent = host.sent().unwrap();
    assert_eq!(sent.status, 201);
    assert_eq!(sent.body, b"{\"id\":1}");
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(
        sent.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(sent.header("set-cookie"), None);
    assert_eq!(sent.header("content-length"), None);
    assert_eq!(host.metric(Metric::Replays), 1);
}

#[test]
fn retry_while_in_flight_is_409_and_other_payload_is_422() {
    let (host, c) = setup("{}");
    let (mut f, forwarded) = request(&host, &c, &post(Some("k")), b"a");
    assert!(forwarded);
    let (_, fwd) = request(&host, &c, &post(Some("k")), b"a");
    assert!(!fwd);
    assert_eq!(sent_status(&host), Some(409));
    let sent = host.sent().unwrap();
    assert_eq!(sent.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        sent.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    let (_, fwd) = request(&host, &c, &post(Some("k")), b"b");
    assert!(!fwd);
    assert_eq!(sent_status(&host), Some(422));
    respond(&host, &mut f, 200, b"done");
    let (_, fwd) = request(&host, &c, &post(Some("k")), b"b");
    assert!(!fwd);
    assert_eq!(
        sent_status(&host),
        Some(422),
        "the record is left as it was"
    );
    let (_, fwd) = request(&host, &c, &post(Some("k")), b"a");
    assert!(!fwd);
    assert_eq!(host.sent().unwrap().body, b"done");
}

#[test]
fn server_errors_release_the_key_unless_recorded() {
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    respond(&host, &mut f, 503, b"down");
    assert_eq!(host.metric(Metric::Released), 1);
    assert_eq!(host.metric(Metric::Entries), 0);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(forwarded, "after a 5xx the retry runs again");

    let (host, c) = setup(r#"{"record_server_errors":true}"#);
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    respond(&host, &mut f, 500, b"boom");
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(500));
}

#[test]
fn only_the_upstreams_own_answers_are_recorded() {
    let up = Some("via_upstream");
    assert!(should_record(201, up, false));
    assert!(should_record(302, up, false));
    assert!(should_record(404, up, false));
    assert!(!should_record(500, up, false));
    assert!(should_record(500, up, true));
    assert!(
        !should_record(429, up, true),
        "retry-later answers are never kept"
    );
    assert!(!should_record(408, up, false));
    assert!(
        should_record(201, None, false),
        "a host that does not tell: the upstream's"
    );
    assert!(!should_record(403, Some("ext_authz_denied"), false));
    assert!(!should_record(503, Some("no_healthy_upstream"), true));
    assert!(!should_record(
        503,
        Some("upstream_reset_before_response_started{connection_failure}"),
        true
    ));
    assert!(should_record(504, Some("upstream_response_timeout"), true));
    assert!(!should_record(
        504,
        Some("upstream_response_timeout"),
        false
    ));
}

#[test]
fn a_local_reply_of_another_filter_releases_the_key() {
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    host.set_code_details("request_rate_limited");
    respond(&host, &mut f, 429, b"slow down");
    assert_eq!(host.metric(Metric::Released), 1);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(forwarded);
}

#[test]
fn never_recorded_headers_are_configurable() {
    let (host, c) = setup(r#"{"never_record_headers":["x-trace"]}"#);
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    host.set_response(&[(":status", "200"), ("set-cookie", "s=1"), ("x-trace", "t1")]);
    f.on_response_headers(&host, true);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    let sent = host.sent().unwrap();
    assert_eq!(
        sent.header("set-cookie").as_deref(),
        Some("s=1"),
        "set-cookie replayed when not excluded"
    );
    assert_eq!(sent.header("x-trace"), None);
}

#[test]
fn client_errors_are_recorded() {
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    respond(&host, &mut f, 402, b"declined");
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(402));
}

#[test]
fn abandoned_exchange_keeps_the_claim_until_the_lock_times_out() {
    let (host, c) = setup(r#"{"lock_timeout_seconds":5}"#);
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    f.on_done(&host); // client disconnected before the response
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(409));
    host.advance_clock(5_000);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(forwarded, "after lock_timeout_seconds the retry may run");
}

#[test]
fn keys_missing_invalid_or_repeated() {
    let (host, c) = setup("{}");
    let (_, forwarded) = request(&host, &c, &post(None), b"x");
    assert!(forwarded);
    assert_eq!(host.metric(Metric::Unkeyed), 1);
    for bad in ["", "\"unterminated", "a b", &"k".repeat(256)] {
        let (_, forwarded) = request(&host, &c, &post(Some(bad)), b"x");
        assert!(!forwarded, "{bad:?}");
        assert_eq!(sent_status(&host), Some(400), "{bad:?}");
    }
    let mut two = post(Some("a"));
    two.push(("idempotency-key", "b".into()));
    let (_, forwarded) = request(&host, &c, &two, b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(400));

    let (host, c) = setup(r#"{"required":true}"#);
    let (_, forwarded) = request(&host, &c, &post(None), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(400));
    let body: serde_json::Value = serde_json::from_slice(&host.sent().unwrap().body).unwrap();
    assert_eq!(body["type"], "urn:idempotency-filter:problem:missing-key");
}

#[test]
fn unprotected_methods_pass_untouched() {
    let (host, c) = setup(r#"{"required":true}"#);
    let get = vec![
        (":method", "GET".to_string()),
        (":path", "/p".to_string()),
        ("idempotency-key", "\"bad".to_string()),
    ];
    let snapshot = (
        host.shared.key_count(),
        host.shared.total_bytes(),
        host.shared.cas_failures(),
    );
    let (_, forwarded) = request(&host, &c, &get, b"");
    assert!(forwarded);
    assert!(host.sent().is_none());
    let after = (
        host.shared.key_count(),
        host.shared.total_bytes(),
        host.shared.cas_failures(),
    );
    assert_eq!(after, snapshot, "the store is not touched");
}

#[test]
fn generated_keys_are_forwarded_and_returned() {
    let (host, c) = setup(r#"{"generate_missing":true}"#);
    let (mut f, forwarded) = request(&host, &c, &post(None), b"x");
    assert!(forwarded);
    let sent_key = host.request_header("idempotency-key").unwrap();
    assert_eq!(sent_key.len(), 36);
    assert_eq!(&sent_key[14..15], "4", "UUID version 4");
    respond(&host, &mut f, 201, b"ok");
    let added = host.added_response_headers.borrow().clone();
    assert_eq!(
        added,
        vec![("idempotency-key".to_string(), sent_key.clone().into_bytes())]
    );
    // The client can now retry with the key it was given.
    let (_, forwarded) = request(&host, &c, &post(Some(&sent_key)), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(201));
}

#[test]
fn body_limits() {
    let (host, c) = setup(r#"{"max_request_body_bytes":4,"max_response_body_bytes":4}"#);
    let mut declared = post(Some("a"));
    declared.push(("content-length", "5".into()));
    let (_, forwarded) = request(&host, &c, &declared, b"12345");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(413));
    // Chunked: no declared length, caught while buffering.
    let (_, forwarded) = request(&host, &c, &post(Some("b")), b"123456");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(413));
    assert_eq!(host.metric(Metric::TooLarge), 2);
    // A large response passes through and replays without its body.
    let (mut f, forwarded) = request(&host, &c, &post(Some("c")), b"1234");
    assert!(forwarded);
    respond(&host, &mut f, 200, b"0123456789");
    let (_, forwarded) = request(&host, &c, &post(Some("c")), b"1234");
    assert!(!forwarded);
    let sent = host.sent().unwrap();
    assert_eq!((sent.status, sent.body.len()), (200, 0));
    assert_eq!(
        sent.header("idempotent-replay-body").as_deref(),
        Some("omitted")
    );
}

#[test]
fn tenants_are_isolated_by_scope_headers() {
    let (host, c) = setup("{}");
    let mut alice = post(Some("same"));
    alice.push(("authorization", "Bearer alice".into()));
    let mut bob = post(Some("same"));
    bob.push(("authorization", "Bearer bob".into()));
    let (mut f, forwarded) = request(&host, &c, &alice, b"x");
    assert!(forwarded);
    respond(&host, &mut f, 200, b"alice's secret");
    let (_, forwarded) = request(&host, &c, &bob, b"x");
    assert!(forwarded, "bob's key is his own");
}

#[test]
fn store_failure_fails_closed() {
    let (host, c) = setup("{}");
    host.shared.fail_with(10);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    assert_eq!(sent_status(&host), Some(503));
    assert_eq!(host.metric(Metric::StoreErrors), 1);
}

#[test]
fn request_trailers_end_the_request() {
    let (host, c) = setup("{}");
    let hs = keyed("t");
    host.reset_exchange(&hs, b"abc");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(&host, false), Verdict::AwaitBody);
    assert_eq!(f.on_request_body(&host, 3, false), Verdict::AwaitBody);
    assert_eq!(f.on_request_trailers(&host), Verdict::Continue);
}

/// The Redis store without the replay cache: every decision is Redis's.
fn redis_ctx(extra: &str) -> Rc<FilterContext> {
    ctx(&format!(
        r#"{{"store":{{"type":"redis","cluster":"webdis","cache_entries":0{extra}}}}}"#
    ))
}

fn cached_redis_ctx() -> Rc<FilterContext> {
    ctx(r#"{"store":{"type":"redis","cluster":"webdis","cache_entries":32}}"#)
}

/// Runs a claimed request to completion: 201 "paid", recorded by call `n`.
fn complete_paid(host: &FakeHost, redis: &FakeRedis, f: &mut Filter) {
    host.set_response(&[(":status", "201")]);
    assert_eq!(f.on_response_headers(host, false), Verdict::Continue);
    host.set_response_chunk(b"paid");
    assert_eq!(f.on_response_body(host, 4, true), Verdict::Pause);
    redis_answers(host, redis, f, Op::Complete);
}

/// A keyed POST that the filter answers without calling Redis.
fn post_answered_locally(host: &FakeHost, c: &Rc<FilterContext>, key: &str, body: &[u8]) -> u16 {
    host.reset_exchange(&keyed(key), body);
    let calls = host.call_count();
    let mut f = Filter::new(c.clone());
    assert_eq!(
        f.on_request_headers(host, body.is_empty()),
        if body.is_empty() {
            Verdict::Pause
        } else {
            Verdict::AwaitBody
        }
    );
    if !body.is_empty() {
        assert_eq!(f.on_request_body(host, body.len(), true), Verdict::Pause);
    }
    assert_eq!(host.call_count(), calls, "answered without a store call");
    host.sent_status().unwrap_or(0)
}

#[test]
fn the_replay_cache_answers_retries_of_what_this_gateway_recorded() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = cached_redis_ctx();
    let mut f = redis_post(&host, &redis, &c, "k");
    complete_paid(&host, &redis, &mut f);
    assert_eq!(host.metric(Metric::Stored), 1);
    // The retry is replayed from the cache: no third call.
    assert_eq!(post_answered_locally(&host, &c, "k", b""), 201);
    let sent = host.sent().unwrap();
    assert_eq!(sent.body, b"paid");
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    // Another payload under the key: 422, also without Redis.
    assert_eq!(post_answered_locally(&host, &c, "k", b"other"), 422);
    assert_eq!(host.metric(Metric::CacheHits), 2);
    assert_eq!(host.metric(Metric::Replays), 1);
    assert_eq!(host.metric(Metric::Mismatches), 1);
}

#[test]
fn configurations_with_other_redis_namespaces_do_not_share_a_cache() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let a = cached_redis_ctx();
    let mut f = redis_post(&host, &redis, &a, "k");
    complete_paid(&host, &redis, &mut f);
    assert_eq!(post_answered_locally(&host, &a, "k", b""), 201);
    // Same shared data (same vm_id), another key_prefix: its own Redis
    // namespace, where "k" was never used, so Redis is asked.
    let b = ctx(
        r#"{"store":{"type":"redis","cluster":"webdis","key_prefix":"other:","cache_entries":32}}"#,
    );
    redis_post(&host, &redis, &b, "k");
    assert_eq!(host.call_count(), 3, "asked its own Redis namespace");
    assert_eq!(host.resumed_requests.get(), 2, "and ran the request there");
}

#[test]
fn records_from_other_gateways_are_cached_until_redis_expires_them() {
    let redis = FakeRedis::default();
    let c = cached_redis_ctx();
    let a = FakeHost::default();
    let mut f = redis_post(&a, &redis, &c, "k");
    complete_paid(&a, &redis, &mut f);
    // Gateway B (its own shared data) asks Redis once, which answers
    // with the record and "60 s left"...
    let b = FakeHost::default();
    b.set_clock(1_000);
    redis_post(&b, &redis, &c, "k");
    assert_eq!(b.sent().unwrap().status, 201);
    assert_eq!(b.metric(Metric::CacheHits), 0);
    // ...then answers the key itself while Redis still has it...
    b.set_clock(60_999);
    assert_eq!(post_answered_locally(&b, &c, "k", b""), 201);
    assert_eq!(b.metric(Metric::CacheHits), 1);
    // ...and never past Redis's expiry (60 s after the claim was sent).
    b.set_clock(61_000);
    redis_post(&b, &redis, &c, "k");
    assert_eq!(b.call_count(), 2, "asked Redis again");
    assert_eq!(b.metric(Metric::CacheHits), 1);
}

#[test]
fn released_and_failed_writes_are_not_cached() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = cached_redis_ctx();
    // A 5xx releases the key: nothing to cache, the retry asks Redis.
    let mut f = redis_post(&host, &redis, &c, "k");
    host.set_response(&[(":status", "503")]);
    assert_eq!(f.on_response_headers(&host, true), Verdict::Pause);
    redis_answers(&host, &redis, &mut f, Op::Release);
    assert_eq!(host.metric(Metric::Released), 1);
    // The retry executes (Redis says claimed); its record write fails.
    let mut f = redis_post(&host, &redis, &c, "k");
    assert_eq!(host.resumed_requests.get(), 2);
    host.set_response(&[(":status", "201")]);
    assert_eq!(f.on_response_headers(&host, true), Verdict::Pause);
    store_answers(&host, &mut f, Op::Complete, Some(503), b"");
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    // Not recorded in Redis, so not in the cache either: Redis is asked.
    redis_post(&host, &redis, &c, "k");
    assert_eq!(host.call_count(), 5);
    assert_eq!(host.metric(Metric::CacheHits), 0);
}

/// A bodiless keyed POST: headers in, claim sent, the fake Redis answers
/// (call `n`). Returns the filter.
fn redis_post(host: &FakeHost, redis: &FakeRedis, c: &Rc<FilterContext>, key: &str) -> Filter {
    host.reset_exchange(&keyed(key), b"");
    let mut f = Filter::new(c.clone());
    assert_eq!(
        f.on_request_headers(host, true),
        Verdict::Pause,
        "held while the store decides"
    );
    redis_answers(host, redis, &mut f, Op::Claim);
    f
}

#[test]
fn redis_flow_claim_forward_record_replay() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = redis_ctx("");
    let mut f = redis_post(&host, &redis, &c, "k");
    assert_eq!(host.call(redis.last(&host, Op::Claim)).upstream, "webdis");
    assert_eq!(host.resumed_requests.get(), 1, "claimed: forwarded");
    host.set_response(&[(":status", "201")]);
    assert_eq!(f.on_response_headers(&host, false), Verdict::Continue);
    host.set_response_chunk(b"paid");
    assert_eq!(
        f.on_response_body(&host, 4, true),
        Verdict::Pause,
        "last chunk held until recorded"
    );
    redis_answers(&host, &redis, &mut f, Op::Complete);
    assert_eq!(host.resumed_responses.get(), 1);
    assert_eq!(host.metric(Metric::Stored), 1);
    // The retry, on any gateway sharing this Redis, replays.
    redis_post(&host, &redis, &c, "k");
    let sent = host.sent().unwrap();
    assert_eq!((sent.status, sent.body.as_slice()), (201, &b"paid"[..]));
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(
        host.resumed_requests.get(),
        1,
        "the replay is not forwarded"
    );
}

#[test]
fn a_content_length_response_completes_at_its_last_byte() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let mut f = redis_post(&host, &redis, &redis_ctx(""), "cl");
    host.set_response(&[(":status", "200"), ("content-length", "6")]);
    assert_eq!(f.on_response_headers(&host, false), Verdict::Continue);
    host.set_response_chunk(b"abc");
    assert_eq!(f.on_response_body(&host, 3, false), Verdict::Continue);
    host.set_response_chunk(b"def");
    // Not end_of_stream yet, but every byte is here: held until recorded.
    assert_eq!(f.on_response_body(&host, 3, false), Verdict::Pause);
    assert_eq!(host.call_count(), 2);
    // Envoy hands the buffered chunk back with the end of stream: still held.
    assert_eq!(f.on_response_body(&host, 3, true), Verdict::Pause);
    redis_answers(&host, &redis, &mut f, Op::Complete);
    assert_eq!(host.metric(Metric::Stored), 1);
    // Envoy's empty end-of-stream frame afterwards passes.
    host.set_response_chunk(b"");
    assert_eq!(f.on_response_body(&host, 0, true), Verdict::Continue);
}

#[test]
fn redis_in_flight_mismatch_and_release() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = redis_ctx("");
    let run = |key: &str, body: &[u8]| -> Filter {
        let hs = keyed(key);
        host.reset_exchange(&hs, body);
        let mut f = Filter::new(c.clone());
        f.on_request_headers(&host, false);
        f.on_request_body(&host, body.len(), true);
        redis_answers(&host, &redis, &mut f, Op::Claim);
        f
    };
    let mut first = run("k", b"a");
    run("k", b"a");
    assert_eq!(host.sent().unwrap().status, 409);
    run("k", b"b");
    assert_eq!(host.sent().unwrap().status, 422);
    // The original fails with a 5xx: the release is owner-checked and frees the key.
    host.set_response(&[(":status", "502")]);
    assert_eq!(first.on_response_headers(&host, true), Verdict::Pause);
    redis_answers(&host, &redis, &mut first, Op::Release);
    assert_eq!(host.metric(Metric::Released), 1);
    assert_eq!(host.resumed_responses.get(), 1);
    run("k", b"a");
    assert_eq!(host.resumed_requests.get(), 2, "the retry runs again");
}

#[test]
fn redis_unavailable_rejects_or_allows() {
    let hs = keyed("k");
    // Reject: no answer (timeout) -> 503, nothing forwarded.
    let host = FakeHost::default();
    let mut f = Filter::new(redis_ctx(""));
    host.reset_exchange(&hs, b"");
    f.on_request_headers(&host, true);
    store_answers(&host, &mut f, Op::Claim, None, b"");
    let sent = host.sent().unwrap();
    assert_eq!(sent.status, 503);
    let doc: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert!(doc["detail"].as_str().unwrap().contains("redis"));
    assert_eq!(host.resumed_requests.get(), 0);
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    // Reject also when the call cannot be sent at all.
    let host = FakeHost::default();
    host.refuse_calls();
    host.reset_exchange(&hs, b"");
    assert_eq!(
        Filter::new(redis_ctx("")).on_request_headers(&host, true),
        Verdict::Pause
    );
    assert_eq!(host.sent().unwrap().status, 503);
    // Allow: forwarded unprotected and counted.
    let host = FakeHost::default();
    let mut f = Filter::new(redis_ctx(r#","on_unavailable":"allow""#));
    host.reset_exchange(&hs, b"");
    f.on_request_headers(&host, true);
    store_answers(&host, &mut f, Op::Claim, Some(503), b"");
    assert_eq!(host.resumed_requests.get(), 1);
    assert!(host.sent().is_none());
    assert_eq!(host.metric(Metric::StoreBypassed), 1);
    // A late answer for another call is ignored.
    f.on_store_response(&host, 99, Some(200), b"{}");
    assert_eq!(host.resumed_requests.get(), 1);
}

/// Redis runs the last `op` call the filter sent, and the filter gets its
/// answer.
fn redis_answers(host: &FakeHost, redis: &FakeRedis, f: &mut Filter, op: Op) {
    let id = redis.last(host, op);
    f.on_store_response(host, id, Some(200), &redis.answer(host, id));
}

/// The last `op` call gets `status` and `body` instead of Redis's answer
/// (`None`: no answer at all).
fn store_answers(host: &FakeHost, f: &mut Filter, op: Op, status: Option<u16>, body: &[u8]) {
    f.on_store_response(host, last_call(host, op), status, body);
}

/// A keyed POST's headers, as `reset_exchange` takes them.
fn keyed(key: &str) -> [(&'static str, &str); 3] {
    [
        (":method", "POST"),
        (":path", "/pay"),
        ("idempotency-key", key),
    ]
}

#[test]
fn a_timed_out_claim_is_cancelled_whichever_lands_first() {
    let hs = keyed("k");
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = redis_ctx("");
    let start = |host: &FakeHost| {
        host.reset_exchange(&hs, b"");
        let mut f = Filter::new(c.clone());
        assert_eq!(f.on_request_headers(host, true), Verdict::Pause);
        f
    };
    // 1. The claim lands after the filter gave up (Envoy's 504 for a
    //    call past its timeout), then the cancel deletes it.
    let mut f = start(&host);
    let claim = redis.last(&host, Op::Claim);
    redis.answer(&host, claim);
    f.on_store_response(&host, claim, Some(504), b"upstream request timeout");
    assert_eq!(host.sent().unwrap().status, 503, "Envoy: at once");
    assert_eq!(host.resumed_requests.get(), 0);
    assert_eq!(host.call_count(), 2);
    let cancel = redis.last(&host, Op::Cancel);
    assert_eq!(cancel, claim + 1, "the cancel follows the claim");
    assert_eq!(host.metric(Metric::ClaimsCancelled), 1);
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    assert!(redis.answer(&host, cancel).ends_with(b"1}"), "deleted");
    assert!(redis.data.borrow().is_empty());
    // The retry claims and runs.
    let mut retry = start(&host);
    redis_answers(&host, &redis, &mut retry, Op::Claim);
    assert_eq!(host.resumed_requests.get(), 1, "the retry runs");
    complete_paid(&host, &redis, &mut retry);

    // 2. The cancel overtakes the claim (no answer at all this time): it
    //    leaves a tombstone, and the claim deletes itself when it lands.
    let mut f = Filter::new(c.clone());
    let hs2 = keyed("k2");
    host.reset_exchange(&hs2, b"");
    f.on_request_headers(&host, true);
    let claim = redis.last(&host, Op::Claim);
    f.on_store_response(&host, claim, None, b"");
    assert_eq!(host.sent().unwrap().status, 503);
    let cancel = redis.last(&host, Op::Cancel);
    assert_eq!(cancel, claim + 1, "the cancel follows the claim");
    assert!(redis.answer(&host, cancel).ends_with(b"2}"), "tombstoned");
    assert_eq!(
        redis.data.borrow().len(),
        2,
        "the record of k and k2's tombstone"
    );
    assert!(redis.answer(&host, claim).ends_with(b"\"cancelled\"}"));
    assert_eq!(redis.data.borrow().len(), 1, "k2 is free");
    assert_eq!(host.metric(Metric::ClaimsCancelled), 2);

    // 3. A tombstone never blocks another request: a new claim takes the key.
    let mut f = Filter::new(c.clone());
    host.reset_exchange(&hs2, b"");
    f.on_request_headers(&host, true);
    let late = redis.last(&host, Op::Claim);
    f.on_store_response(&host, late, None, b"");
    redis.answer(&host, redis.last(&host, Op::Cancel)); // a tombstone
    let mut other = Filter::new(c.clone());
    host.reset_exchange(&hs2, b"");
    other.on_request_headers(&host, true);
    redis_answers(&host, &redis, &mut other, Op::Claim);
    assert_eq!(host.resumed_requests.get(), 2, "claimed over the tombstone");
    // The late claim then finds the other request's marker and sets nothing.
    assert!(redis.answer(&host, late).ends_with(b"\"}"));
    complete_paid(&host, &redis, &mut other);
    assert_eq!(host.metric(Metric::Stored), 2);
}

#[test]
fn only_a_claim_of_unknown_fate_is_cancelled() {
    let hs = keyed("k");
    // A refused connection (Envoy's 503) or Webdis's own error never
    // reached Redis: nothing to cancel.
    for (status, body) in [
        (Some(503), &b"no healthy upstream"[..]),
        (Some(200), &b"{\"EVAL\":[false,\"ERR oom\"]}"[..]),
    ] {
        let host = FakeHost::default();
        let mut f = Filter::new(redis_ctx(""));
        host.reset_exchange(&hs, b"");
        f.on_request_headers(&host, true);
        store_answers(&host, &mut f, Op::Claim, status, body);
        assert_eq!(host.sent().unwrap().status, 503);
        assert_eq!(host.call_count(), 1, "{status:?}");
        assert_eq!(host.metric(Metric::ClaimsCancelled), 0);
    }
    // With on_unavailable: allow the request goes on unprotected; a claim
    // that lands late keeps a quick retry from running it again.
    let host = FakeHost::default();
    let mut f = Filter::new(redis_ctx(r#","on_unavailable":"allow""#));
    host.reset_exchange(&hs, b"");
    f.on_request_headers(&host, true);
    store_answers(&host, &mut f, Op::Claim, None, b"");
    assert_eq!(host.resumed_requests.get(), 1);
    assert_eq!(host.call_count(), 1);
    // The cancel cannot be sent: still 503, nothing else.
    let host = FakeHost::default();
    let mut f = Filter::new(redis_ctx(""));
    host.reset_exchange(&hs, b"");
    f.on_request_headers(&host, true);
    host.refuse_calls();
    store_answers(&host, &mut f, Op::Claim, None, b"");
    assert_eq!(host.sent().unwrap().status, 503);
    assert_eq!(host.metric(Metric::ClaimsCancelled), 0);
}

#[test]
fn apisix_answers_a_timed_out_claim_after_its_cancel() {
    let c = ctx(
        r#"{"host":"apisix-profile","forward":{"upstream":"up"},"store":{"type":"redis","cluster":"webdis"}}"#,
    );
    let hs: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", "/p"),
        (":authority", "a"),
        ("idempotency-key", "k"),
    ];
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    host.reset_exchange(&hs, b"{}");
    let mut f = Filter::new(c);
    f.on_request_headers(&host, false);
    assert_eq!(f.on_request_body(&host, 2, true), Verdict::Pause);
    let claim = redis.last(&host, Op::Claim);
    redis.answer(&host, claim);
    f.on_store_response(&host, claim, None, b"");
    // Store calls are chained within the request: no answer until the
    // cancel has its own.
    assert!(host.sent().is_none());
    assert_eq!(
        redis.last(&host, Op::Cancel),
        claim + 1,
        "the cancel is sent"
    );
    // Late answers to other calls change nothing.
    f.on_store_response(&host, claim, Some(200), b"{}");
    assert!(host.sent().is_none());
    redis_answers(&host, &redis, &mut f, Op::Cancel);
    assert_eq!(host.sent().unwrap().status, 503);
    assert!(redis.data.borrow().is_empty(), "the claim was deleted");
    assert_eq!(host.metric(Metric::ClaimsCancelled), 1);
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    // A cancel that gets no answer either still ends in the 503.
    let host = FakeHost::default();
    host.reset_exchange(&hs, b"{}");
    let c = ctx(
        r#"{"host":"apisix-profile","forward":{"upstream":"up"},"store":{"type":"redis","cluster":"webdis"}}"#,
    );
    let mut f = Filter::new(c);
    f.on_request_headers(&host, false);
    f.on_request_body(&host, 2, true);
    store_answers(&host, &mut f, Op::Claim, None, b"");
    store_answers(&host, &mut f, Op::Cancel, None, b"");
    assert_eq!(host.sent().unwrap().status, 503);
}

#[test]
fn redis_calls_carry_authority_and_basic_auth() {
    let host = FakeHost::default();
    let c = ctx(
        r#"{"store":{"type":"redis","cluster":"127.0.0.1:7379","authority":"redis.internal","auth":{"username":"u","password":"p"}}}"#,
    );
    let hs = keyed("k");
    host.reset_exchange(&hs, b"");
    Filter::new(c).on_request_headers(&host, true);
    let claim = host.calls().into_iter().find(|c| op(c) == Some(Op::Claim));
    let Call {
        upstream, headers, ..
    } = claim.unwrap();
    assert_eq!(upstream, "127.0.0.1:7379");
    assert!(headers.contains(&(":authority".into(), "redis.internal".into())));
    assert!(headers.contains(&("authorization".into(), "Basic dTpw".into())));
}

const APISIX: &str = r#"{"host":"apisix","store":{"type":"redis","cluster":"127.0.0.1:7379"},"forward":{"upstream":"127.0.0.1:8081"}}"#;

#[test]
fn apisix_forwarding_claims_forwards_records_then_answers() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = ctx(APISIX);
    let hs: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", "/pay?x=1"),
        (":authority", "shop.example"),
        ("content-length", "5"),
        ("content-type", "application/json"),
        ("connection", "keep-alive"),
        ("idempotency-key", "ap"),
    ];
    host.reset_exchange(&hs, b"hello");
    let mut f = Filter::new(c.clone());
    // APISIX says end-of-stream with the headers; the length says a body follows.
    assert_eq!(f.on_request_headers(&host, true), Verdict::AwaitBody);
    assert_eq!(
        host.properties.borrow().as_slice(),
        &[("wasm_process_req_body".to_string(), b"true".to_vec())]
    );
    assert_eq!(f.on_request_body(&host, 5, true), Verdict::Pause);
    assert_eq!(host.call_count(), 1, "the claim");
    redis_answers(&host, &redis, &mut f, Op::Claim);
    // Claimed: the filter sends the request upstream itself.
    let Call {
        upstream: target,
        headers,
        body,
        ..
    } = host.calls().last().cloned().unwrap();
    assert_eq!(target, "127.0.0.1:8081");
    assert!(headers.contains(&(":method".into(), "POST".into())));
    assert!(headers.contains(&(":path".into(), "/pay?x=1".into())));
    assert!(headers.contains(&(":authority".into(), "shop.example".into())));
    assert!(headers.contains(&("idempotency-key".into(), "ap".into())));
    assert!(!headers
        .iter()
        .any(|(n, _)| n == "connection" || n == "content-length"));
    assert_eq!(body.as_deref(), Some(&b"hello"[..]));
    let upstream = CallResponse {
        status: Some(201),
        headers: vec![
            (":status".into(), b"201".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("set-cookie".into(), b"s=1".to_vec()),
            ("transfer-encoding".into(), b"chunked".to_vec()),
        ],
        body: b"{\"id\":7}".to_vec(),
    };
    f.on_call_response(&host, 2, &upstream);
    assert!(host.sent().is_none(), "answered only once recorded");
    let record = host.call(redis.last(&host, Op::Complete));
    assert_eq!(record.body.is_some(), true, "the record (PUT)");
    redis_answers(&host, &redis, &mut f, Op::Complete);
    let sent = host.sent().unwrap();
    assert_eq!(
        (sent.status, sent.body.as_slice()),
        (201, &b"{\"id\":7}"[..])
    );
    assert_eq!(
        sent.header("set-cookie").as_deref(),
        Some("s=1"),
        "the live answer keeps its cookie"
    );
    assert_eq!(sent.header("transfer-encoding"), None);
    assert_eq!(
        host.resumed_requests.get(),
        0,
        "nothing goes through APISIX's own upstream"
    );
    assert_eq!(host.metric(Metric::Stored), 1);
    // The retry replays from Redis without the cookie.
    host.reset_exchange(&hs, b"hello");
    let mut g = Filter::new(c);
    g.on_request_headers(&host, true);
    g.on_request_body(&host, 5, true);
    redis_answers(&host, &redis, &mut g, Op::Claim);
    let sent = host.sent().unwrap();
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(sent.header("set-cookie"), None);
    assert_eq!(host.call_count(), 4, "no upstream call for the replay");
}

#[test]
fn apisix_always_asks_for_the_body_and_decides_in_its_callback() {
    let host = FakeHost::default();
    // An HTTP/2 POST: no Content-Length, and APISIX says end of stream.
    let hs = keyed("h2");
    host.reset_exchange(&hs, b"{}");
    let mut f = Filter::new(ctx(APISIX));
    assert_eq!(f.on_request_headers(&host, true), Verdict::AwaitBody);
    assert_eq!(
        host.properties.borrow().len(),
        1,
        "wasm_process_req_body is set"
    );
    assert!(host.calls().is_empty(), "nothing decided before the body");
    assert_eq!(f.on_request_body(&host, 2, true), Verdict::Pause);
    assert_eq!(host.call_count(), 1, "the claim, after the whole body");
    // A request that really has no body: APISIX calls back with none.
    host.reset_exchange(&hs, b"");
    let mut g = Filter::new(ctx(APISIX));
    assert_eq!(g.on_request_headers(&host, true), Verdict::AwaitBody);
    assert_eq!(g.on_request_body(&host, 0, true), Verdict::Pause);
    assert_eq!(host.call_count(), 2);
}

#[test]
fn forwarding_to_a_silent_upstream_releases_and_answers_502() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = ctx(APISIX);
    let hs: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", "/p"),
        ("idempotency-key", "down"),
    ];
    host.reset_exchange(&hs, b"");
    let mut f = Filter::new(c.clone());
    f.on_request_headers(&host, true);
    f.on_request_body(&host, 0, true);
    redis_answers(&host, &redis, &mut f, Op::Claim);
    f.on_call_response(&host, 2, &CallResponse::default());
    assert!(host.sent().is_none());
    redis_answers(&host, &redis, &mut f, Op::Release);
    let sent = host.sent().unwrap();
    assert_eq!(sent.status, 502);
    assert_eq!(host.metric(Metric::Released), 1);
    // Released: the retry runs again.
    host.reset_exchange(&hs, b"");
    let mut g = Filter::new(c);
    g.on_request_headers(&host, true);
    g.on_request_body(&host, 0, true);
    redis_answers(&host, &redis, &mut g, Op::Claim);
    assert_eq!(host.call_count(), 5);
    let retry = host.calls().last().cloned().unwrap();
    assert_eq!(
        retry.upstream, "127.0.0.1:8081",
        "the retry is forwarded again"
    );
}
