"""A real payment client library through the filter: Stripe's official Python
SDK (`stripe` on PyPI) adds an Idempotency-Key to every POST and retries by
itself on connection errors, timeouts, 409 and 5xx, with exponential backoff
and jitter. Pointed at the demo upstream (a stand-in for Stripe's API that
counts what it executes) through each kind of gateway, over a path that loses
answers and with a client timeout shorter than the upstream's work, every
logical payment runs exactly once upstream and ends with the original's
result, or, where the gateway cannot know the outcome, with the documented
problem (`outcome-unknown`)."""

import uuid

import pytest
import requests
import stripe
from stripe._http_client import HTTPClient

from conftest import ApisixRuntime, Envoy, apisix_conf, redis_store
from fault_proxy import FaultProxy

# The SDK's backoff tops out at 5 s; 1 s keeps the test short without
# changing what it does (exponential, jittered, Retry-After honoured).
HTTPClient.MAX_DELAY = 1.0

MODES = ["envoy-streaming", "envoy-forwarding", "apisix"]


@pytest.fixture(scope="module", params=MODES)
def mode_gateway(request, upstream, redis_backend):
    mode = request.param
    prefix = f"idem-stripe-{uuid.uuid4().hex[:8]}:"
    if mode == "apisix":
        gw = ApisixRuntime(apisix_conf({"store": redis_store(prefix)}, upstream, redis_backend), upstream.port).start()
    else:
        config = {"store": redis_store(prefix)}
        if mode == "envoy-forwarding":
            config["forward"] = {"upstream": "upstream"}
        gw = Envoy(config, upstream.port, concurrency=2, webdis_port=redis_backend.webdis_port).start()
    gw.mode = mode
    yield gw
    gw.stop()


def client(port, timeout=30.0, extra_headers=None):
    """Stripe's client as an application configures it: retries on, its
    idempotency keys automatic, the API base pointed at the gateway."""
    session = requests.Session()
    session.headers["Connection"] = "close"  # the lossy proxy serves one request a connection
    session.headers.update(extra_headers or {})
    return stripe.StripeClient(
        "sk_test_idempotency_filter",
        base_addresses={"api": f"http://127.0.0.1:{port}"},
        max_network_retries=8,
        http_client=stripe.RequestsClient(timeout=timeout, session=session),
    )


def executions_by_key(upstream, keys_before):
    """Executions of the keys the SDK generated during the test."""
    return {k: n for k, n in upstream.ledger_by_key().items() if k not in keys_before}


def test_over_a_path_that_loses_answers_every_payment_runs_once(mode_gateway, upstream):
    proxy = FaultProxy(f"127.0.0.1:{mode_gateway.port}", drop=0.3, seed=7).start()
    try:
        before = set(upstream.ledger_by_key())
        sdk = client(proxy.port)
        intents = [sdk.payment_intents.create(params={"amount": 100 + i, "currency": "usd"}) for i in range(10)]
        runs = executions_by_key(upstream, before)
        assert len(runs) == 10 and set(runs.values()) == {1}, runs
        # Each call ended with its original's result: ten distinct payments.
        assert len({i["id"] for i in intents}) == 10
        assert proxy.dropped > 0, "the path lost answers"
    finally:
        proxy.stop()


def test_a_client_timeout_shorter_than_the_upstream_never_runs_a_payment_twice(mode_gateway, upstream):
    """The upstream takes 1.5 s; the SDK gives up after 1 s and retries."""
    before = set(upstream.ledger_by_key())
    sdk = client(mode_gateway.port, timeout=1.0, extra_headers={"x-demo-delay-ms": "1500"})
    outcomes = []
    for i in range(2):
        try:
            outcomes.append(sdk.payment_intents.create(params={"amount": 200 + i, "currency": "usd"})["id"])
        except stripe.APIError as e:
            outcomes.append(e)
    runs = executions_by_key(upstream, before)
    assert len(runs) == 2 and set(runs.values()) == {1}, runs
    if mode_gateway.mode == "envoy-streaming":
        # Envoy reset the upstream request when the client left: nobody can
        # know the outcome, so every retry gets the documented problem.
        for e in outcomes:
            assert isinstance(e, stripe.APIError) and e.http_status == 502, e
            assert "outcome-unknown" in (e.http_body or "")
    else:
        # Forwarding: the answer was recorded without its client; a retry got it.
        assert all(isinstance(o, str) and o.startswith("pay_") for o in outcomes), outcomes
        assert len(set(outcomes)) == 2
