//! Forwarding mode (APISIX): the filter claims, forwards the request
//! itself, records the upstream's answer, then answers the client.

use super::*;

const APISIX: &str = r#"{"host":"apisix","store":{"type":"redis","cluster":"127.0.0.1:7379"},"forward":{"upstream":"127.0.0.1:8081"}}"#;

#[test]
fn apisix_forwarding_claims_forwards_records_then_answers() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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
    let record = host.call(redis.last(&host, Op::Record));
    assert!(record.body.is_some(), "the record (PUT)");
    redis_answers(&host, &redis, &mut f, Op::Record);
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

/// APISIX crashes its worker when a request without `Host` has its headers
/// listed (HTTP/1.0): such a request is refused where protected, let go
/// where not, and its headers are never listed.
#[test]
fn apisix_requests_without_host_are_never_listed() {
    let host = FakeHost::default();
    host.lists_headers_only_with_host.set(true);
    let c = ctx(APISIX);
    host.reset_exchange(&keyed("no-host"), b"{}");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
    let sent = host.sent().unwrap();
    assert_eq!(sent.status, 400);
    assert!(String::from_utf8_lossy(&sent.body).contains("host-required"));
    assert!(
        host.calls().is_empty(),
        "nothing claimed, nothing forwarded"
    );
    // Not a protected method, or no key where keys are optional: it goes
    // on as it would with Host.
    host.reset_exchange(&[(":method", "GET"), (":path", "/health")], b"");
    let mut g = Filter::new(c.clone());
    assert_eq!(g.on_request_headers(&host, true), Verdict::Continue);
    host.reset_exchange(&[(":method", "POST"), (":path", "/pay")], b"{}");
    let mut unkeyed = Filter::new(c.clone());
    assert_eq!(unkeyed.on_request_headers(&host, true), Verdict::Continue);
    assert_eq!(host.sent_status(), None);
    assert_eq!(host.metric(Metric::Unkeyed), 1);
    // With Host, as ever.
    let mut with_host = keyed("with-host").to_vec();
    with_host.push(("host", "pay.example"));
    host.reset_exchange(&with_host, b"{}");
    let mut h = Filter::new(c);
    assert_eq!(h.on_request_headers(&host, true), Verdict::AwaitBody);
    assert_eq!(h.on_request_body(&host, 2, true), Verdict::Pause);
    assert_eq!(host.call_count(), 1, "claimed");
}

#[test]
fn forwarding_to_a_silent_upstream_releases_and_answers_502() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
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

#[test]
fn a_forwarded_call_that_times_out_has_an_unknown_outcome() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(APISIX); // forward.timeout_ms: 8000 (APISIX's default)
    let hs: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", "/p"),
        ("idempotency-key", "slow"),
    ];
    host.reset_exchange(&hs, b"");
    let mut f = Filter::new(c.clone());
    f.on_request_headers(&host, true);
    f.on_request_body(&host, 0, true);
    redis_answers(&host, &redis, &mut f, Op::Claim);
    // No answer, at the timeout: the request was sent and may have acted.
    host.advance_clock(8_000);
    f.on_call_response(&host, 2, &CallResponse::default());
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.sent().unwrap().status, 502);
    assert_eq!(host.metric(Metric::OutcomesUnknown), 1);
    // The retry gets the problem replayed; nothing is forwarded again.
    host.reset_exchange(&hs, b"");
    let mut g = Filter::new(c);
    g.on_request_headers(&host, true);
    g.on_request_body(&host, 0, true);
    redis_answers(&host, &redis, &mut g, Op::Claim);
    assert_eq!(host.sent().unwrap().status, 502);
    assert_eq!(
        host.call_count(),
        4,
        "claim, forward, record, the retry's claim"
    );
}

/// APISIX says nothing of why a call failed. One that failed at once never
/// opened its connection; one that failed later may have been sent, even
/// well before `forward.timeout_ms` by the filter's clock, since nginx arms
/// its timers from the time it cached when its event loop last woke.
#[test]
fn an_apisix_call_that_failed_after_half_its_timeout_may_have_acted() {
    // (ms after the send, the operation that follows)
    let cases = [
        (2, Op::Release),
        (3_999, Op::Release),
        (4_000, Op::Record),
        // A timeout armed on a clock 60 ms stale.
        (7_940, Op::Record),
        (8_000, Op::Record),
    ];
    for (waited, then) in cases {
        let host = FakeHost::default();
        let redis = FakeRedis::with_script();
        let hs = [
            (":method", "POST"),
            (":path", "/p"),
            ("idempotency-key", "k"),
        ];
        host.reset_exchange(&hs, b"");
        let mut f = Filter::new(ctx(APISIX));
        f.on_request_headers(&host, true);
        f.on_request_body(&host, 0, true);
        redis_answers(&host, &redis, &mut f, Op::Claim);
        host.advance_clock(waited);
        f.on_call_response(&host, 2, &CallResponse::default());
        let last = ops(host.calls().last().unwrap());
        assert_eq!(
            last,
            Some(vec![then]),
            "a call that failed after {waited} ms"
        );
    }
}

/// Envoy, forwarding mode: the filter's own calls outlive the client's
/// stream, and their answers still reach the filter.
const ENVOY_FORWARD: &str = r#"{"forward":{"upstream":"up"},"store":{"type":"redis","cluster":"webdis","cache_entries":0}}"#;

#[test]
fn a_client_that_left_still_gets_its_answer_recorded() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(ENVOY_FORWARD);
    let mut f = redis_post(&host, &redis, &c, "gone");
    let upstream = host.last_call_to("up").unwrap();
    // The client times out and goes; the upstream answers later (marked as
    // Envoy's router marks what an upstream sent).
    f.on_done(&host);
    assert!(f.waiting(), "the call's answer is still awaited");
    let answer = CallResponse {
        status: Some(201),
        headers: vec![
            (":status".into(), b"201".to_vec()),
            ("x-envoy-upstream-service-time".into(), b"2".to_vec()),
        ],
        body: b"paid".to_vec(),
    };
    f.on_call_response(&host, upstream.id, &answer);
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.metric(Metric::Stored), 1, "recorded");
    assert!(host.sent().is_none(), "no one to answer");
    assert!(!f.waiting());
    // The retry is replayed: one execution.
    redis_post(&host, &redis, &c, "gone");
    let sent = host.sent().unwrap();
    assert_eq!((sent.status, sent.body.as_slice()), (201, &b"paid"[..]));
    assert_eq!(
        host.calls().iter().filter(|c| c.upstream == "up").count(),
        1
    );
}

#[test]
fn a_claim_that_lands_after_its_client_left_is_released() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(ENVOY_FORWARD);
    host.reset_exchange(&keyed("late"), b"");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
    f.on_done(&host);
    redis_answers(&host, &redis, &mut f, Op::Claim);
    assert!(host.last_call_to("up").is_none(), "nothing forwarded");
    redis_answers(&host, &redis, &mut f, Op::Release);
    assert_eq!(host.metric(Metric::Released), 1);
    assert!(redis.data.borrow().is_empty(), "the key is free");
    assert_eq!(host.resumed_requests.get(), 0);
    assert!(host.sent().is_none());
}

#[test]
fn a_call_that_could_not_be_sent_later_is_decided_as_if_at_once() {
    let c = redis_ctx("");
    let host = FakeHost::default();
    host.reset_exchange(&keyed("k"), b"");
    let mut f = Filter::new(c.clone());
    assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
    let claim = last_call(&host, Op::Claim);
    f.on_call_failed(
        &host,
        claim,
        crate::host::HostError {
            call: "http_call",
            status: 10,
        },
    );
    assert_eq!(host.sent_status(), Some(503));
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    assert_eq!(host.metric(Metric::ClaimsCancelled), 0, "nothing to cancel");
}

#[test]
fn a_claim_that_times_out_after_its_client_left_is_cancelled() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(ENVOY_FORWARD);
    host.reset_exchange(&keyed("slow"), b"");
    let mut f = Filter::new(c);
    assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
    let claim = redis.last(&host, Op::Claim);
    redis.answer(&host, claim); // it lands in Redis, but its answer does not come
    f.on_done(&host);
    f.on_call_response(&host, claim, &CallResponse::default());
    let cancel = redis.last(&host, Op::Cancel);
    assert!(
        redis.answer(&host, cancel).ends_with(br#"["1"]}"#),
        "deleted"
    );
    assert!(redis.data.borrow().is_empty(), "the key is free");
    assert_eq!(host.metric(Metric::ClaimsCancelled), 1);
    assert!(host.sent().is_none(), "no one to answer");
    assert!(host.last_call_to("up").is_none(), "nothing forwarded");
}

#[test]
fn an_upstream_call_envoy_refuses_to_send_releases_the_key() {
    // No such cluster, no healthy host, a circuit breaker: Envoy refuses the
    // call at once, or (the worker sending it) after the callback; either
    // way nothing reached the upstream.
    for later in [false, true] {
        let host = FakeHost::default();
        let redis = FakeRedis::with_script();
        let c = ctx(ENVOY_FORWARD);
        host.reset_exchange(&keyed("refused"), b"");
        let mut f = Filter::new(c);
        assert_eq!(f.on_request_headers(&host, true), Verdict::Pause);
        if !later {
            *host.refused_upstream.borrow_mut() = Some("up".to_string());
        }
        let claim = redis.last(&host, Op::Claim);
        let body = redis.answer(&host, claim);
        f.on_call_response(
            &host,
            claim,
            &CallResponse {
                status: Some(200),
                headers: Vec::new(),
                body,
            },
        );
        if later {
            let call = host.last_call_to("up").unwrap();
            f.on_call_failed(
                &host,
                call.id,
                crate::host::HostError {
                    call: "http_call",
                    status: 10,
                },
            );
        }
        redis_answers(&host, &redis, &mut f, Op::Release);
        assert_eq!(host.metric(Metric::Released), 1, "later: {later}");
        assert_eq!(host.metric(Metric::OutcomesUnknown), 0);
        assert_eq!(host.sent_status(), Some(502));
        assert!(redis.data.borrow().is_empty(), "the key is free");
    }
}

#[test]
fn envoys_control_headers_are_not_forwarded_on_envoy_only() {
    // Envoy's router handles the filter's own call and obeys x-envoy-*
    // request headers (retries, timeouts): a client must not set them there.
    // APISIX's calls know nothing of them: they go as the client sent them.
    for (config, kept) in [(ENVOY_FORWARD, false), (APISIX, true)] {
        let host = FakeHost::default();
        let redis = FakeRedis::with_script();
        let c = ctx(config);
        let hs: [(&str, &str); 6] = [
            (":method", "POST"),
            (":path", "/pay"),
            ("idempotency-key", "k"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-max-retries", "3"),
            ("x-tenant", "t1"),
        ];
        host.reset_exchange(&hs, b"");
        let mut f = Filter::new(c);
        f.on_request_headers(&host, true);
        if config == APISIX {
            f.on_request_body(&host, 0, true);
        }
        redis_answers(&host, &redis, &mut f, Op::Claim);
        let call = host
            .calls()
            .into_iter()
            .rev()
            .find(|c| c.upstream.ends_with("up") || c.upstream.ends_with(":8081"))
            .unwrap();
        let has = |name: &str| call.headers.iter().any(|(n, _)| n == name);
        assert_eq!(has("x-envoy-retry-on"), kept, "{config}");
        assert_eq!(has("x-envoy-max-retries"), kept, "{config}");
        assert!(has("x-tenant"), "other headers always go");
    }
}

/// An upstream's own 504, whenever it comes, is an upstream 5xx: released,
/// so that a retry runs (the router marks it as an upstream's answer).
#[test]
fn an_upstreams_own_504_is_a_5xx_even_late_in_the_timeout() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(ENVOY_FORWARD); // forward.timeout_ms 25000
    let mut f = redis_post(&host, &redis, &c, "gw504");
    let upstream = host.last_call_to("up").unwrap();
    host.advance_clock(13_000);
    let answer = CallResponse {
        status: Some(504),
        headers: vec![
            (":status".into(), b"504".to_vec()),
            ("x-envoy-upstream-service-time".into(), b"13000".to_vec()),
        ],
        body: b"gateway timeout".to_vec(),
    };
    f.on_call_response(&host, upstream.id, &answer);
    assert_eq!(host.metric(Metric::OutcomesUnknown), 0);
    assert_eq!(ops(host.calls().last().unwrap()), Some(vec![Op::Release]));
}

/// Forwarding mode holds a request's body until it is sent, and takes the
/// upstream's whole answer: both count in the VM's bytes in flight. A body
/// that does not fit, or any request once the count is at the limit, is
/// refused before its key is claimed (nothing ran, the retry runs); an
/// answer is counted whatever the limit, and its record keeps no body if
/// the count went past it.
#[test]
fn forwarding_refuses_requests_past_the_vms_bytes_in_flight_before_claiming() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = ctx(
        r#"{"host":"apisix","max_request_body_bytes":8,"max_response_body_bytes":8,"max_in_flight_bytes":8,"store":{"type":"redis","cluster":"127.0.0.1:7379"},"forward":{"upstream":"127.0.0.1:8081"}}"#,
    );
    // The body in two chunks (sizes are cumulative, as the proxy gives them).
    let start = |key: &str, body: &[u8]| {
        host.reset_exchange(&keyed(key), body);
        let mut f = Filter::new(c.clone());
        assert_eq!(f.on_request_headers(&host, false), Verdict::AwaitBody);
        let mut v = f.on_request_body(&host, body.len() / 2, false);
        if v == Verdict::AwaitBody {
            v = f.on_request_body(&host, body.len(), true);
        }
        (f, v)
    };
    let refused = |what: &str| {
        let sent = host.sent().unwrap();
        assert_eq!(sent.status, 503, "{what}");
        assert!(String::from_utf8_lossy(&sent.body).contains("in-flight-full"));
        assert_eq!(sent.header("retry-after").as_deref(), Some("1"));
    };
    // A: 5 bytes held while its claim is out.
    let (mut a, v) = start("a", b"hello");
    assert_eq!(v, Verdict::Pause);
    assert_eq!(c.in_flight.held(), 5);
    // B: 5 more do not fit. 503 at once: no claim, no call.
    let calls = host.call_count();
    let (b, _) = start("b", b"world");
    refused("B");
    assert_eq!(host.call_count(), calls, "nothing claimed, nothing sent");
    drop(b);
    // A is claimed and sent: the host has its body, which no longer counts.
    redis_answers(&host, &redis, &mut a, Op::Claim);
    assert!(host.last_call_to("127.0.0.1:8081").is_some());
    assert_eq!(c.in_flight.held(), 0);
    // D: 6 bytes held while its claim is out.
    let (d, _) = start("d", b"dddddd");
    assert_eq!(c.in_flight.held(), 6);
    // A's 4-byte answer is counted (10 of 8): the client gets it whole, the
    // record keeps no body.
    let upstream = CallResponse {
        status: Some(201),
        headers: vec![(":status".into(), b"201".to_vec())],
        body: b"paid".to_vec(),
    };
    a.on_call_response(
        &host,
        host.last_call_to("127.0.0.1:8081").unwrap().id,
        &upstream,
    );
    redis_answers(&host, &redis, &mut a, Op::Record);
    assert_eq!(host.sent().unwrap().body, b"paid");
    assert_eq!(host.metric(Metric::BodiesOmitted), 1);
    assert_eq!(c.in_flight.held(), 6, "A let go of its answer once relayed");
    // F's 2 bytes take the count to the limit: even a request without a
    // body waits for room then.
    let (f, _) = start("f", b"ff");
    assert_eq!(c.in_flight.held(), 8);
    let calls = host.call_count();
    host.reset_exchange(&keyed("e"), b"");
    let mut e = Filter::new(c.clone());
    assert_eq!(e.on_request_headers(&host, true), Verdict::Pause);
    refused("E, without a body");
    assert_eq!(host.call_count(), calls);
    assert_eq!(host.metric(Metric::InFlightFull), 3);
    drop((a, d, e, f));
    assert_eq!(c.in_flight.held(), 0);
    // A replay lets go of its request's body as it answers.
    let (mut a2, _) = start("a", b"hello");
    assert_eq!(c.in_flight.held(), 5);
    redis_answers(&host, &redis, &mut a2, Op::Claim);
    let sent = host.sent().unwrap();
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(c.in_flight.held(), 0);
    let calls = host.call_count();
    // B's retry fits now: claimed.
    let (_b, _) = start("b", b"world");
    assert_eq!(host.call_count(), calls + 1, "B's claim");
}
