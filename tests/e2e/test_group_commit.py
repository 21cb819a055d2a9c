"""End-to-end: group commit on Envoy with the Redis store. Each worker sends
its requests' store operations in one call per batch, one batch out at a
time (src/store/group_commit.rs). These tests make batches form for sure by
holding Redis with a busy script while requests arrive: the first batch
waits in Redis, and everything else gathers for the next one.

Each asserts what the counting upstream executed and what every client got,
and (from the store_calls / store_operations counters) that calls were
shared."""

import hashlib
import os
import re
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Envoy, RedisBackend, post, problem, redis_store, wait_for
from test_faults import redis_busy
from test_redis_fleet import Fleet

def k(name):
    return f"gc-{name}-{uuid.uuid4().hex[:8]}"


def block_redis(backend, ms):
    """Holds Redis with a script that busy-waits `ms` (Redis 7 refuses DEBUG
    SLEEP by default); returns the thread once Redis is held."""
    spin = ("local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] "
            f"repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - t0 > {ms * 1000} return 1")
    blocker = threading.Thread(target=lambda: backend.command("EVAL", spin, "0"))
    blocker.start()
    wait_for(lambda: redis_busy(backend.redis_port), what="the script to block Redis")
    return blocker


def keys_under(backend, prefix):
    """The Redis keys under `prefix` and their values."""
    names = backend.command("KEYS", prefix + "*")["KEYS"]
    return {n: backend.command("GET", n)["GET"] for n in names}


def counters(envoys):
    calls = sum(e.stats()["store_calls"] for e in envoys)
    ops = sum(e.stats()["store_operations"] for e in envoys)
    return calls, ops


@pytest.fixture
def lone_backend(tmp_path):
    backend = RedisBackend(workdir=str(tmp_path)).start()
    yield backend
    backend.stop()


def one_worker(upstream, backend, prefix, **store):
    """One Envoy worker (so one group commit), without the replay cache: every
    decision is Redis's."""
    config = {"store": redis_store(prefix, cache_entries=0, **store)}
    return Envoy(config, upstream.port, concurrency=1, webdis_port=backend.webdis_port).start()


def test_a_batch_answers_each_request_its_own_outcome(upstream, lone_backend):
    """Fresh keys, a duplicate of a running request (409), the same key with
    another body (422) and a recorded key (replay) all in one batch."""
    envoy = one_worker(upstream, lone_backend, f"gc-{uuid.uuid4().hex[:8]}:")
    pool = ThreadPoolExecutor(32)
    try:
        recorded, running = k("recorded"), k("running")
        assert post(envoy, recorded)[0] == 201
        original = pool.submit(post, envoy, running, b'{"amount": 42}', {"x-demo-hold": running})
        wait_for(lambda: upstream.started(running) == 1, what="the original to reach the upstream")
        fresh = [k(f"fresh{i}") for i in range(10)]
        gate = k("gate")
        calls0, ops0 = counters([envoy])
        blocker = block_redis(lone_backend, 500)
        requests = ([(key, b'{"amount": 42}', {"x-demo-hold": gate}) for key in fresh]
                    + [(running, b'{"amount": 42}', {})] * 2
                    + [(running, b'{"amount": 7}', {})] * 2
                    + [(recorded, b'{"amount": 42}', {})] * 3)
        futures = [pool.submit(post, envoy, key, body, headers) for key, body, headers in requests]
        blocker.join()
        wait_for(lambda: all(upstream.started(key) == 1 for key in fresh), what="the fresh keys to run")
        # Their records gather the same way: the first waits in Redis.
        blocker = block_redis(lone_backend, 500)
        upstream.release(gate)
        answers = [f.result() for f in futures]
        blocker.join()
        for resp in answers[:10]:
            assert resp[0] == 201 and "idempotent-replayed" not in resp[1], resp
        for resp in answers[10:12]:
            assert resp[0] == 409 and problem(resp)["type"].endswith("request-in-progress"), resp
        for resp in answers[12:14]:
            assert resp[0] == 422 and problem(resp)["type"].endswith("key-reused"), resp
        for resp in answers[14:]:
            assert resp[0] == 201 and resp[1].get("idempotent-replayed") == "true", resp
        upstream.release(running)
        assert original.result()[0] == 201
        assert [upstream.executions(key) for key in fresh + [running, recorded]] == [1] * 12
        calls, ops = counters([envoy])
        calls, ops = calls - calls0, ops - ops0
        # 17 claims, 10 records, then the held original's record.
        assert ops == 28, (calls, ops)
        # Batches: the first claim alone, the rest of the claims together
        # (Redis was held), the first record alone, the other nine together
        # (held again), the original's record: 5 calls, not 28 (a request
        # slower than Redis's half second would add one).
        assert calls <= 8, (calls, ops)
        # Every fresh key replays from Redis now.
        assert all(post(envoy, key)[1].get("idempotent-replayed") == "true" for key in fresh)
    finally:
        pool.shutdown(wait=True)
        envoy.stop()


def refused_while_redis_is_held(envoy, backend, upstream, keys, hold_ms):
    """Sends every key at once while Redis is held for `hold_ms`: each gets
    503 store-unavailable and none runs. Returns the thread holding Redis."""
    blocker = block_redis(backend, hold_ms)
    with ThreadPoolExecutor(len(keys)) as pool:
        answers = list(pool.map(lambda key: post(envoy, key), keys))
    for resp in answers:
        assert resp[0] == 503 and problem(resp)["type"].endswith("store-unavailable"), resp
    assert [upstream.executions(key) for key in keys] == [0] * len(keys)
    return blocker


def late_claims_settle(backend, prefix):
    """Waits until no key under `prefix` holds a claim: the late claims and
    their cancels (in whichever order Webdis's connections deliver them)
    have run."""
    wait_for(lambda: all(not v.startswith("I|") for v in keys_under(backend, prefix).values()),
             timeout=15, what="the late claims and their cancels to run")


def test_a_batch_that_times_out_fails_each_request_and_frees_each_key(upstream, lone_backend):
    prefix = f"gc-{uuid.uuid4().hex[:8]}:"
    envoy = one_worker(upstream, lone_backend, prefix, timeout_ms=300)
    try:
        keys = [k(f"slow{i}") for i in range(6)]
        blocker = refused_while_redis_is_held(envoy, lone_backend, upstream, keys, 2000)
        assert envoy.stats()["claims_cancelled"] == 6, "each claim of the timed-out batches is cancelled"
        blocker.join()
        late_claims_settle(lone_backend, prefix)
        for key in keys:
            assert post(envoy, key)[0] == 201, "the retry runs: no late claim holds the key"
        assert [upstream.executions(key) for key in keys] == [1] * 6
    finally:
        envoy.stop()


def test_claims_that_wait_longer_than_the_store_timeout_fail_unsent(upstream, lone_backend):
    """A Redis that does not answer lets a batch go only every timeout. Claims
    that waited longer than that behind the batch in flight fail at once as
    never sent (503, no cancel needed), instead of queueing without bound
    for as long as requests keep coming (memory, and each new request's
    wait, grew with the outage before)."""
    prefix = f"gc-{uuid.uuid4().hex[:8]}:"
    envoy = one_worker(upstream, lone_backend, prefix, timeout_ms=200)
    try:
        keys = [k(f"queued{i}") for i in range(150)]
        blocker = refused_while_redis_is_held(envoy, lone_backend, upstream, keys, 3000)
        assert "not sent: waited over store.timeout_ms" in envoy.log()
        stats = envoy.stats()
        # Only the claims that went out are cancelled; the rest never left.
        assert stats["claims_cancelled"] < 150, stats
        blocker.join()
        late_claims_settle(lone_backend, prefix)
        assert all(post(envoy, key)[0] == 201 for key in keys[:10]), "the retries run"
    finally:
        envoy.stop()


def script_loaded(backend):
    """Whether Redis has the filter's batch script (by its SHA-1, read from
    the source file so the test does not trust the filter's constant)."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "src", "store", "batch.rs")).read()
    raw = re.search(r'pub const BATCH_SCRIPT: &str = "(.*?)";\n', src, re.S).group(1)
    script = re.sub(r"\\\n\s*", "", raw)
    sha = hashlib.sha1(script.encode()).hexdigest()
    # Straight to Redis: Webdis may still be reconnecting after a restart.
    out = subprocess.run(["redis-cli", "-p", str(backend.redis_port), "SCRIPT", "EXISTS", sha],
                         capture_output=True, text=True, check=True).stdout
    return out.strip() == "1"


def webdis_reconnected(backend):
    def ok():
        try:
            return backend.command("PING")["PING"] == [True, "PONG"]
        except Exception:
            return False
    return ok


def test_noscript_after_a_redis_restart_is_answered_by_the_source(upstream, lone_backend):
    envoy = one_worker(upstream, lone_backend, f"gc-{uuid.uuid4().hex[:8]}:")
    try:
        assert not script_loaded(lone_backend), "a new Redis has no script"
        first = k("first")
        assert post(envoy, first)[0] == 201, "NOSCRIPT, then the same batch by source"
        assert script_loaded(lone_backend)
        lone_backend.stop_redis()
        lone_backend.start_redis()
        wait_for(webdis_reconnected(lone_backend), timeout=15, what="Webdis to reach the new Redis")
        assert not script_loaded(lone_backend), "a restarted Redis has forgotten it"
        errors = envoy.stats()["store_errors"]
        after = k("after")
        resp = post(envoy, after)
        assert resp[0] == 201 and "idempotent-replayed" not in resp[1], resp
        assert script_loaded(lone_backend), "sent by source once"
        assert post(envoy, after)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(after) == 1
        assert envoy.stats()["store_errors"] == errors, "NOSCRIPT never reaches a request"
    finally:
        envoy.stop()


def test_one_duplicate_across_batches_of_two_workers_and_two_gateways_runs_once(upstream, redis_backend):
    """40 requests at once over two gateways of two workers each: half are one
    key, half fresh keys, so the duplicate sits in many batches at once."""
    fleet = Fleet(upstream, redis_backend, store_extra={"cache_entries": 0})
    try:
        duplicate = k("dup")
        fresh = [k(f"other{i}") for i in range(20)]
        calls0, ops0 = counters([fleet.a, fleet.b])
        barrier = threading.Barrier(40)

        def one(i):
            barrier.wait()
            key = duplicate if i % 2 else fresh[i // 2]
            return key, post(fleet.a if i % 4 < 2 else fleet.b, key, headers={"x-demo-delay-ms": "200"})

        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(one, range(40)))
        assert upstream.executions(duplicate) == 1
        dup = [r for key, r in results if key == duplicate]
        assert {r[0] for r in dup} <= {201, 409}, [r[0] for r in dup]
        assert len([r for r in dup if r[0] == 201 and "idempotent-replayed" not in r[1]]) == 1
        assert all(r[0] == 201 for key, r in results if key != duplicate)
        assert [upstream.executions(key) for key in fresh] == [1] * 20
        calls, ops = counters([fleet.a, fleet.b])
        assert ops - ops0 > calls - calls0, "some calls carried several operations"
    finally:
        fleet.stop()
