"""APISIX's own Wasm runtime (wasm-nginx-module 0.7.0 on wasmtime 0.38.1):
what only this host has. A fleet that mixes it with Envoy on one Redis, a
reload with keys in flight, and routes with their own configurations,
including a bad one. The semantics shared with Envoy run in the other files,
on the `apisix` gateway kind."""

import re
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ApisixRuntime, RedisBackend, apisix_conf, post, problem, raw_request, redis_store, wait_for
from test_redis_fleet import Fleet, assert_concurrent_duplicates_run_once


@pytest.fixture(scope="module")
def mixed(upstream, redis_backend):
    """Gateway A is an Envoy, gateway B APISIX's runtime: one Redis."""
    f = Fleet(upstream, redis_backend, ("envoy", "apisix"))
    yield f
    f.stop()


def test_a_mixed_fleet_replays_in_both_directions(mixed, upstream, key):
    for first, second, k in ((mixed.a, mixed.b, key + "-e2a"), (mixed.b, mixed.a, key + "-a2e")):
        s1, h1, b1 = post(first, k)
        assert s1 == 201
        s2, h2, b2 = post(second, k)
        assert (s2, h2.get("idempotent-replayed"), b2) == (201, "true", b1)
        assert h2["x-payment-id"] == h1["x-payment-id"]
        assert post(second, k, body=b'{"amount": 7}')[0] == 422, "the fingerprint is the same on both hosts"
        assert upstream.executions(k) == 1


def test_a_key_running_on_one_host_is_409_on_the_other(mixed, upstream, key):
    for running, other, k in ((mixed.a, mixed.b, key + "-on-envoy"), (mixed.b, mixed.a, key + "-on-apisix")):
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, running, k, b"{}", {"x-demo-hold": k})
            try:
                wait_for(lambda: upstream.started(k) == 1, what="the original to reach the upstream")
                resp = post(other, k, body=b"{}")
                assert resp[0] == 409, resp
                problem(resp)
            finally:
                upstream.release(k)
            assert original.result()[0] == 201
        s, h, _ = post(other, k, body=b"{}")
        assert (s, h.get("idempotent-replayed")) == (201, "true")
        assert upstream.executions(k) == 1


def test_concurrent_duplicates_spread_over_both_hosts_run_once(mixed, upstream, key):
    assert_concurrent_duplicates_run_once(mixed, upstream, key, 24)


def test_http10_requests_without_host_never_crash_a_worker(upstream, redis_backend, key):
    """wasm-nginx-module 0.7.0 builds `:authority` from `Host` whenever a
    filter lists the request's headers, and an HTTP/1.0 request without
    `Host` crashed the nginx worker there (signal 11), taking every request
    on it down: a forwarded payment lost its answer and record, and its
    retry ran it again. The filter no longer lists such a request's
    headers: a keyed one is refused, anything else goes on as with Host."""
    prefix = "nohost-" + uuid.uuid4().hex[:8] + ":"
    gw = ApisixRuntime(apisix_conf({"store": redis_store(prefix)}, upstream, redis_backend), upstream.port).start()
    try:
        workers = set(gw.worker_pids())
        body = b'{"amount": 42}'
        resp = raw_request(gw.port, (f"POST /payments HTTP/1.0\r\nIdempotency-Key: {key}\r\n"
                                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                                     ).encode() + body)
        assert resp is not None and resp[0] == 400, resp
        assert resp[1]["content-type"] == "application/problem+json"
        assert problem(resp)["type"].endswith("host-required")
        assert upstream.executions(key) == 0
        health = raw_request(gw.port, b"GET /payments HTTP/1.0\r\n\r\n")
        assert health is not None and health[0] == 200 and b"captured" in health[2], "not protected: on to the upstream"
        unkeyed = raw_request(gw.port, (f"POST /payments HTTP/1.0\r\nContent-Type: application/json\r\n"
                                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        assert unkeyed is not None and unkeyed[0] == 201, "no key where keys are optional: on, unprotected"
        assert set(gw.worker_pids()) == workers and "exited on signal" not in gw.log(), "no worker crashed"
        # HTTP/1.0 with Host is protected as ever.
        with_host = (f"POST /payments HTTP/1.0\r\nHost: pay.example\r\nIdempotency-Key: {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        first, again = raw_request(gw.port, with_host), raw_request(gw.port, with_host)
        assert (first[0], again[0], again[1].get("idempotent-replayed")) == (201, 201, "true")
        assert upstream.executions(key) == 1
    finally:
        gw.stop()


def routes(upstream, backend, prefix, **default):
    """Two routes as APISIX would have them: /strict requires keys."""
    base = {"store": redis_store(prefix)}
    return [
        {"id": "strict", "prefix": "/strict", "conf": apisix_conf({**base, "required": True}, upstream, backend)},
        {"id": "default", "prefix": "/", "conf": apisix_conf({**base, **default}, upstream, backend)},
    ]


def test_each_route_has_its_own_configuration(upstream, redis_backend, key):
    gw = ApisixRuntime(routes=routes(upstream, redis_backend, "routes-" + uuid.uuid4().hex[:8] + ":"),
                       upstream_port=upstream.port).start()
    try:
        assert post(gw, None, path="/payments")[0] == 201, "keys optional on the default route"
        resp = post(gw, None, path="/strict/payments")
        assert resp[0] == 400 and problem(resp)["type"].endswith("missing-key")
        assert post(gw, key, path="/strict/payments")[0] == 201
    finally:
        gw.stop()


def test_a_reload_with_keys_in_flight_loses_nothing(upstream, redis_backend, key):
    """`nginx -s reload`: new workers (new VMs) take new requests while the
    old ones finish theirs, forwarded call and record included."""
    prefix = "reload-" + uuid.uuid4().hex[:8] + ":"
    gw = ApisixRuntime(routes=routes(upstream, redis_backend, prefix), upstream_port=upstream.port).start()
    try:
        done = key + "-done"
        s1, _, b1 = post(gw, done)
        assert s1 == 201
        running = key + "-running"
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, gw, running, b"{}", {"x-demo-hold": running})
            try:
                wait_for(lambda: upstream.started(running) == 1, what="the original to reach the upstream")
                old_workers = set(gw.worker_pids())
                # The reload also changes the default route: keys now required.
                gw.reload(routes(upstream, redis_backend, prefix, required=True))
                assert set(gw.worker_pids()) - old_workers, "new workers serve"
                resp = post(gw, running, body=b"{}")
                assert resp[0] == 409, "the new VM sees the old one's claim (Redis)"
            finally:
                upstream.release(running)
            assert original.result()[0] == 201, "the old worker finished its request"
        s, h, _ = post(gw, running, body=b"{}")
        assert (s, h.get("idempotent-replayed")) == (201, "true"), "and recorded it"
        s, h, b = post(gw, done)
        assert (s, h.get("idempotent-replayed"), b) == (201, "true", b1)
        assert post(gw, None)[0] == 400, "the new configuration is in force"
        assert upstream.executions(running) == 1 and upstream.executions(done) == 1
    finally:
        gw.stop()


def test_a_bad_conf_shows_at_the_routes_first_request_as_503_and_one_log_line(upstream, redis_backend):
    """APISIX runs on_configure when a route's first request arrives, not when
    the route is created: a bad conf is a 503 for that route (every time,
    since nothing is cached), and the filter's one line in the error log."""
    good = apisix_conf({"store": redis_store("bad-conf:")}, upstream, redis_backend)
    bad = dict(good, ttl_seconds=0)
    gw = ApisixRuntime(routes=[{"id": "bad", "prefix": "/bad", "conf": bad},
                               {"id": "good", "prefix": "/", "conf": good}],
                       upstream_port=upstream.port).start()
    try:
        before = upstream.executions()
        for _ in range(2):
            assert post(gw, "k-" + uuid.uuid4().hex, path="/bad/payments")[0] == 503
        assert upstream.executions() == before, "nothing ran on the broken route"
        assert post(gw, "k-" + uuid.uuid4().hex, path="/payments")[0] == 201, "other routes serve"
        lines = [l for l in gw.log().splitlines() if "ttl_seconds" in l]
        assert lines, gw.log()[-2000:]
        assert any("failed to fetch wasm plugin ctx" in l for l in gw.log().splitlines())
    finally:
        gw.stop()


def shipped_routes(upstream, backend):
    """apisix/apisix.yaml's routes as they are, but for the Docker host names
    (webdis:7379, payments:8081), which become this machine's ports."""
    import json
    import os
    import yaml
    from conftest import REPO
    with open(os.path.join(REPO, "apisix", "apisix.yaml")) as f:
        text = f.read()
    text = text.replace("webdis:7379", f"127.0.0.1:{backend.webdis_port}")
    text = text.replace("payments:8081", f"127.0.0.1:{upstream.port}")
    return [{"id": r["id"], "prefix": r["uri"].rstrip("*"), "conf": r["plugins"]["idempotency"]["conf"]}
            for r in yaml.safe_load(text)["routes"]]


def test_the_shipped_standalone_routes_run_as_documented(upstream, redis_backend, key):
    """The route configurations users copy from apisix/apisix.yaml (and
    admin-api.sh, which test_deploy_files holds equal to it) on the runtime."""
    gw = ApisixRuntime(routes=shipped_routes(upstream, redis_backend), upstream_port=upstream.port).start()
    try:
        # payments: a key is required; replays come from Redis.
        resp = post(gw, None, path="/payments")
        assert resp[0] == 400 and problem(resp)["type"].endswith("missing-key")
        s1, _, b1 = post(gw, key, path="/payments")
        s2, h2, b2 = post(gw, key, path="/payments")
        assert (s1, s2, h2.get("idempotent-replayed"), b2) == (201, 201, "true", b1)
        # orders: the gateway assigns a key when none was sent, and returns it.
        s, h, _ = post(gw, None, path="/orders")
        generated = h.get("idempotency-key")
        assert s == 201 and generated, h
        s, h, _ = post(gw, generated, path="/orders")
        assert (s, h.get("idempotent-replayed")) == (201, "true")
        assert upstream.executions(key) == 1
    finally:
        gw.stop()


def script_calls(backend):
    """How many EVAL (by source) and EVALSHA calls this Redis has run."""
    out = subprocess.run(["redis-cli", "-p", str(backend.redis_port), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    calls = dict(re.findall(r"^cmdstat_(eval|evalsha):calls=(\d+)", out, re.M))
    return int(calls.get("eval", 0)), int(calls.get("evalsha", 0))


def test_store_calls_go_by_sha_and_by_source_only_after_redis_lost_the_script(upstream, tmp_path, key):
    """Each operation goes alone on APISIX: by SHA-1, and again by source only
    where Redis answers NOSCRIPT (a new Redis, or one whose scripts were
    flushed), so the 1.5 KB script does not travel on every call."""
    backend = RedisBackend(workdir=str(tmp_path)).start()
    gw = ApisixRuntime(apisix_conf({"store": redis_store("sha:")}, upstream, backend), upstream.port,
                       workers=1).start()
    try:
        keys = [f"{key}-{i}" for i in range(5)]
        for k in keys:
            assert post(gw, k)[0] == 201
            assert post(gw, k)[1].get("idempotent-replayed") == "true"
        by_source, by_sha = script_calls(backend)
        assert by_source == 1, "the source once: the first claim, after NOSCRIPT"
        assert by_sha >= 3 * len(keys), "claims, records and replays by SHA-1"
        subprocess.run(["redis-cli", "-p", str(backend.redis_port), "SCRIPT", "FLUSH"], check=True,
                       capture_output=True)
        after = key + "-after-flush"
        s, h, _ = post(gw, after)
        assert s == 201 and "idempotent-replayed" not in h
        assert post(gw, after)[1].get("idempotent-replayed") == "true"
        assert script_calls(backend)[0] == 2, "sent by source once more"
        assert all(upstream.executions(k) == 1 for k in keys + [after])
    finally:
        gw.stop()
        backend.stop()


def test_repeated_scope_and_fingerprint_headers_read_alike_on_both_hosts(mixed, upstream, key):
    """Envoy hands a filter some repeated headers already joined (with ",",
    cookies with "; "), APISIX hands each one over: a key's scope and
    fingerprint must come out the same on both, or a retry that crosses
    hosts runs again (another scope) or gets 422."""
    body = b'{"amount": 42}'

    def send(gateway, k):
        head = (f"POST /payments HTTP/1.1\r\nHost: pay.example\r\nIdempotency-Key: {k}\r\n"
                "Authorization: Bearer a\r\n"
                "Content-Type: application/json\r\nContent-Type: charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        return raw_request(gateway.port, head.encode() + body)

    for first, second, k in ((mixed.a, mixed.b, key + "-e2a"), (mixed.b, mixed.a, key + "-a2e")):
        s1 = send(first, k)
        assert s1 is not None and s1[0] == 201, s1
        s2 = send(second, k)
        assert s2 is not None and (s2[0], s2[1].get("idempotent-replayed")) == (201, "true"), s2
        assert upstream.executions(k) == 1


def test_an_empty_list_in_a_table_conf_reaches_the_filter_as_an_object_and_works(upstream, redis_backend, key):
    """APISIX JSON-encodes a table `conf` with cjson, which writes an empty
    list as `{}`: a route with `scope_headers: []` (no scope: one key space
    for every client) used to be refused at its first request (503). The
    filter reads `{}` there as the empty list it was."""
    prefix = "empty-list-" + uuid.uuid4().hex[:8] + ":"
    conf = apisix_conf({"store": redis_store(prefix), "scope_headers": [], "fingerprint_headers": []},
                       upstream, redis_backend)
    gw = ApisixRuntime(conf, upstream.port).start()
    try:
        first = post(gw, key, headers={"authorization": "Bearer tenant-1"})
        again = post(gw, key, headers={"authorization": "Bearer tenant-2"})
        assert first[0] == 201, first
        assert (again[0], again[1].get("idempotent-replayed")) == (201, "true"), "no scope: one key for all"
        assert upstream.executions(key) == 1
    finally:
        gw.stop()
