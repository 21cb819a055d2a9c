//! The main paths of a protected request, one row each, in the style of
//! coraza-proxy-wasm's `TestLifecycle`: (configuration, request, the
//! upstream's answer) → (status the client gets, outcome, metric counted).
//! A row's `before` requests run first on the same store, each to the end
//! (or left running, when their upstream never answers).

use super::*;
use crate::fake_redis::ops;

/// A request: its key (if any) and body.
#[derive(Clone, Copy)]
struct Req {
    key: Option<&'static str>,
    body: &'static [u8],
}

const fn keyed_req(key: &'static str, body: &'static [u8]) -> Req {
    Req {
        key: Some(key),
        body,
    }
}

struct Case {
    name: &'static str,
    config: &'static str,
    /// Run first: a request and what its upstream answers (`None`: never).
    before: &'static [(Req, Option<u16>)],
    /// The store cannot be reached (local: shared data fails; Redis: no
    /// call can be sent) while the request under test runs.
    store_down: bool,
    request: Req,
    upstream: u16,
    status: u16,
    outcome: &'static str,
    metric: Metric,
}

const LOCAL: &str = r#"{"outcome_property":"o"}"#;
const REDIS: &str =
    r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","cache_entries":0}}"#;
const CACHED: &str =
    r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","cache_entries":32}}"#;
const FORWARD: &str = r#"{"outcome_property":"o","forward":{"upstream":"up"},"store":{"type":"redis","cluster":"webdis","cache_entries":0}}"#;

const PAY: Req = keyed_req("k", b"{\"amount\":10}");
const PAID: &[(Req, Option<u16>)] = &[(PAY, Some(201))];

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { name: "local: the first request runs and is recorded", config: LOCAL, before: &[], store_down: false,
           request: PAY, upstream: 201, status: 201, outcome: "stored", metric: Metric::Stored },
    Case { name: "local: a retry is replayed", config: LOCAL, before: PAID, store_down: false,
           request: PAY, upstream: 500, status: 201, outcome: "replayed", metric: Metric::Replays },
    Case { name: "local: the key with another body is refused", config: LOCAL, before: PAID, store_down: false,
           request: keyed_req("k", b"{}"), upstream: 201, status: 422, outcome: "key-reused", metric: Metric::Mismatches },
    Case { name: "local: a retry while the first runs is refused", config: LOCAL, before: &[(PAY, None)], store_down: false,
           request: PAY, upstream: 201, status: 409, outcome: "request-in-progress", metric: Metric::Conflicts },
    Case { name: "local: a server error releases the key", config: LOCAL, before: &[], store_down: false,
           request: PAY, upstream: 503, status: 503, outcome: "released", metric: Metric::Released },
    Case { name: "local: a server error is recorded when asked", config: r#"{"outcome_property":"o","record_server_errors":true}"#, before: &[], store_down: false,
           request: PAY, upstream: 500, status: 500, outcome: "stored", metric: Metric::Stored },
    Case { name: "local: 429 is never recorded", config: LOCAL, before: &[], store_down: false,
           request: PAY, upstream: 429, status: 429, outcome: "released", metric: Metric::Released },
    Case { name: "local: the key released by a 5xx runs again", config: LOCAL, before: &[(PAY, Some(503))], store_down: false,
           request: PAY, upstream: 201, status: 201, outcome: "stored", metric: Metric::Stored },
    Case { name: "unkeyed requests pass", config: LOCAL, before: &[], store_down: false,
           request: Req { key: None, body: b"{}" }, upstream: 201, status: 201, outcome: "unkeyed", metric: Metric::Unkeyed },
    Case { name: "a required key is missing", config: r#"{"outcome_property":"o","required":true}"#, before: &[], store_down: false,
           request: Req { key: None, body: b"{}" }, upstream: 201, status: 400, outcome: "missing-key", metric: Metric::InvalidKey },
    Case { name: "an invalid key", config: LOCAL, before: &[], store_down: false,
           request: keyed_req("a b", b"{}"), upstream: 201, status: 400, outcome: "invalid-key", metric: Metric::InvalidKey },
    Case { name: "a body over the limit", config: r#"{"outcome_property":"o","max_request_body_bytes":4}"#, before: &[], store_down: false,
           request: keyed_req("k", b"12345"), upstream: 201, status: 413, outcome: "body-too-large", metric: Metric::TooLarge },
    Case { name: "local: the store fails: refused", config: LOCAL, before: &[], store_down: true,
           request: PAY, upstream: 201, status: 503, outcome: "store-unavailable", metric: Metric::StoreErrors },
    Case { name: "redis: the first request runs and is recorded", config: REDIS, before: &[], store_down: false,
           request: PAY, upstream: 201, status: 201, outcome: "stored", metric: Metric::Stored },
    Case { name: "redis: a retry is replayed", config: REDIS, before: PAID, store_down: false,
           request: PAY, upstream: 500, status: 201, outcome: "replayed", metric: Metric::Replays },
    Case { name: "redis: a retry while the first runs is refused", config: REDIS, before: &[(PAY, None)], store_down: false,
           request: PAY, upstream: 201, status: 409, outcome: "request-in-progress", metric: Metric::Conflicts },
    Case { name: "redis: a server error releases the key", config: REDIS, before: &[], store_down: false,
           request: PAY, upstream: 502, status: 502, outcome: "released", metric: Metric::Released },
    Case { name: "redis: unreachable: refused", config: REDIS, before: &[], store_down: true,
           request: PAY, upstream: 201, status: 503, outcome: "store-unavailable", metric: Metric::StoreErrors },
    Case { name: "redis: unreachable, on_unavailable allow: forwarded unprotected",
           config: r#"{"outcome_property":"o","store":{"type":"redis","cluster":"webdis","on_unavailable":"allow"}}"#, before: &[], store_down: true,
           request: PAY, upstream: 201, status: 201, outcome: "store-bypassed", metric: Metric::StoreBypassed },
    Case { name: "redis + cache: a retry is replayed from Redis and fills the cache", config: CACHED, before: PAID, store_down: false,
           request: PAY, upstream: 500, status: 201, outcome: "replayed", metric: Metric::Replays },
    Case { name: "redis + cache: a further retry is replayed from the cache", config: CACHED, before: &[(PAY, Some(201)), (PAY, None)], store_down: false,
           request: PAY, upstream: 500, status: 201, outcome: "replayed", metric: Metric::CacheHits },
    Case { name: "forwarding: the upstream's answer is recorded", config: FORWARD, before: &[], store_down: false,
           request: PAY, upstream: 201, status: 201, outcome: "stored", metric: Metric::Stored },
    Case { name: "forwarding: a retry is replayed", config: FORWARD, before: PAID, store_down: false,
           request: PAY, upstream: 500, status: 201, outcome: "replayed", metric: Metric::Replays },
    Case { name: "forwarding: a server error releases the key", config: FORWARD, before: &[], store_down: false,
           request: PAY, upstream: 503, status: 503, outcome: "released", metric: Metric::Released },
];

/// Runs one exchange to its end: every call the filter sends is answered
/// (Redis calls by `redis`, upstream calls with `upstream`), and a request
/// that goes on reaches an upstream answering `upstream` (`None`: never).
/// Returns the status the client got (0: none yet).
fn exchange(
    host: &FakeHost,
    redis: &FakeRedis,
    c: &Rc<FilterContext>,
    req: Req,
    upstream: Option<u16>,
) -> u16 {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/pay"),
        (":authority", "shop"),
    ];
    if let Some(k) = req.key {
        headers.push(("idempotency-key", k));
    }
    host.reset_exchange(&headers, req.body);
    let resumed = host.resumed_requests.get();
    let mut answered = host.call_count();
    let mut f = Filter::new(c.clone());
    let mut v = f.on_request_headers(host, req.body.is_empty());
    if v == Verdict::AwaitBody {
        v = f.on_request_body(host, req.body.len(), true);
    }
    let mut responded = None;
    loop {
        while let Some(call) = host.calls().get(answered).cloned() {
            answered += 1;
            let response = if ops(&call).is_some() {
                CallResponse {
                    status: Some(200),
                    headers: Vec::new(),
                    body: redis.answer(host, call.id),
                }
            } else {
                let Some(status) = upstream else { return 0 };
                // As Envoy's router hands over what an upstream sent.
                CallResponse {
                    status: Some(status),
                    headers: vec![
                        (":status".into(), status.to_string().into_bytes()),
                        ("x-envoy-upstream-service-time".into(), b"1".to_vec()),
                    ],
                    body: b"paid".to_vec(),
                }
            };
            f.on_call_response(host, call.id, &response);
        }
        let went_on = v == Verdict::Continue || host.resumed_requests.get() > resumed;
        match (went_on, responded, upstream) {
            (true, None, Some(status)) => {
                responded = Some(status);
                host.set_response(&[(":status", &status.to_string())]);
                f.on_response_headers(host, false);
                host.set_response_chunk(b"paid");
                f.on_response_body(host, 4, true);
            }
            // Left running: the upstream never answers.
            (true, None, None) => return 0,
            _ => break,
        }
    }
    f.on_done(host);
    host.sent_status().or(responded).unwrap_or(0)
}

#[test]
fn lifecycle() {
    for case in CASES {
        let host = FakeHost::default().at(1_000_000);
        let redis = FakeRedis::with_script();
        let mut c = FilterContext::new(Config::parse(case.config.as_bytes()).unwrap());
        c.store.init(&host).unwrap();
        let c = Rc::new(c);
        for (req, upstream) in case.before {
            exchange(&host, &redis, &c, *req, *upstream);
        }
        if case.store_down {
            host.shared.fail_with(10);
            host.refuse_calls();
        }
        let counted = host.metric(case.metric);
        let status = exchange(&host, &redis, &c, case.request, Some(case.upstream));
        assert_eq!(status, case.status, "{}: status", case.name);
        assert_eq!(
            host.last_property(),
            Some(("o".to_string(), case.outcome.to_string())),
            "{}: outcome",
            case.name
        );
        assert_eq!(
            host.metric(case.metric),
            counted + 1,
            "{}: {} counted once",
            case.name,
            case.metric.name()
        );
    }
}
