"""End-to-end: `outcome_property` puts what became of each protected request
into Envoy's filter state, where an access log reads it
(`%FILTER_STATE(wasm.<name>:PLAIN)%`). One gateway per store, each with an
access log."""

import re
import threading
import uuid

import pytest

from conftest import Envoy, post, redis_store, renewable_timeouts, wait_for


@pytest.fixture(params=["local", "redis"])
def logged_gateway(request, upstream):
    config = {"outcome_property": "idempotency_outcome", "lock_timeout_seconds": 5}
    webdis_port = None
    if request.param == "redis":
        backend = request.getfixturevalue("redis_backend")
        config["store"] = redis_store("outcomes-" + uuid.uuid4().hex[:8] + ":")
        renewable_timeouts(config)
        webdis_port = backend.webdis_port
    gw = Envoy(config, upstream.port, concurrency=2, webdis_port=webdis_port,
               access_log=True).start()
    yield gw
    gw.stop()


def outcomes(gw, key):
    """The outcome logged for each request with this key, in log order."""
    found = []
    for line in gw.access_lines():
        m = re.search(r" (\d{3}) key=(\S+) outcome=(\S+)$", line)
        if m and m.group(2) == key:
            found.append((int(m.group(1)), m.group(3)))
    return found


def test_each_protected_request_logs_its_outcome(logged_gateway, upstream):
    gw = logged_gateway
    key = "outcome-" + uuid.uuid4().hex
    assert post(gw, key)[0] == 201
    assert post(gw, key)[1].get("idempotent-replayed") == "true"
    assert post(gw, key, body=b'{"amount": 1}')[0] == 422
    # A request in flight: the second one gets 409 while the first waits upstream.
    slow = "outcome-slow-" + uuid.uuid4().hex
    first = threading.Thread(target=post, args=(gw, slow), kwargs={"headers": {"x-demo-delay-ms": "800"}})
    first.start()
    wait_for(lambda: upstream.started(slow) == 1, what="the slow original upstream")
    assert post(gw, slow)[0] == 409
    first.join()
    failed = "outcome-5xx-" + uuid.uuid4().hex
    assert post(gw, failed, headers={"x-demo-status": "503"})[0] == 503
    wait_for(lambda: len(outcomes(gw, key)) == 3 and len(outcomes(gw, slow)) == 2
             and len(outcomes(gw, failed)) == 1, what="the access log lines")
    assert outcomes(gw, key) == [(201, "stored"), (201, "replayed"), (422, "key-reused")]
    assert sorted(outcomes(gw, slow)) == [(201, "stored"), (409, "request-in-progress")]
    assert outcomes(gw, failed) == [(503, "released")]
    # Without a key: forwarded unprotected, and said so. Unprotected methods
    # bypass the filter altogether: nothing is written ("-").
    assert post(gw, None)[0] == 201
    assert post(gw, "outcome-get", method="GET")[0] == 200
    wait_for(lambda: any(" key=- outcome=unkeyed" in line for line in gw.access_lines())
             and any(line.endswith("key=outcome-get outcome=-") for line in gw.access_lines()),
             what="the unkeyed and GET lines")


def test_an_unknowable_outcome_is_logged_as_such(logged_gateway, upstream):
    """An upstream that resets after acting: Envoy answers 503, the key
    records the outcome-unknown problem (the default `unknown_outcome`), and
    the log says so rather than "released" or "stored"."""
    gw = logged_gateway
    key = "outcome-reset-" + uuid.uuid4().hex
    assert post(gw, key, headers={"x-demo-reset": "1"})[0] == 503
    assert post(gw, key)[0] == 502
    assert upstream.executions(key) == 1
    wait_for(lambda: len(outcomes(gw, key)) == 2, what="the access log lines")
    assert outcomes(gw, key) == [(503, "outcome-unknown"), (502, "replayed")]


def test_a_kept_claim_is_logged_as_such(upstream):
    """The same with `unknown_outcome: release-after-lock`: the claim stays
    until its lock timeout, and the log says "claim-kept"."""
    config = {"outcome_property": "idempotency_outcome", "lock_timeout_seconds": 5,
              "unknown_outcome": "release-after-lock"}
    gw = Envoy(config, upstream.port, concurrency=2, access_log=True).start()
    try:
        key = "outcome-kept-" + uuid.uuid4().hex
        assert post(gw, key, headers={"x-demo-reset": "1"})[0] == 503
        assert post(gw, key)[0] == 409
        wait_for(lambda: len(outcomes(gw, key)) == 2, what="the access log lines")
        assert outcomes(gw, key) == [(503, "claim-kept"), (409, "request-in-progress")]
    finally:
        gw.stop()
