"""Envoy, forwarding mode: the filter's calls belong to the worker, not to the
request that made them. A client that gives up while its forwarded request
runs does not lose the outcome: the upstream's answer is recorded, and the
retry gets it replayed. Exactly one execution.

Without the worker owning the calls, the SDK drops the upstream's answer
with the request's context: nothing is recorded or released, and the retry
gets 409 until the lock times out (30 s here), so this test fails.
"""

import socket
import uuid

import pytest

from conftest import Envoy, post, redis_store, renewable_timeouts, wait_for

STORES = ["local", "redis"]


def forwarding_envoy(request, upstream, **config):
    """Envoy in forwarding mode on the store the fixture's param names."""
    config = {"forward": {"upstream": "upstream"}, **config}
    backend = None
    if request.param == "redis":
        backend = request.getfixturevalue("redis_backend")
        config["store"] = redis_store(f"idem-gone-{uuid.uuid4().hex[:8]}:")
        renewable_timeouts(config)
    return Envoy(config, upstream.port, concurrency=2,
                 webdis_port=backend.webdis_port if backend else None).start()


@pytest.fixture(scope="module", params=STORES)
def forwarding_gw(request, upstream):
    envoy = forwarding_envoy(request, upstream)
    yield envoy
    envoy.stop()


def clients_gone_mid_request(gw):
    total = 0
    for line in gw.admin("/stats?filter=downstream_cx_destroy_remote_active_rq").splitlines():
        name, _, value = line.partition(": ")
        if name.endswith("downstream_cx_destroy_remote_active_rq") and value.strip().isdigit():
            total += int(value)
    return total


def test_a_client_that_gives_up_gets_the_outcome_on_retry(forwarding_gw, upstream, key):
    gw = forwarding_gw
    gate = "gone-" + key
    gone_before = clients_gone_mid_request(gw)
    # The client waits 0.5 s; the upstream answers only once the client has gone.
    with pytest.raises((socket.timeout, TimeoutError)):
        gw.request("POST", "/payments",
                   {"content-type": "application/json", "idempotency-key": key, "x-demo-hold": gate},
                   b'{"amount": 42}', timeout=0.5)
    wait_for(lambda: upstream.started(key) == 1, what="the upstream to get the request")
    wait_for(lambda: clients_gone_mid_request(gw) > gone_before, what="Envoy to see the client go")
    upstream.release(gate)
    wait_for(lambda: upstream.executions(key) == 1, what="the upstream to answer")

    # The record lands just after the answer: retries meanwhile get 409,
    # never a second execution.
    replies = []

    def replayed():
        status, headers, body = post(gw, key)
        replies.append(status)
        return status == 201 and headers.get("idempotent-replayed") == "true"

    wait_for(replayed, timeout=10, what="the retry to be replayed")
    assert set(replies) <= {409, 201}, replies
    assert upstream.executions(key) == 1, "exactly one execution"


@pytest.fixture(scope="module", params=STORES)
def short_lock_forwarding_gw(request, upstream):
    envoy = forwarding_envoy(request, upstream, forward={"upstream": "upstream", "timeout_ms": 20_000},
                             lock_timeout_seconds=4)
    yield envoy
    envoy.stop()


def test_a_forwarded_request_slower_than_the_lock_keeps_its_claim(short_lock_forwarding_gw, upstream, key):
    """Envoy forwarding mode renews claims from the tick like streaming mode:
    a 4 s lock, an upstream that takes longer, retries meanwhile get 409."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    gw = short_lock_forwarding_gw
    before = gw.stats()["claims_renewed"]
    with ThreadPoolExecutor(1) as pool:
        original = pool.submit(post, gw, key, b"{}", {"x-demo-hold": key})
        try:
            wait_for(lambda: upstream.started(key) == 1, what="the upstream to get the request")
            time.sleep(5.0)  # past the 4 s lock
            assert post(gw, key, body=b"{}")[0] == 409, "renewed: still held"
        finally:
            upstream.release(key)
        first = original.result()
    assert first[0] == 201
    s, h, b = post(gw, key, body=b"{}")
    assert (s, h.get("idempotent-replayed"), b) == (201, "true", first[2])
    assert upstream.executions(key) == 1
    assert gw.stats()["claims_renewed"] - before >= 1
