"""The key-operations endpoint on a real Envoy (README "Operations: inspect
and forget a key"): a second listener whose filter instance has
"operations" in its configuration, with the protected listener's vm_id and
max_entries, inspects and forgets keys that the protected listener
recorded. Two workers, so the endpoint and the requests it acts on may run
on different threads (one shared-data table)."""

import json
import os
import re
import threading
import uuid

import pytest

from conftest import REPO, Envoy, post, wait_for
from gateway import http_request

PATH = "/idempotency/key"


@pytest.fixture(scope="module")
def envoy(upstream):
    gw = Envoy({"lock_timeout_seconds": 30}, upstream.port, concurrency=2,
               operations={"lock_timeout_seconds": 30, "operations": {}}).start()
    assert gw.operations_port and gw.operations_port != gw.port
    yield gw
    gw.stop()


def operation(gw, method, key, query="", headers=None):
    """One request to the operations listener; (status, headers, parsed body)."""
    h = {"idempotency-key": key, **(headers or {})}
    status, hs, body = http_request(gw.operations_port, method, PATH + query, h)
    return status, hs, json.loads(body) if body else None


def inspect(gw, key, **kw):
    status, headers, doc = operation(gw, "GET", key, **kw)
    assert status == 200 and headers["content-type"] == "application/json", (status, doc)
    return doc


@pytest.fixture
def key():
    return f'"ops-{uuid.uuid4().hex}"'


def test_a_recorded_key_is_inspected_and_forgotten_and_its_retry_runs_again(envoy, upstream, key):
    first = post(envoy, key)
    assert first[0] == 201
    doc = inspect(envoy, key)
    assert doc["state"] == "completed" and doc["status"] == 201, doc
    assert doc["body_bytes"] == len(first[2]) and doc["body_omitted"] is False
    assert 0 < doc["expires_in_ms"] <= 86_400_000
    assert post(envoy, key)[1].get("idempotent-replayed") == "true"
    assert upstream.executions(key) == 1

    status, _, doc = operation(envoy, "DELETE", key)
    assert status == 200 and doc["forgotten"] == "completed", doc
    assert inspect(envoy, key)["state"] == "absent"
    retry = post(envoy, key)
    assert retry[0] == 201 and "idempotent-replayed" not in retry[1], retry
    assert upstream.executions(key) == 2, "the retry ran again"
    assert post(envoy, key)[1].get("idempotent-replayed") == "true", "and is recorded"


def test_a_running_key_is_refused_unless_forced(envoy, upstream, key):
    hold = "ops-" + uuid.uuid4().hex
    original = {}
    t = threading.Thread(target=lambda: original.update(
        resp=post(envoy, key, headers={"x-demo-hold": hold})))
    t.start()
    try:
        wait_for(lambda: upstream.started(key) == 1, what="the original to reach the upstream")
        assert inspect(envoy, key)["state"] == "in-flight"
        status, headers, doc = operation(envoy, "DELETE", key)
        assert status == 409 and doc["type"].endswith(":key-in-flight"), doc
        assert headers["content-type"] == "application/problem+json"
        assert post(envoy, key)[0] == 409, "retries still wait"
        assert inspect(envoy, key)["state"] == "in-flight"

        # Forced: the retry runs while the original still runs.
        status, _, doc = operation(envoy, "DELETE", key, query="?force=true")
        assert status == 200 and doc["forgotten"] == "in-flight", doc
        claims_lost = envoy.stats().get("claims_lost", 0)
        retry = post(envoy, key)
        assert retry[0] == 201 and upstream.executions(key) == 1
    finally:
        upstream.release(hold)
        t.join(timeout=30)
    assert original["resp"][0] == 201
    assert upstream.executions(key) == 2
    # The original's claim was forgotten: its answer is not recorded over
    # the retry's, which is what later retries get.
    wait_for(lambda: envoy.stats().get("claims_lost", 0) == claims_lost + 1, what="the original's lost claim")
    again = post(envoy, key)
    assert again[1].get("idempotent-replayed") == "true" and again[2] == retry[2]


def test_keys_are_found_in_their_scope_only_and_absent_keys_are_not_forgotten(envoy, key):
    tenant = {"authorization": "Bearer tenant-" + uuid.uuid4().hex}
    assert post(envoy, key, headers=tenant)[0] == 201
    assert inspect(envoy, key)["state"] == "absent", "another scope"
    assert inspect(envoy, key, headers=tenant)["state"] == "completed"
    status, headers, doc = operation(envoy, "DELETE", key)
    assert status == 404 and doc["type"].endswith(":key-absent"), doc
    assert headers["content-type"] == "application/problem+json"
    status, _, doc = operation(envoy, "DELETE", key, headers=tenant)
    assert status == 200 and doc["forgotten"] == "completed"


def test_the_endpoint_refuses_other_paths_and_methods(envoy, key):
    status, headers, body = http_request(envoy.operations_port, "GET", "/other", {"idempotency-key": key})
    assert status == 404 and json.loads(body)["type"].endswith(":not-found")
    status, headers, body = http_request(envoy.operations_port, "POST", PATH, {"idempotency-key": key}, b"{}")
    assert status == 405 and headers["allow"] == "GET, DELETE"
    status, _, body = http_request(envoy.operations_port, "GET", PATH, {})
    assert status == 400 and json.loads(body)["type"].endswith(":missing-key")


def test_the_protected_listener_does_not_expose_the_endpoint(envoy, upstream, key):
    assert post(envoy, key)[0] == 201
    for method in ("GET", "DELETE"):
        status, headers, body = envoy.request(method, PATH + "?force=true", {"idempotency-key": key})
        # The upstream's own answer: the filter passed it on untouched.
        assert "x-payment-id" in headers, (method, status, body)
    assert post(envoy, key)[1].get("idempotent-replayed") == "true", "the record stays"
    assert inspect(envoy, key)["state"] == "completed"


def test_the_key_is_read_as_the_protected_listener_reads_it(envoy, key):
    """A bare key and its sf-string form are one key (key_syntax structured)."""
    assert post(envoy, key)[0] == 201
    doc = inspect(envoy, key.strip('"'))
    assert doc["state"] == "completed" and doc["key"] == key.strip('"')


def test_the_readme_names_every_field_of_the_answers(envoy, upstream, key):
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("\n## Operations: inspect and forget a key\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    hold = "ops-" + uuid.uuid4().hex
    t = threading.Thread(target=post, args=(envoy, key), kwargs={"headers": {"x-demo-hold": hold}})
    t.start()
    try:
        wait_for(lambda: upstream.started(key) == 1, what="the original to reach the upstream")
        seen = set(inspect(envoy, key))
    finally:
        upstream.release(hold)
        t.join(timeout=30)
    wait_for(lambda: inspect(envoy, key)["state"] == "completed", what="the record")
    seen |= set(inspect(envoy, key)) | set(operation(envoy, "DELETE", key)[2])
    assert seen == documented
