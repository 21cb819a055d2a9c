//! The replay cache in front of the Redis store.

use super::*;

/// A completed key, recorded here and retried once (Redis replays it, and
/// the cache keeps the record).
fn recorded_and_retried(host: &FakeHost, redis: &FakeRedis, c: &Rc<FilterContext>, key: &str) {
    let mut f = redis_post(host, redis, c, key);
    complete_paid(host, redis, &mut f);
    let (calls, held) = (host.call_count(), host.metric(Metric::BytesHeld));
    redis_post(host, redis, c, key);
    assert_eq!(host.call_count(), calls + 1, "the first retry asks Redis");
    assert_eq!(host.sent().unwrap().body, b"paid");
    assert!(host.metric(Metric::BytesHeld) > held, "and fills the cache");
}

#[test]
fn recording_a_key_does_not_fill_the_cache() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = cached_redis_ctx();
    let sets = host.shared.sets.get();
    let mut f = redis_post(&host, &redis, &c, "k");
    complete_paid(&host, &redis, &mut f);
    assert_eq!(host.metric(Metric::Stored), 1);
    // Most keys are never retried: the record went to Redis only.
    assert_eq!(host.metric(Metric::BytesHeld), 0);
    assert_eq!(
        host.shared.sets.get(),
        sets,
        "no shared-data write for a fresh key"
    );
    redis_post(&host, &redis, &c, "k");
    assert_eq!(host.call_count(), 3, "its first retry asks Redis");
    assert_eq!(host.sent().unwrap().body, b"paid");
    assert_eq!(host.metric(Metric::CacheHits), 0);
}

#[test]
fn the_replay_cache_answers_further_retries_of_a_replayed_key() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = cached_redis_ctx();
    recorded_and_retried(&host, &redis, &c, "k");
    // The next retry is replayed from the cache: no further call.
    assert_eq!(post_answered_locally(&host, &c, "k", b""), 201);
    let sent = host.sent().unwrap();
    assert_eq!(sent.body, b"paid");
    assert_eq!(sent.header("idempotent-replayed").as_deref(), Some("true"));
    // Another payload under the key: 422, also without Redis.
    assert_eq!(post_answered_locally(&host, &c, "k", b"other"), 422);
    assert_eq!(host.metric(Metric::CacheHits), 2);
    assert_eq!(host.metric(Metric::Replays), 2);
    assert_eq!(host.metric(Metric::Mismatches), 1);
}

#[test]
fn configurations_with_other_redis_namespaces_do_not_share_a_cache() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let a = cached_redis_ctx();
    recorded_and_retried(&host, &redis, &a, "k");
    assert_eq!(post_answered_locally(&host, &a, "k", b""), 201);
    // Same shared data (same vm_id), another key_prefix: its own Redis
    // namespace, where "k" was never used, so Redis is asked.
    let b = ctx(
        r#"{"store":{"type":"redis","cluster":"webdis","key_prefix":"other:","cache_entries":32}}"#,
    );
    redis_post(&host, &redis, &b, "k");
    assert_eq!(host.call_count(), 4, "asked its own Redis namespace");
    assert_eq!(host.resumed_requests.get(), 2, "and ran the request there");
}

#[test]
fn records_from_other_gateways_are_cached_until_redis_expires_them() {
    let redis = FakeRedis::with_script();
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
    let redis = FakeRedis::with_script();
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
    store_answers(&host, &mut f, Op::Record, Some(503), b"");
    assert_eq!(host.metric(Metric::StoreErrors), 1);
    // Not recorded in Redis, so not in the cache either: Redis is asked.
    redis_post(&host, &redis, &c, "k");
    assert_eq!(host.call_count(), 5);
    assert_eq!(host.metric(Metric::CacheHits), 0);
}

#[test]
fn an_outcome_unknown_record_is_never_cached() {
    // Support forgets such a key in Redis once it has checked what happened;
    // a cached copy would go on answering for the TTL.
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c = cached_redis_ctx();
    let mut f = redis_post(&host, &redis, &c, "k");
    f.on_done(&host); // the client left mid-response: the outcome is unknown
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.metric(Metric::OutcomesUnknown), 1);
    for retry in 1..=2 {
        let calls = host.call_count();
        redis_post(&host, &redis, &c, "k");
        assert_eq!(host.call_count(), calls + 1, "retry {retry} asks Redis");
        assert_eq!(host.sent_status(), Some(502));
    }
    assert_eq!(host.metric(Metric::CacheHits), 0);
    assert_eq!(host.metric(Metric::BytesHeld), 0);
}

/// The replay cache's byte budget: a record larger than a bucket's share is
/// not cached (Redis has it whole, so its retry asks Redis and gets it
/// whole), and the bytes gauge counts only what the cache holds.
#[test]
fn the_replay_cache_keeps_only_what_fits_its_byte_budget() {
    let host = FakeHost::default();
    let redis = FakeRedis::with_script();
    let c =
        ctx(r#"{"store":{"type":"redis","cluster":"webdis","cache_entries":16,"max_bytes":4096}}"#);
    recorded_and_retried(&host, &redis, &c, "small");
    let held = host.metric(Metric::BytesHeld);
    assert_eq!(post_answered_locally(&host, &c, "small", b""), 201);
    // A 5000-byte answer does not fit a 4096-byte share.
    let mut f = redis_post(&host, &redis, &c, "big");
    host.set_response(&[(":status", "201")]);
    assert_eq!(f.on_response_headers(&host, false), Verdict::Continue);
    host.set_response_chunk(&[7u8; 5000]);
    assert_eq!(f.on_response_body(&host, 5000, true), Verdict::Pause);
    redis_answers(&host, &redis, &mut f, Op::Record);
    assert_eq!(host.metric(Metric::Stored), 2);
    // Its retries are answered by Redis, whole, every time.
    for _ in 0..2 {
        let calls = host.call_count();
        redis_post(&host, &redis, &c, "big");
        assert_eq!(host.call_count(), calls + 1, "asked Redis");
        let replay = host.sent().unwrap();
        assert_eq!((replay.status, replay.body), (201, vec![7u8; 5000]));
        assert_eq!(host.metric(Metric::BytesHeld), held, "not cached");
        assert_eq!(host.metric(Metric::BodiesOmitted), 0, "Redis has it whole");
    }
}
