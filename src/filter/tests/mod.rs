//! The filter's unit tests: every path runs against the in-memory host
//! (`FakeHost`) and, for the Redis store, the in-memory Redis
//! (`FakeRedis`). Shared helpers live here; the tests are grouped by what
//! they specify.

mod cache;
mod forwarding;
mod lifecycle;
mod local;
mod operations;
mod redis;

use super::*;
use crate::fake_host::{Call, FakeHost};
use crate::fake_redis::{last_call, ops, FakeRedis, Op};

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
    redis_answers(host, redis, f, Op::Record);
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
