"""What each host does with a VM that trapped, shown with a test module that
traps on demand (tests/trap-filter: `x-trap: 1` executes `unreachable`). No
input is known to trap the idempotency filter; these tests are about the
hosts, and about the Envoy setting the shipped configurations choose."""

import os
import subprocess
import time

import pytest

import gateway
from conftest import REPO, ApisixRuntime, Envoy

CRATE = os.path.join(REPO, "tests", "trap-filter")
TRAP_WASM = os.path.join(CRATE, "target", "wasm32-wasip1", "release", "trap_filter.wasm")


@pytest.fixture(scope="module")
def trap_wasm():
    subprocess.run(["cargo", "build", "--release", "-q", "--target", "wasm32-wasip1", "--manifest-path",
                    os.path.join(CRATE, "Cargo.toml")], check=True, timeout=600)
    return TRAP_WASM


def envoy_with_policy(policy, wasm, upstream):
    """Envoy with the shipped template, but for the failure policy."""
    template = open(gateway.TEMPLATE).read()
    assert "failure_policy: FAIL_RELOAD" in template, "the shipped configuration reloads a failed VM"
    path = os.path.join(REPO, ".tmp", f"envoy-{policy}.template.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(template.replace("failure_policy: FAIL_RELOAD", f"failure_policy: {policy}"))
    return Envoy({"trap-test": True}, upstream.port, concurrency=1, wasm_path=wasm, template=path).start()


def served(gw):
    return gw.request("POST", "/payments", {}, b"{}")[0] == 201


def trap(gw):
    return gw.request("POST", "/payments", {"x-trap": "1"}, b"{}")[0]


def test_envoy_fail_reload_fails_only_the_request_that_trapped(trap_wasm, upstream):
    gw = envoy_with_policy("FAIL_RELOAD", trap_wasm, upstream)
    try:
        assert served(gw)
        assert trap(gw) == 503, "the request that trapped is refused, not forwarded"
        # A new VM after the reload backoff (1 s by default): served again.
        deadline = time.time() + 15
        while not served(gw):
            assert time.time() < deadline, "the VM was never reloaded"
            time.sleep(0.2)
        assert "RuntimeError: unreachable" in gw.log()
    finally:
        gw.stop()


def test_envoy_fail_closed_would_refuse_every_later_request(trap_wasm, upstream):
    gw = envoy_with_policy("FAIL_CLOSED", trap_wasm, upstream)
    try:
        assert served(gw)
        assert trap(gw) == 503
        # Well past FAIL_RELOAD's backoff: still refused (why it is not shipped).
        for _ in range(10):
            time.sleep(0.3)
            assert gw.request("POST", "/payments", {}, b"{}")[0] == 503
    finally:
        gw.stop()


def test_apisix_keeps_a_trapped_vm_until_nginx_reloads(trap_wasm, upstream):
    """wasm-nginx-module has no reload policy: after a trap, the Rust SDK's
    context table stays borrowed, so every later request on that worker
    fails (APISIX answers 503), until `nginx -s reload` starts new workers."""
    gw = ApisixRuntime({"trap-test": True}, upstream.port, workers=1, wasm_path=trap_wasm).start()
    try:
        assert served(gw)
        assert trap(gw) == 503
        for _ in range(5):
            assert gw.request("POST", "/payments", {}, b"{}")[0] == 503
        assert "already borrowed" in gw.log() or "failed to create context" in gw.log() \
            or "failed to run" in gw.log(), gw.log()[-3000:]
        gw.reload()
        deadline = time.time() + 15
        while not served(gw):
            assert time.time() < deadline, "new workers did not serve"
            time.sleep(0.2)
    finally:
        gw.stop()
