"""The wall clock stepped while requests run (NTP at boot or after a large
drift, a VM resumed). Deadlines follow the monotonic clock, with one offset
per process that gives them wall-clock meaning (src/clock.rs), so a step
changes none of them. A preloaded shim (clock_shift/clock_shift.c) steps the
wall clock of the gateway's process alone and leaves its monotonic clock as
it is; each test checks that the gateway's wall clock did move."""

import email.utils
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ApisixRuntime, Envoy, apisix_conf, post, problem, redis_store, wait_for

SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clock_shift", "clock_shift.c")


@pytest.fixture(scope="module")
def shim():
    """The shim, compiled for this run (a C compiler is already needed to
    build APISIX's runtime)."""
    workdir = tempfile.mkdtemp(prefix="idem-clock-shift-")
    path = os.path.join(workdir, "clock_shift.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", path, SHIM_SOURCE], check=True)
    yield path
    shutil.rmtree(workdir, ignore_errors=True)


class SteppedClock:
    """The wall clock of one process, stepped by the test."""

    def __init__(self, shim):
        self.shim = shim
        fd, self.path = tempfile.mkstemp(prefix="idem-clock-")
        os.close(fd)
        self.offset = 0
        self._write()

    def _write(self):
        # Whole, by a rename: the shim never reads a half-written file.
        with open(self.path + ".new", "w") as f:
            f.write(f"{self.offset:+d}\n")
        os.replace(self.path + ".new", self.path)

    def env(self):
        return {"LD_PRELOAD": self.shim, "IDEM_CLOCK_SHIFT_FILE": self.path}

    def step(self, seconds):
        self.offset += seconds
        self._write()

    def close(self):
        os.unlink(self.path)


def seconds_ahead(resp):
    """How far the gateway's clock runs ahead of ours, by its Date header."""
    return email.utils.parsedate_to_datetime(resp[1]["date"]).timestamp() - time.time()


def test_a_clock_stepped_forward_past_the_lock_frees_no_running_key(shim, upstream, key):
    """An hour forward, past every lock: the original still holds its key,
    the retry gets 409, and the upstream runs once."""
    clock = SteppedClock(shim)
    gw = Envoy({"lock_timeout_seconds": 10}, upstream.port, concurrency=2, env=clock.env()).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, gw, key, b"{}", {"x-demo-hold": key})
            try:
                wait_for(lambda: upstream.started(key) == 1, what="the original to reach the upstream")
                clock.step(3600)
                # Every retry is 409, before and after Envoy's Date (cached,
                # refreshed twice a second) shows the step.
                deadline = time.time() + 10
                while True:
                    resp = post(gw, key, body=b"{}")
                    assert resp[0] == 409, resp
                    if seconds_ahead(resp) > 3000 or time.time() > deadline:
                        break
                assert seconds_ahead(resp) > 3000, "the gateway's wall clock moved"
            finally:
                upstream.release(key)
            assert original.result()[0] == 201
        s, h, _ = post(gw, key, body=b"{}")
        assert (s, h.get("idempotent-replayed")) == (201, "true")
        assert upstream.executions(key) == 1
    finally:
        gw.stop()
        clock.close()


def test_a_clock_stepped_back_during_a_forwarded_call_is_no_call_never_sent(shim, upstream, redis_backend, key):
    """APISIX tells a forwarded call that timed out from one that never
    left by how long it waited. A minute back while the upstream works: the
    call still waited its whole timeout, so the outcome is unknown (the
    default records it) and the retry does not run it again."""
    clock = SteppedClock(shim)
    prefix = "clock-" + uuid.uuid4().hex[:8] + ":"
    conf = apisix_conf({"store": redis_store(prefix, timeout_ms=1000), "forward": {"timeout_ms": 2000}}, upstream, redis_backend)
    gw = ApisixRuntime(conf, upstream.port, env=clock.env()).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, gw, key, b"{}", {"x-demo-hold": key})
            try:
                wait_for(lambda: upstream.started(key) == 1, what="the original to reach the upstream")
                clock.step(-60)
                first = original.result()
                assert seconds_ahead(first) < -50, "the gateway's wall clock moved"
                assert first[0] == 502 and problem(first)["type"].endswith("outcome-unknown"), first
            finally:
                upstream.release(key)
        wait_for(lambda: upstream.executions(key) == 1, what="the held original to finish upstream")
        retry = post(gw, key, body=b"{}")
        assert retry[0] == 502 and problem(retry)["type"].endswith("outcome-unknown"), retry
        assert upstream.executions(key) == 1
    finally:
        gw.stop()
        clock.close()
