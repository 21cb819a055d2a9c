"""Fixtures: a counting upstream and Envoy gateways with the built filter.

Every process listens on 127.0.0.1 on a free port and is stopped at the end
of the session (or of the test that started it).
"""

import json
import os
import socket
import sys
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "demo"))

from fault_proxy import read_message  # noqa: E402
from gateway import DEFAULT_WASM, Envoy  # noqa: E402
from payment_service import PaymentService  # noqa: E402
from redis_backend import RedisBackend  # noqa: E402
from apisix_gateway import ApisixRuntime  # noqa: E402

# Every test that takes a gateway runs on each kind of gateway:
# - local, redis: Envoy with the filter, each store;
# - apisix-profile: Envoy imitating APISIX's rules (Redis store, the filter
#   forwarding requests itself, a rule violation traps the VM);
# - apisix: APISIX's own Wasm runtime (wasm-nginx-module 0.7.0 on wasmtime
#   0.38.1, built by `make apisix-runtime`), driven as apisix/wasm.lua does.
STORES = ["local", "redis", "apisix-profile", "apisix"]
# Kinds where the filter forwards requests itself (APISIX's only mode).
FORWARDING = {"apisix-profile", "apisix"}

# One gateway per configuration; started on first use, shared by the tests.
PROFILES = {
    "default": {},
    "strict": {"required": True},
    "generate": {"generate_missing": True},
    "limits": {"max_request_body_bytes": 1024, "max_response_body_bytes": 1024},
    "short_ttl": {"ttl_seconds": 5, "lock_timeout_seconds": 4},
    "lock": {"lock_timeout_seconds": 4, "ttl_seconds": 60},
    # The other choice where the upstream's outcome is unknowable (the
    # default, "record", records the outcome-unknown problem).
    "release_after_lock": {"unknown_outcome": "release-after-lock", "lock_timeout_seconds": 4, "ttl_seconds": 60},
    "server_errors": {"record_server_errors": True},
    "small_table": {"store": {"type": "local", "max_entries": 64}, "max_response_body_bytes": 65536},
    "one_bucket": {"store": {"type": "local", "max_entries": 16}},
    "put_only": {"methods": ["PUT"], "required": True},
    "opaque": {"key_syntax": "opaque"},
    # The host named in the scope: one key on two hosts is two keys.
    "host_scoped": {"scope_headers": ["authorization", ":authority"]},
    # Answers up to max_response_body_bytes (1 MiB) replayed whole; on the
    # local store that needs the room below (LOCAL_STORE).
    "large_records": {},
}

# The local store of profiles that are not about the local store but need
# its room: store.max_bytes is shared equally by the table's buckets, so the
# default table (6,250 buckets of 42 KB) keeps larger answers without their
# body. 100 buckets of 2.7 MB hold a 1 MiB answer whole. (The Redis kinds
# keep their store: Redis holds whole records.)
LOCAL_STORE = {
    "large_records": {"type": "local", "max_entries": 1600, "max_bytes": 256 * 1024 * 1024},
}


def pytest_configure(config):
    if not os.path.exists(DEFAULT_WASM):
        raise pytest.UsageError(f"{DEFAULT_WASM} is missing: run `make build` first")


@pytest.fixture(scope="session")
def upstream():
    svc = PaymentService().start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def redis_backend():
    backend = RedisBackend().start()
    yield backend
    backend.stop()


@pytest.fixture(scope="session", params=STORES)
def store_kind(request):
    return request.param


def redis_store(prefix, **extra):
    # 4 s per store call, not the default 500 ms: on a loaded CI machine a
    # slow call would turn into a 503 (or an unrecorded response) and fail a
    # test about something else. (Envoy's default 30 s lock allows up to
    # 4.7 s: renewable_timeouts.) Tests about timeouts set their own.
    return {"type": "redis", "cluster": "webdis", "key_prefix": prefix, "timeout_ms": 4000, **extra}


@pytest.fixture(scope="session")
def gateways(upstream, store_kind, request):
    backend = request.getfixturevalue("redis_backend") if store_kind != "local" else None
    started = {}

    def get(profile):
        if profile not in started:
            config = json.loads(json.dumps(PROFILES[profile]))
            if not backend and profile in LOCAL_STORE:
                config["store"] = dict(LOCAL_STORE[profile])
            if backend:
                if "store" in config:
                    pytest.skip(f"profile {profile!r} is about the local store")
                config["store"] = redis_store(f"idem-{store_kind}-{profile}:")
            if store_kind == "redis":
                renewable_timeouts(config)
            if store_kind == "apisix-profile":
                config["host"] = "apisix-profile"
                config["forward"] = {"upstream": "upstream"}
                no_tick_timeouts(config)
            if store_kind == "apisix":
                started[profile] = ApisixRuntime(apisix_conf(config, upstream, backend), upstream.port).start()
            else:
                started[profile] = Envoy(config, upstream.port, concurrency=2,
                                         webdis_port=backend.webdis_port if backend else None).start()
        return started[profile]

    get.kind = store_kind
    get.forwarding = store_kind in FORWARDING
    yield get
    for envoy in started.values():
        envoy.stop()


def apisix_conf(config, upstream, backend):
    """A plugin configuration for APISIX: Redis through Webdis and the
    upstream, both as host:port (APISIX calls addresses, not clusters)."""
    config = dict(config, host="apisix")
    config["store"] = dict(config["store"], cluster=f"127.0.0.1:{backend.webdis_port}")
    config["forward"] = dict(config.get("forward", {}), upstream=f"127.0.0.1:{upstream.port}")
    return no_tick_timeouts(config)


# Envoy renews running requests' claims from a one-second tick, and refuses
# a lock too short for a renewal to land: it must be longer than 1 s + 6 x
# store.timeout_ms + 0.5 s (src/store/renewals.rs, shortest_lock_ms).
TICK_MS, TICK_SLACK_MS = 1000, 500


def renewable_timeouts(config):
    """An Envoy configuration on the Redis store with a lock shorter than the
    tests' long store timeout allows gets store calls short enough for it
    (at least 100 ms)."""
    store = config.get("store", {})
    if store.get("type") == "redis" and config.get("host", "envoy") == "envoy":
        lock_ms = config.get("lock_timeout_seconds", 30) * 1000
        fits = (lock_ms - TICK_MS - TICK_SLACK_MS - 1) // 6 // 100 * 100
        store["timeout_ms"] = min(store.get("timeout_ms", 500), max(100, fits))
    return config


def no_tick_timeouts(config):
    """Where claims cannot be renewed (APISIX and its profile), the lock must
    outlast three times the forward timeout and the three store calls
    (the claim's answer, and the record sent twice after a NOSCRIPT), since
    nginx times each socket operation of a call (a connect, a send, a read):
    a profile with a short lock gets shorter ones (a sixteenth of it for
    each store call, the forward timeout from what is left)."""
    lock_ms = config.get("lock_timeout_seconds", 30) * 1000
    store = config.get("store", {})
    store_ms = 500
    if store.get("type") == "redis":
        store_ms = store["timeout_ms"] = min(store.get("timeout_ms", 500), lock_ms // 16)
    forward = config.setdefault("forward", {})
    forward.setdefault("timeout_ms", min(8_000, (lock_ms - 1) // 3 - 3 * store_ms))
    return config


@pytest.fixture
def gw(gateways):
    return gateways("default")


@pytest.fixture
def key():
    return "k-" + uuid.uuid4().hex


def wait_for(cond, timeout=10.0, what="condition"):
    """Polls for a state the test caused (not for an amount of time)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def post(gw, key, body=b'{"amount": 42}', headers=None, path="/payments", method="POST"):
    h = {"content-type": "application/json"}
    if key is not None:
        h["idempotency-key"] = key
    h.update(headers or {})
    return gw.request(method, path, h, body)


def problem(resp):
    """Asserts an RFC 9457 body and returns it parsed."""
    status, headers, body = resp
    assert headers.get("content-type") == "application/problem+json", resp
    doc = json.loads(body)
    assert doc["status"] == status
    assert doc["type"].startswith("urn:idempotency-filter:problem:")
    assert doc["title"] and doc["detail"]
    return doc


def settled(gw, key, body=b'{"amount": 42}', headers=None, path="/payments", timeout=10.0):
    """The answer to a retry once the original's fate has been written: a
    409 may come first while the gateway is still ending the original."""
    deadline = time.time() + timeout
    while True:
        resp = post(gw, key, body=body, headers=headers, path=path)
        if resp[0] != 409 or time.time() > deadline:
            return resp
        time.sleep(0.05)


def assert_outcome_unknown(resp):
    """The replayed record of a key whose outcome nobody could know."""
    assert resp[0] == 502 and resp[1].get("idempotent-replayed") == "true", resp
    assert problem(resp)["type"].endswith("outcome-unknown")


def raw_request(port, data, timeout=10):
    """Sends raw bytes (for requests http.client will not build) and returns
    (status, headers, body) of the response, or None if the connection closed
    without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        # A proxy that answers early (413, 431) may close before it has read
        # everything: the send can fail, and the answer may still be there.
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            message = read_message(s)
        except ConnectionResetError:
            message = None
    if message is None:
        return None
    head, _, body = message.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body
