"""Faults of the upstream, the store and the gateway. Afterwards the record
is what the README says it is, nothing runs without protection when the
store refuses, and nothing runs more than the documented number of times."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import RedisBackend, post, problem, redis_store, wait_for
from test_redis_fleet import Fleet


def k(tag):
    return f"{tag}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- upstream


def test_upstream_reset_after_acting_releases_the_key(gw, gateways, upstream):
    key = k("reset")
    s, _, _ = post(gw, key, headers={"x-demo-reset": "1"})
    # Envoy's own 503, or the filter's 502 in forwarding mode: no answer either way.
    assert s in (502, 503)
    assert upstream.executions(key) == 1
    # Documented: a failure without an answer releases the key, so the retry
    # runs again (the upstream may have acted: use record_server_errors only
    # covers answers, not resets).
    assert post(gw, key)[0] == 201
    assert upstream.executions(key) == 2
    assert post(gw, key)[1].get("idempotent-replayed") == "true"


def test_upstream_timeout_releases_the_key(gw, gateways, upstream):
    if gateways.kind == "apisix":
        pytest.skip("forwarding mode times out by forward.timeout_ms, not Envoy's route timeout")
    key = k("timeout")
    # /slow is routed with a 1 s timeout (envoy/envoy.template.yaml).
    s, _, _ = post(gw, key, path="/slow", headers={"x-demo-delay-ms": "1500"})
    assert s == 504
    wait_for(lambda: upstream.executions(key) == 1, what="the slow original to finish upstream")
    assert post(gw, key, path="/slow")[0] == 201, "released: the retry runs"
    assert upstream.executions(key) == 2


def test_a_response_cut_mid_body(gw, gateways, upstream):
    key = k("cut")
    try:
        post(gw, key, headers={"x-demo-cut": "1"})
    except Exception:
        pass  # the client sees a broken response
    assert upstream.executions(key) == 1
    resp = post(gw, key)
    if gateways.kind == "apisix":
        # Forwarding mode never got a whole answer: released, the retry runs.
        assert resp[0] == 201 and upstream.executions(key) == 2
    else:
        # The client may have seen part of it and the upstream acted: the
        # claim stays until lock_timeout_seconds, the retry gets 409.
        assert resp[0] == 409
        problem(resp)
        assert upstream.executions(key) == 1


def test_a_response_slower_than_the_lock_timeout(gateways, upstream):
    lock = gateways("lock")  # lock_timeout_seconds 4
    key = k("slow")
    before = lock.stats()["claims_lost"]
    with ThreadPoolExecutor(1) as pool:
        original = pool.submit(post, lock, key, b"{}", {"x-demo-delay-ms": "5500"})
        wait_for(lambda: upstream.started(key) == 1, what="the original to start")
        started = time.time()
        time.sleep(max(0.0, started + 4.3 - time.time()))
        # The claim is abandoned: a retry runs again (documented).
        retry = post(lock, key, body=b"{}")
        assert retry[0] == 201 and "idempotent-replayed" not in retry[1]
        assert original.result()[0] == 201
    # The late original does not overwrite the retry's record.
    assert lock.stats()["claims_lost"] - before >= 1
    s, h, b = post(lock, key, body=b"{}")
    assert (s, h.get("idempotent-replayed"), b) == (201, "true", retry[2])
    assert upstream.executions(key) == 2


# ---------------------------------------------------------------- store


@pytest.fixture
def lone_backend(tmp_path):
    backend = RedisBackend(workdir=str(tmp_path)).start()
    yield backend
    backend.stop()


def test_redis_killed_then_restarted(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend, store_extra={"timeout_ms": 400})
    try:
        key = k("redis-down")
        lone_backend.stop_redis()
        resp = post(fleet.a, key)
        assert resp[0] == 503 and problem(resp)["type"].endswith("store-unavailable")
        assert upstream.executions(key) == 0, "never executed without protection"
        # Under load too: 20 concurrent requests on both gateways, all refused.
        burst = [k("redis-down-burst") for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: post(fleet.a if i % 2 else fleet.b, burst[i])[0], range(20)))
        assert answers == [503] * 20
        assert sum(upstream.executions(x) for x in burst) == 0
        lone_backend.start_redis()
        # Webdis re-opens its pooled Redis connections one failure at a time:
        # a few 503s (fail closed) until every connection is back.
        def healthy():
            probe = k("probe")
            return post(fleet.a, probe)[0] == 201 and post(fleet.b, probe)[0] == 201
        wait_for(healthy, timeout=30, what="Redis back in use on both gateways")
        again = k("after")
        assert post(fleet.a, again)[0] == 201
        assert post(fleet.b, again)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(again) == 1
    finally:
        fleet.stop()


def test_redis_slower_than_the_store_timeout(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend, store_extra={"timeout_ms": 300})
    try:
        key = k("redis-slow")
        # Redis 7 refuses DEBUG SLEEP by default: a script that busy-waits
        # 1.5 s blocks it just the same.
        spin = ("local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] "
                "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - t0 > 1500000 return 1")
        blocker = threading.Thread(target=lambda: lone_backend.command("EVAL", spin, "0"))
        blocker.start()
        time.sleep(0.2)
        resp = post(fleet.a, key)
        blocker.join()
        assert resp[0] == 503
        assert upstream.executions(key) == 0
        # Redis ran the queued claim once it was free again: the key stays
        # claimed until lock_timeout_seconds (409), and never runs twice.
        second = post(fleet.a, key)
        assert second[0] in (201, 409), second
        if second[0] == 409:
            assert upstream.executions(key) == 0
        other = k("redis-fine")
        assert post(fleet.a, other)[0] == 201, "the store is used again at once"
    finally:
        fleet.stop()


def test_redis_flushed_forgets_records(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend)
    try:
        key = k("flushed")
        assert post(fleet.a, key)[0] == 201
        lone_backend.command("FLUSHALL")
        # Documented: the record is gone, so the retry runs again.
        assert post(fleet.b, key)[1].get("idempotent-replayed") is None
        assert upstream.executions(key) == 2
    finally:
        fleet.stop()


# ---------------------------------------------------------------- gateway


def test_gateway_killed_under_load_then_every_key_runs_at_most_once_more(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend, lock_timeout_seconds=3)
    try:
        keys = [k("load") for _ in range(30)]

        def send(key):
            try:
                return post(fleet.a, key, headers={"x-demo-delay-ms": "600"})[0]
            except Exception:
                return None

        with ThreadPoolExecutor(30) as pool:
            futures = [pool.submit(send, key) for key in keys]
            wait_for(lambda: sum(upstream.started(x) for x in keys) >= 10, what="load to reach the upstream")
            killed_at = time.time()
            fleet.a.stop(sig=9)
            answered = [f.result() for f in futures]
        fleet.a = fleet.new_gateway()
        time.sleep(max(0.0, killed_at + 3.3 - time.time()))
        for key in keys:
            s, h, _ = post(fleet.a, key)
            assert s == 201, (key, s)
        for key, first in zip(keys, answered):
            runs = upstream.executions(key)
            assert 1 <= runs <= 2, (key, runs)
            if first == 201:
                assert runs == 1, "answered before the kill: recorded, so replayed"
    finally:
        fleet.stop()
