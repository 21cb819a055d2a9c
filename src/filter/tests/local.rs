//! The local store: claims, records, replays and refusals on one gateway.

use super::*;

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
        (before.0 + 3, before.1 + 3),
        "complete: reserve the record's bytes in its bucket (store.max_bytes), \
         then the slot's data (owner check) and its bucket"
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
    // Envoy 1.40's route timeout, and the name older versions used.
    assert!(should_record(504, Some("response_timeout"), true));
    assert!(should_record(504, Some("upstream_response_timeout"), true));
    assert!(should_record(504, Some("upstream_per_try_timeout"), true));
    assert!(!should_record(504, Some("response_timeout"), false));
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

/// A retry's answer: the problem type of a replayed problem, or "" if none.
fn replayed_problem(host: &FakeHost) -> (Option<u16>, String) {
    let sent = host.sent();
    let kind = sent
        .as_ref()
        .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s.body).ok())
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_default();
    (sent.map(|s| s.status), kind)
}

#[test]
fn an_abandoned_exchange_records_outcome_unknown_by_default() {
    let (host, c) = setup(r#"{"lock_timeout_seconds":5}"#);
    let (mut f, _) = request(&host, &c, &post(Some("k")), b"x");
    f.on_done(&host); // the client left before the response: Envoy reset upstream
    assert_eq!(host.metric(Metric::OutcomesUnknown), 1);
    // Past the lock timeout, and for the whole TTL: the retry gets the
    // problem replayed and never runs again.
    host.advance_clock(60_000);
    let (_, forwarded) = request(&host, &c, &post(Some("k")), b"x");
    assert!(!forwarded);
    assert_eq!(
        replayed_problem(&host),
        (
            Some(502),
            "urn:idempotency-filter:problem:outcome-unknown".into()
        )
    );
}

#[test]
fn an_upstream_reset_after_sending_is_an_unknown_outcome_a_refused_connection_is_not() {
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &post(Some("reset")), b"x");
    host.set_code_details("upstream_reset_before_response_started{connection_termination}");
    respond(&host, &mut f, 503, b"reset");
    let (_, forwarded) = request(&host, &c, &post(Some("reset")), b"x");
    assert!(!forwarded, "the upstream may have acted");
    assert_eq!(replayed_problem(&host).0, Some(502));

    let (mut f, _) = request(&host, &c, &post(Some("refused")), b"x");
    host.set_code_details(
        "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_Connection_refused}",
    );
    respond(&host, &mut f, 503, b"refused");
    let (_, forwarded) = request(&host, &c, &post(Some("refused")), b"x");
    assert!(forwarded, "the request never reached the upstream");

    let (mut f, _) = request(&host, &c, &post(Some("timeout")), b"x");
    host.set_code_details("response_timeout");
    respond(&host, &mut f, 504, b"timeout");
    let (_, forwarded) = request(&host, &c, &post(Some("timeout")), b"x");
    assert!(!forwarded, "the upstream may still act after Envoy gave up");
    assert_eq!(host.metric(Metric::OutcomesUnknown), 2);

    // The connection manager's own timeouts, after the request went
    // upstream: 504 once the request was whole (408 before).
    for (details, status) in [("stream_idle_timeout", 504), ("max_duration_timeout", 408)] {
        let (mut f, _) = request(&host, &c, &post(Some(details)), b"x");
        host.set_code_details(details);
        respond(&host, &mut f, status, b"stream timeout");
        let (_, forwarded) = request(&host, &c, &post(Some(details)), b"x");
        assert!(!forwarded, "{details}: the upstream may have acted");
    }
    assert_eq!(host.metric(Metric::OutcomesUnknown), 4);

    // release-after-lock: the same reset keeps the claim until the lock
    // timeout (409 meanwhile), then the next retry runs.
    let (host, c) = setup(r#"{"lock_timeout_seconds":5,"unknown_outcome":"release-after-lock"}"#);
    let (mut f, _) = request(&host, &c, &post(Some("reset")), b"x");
    host.set_code_details("upstream_reset_before_response_started{connection_termination}");
    respond(&host, &mut f, 503, b"reset");
    let (_, forwarded) = request(&host, &c, &post(Some("reset")), b"x");
    assert!(!forwarded);
    assert_eq!(host.sent_status(), Some(409));
    host.advance_clock(5_000);
    let (_, forwarded) = request(&host, &c, &post(Some("reset")), b"x");
    assert!(forwarded);
    assert_eq!(host.metric(Metric::OutcomesUnknown), 0);
}

#[test]
fn release_after_lock_keeps_the_claim_until_the_lock_times_out() {
    let (host, c) = setup(r#"{"lock_timeout_seconds":5,"unknown_outcome":"release-after-lock"}"#);
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
    // An sf-string, as the draft has clients send it.
    let sent_key = host.request_header("idempotency-key").unwrap();
    assert_eq!(sent_key.len(), 38);
    assert!(sent_key.starts_with('"') && sent_key.ends_with('"'));
    assert_eq!(&sent_key[15..16], "4", "UUID version 4");
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

/// Under `key_syntax: opaque` the header is the key itself: quoted, it
/// would come back as another key.
#[test]
fn generated_opaque_keys_are_bare() {
    let (host, c) = setup(r#"{"generate_missing":true,"key_syntax":"opaque"}"#);
    let (mut f, _) = request(&host, &c, &post(None), b"x");
    let sent_key = host.request_header("idempotency-key").unwrap();
    assert_eq!(sent_key.len(), 36);
    respond(&host, &mut f, 201, b"ok");
    let (_, forwarded) = request(&host, &c, &post(Some(&sent_key)), b"x");
    assert!(!forwarded, "replayed");
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

/// `store.max_bytes` through the filter: records that do not fit evict the
/// oldest of their bucket, the bytes gauge follows the table exactly, and a
/// body larger than a bucket's share is not even captured: the client gets
/// it whole, retries get the replay without it.
#[test]
fn the_byte_budget_evicts_for_space_and_its_gauge_follows_the_table() {
    // One bucket of 16 entries whose share (5000 bytes) holds three
    // 1000-byte answers (1488 bytes each, charged).
    let (host, c) = setup(r#"{"store":{"max_entries":16,"max_bytes":5000}}"#);
    let charged = || match &c.store {
        crate::store::Store::Local { table, .. } => table.charged(&host.shared).unwrap(),
        crate::store::Store::Redis(_) => unreachable!(),
    };
    let answer = |i: usize| vec![b'a' + i as u8; 1000];
    for i in 0..6 {
        // Eviction takes the oldest completion: one per millisecond.
        host.advance_clock(1);
        let key = format!("k{i}");
        let (mut f, forwarded) = request(&host, &c, &post(Some(&key)), b"{}");
        assert!(forwarded);
        respond(&host, &mut f, 201, &answer(i));
        assert_eq!(
            host.metric(Metric::BytesHeld) as u64,
            charged(),
            "after {key}"
        );
    }
    assert_eq!(host.metric(Metric::Stored), 6);
    assert_eq!(host.metric(Metric::EvictedForSpace), 3);
    assert_eq!(host.metric(Metric::Evicted), 0, "the entries never ran out");
    assert_eq!(host.metric(Metric::Entries), 3);
    assert!(charged() <= 5000);
    // The three newest replay byte for byte; the oldest runs again.
    for i in 3..6 {
        let (_, forwarded) = request(&host, &c, &post(Some(&format!("k{i}"))), b"{}");
        assert!(!forwarded, "k{i} replayed");
        assert_eq!(host.sent().unwrap().body, answer(i));
    }
    let (_, forwarded) = request(&host, &c, &post(Some("k0")), b"{}");
    assert!(forwarded, "evicted: runs again");
    // A 40 KB answer: larger than the share, so captured without its body.
    let (mut f, _) = request(&host, &c, &post(Some("big")), b"{}");
    respond(&host, &mut f, 201, &vec![b'z'; 40_000]);
    assert_eq!(host.metric(Metric::BodiesOmitted), 1);
    request(&host, &c, &post(Some("big")), b"{}");
    let replay = host.sent().unwrap();
    assert_eq!(
        (replay.status, replay.body.len()),
        (201, 0),
        "replayed, without its body"
    );
    assert_eq!(
        replay.header("idempotent-replay-body").as_deref(),
        Some("omitted")
    );
    assert_eq!(host.metric(Metric::BytesHeld) as u64, charged());
}

#[test]
fn a_key_on_another_host_is_kept_apart_only_when_the_host_is_named() {
    let on = |host: &str| {
        let mut h = post(Some("k1"));
        h.push((":authority", host.to_string()));
        h
    };
    // By default the host is neither scope nor fingerprint: one request.
    let (host, c) = setup("{}");
    let (mut f, _) = request(&host, &c, &on("payments.example.com"), b"{}");
    respond(&host, &mut f, 201, b"from-payments");
    let (_, forwarded) = request(&host, &c, &on("refunds.example.com"), b"{}");
    assert!(!forwarded, "replayed: documented");
    // Named in the scope: two keys, each runs.
    let (host, c) = setup(r#"{"scope_headers":["authorization",":authority"]}"#);
    let (mut f, _) = request(&host, &c, &on("payments.example.com"), b"{}");
    respond(&host, &mut f, 201, b"from-payments");
    let (_, forwarded) = request(&host, &c, &on("refunds.example.com"), b"{}");
    assert!(forwarded, "another host, another key");
    // Named in the fingerprint: the same key, another request: 422.
    let (host, c) = setup(r#"{"fingerprint_headers":["content-type",":authority"]}"#);
    let (mut f, _) = request(&host, &c, &on("payments.example.com"), b"{}");
    respond(&host, &mut f, 201, b"from-payments");
    let (_, forwarded) = request(&host, &c, &on("refunds.example.com"), b"{}");
    assert!(!forwarded);
    assert_eq!(host.sent_status(), Some(422));
}

/// `max_in_flight_bytes`: a response's copy for its record must fit in what
/// the worker's running requests hold. One that does not fit is recorded
/// without its body (the client still gets it whole, and the retry does
/// not run again); a request gives its bytes back when it ends.
#[test]
fn the_workers_in_flight_budget_omits_a_body_that_does_not_fit_until_bytes_come_back() {
    let (host, c) = setup(
        r#"{"max_request_body_bytes":10,"max_response_body_bytes":10,"max_in_flight_bytes":10}"#,
    );
    // A is halfway through its answer: 6 bytes captured.
    let (mut a, forwarded) = request(&host, &c, &post(Some("a")), b"{}");
    assert!(forwarded);
    host.set_response(&[(":status", "201"), ("content-length", "10")]);
    a.on_response_headers(&host, false);
    host.set_response_chunk(b"aaaaaa");
    a.on_response_body(&host, 6, false);
    assert_eq!(c.in_flight.held(), 6);
    // B's 6 bytes do not fit beside them: B is recorded without its body.
    let (mut b, forwarded) = request(&host, &c, &post(Some("b")), b"{}");
    assert!(forwarded);
    respond(&host, &mut b, 201, b"bbbbbb");
    drop(b);
    assert_eq!(host.metric(Metric::InFlightFull), 1);
    assert_eq!(host.metric(Metric::BodiesOmitted), 1);
    // A's last 4 bytes fit (10 of 10): A is recorded whole, and lets go of
    // its bytes once its record is written.
    host.set_response_chunk(b"aaaa");
    a.on_response_body(&host, 4, true);
    assert_eq!(c.in_flight.held(), 0);
    a.on_done(&host);
    drop(a);
    assert_eq!(host.metric(Metric::Stored), 2);
    let (_, forwarded) = request(&host, &c, &post(Some("b")), b"{}");
    assert!(!forwarded, "B replayed, not run again");
    let replay = host.sent().unwrap();
    assert_eq!(
        (
            replay.body.len(),
            replay.header("idempotent-replay-body").as_deref()
        ),
        (0, Some("omitted"))
    );
    let (_, forwarded) = request(&host, &c, &post(Some("a")), b"{}");
    assert!(!forwarded);
    assert_eq!(host.sent().unwrap().body, b"aaaaaaaaaa");
    // With the bytes back, a full-size answer is kept whole again.
    let (mut d, _) = request(&host, &c, &post(Some("d")), b"{}");
    respond(&host, &mut d, 201, b"dddddddddd");
    drop(d);
    request(&host, &c, &post(Some("d")), b"{}");
    assert_eq!(host.sent().unwrap().body, b"dddddddddd");
    assert_eq!(host.metric(Metric::InFlightFull), 1);
    // An answer past max_response_body_bytes lets go of what it had
    // captured as soon as the record gives its body up, not at its end.
    let (mut e, _) = request(&host, &c, &post(Some("e")), b"{}");
    host.set_response(&[(":status", "201")]);
    e.on_response_headers(&host, false);
    for (i, chunk) in [b"eeee", b"eeee", b"eeee"].iter().enumerate() {
        host.set_response_chunk(*chunk);
        e.on_response_body(&host, 4, false);
        let expected = if i < 2 { 4 * (i as u64 + 1) } else { 0 };
        assert_eq!(c.in_flight.held(), expected, "after chunk {i}");
    }
}
