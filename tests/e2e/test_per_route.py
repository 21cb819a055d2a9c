"""End-to-end: envoy/per-route.template.yaml, the documented way to give
routes different idempotency settings (one filter instance per set of
settings, chosen per route)."""

import os
import uuid

import pytest

from conftest import REPO, Envoy, post, problem


@pytest.fixture(scope="module")
def per_route(upstream):
    gw = Envoy({"required": False}, upstream.port, concurrency=2,
               template=os.path.join(REPO, "envoy", "per-route.template.yaml")).start()
    yield gw
    gw.stop()


def test_the_strict_instance_runs_only_on_its_route(per_route, upstream):
    # /payments: keys required.
    resp = post(per_route, None, path="/payments")
    assert resp[0] == 400 and problem(resp)["type"].endswith("missing-key")
    # Elsewhere the default instance runs: no key is fine...
    assert post(per_route, None, path="/orders")[0] == 201
    # ...and a key is honoured on both.
    for path in ("/payments", "/orders"):
        key = "per-route-" + uuid.uuid4().hex
        assert post(per_route, key, path=path)[0] == 201
        assert post(per_route, key, path=path)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(key) == 1


def test_a_route_without_idempotency_runs_every_request(per_route, upstream):
    key = "refund-" + uuid.uuid4().hex
    for _ in range(2):
        resp = post(per_route, key, path="/refunds")
        assert resp[0] == 201 and resp[1].get("idempotent-replayed") is None
    assert upstream.executions(key) == 2


def test_unprotected_methods_pass_on_every_route(per_route, upstream):
    # A GET without a key, even where keys are required, and a PUT with one
    # (neither instance protects PUT: it runs every time).
    for path in ("/payments", "/orders", "/refunds"):
        assert post(per_route, None, path=path, method="GET")[0] == 200
    key = "put-" + uuid.uuid4().hex
    for _ in range(2):
        assert post(per_route, key, path="/payments", method="PUT")[1].get("idempotent-replayed") is None
    assert upstream.executions(key) == 2


def test_a_key_is_one_request_across_instances(per_route, upstream):
    # Both instances share the VM and, with equal max_entries, the table: a key
    # used on /orders and then on /payments is a different request (path), 422.
    key = "across-" + uuid.uuid4().hex
    assert post(per_route, key, path="/orders")[0] == 201
    assert post(per_route, key, path="/payments")[0] == 422
    assert upstream.executions(key) == 1
