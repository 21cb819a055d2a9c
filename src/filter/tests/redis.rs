//! The Redis store: the claim, record and release calls, failures, and
//! the cancel of a claim whose answer never came.

use super::*;

#[test]
fn redis_outcomes_follow_the_store_answers() {
    let last = |host: &FakeHost| {
        let props = host.properties.borrow();
        String::from_utf8(props.last().unwrap().1.clone()).unwrap()
    };
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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
    store_answers(&host, &mut f, Op::Record, None, b"");
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
fn redis_flow_claim_forward_record_replay() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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
    redis_answers(&host, &redis, &mut f, Op::Record);
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
    let redis = FakeRedis::with_script();
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
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.metric(Metric::Stored), 1);
    // Envoy's empty end-of-stream frame afterwards passes.
    host.set_response_chunk(b"");
    assert_eq!(f.on_response_body(&host, 0, true), Verdict::Continue);
}

#[test]
fn redis_in_flight_mismatch_and_release() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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

#[test]
fn a_timed_out_claim_is_cancelled_whichever_lands_first() {
    let hs = keyed("k");
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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
    assert!(
        redis.answer(&host, cancel).ends_with(br#"["1"]}"#),
        "deleted"
    );
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
    assert!(
        redis.answer(&host, cancel).ends_with(br#"["2"]}"#),
        "tombstoned"
    );
    assert_eq!(
        redis.data.borrow().len(),
        2,
        "the record of k and k2's tombstone"
    );
    assert!(redis.answer(&host, claim).ends_with(br#"["cancelled"]}"#));
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
    assert!(redis.answer(&host, late).ends_with(br#""]}"#));
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
    let redis = FakeRedis::with_script();
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
    let claim = host
        .calls()
        .into_iter()
        .find(|c| ops(c) == Some(vec![Op::Claim]));
    let Call {
        upstream, headers, ..
    } = claim.unwrap();
    assert_eq!(upstream, "127.0.0.1:7379");
    assert!(headers.contains(&(":authority".into(), "redis.internal".into())));
    assert!(headers.contains(&("authorization".into(), "Basic dTpw".into())));
}

#[test]
fn an_exchange_that_ends_mid_response_records_outcome_unknown_in_redis() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(
        r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","cache_entries":0}}"#,
    );
    let mut f = redis_post(&host, &redis, &c, "k");
    host.set_response(&[(":status", "201")]);
    f.on_response_headers(&host, false);
    // The client leaves mid-response: the record call goes out for nobody.
    f.on_done(&host);
    assert!(f.waiting(), "the filter waits for the record's answer");
    let sent_before = host.sent();
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.sent(), sent_before, "nobody is answered");
    assert_eq!(host.metric(Metric::OutcomesUnknown), 1);
    assert_eq!(host.metric(Metric::Stored), 1);
    let last = host.properties.borrow().last().cloned().unwrap();
    assert_eq!(
        last,
        ("o".to_string(), b"outcome-unknown".to_vec()),
        "not \"stored\""
    );
    // Another gateway's retry reads the problem from Redis.
    let retry = redis_post(&host, &redis, &redis_ctx(""), "k");
    assert!(!retry.waiting());
    assert_eq!(host.sent_status(), Some(502));
}

/// An operation sent alone (APISIX) goes by SHA-1. A Redis without the
/// script (restarted, flushed) answers `NOSCRIPT`: nothing ran, and the same
/// operation goes again once, by source. `NOSCRIPT` to the source itself
/// fails the operation.
#[test]
fn an_operation_sent_alone_goes_by_sha_and_again_by_source_after_noscript() {
    let host = FakeHost::default();
    let redis = FakeRedis::default();
    let c = redis_ctx("");
    let path = |id: u32| host.call(id).header(":path").unwrap().to_string();
    host.reset_exchange(&keyed("k"), b"");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
    let by_sha = redis.last(&host, Op::Claim);
    assert!(path(by_sha).starts_with("/EVALSHA/"));
    f.on_store_response(&host, by_sha, Some(200), &redis.answer(&host, by_sha));
    assert!(redis.data.borrow().is_empty(), "NOSCRIPT: nothing ran");
    let by_source = redis.last(&host, Op::Claim);
    assert_ne!(by_source, by_sha, "sent again");
    assert!(path(by_source).starts_with("/EVAL/"));
    f.on_store_response(&host, by_source, Some(200), &redis.answer(&host, by_source));
    assert_eq!(host.resumed_requests.get(), 1, "claimed: forwarded");
    complete_paid(&host, &redis, &mut f);
    assert!(path(redis.last(&host, Op::Record)).starts_with("/EVALSHA/"));
    assert_eq!(host.metric(Metric::Stored), 1);
    assert_eq!(host.metric(Metric::StoreErrors), 0);
    assert_eq!(host.metric(Metric::StoreCalls), 3);

    host.reset_exchange(&keyed("k2"), b"");
    let mut f = Filter::new(c.clone());
    f.on_request_headers(&host, true);
    let noscript = br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#;
    store_answers(&host, &mut f, Op::Claim, Some(200), noscript);
    let calls = host.call_count();
    store_answers(&host, &mut f, Op::Claim, Some(200), noscript);
    assert_eq!(host.call_count(), calls, "sent by source once only");
    assert_eq!(host.sent_status(), Some(503));
    assert_eq!(host.metric(Metric::StoreErrors), 1);
}

/// `NOSCRIPT` to a record sends the record again, and to a cancel the
/// cancel: the operation kept is always the one whose answer it was.
#[test]
fn noscript_resends_the_record_or_the_cancel_it_answered() {
    let noscript = br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#;
    let path = |host: &FakeHost, id: u32| host.call(id).header(":path").unwrap().to_string();
    // The record: the held response goes on once the source has landed.
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let mut f = redis_post(&host, &redis, &redis_ctx(""), "k");
    host.set_response(&[(":status", "201")]);
    f.on_response_headers(&host, false);
    host.set_response_chunk(b"paid");
    assert_eq!(f.on_response_body(&host, 4, true), Verdict::Pause);
    let by_sha = redis.last(&host, Op::Record);
    f.on_store_response(&host, by_sha, Some(200), noscript);
    let by_source = redis.last(&host, Op::Record);
    assert_ne!(by_source, by_sha, "the record, sent again");
    assert!(path(&host, by_source).starts_with("/EVAL/"));
    assert_eq!(host.resumed_responses.get(), 0, "held until recorded");
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.resumed_responses.get(), 1);
    assert_eq!(host.metric(Metric::Stored), 1);
    assert_eq!(host.metric(Metric::StoreErrors), 0);
    // The cancel of a claim that got no answer (calls chained in the
    // request, as on APISIX).
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(
        r#"{"host":"apisix-profile","forward":{"upstream":"up"},"store":{"type":"redis","cluster":"webdis"}}"#,
    );
    host.reset_exchange(
        &[
            (":method", "POST"),
            (":path", "/p"),
            (":authority", "a"),
            ("idempotency-key", "k"),
        ],
        b"{}",
    );
    let mut f = Filter::new(c);
    f.on_request_headers(&host, false);
    f.on_request_body(&host, 2, true);
    let claim = redis.last(&host, Op::Claim);
    redis.answer(&host, claim);
    f.on_store_response(&host, claim, None, b"");
    let cancel = redis.last(&host, Op::Cancel);
    f.on_store_response(&host, cancel, Some(200), noscript);
    let again = host.call_count() as u32;
    assert_eq!(
        redis.last(&host, Op::Cancel),
        again,
        "the cancel, sent again"
    );
    assert!(path(&host, again).starts_with("/EVAL/"));
    assert!(host.sent().is_none());
    redis_answers(&host, &redis, &mut f, Op::Cancel);
    assert_eq!(host.sent().unwrap().status, 503);
    assert!(redis.data.borrow().is_empty(), "the claim was deleted");
}

/// Webdis answers 503 when its link to Redis broke, perhaps after sending
/// the claim: the claim may have run, so it is cancelled, and a retry is
/// not held at 409 for the lock by a claim no request runs.
#[test]
fn a_claim_webdis_answered_503_may_have_run_and_is_cancelled() {
    let hs = keyed("k");
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = redis_ctx("");
    host.reset_exchange(&hs, b"");
    let mut f = Filter::new(c.clone());
    f.on_request_headers(&host, true);
    let claim = redis.last(&host, Op::Claim);
    redis.answer(&host, claim); // Redis ran it; then the link broke
    f.on_store_response(&host, claim, Some(503), b"Service Unavailable");
    assert_eq!(host.sent().unwrap().status, 503);
    assert_eq!(host.metric(Metric::ClaimsCancelled), 1);
    redis_answers(&host, &redis, &mut f, Op::Cancel);
    let mut retry = Filter::new(c);
    host.reset_exchange(&hs, b"");
    retry.on_request_headers(&host, true);
    redis_answers(&host, &redis, &mut retry, Op::Claim);
    assert_eq!(host.resumed_requests.get(), 1, "the retry runs");
}

/// A captured body counts in the VM's bytes in flight while its record is
/// out, and no longer once the write has answered.
#[test]
fn a_captured_body_counts_until_its_record_is_written() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = redis_ctx("");
    let mut f = redis_post(&host, &redis, &c, "held");
    host.set_response(&[(":status", "201")]);
    f.on_response_headers(&host, false);
    host.set_response_chunk(b"paid");
    assert_eq!(f.on_response_body(&host, 4, true), Verdict::Pause);
    assert_eq!(c.in_flight.held(), 4, "held while the record is out");
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(c.in_flight.held(), 0);
}
