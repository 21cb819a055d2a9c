"""End-to-end: a fleet of two gateways sharing one Redis (through Webdis):
two Envoys, or an Envoy and APISIX's runtime, and what happens when a
gateway or the store fails. Every test asserts on what the counting upstream
executed."""

import contextlib
import os
import json
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (ApisixRuntime, Envoy, RedisBackend, apisix_conf, post, problem, redis_store,
                      renewable_timeouts, wait_for)




class Fleet:
    """Two gateways with the same configuration and one Redis. `kinds` says
    what each one is: "envoy", or "apisix" (APISIX's runtime, where the filter
    forwards requests itself)."""

    def __init__(self, upstream, backend, kinds=("envoy", "envoy"), **config):
        self.upstream = upstream
        self.backend = backend
        self.kinds = kinds
        self.prefix = "fleet-" + uuid.uuid4().hex[:8] + ":"
        store_extra = config.pop("store_extra", {})
        self.config = {**config, "store": redis_store(self.prefix, **store_extra)}
        self.a = self.new_gateway(kinds[0])
        self.b = self.new_gateway(kinds[1])

    def new_gateway(self, kind="envoy"):
        if kind == "apisix":
            return ApisixRuntime(apisix_conf(self.config, self.upstream, self.backend), self.upstream.port).start()
        config = renewable_timeouts(json.loads(json.dumps(self.config)))
        return Envoy(config, self.upstream.port, concurrency=2,
                     webdis_port=self.backend.webdis_port).start()

    def stop(self):
        self.a.stop()
        self.b.stop()


@contextlib.contextmanager
def own_fleet(upstream, tmp_path, kinds=("envoy", "envoy"), **config):
    """A fleet with a Redis of its own, for tests that stop parts of it."""
    backend = RedisBackend(workdir=str(tmp_path)).start()
    fleet = Fleet(upstream, backend, kinds, **config)
    try:
        yield fleet, backend
    finally:
        fleet.stop()
        backend.stop()


@pytest.fixture(scope="module")
def fleet(upstream, redis_backend):
    f = Fleet(upstream, redis_backend)
    yield f
    f.stop()


def test_a_key_completed_on_one_gateway_replays_on_the_other(fleet, upstream, key):
    s1, h1, b1 = post(fleet.a, key)
    assert s1 == 201
    s2, h2, b2 = post(fleet.b, key)
    assert (s2, h2.get("idempotent-replayed"), b2) == (201, "true", b1)
    assert post(fleet.b, key, body=b'{"amount": 1}')[0] == 422
    assert upstream.executions(key) == 1


def assert_concurrent_duplicates_run_once(fleet, upstream, key, n):
    """n identical requests at once, alternating between the fleet's two
    gateways: exactly one runs, the others get 409 or its replay."""
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return post(fleet.a if i % 2 else fleet.b, key, headers={"x-demo-delay-ms": "300"})

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert upstream.executions(key) == 1
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {201, 409}, statuses
    originals = [r for r in results if r[0] == 201 and "idempotent-replayed" not in r[1]]
    assert len(originals) == 1


def test_forty_concurrent_duplicates_over_both_gateways_execute_once(fleet, upstream, key):
    assert_concurrent_duplicates_run_once(fleet, upstream, key, 40)


def test_a_restarted_gateway_still_replays(fleet, upstream, key):
    s1, _, b1 = post(fleet.a, key)
    assert s1 == 201
    fleet.a.stop()
    fleet.a = fleet.new_gateway()
    s2, h2, b2 = post(fleet.a, key)
    assert (s2, h2.get("idempotent-replayed"), b2) == (201, "true", b1)
    assert upstream.executions(key) == 1


def test_redis_keys_are_prefix_plus_hex_digest_and_values_are_ascii(fleet, key):
    hostile = '"../../FLUSHALL/x.raw?a=b%2F"'
    assert post(fleet.a, hostile)[0] == 201
    assert post(fleet.a, hostile)[1].get("idempotent-replayed") == "true"
    keys = fleet.backend.command("KEYS", fleet.prefix + "*")["KEYS"]
    assert keys, "records are stored under the prefix"
    for k in keys:
        assert re.fullmatch(re.escape(fleet.prefix) + "[0-9a-f]{32}", k), k
    assert fleet.backend.command("DBSIZE")["DBSIZE"] >= len(keys), "nothing was flushed"
    value = fleet.backend.command("GET", keys[0])["GET"]
    assert value.startswith("C|") and value.isascii()
    # Completed records carry Redis's own expiry.
    assert 0 < fleet.backend.command("PTTL", keys[0])["PTTL"] <= 86_400_000


def eval_calls(backend):
    """How many scripts Redis has run, by source or by SHA (Webdis returns
    INFO as a dict)."""
    info = backend.command("INFO", "commandstats")["INFO"]
    return sum(int(re.search(r"calls=(\d+)", value).group(1))
               for name, value in info.items()
               if name.endswith(("cmdstat_eval", "cmdstat_evalsha")))


def test_methods_not_protected_never_touch_the_store(fleet, upstream, key):
    assert post(fleet.a, key)[0] == 201  # the store is in use...
    before = eval_calls(fleet.backend)
    assert before > 0
    for _ in range(3):
        assert fleet.a.request("GET", "/orders", {"idempotency-key": key})[0] == 200
        assert post(fleet.a, key, method="PUT")[0] == 200
    assert eval_calls(fleet.backend) == before, "...but not for unprotected methods"


def test_a_gateway_killed_mid_request_leaves_a_claim_that_expires(upstream, redis_backend, key):
    fleet = Fleet(upstream, redis_backend, lock_timeout_seconds=4)
    try:
        pool = ThreadPoolExecutor(1)
        # The original is still upstream when its gateway dies.
        original = pool.submit(post, fleet.a, key, b'{"amount": 5}', {"x-demo-hold": key})
        try:
            wait_for(lambda: upstream.started(key) == 1, what="the original to reach the upstream")
            claimed_at = time.time()
            fleet.a.stop(sig=9)  # SIGKILL: no chance to release or record anything
            with pytest.raises(Exception):
                original.result()
            resp = post(fleet.b, key, body=b'{"amount": 5}')
            assert resp[0] == 409, resp
            problem(resp)
        finally:
            upstream.release(key)
        time.sleep(max(0.0, claimed_at + 4.3 - time.time()))
        s, h, _ = post(fleet.b, key, body=b'{"amount": 5}')
        assert s == 201 and "idempotent-replayed" not in h, "after the lock timeout the retry runs"
        wait_for(lambda: upstream.executions(key) == 2, what="both executions")
        pool.shutdown()
    finally:
        fleet.stop()


# Gateway A is an Envoy, or APISIX's runtime; B is an Envoy.
A_KINDS = {"envoy": ("envoy", "envoy"), "apisix": ("apisix", "envoy")}


@pytest.mark.parametrize("a_kind", sorted(A_KINDS))
def test_store_down_with_reject_answers_503_and_recovers(upstream, key, tmp_path, a_kind):
    with own_fleet(upstream, tmp_path, A_KINDS[a_kind], store_extra={"timeout_ms": 300}) as (fleet, backend):
        before = fleet.a.stats() if fleet.a.has_metrics else None
        backend.stop_webdis()
        resp = post(fleet.a, key)
        assert resp[0] == 503, resp
        doc = problem(resp)
        assert doc["title"] == "Idempotency store unavailable" and "redis" in doc["detail"]
        assert resp[1].get("retry-after") == "1"
        assert upstream.executions(key) == 0, "fail closed: the upstream is untouched"
        if fleet.a.has_metrics:
            assert fleet.a.stats()["store_errors"] > before["store_errors"]
        backend.start_webdis()
        s1, _, b1 = post(fleet.a, key)
        assert s1 == 201
        s2, h2, b2 = post(fleet.b, key)
        assert (s2, h2.get("idempotent-replayed"), b2) == (201, "true", b1), "protection resumed"
        assert upstream.executions(key) == 1


@pytest.mark.parametrize("a_kind", sorted(A_KINDS))
def test_store_down_with_allow_forwards_unprotected_and_counts_it(upstream, key, tmp_path, a_kind):
    config = {"store_extra": {"timeout_ms": 300, "on_unavailable": "allow"}}
    with own_fleet(upstream, tmp_path, A_KINDS[a_kind], **config) as (fleet, backend):
        before = fleet.a.stats()["store_bypassed"] if fleet.a.has_metrics else None
        backend.stop_webdis()
        assert post(fleet.a, key)[0] == 201
        assert post(fleet.a, key)[0] == 201
        assert upstream.executions(key) == 2, "fail open: forwarded without protection"
        if fleet.a.has_metrics:
            assert fleet.a.stats()["store_bypassed"] - before == 2
        backend.start_webdis()
        key2 = key + "-after"
        assert post(fleet.a, key2)[0] == 201
        assert post(fleet.b, key2)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(key2) == 1


def test_replays_come_from_the_gateway_cache_without_a_store_round_trip(fleet, upstream, key):
    s1, _, b1 = post(fleet.a, key)
    assert s1 == 201
    # Recording a key leaves the cache alone (most keys are never retried):
    # the first retry asks Redis, and keeps the record.
    before = eval_calls(fleet.backend)
    hits = fleet.a.stats()["cache_hits"]
    s, h, b = post(fleet.a, key)
    assert (s, h.get("idempotent-replayed"), b) == (201, "true", b1)
    assert eval_calls(fleet.backend) == before + 1
    assert fleet.a.stats()["cache_hits"] == hits
    before += 1
    for _ in range(3):
        s, h, b = post(fleet.a, key)
        assert (s, h.get("idempotent-replayed"), b) == (201, "true", b1)
    assert post(fleet.a, key, body=b'{"amount": 1}')[0] == 422
    assert eval_calls(fleet.backend) == before, "gateway A answered from its cache"
    assert fleet.a.stats()["cache_hits"] - hits == 4
    # Gateway B asks Redis once, then keeps the record too.
    assert post(fleet.b, key)[1].get("idempotent-replayed") == "true"
    assert eval_calls(fleet.backend) == before + 1
    assert post(fleet.b, key)[1].get("idempotent-replayed") == "true"
    assert eval_calls(fleet.backend) == before + 1
    assert upstream.executions(key) == 1


def test_the_cache_never_outlives_the_record_in_redis(upstream, redis_backend, key):
    fleet = Fleet(upstream, redis_backend, ttl_seconds=5, lock_timeout_seconds=4)
    try:
        assert post(fleet.a, key)[0] == 201
        done_at = time.time()
        assert post(fleet.a, key)[1].get("idempotent-replayed") == "true"
        assert post(fleet.b, key)[1].get("idempotent-replayed") == "true"
        time.sleep(max(0.0, done_at + 5.3 - time.time()))  # past the TTL: Redis has dropped the record
        s, h, _ = post(fleet.a, key)
        assert s == 201 and "idempotent-replayed" not in h, "A's cached copy expired with it"
        assert post(fleet.b, key)[1].get("idempotent-replayed") == "true", "B replays the new record"
        assert upstream.executions(key) == 2
    finally:
        fleet.stop()


def test_cached_replays_survive_a_store_outage_and_nothing_else_does(upstream, key, tmp_path):
    with own_fleet(upstream, tmp_path, store_extra={"timeout_ms": 300}) as (fleet, backend):
        s1, _, b1 = post(fleet.a, key)
        assert s1 == 201
        assert post(fleet.a, key)[1].get("idempotent-replayed") == "true", "Redis's replay fills A's cache"
        backend.stop_webdis()
        s2, h2, b2 = post(fleet.a, key)
        assert (s2, h2.get("idempotent-replayed"), b2) == (201, "true", b1), "from A's cache"
        assert post(fleet.b, key)[0] == 503, "B never saw the record: only Redis can decide"
        assert post(fleet.a, key + "-new")[0] == 503, "new keys still need Redis"
        assert upstream.executions(key) == 1
        assert upstream.executions(key + "-new") == 0


def test_without_the_cache_every_replay_asks_redis(upstream, redis_backend, key):
    fleet = Fleet(upstream, redis_backend, store_extra={"cache_entries": 0})
    try:
        assert post(fleet.a, key)[0] == 201
        before = eval_calls(redis_backend)
        assert post(fleet.a, key)[1].get("idempotent-replayed") == "true"
        assert eval_calls(redis_backend) == before + 1
        assert fleet.a.stats().get("cache_hits", 0) == 0
    finally:
        fleet.stop()


def readme_delete_script():
    """The delete script of the README's "Finding or deleting one record"."""
    from conftest import REPO
    with open(os.path.join(REPO, "README.md")) as f:
        return re.search(r'redis-cli -p 6380 EVAL "([^"]+)" 1 "\$KEY"', f.read()).group(1)


def redis_key_of(fleet, tmp_path, *args):
    """What examples/redis_key prints for the fleet's configuration."""
    import subprocess
    from conftest import REPO
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(fleet.config))
    out = subprocess.run(["cargo", "run", "-q", "--example", "redis_key", "--", str(conf), *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("key_syntax", ["structured", "opaque"])
def test_an_operator_finds_and_deletes_a_record_by_its_key(upstream, redis_backend, key, tmp_path, key_syntax):
    """examples/redis_key names the Redis key of a client's key and scope,
    read as the filter reads it; the README's delete script deletes a
    completed record and refuses a running one."""
    fleet = Fleet(upstream, redis_backend, key_syntax=key_syntax)
    try:
        # The same header, which each syntax reads as another key.
        header = f'"{key}"'
        auth = "Bearer tenant-1"
        delete = readme_delete_script()
        redis_key = redis_key_of(fleet, tmp_path, header, auth)
        assert redis_key.startswith(fleet.prefix)
        # Running: the script leaves the claim, and the retry gets 409.
        hold = f"hold-{key}"
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, fleet.a, header, headers={"authorization": auth, "x-demo-hold": hold})
            try:
                wait_for(lambda: upstream.started(header) == 1, what="the original to start")
                assert fleet.backend.command("GET", redis_key)["GET"].startswith("I|")
                assert fleet.backend.command("EVAL", delete, 1, redis_key)["EVAL"] == 0
                assert post(fleet.b, header, headers={"authorization": auth})[0] == 409
            finally:
                upstream.release(hold)
            assert original.result()[0] == 201
        value = fleet.backend.command("GET", redis_key)["GET"]
        assert value.startswith("C|"), value
        # Another tenant's same key is another record.
        other = redis_key_of(fleet, tmp_path, header, "Bearer tenant-2")
        assert other != redis_key and fleet.backend.command("GET", other)["GET"] is None
        # Deleted: a gateway without a cached copy runs the retry again.
        assert fleet.backend.command("EVAL", delete, 1, redis_key)["EVAL"] == 1
        s2, h2, _ = post(fleet.b, header, headers={"authorization": auth})
        assert s2 == 201 and h2.get("idempotent-replayed") is None
        assert upstream.executions(header) == 2
    finally:
        fleet.stop()
