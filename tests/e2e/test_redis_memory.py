"""Redis under memory pressure. The README requires `maxmemory-policy
noeviction`: once Redis is full it refuses writes (SET) but still answers
reads and runs PEXPIRE and DEL. Then new keys get 503 and run nowhere,
recorded keys are replayed, and a request that ran but whose record Redis
refused keeps its key in progress (409) for the TTL: it never runs twice.
An evicting policy drops records (and claims) silently: this shows what that
costs, which is why it is not allowed."""

import os
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, RedisBackend, post, problem, wait_for
from test_redis_fleet import Fleet

FILL = "x" * 100_000


def resp_command(port, *args):
    """One Redis command over RESP (filler and INFO go around Webdis)."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(out)
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def full(backend):
    info = resp_command(backend.redis_port, "INFO", "memory").decode()
    fields = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
    return int(fields["used_memory"]) > int(fields["maxmemory"])


def make_full(backend):
    """A few MB of filler (no expiry), then maxmemory below what is used."""
    for i in range(40):
        assert resp_command(backend.redis_port, "SET", f"filler:{i}", FILL).startswith(b"+OK")
    resp_command(backend.redis_port, "CONFIG", "SET", "maxmemory", "1mb")
    assert full(backend)


def fill(backend, until):
    """Filler until `until()` holds (an evicting Redis makes room each time)."""
    for i in range(4000):
        if until():
            return
        resp_command(backend.redis_port, "SET", f"filler:{i}", FILL)
    raise AssertionError("never happened")


@pytest.fixture
def small_redis(tmp_path):
    # Starts with room; the test lowers maxmemory to below what is in use.
    backend = RedisBackend(workdir=str(tmp_path), redis_args=("--maxmemory", "64mb",
                                                               "--maxmemory-policy", "noeviction")).start()
    yield backend
    backend.stop()


def test_a_full_redis_with_noeviction_never_runs_anything_twice(upstream, small_redis, key):
    fleet = Fleet(upstream, small_redis, ttl_seconds=12, lock_timeout_seconds=4)
    try:
        done, running, new = key + "-done", key + "-running", key + "-new"
        s1, _, b1 = post(fleet.a, done)
        assert s1 == 201
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, fleet.a, running, b"{}", {"x-demo-hold": running})
            try:
                wait_for(lambda: upstream.started(running) == 1, what="the original to reach the upstream")
                # Redis fills up while the original runs.
                make_full(small_redis)
                # A new key: Redis refuses the claim; 503, nothing runs.
                resp = post(fleet.b, new)
                assert resp[0] == 503 and problem(resp)["type"].endswith("store-unavailable")
                assert upstream.executions(new) == 0
                # A recorded key is still replayed (reads work).
                s, h, b = post(fleet.b, done)
                assert (s, h.get("idempotent-replayed"), b) == (201, "true", b1)
            finally:
                upstream.release(running)
            # The original ran; Redis refuses its record: the client still
            # gets the answer, and the key is held in progress instead.
            assert original.result()[0] == 201
        assert upstream.executions(running) == 1
        # Room again, and past the 4 s lock timeout: still 409. The marker
        # lives as long as a record would (the TTL), so no retry runs it again.
        resp_command(small_redis.redis_port, "CONFIG", "SET", "maxmemory", "64mb")
        time.sleep(4.5)
        for gw in (fleet.a, fleet.b):
            resp = post(gw, running, body=b"{}")
            assert resp[0] == 409, resp
        assert upstream.executions(running) == 1
        ttl = small_redis.command("PTTL", fleet.prefix + redis_key_hex(fleet, running))["PTTL"]
        assert 4_000 < ttl <= 12_000, ttl
        # New keys are protected as before.
        assert post(fleet.a, new)[0] == 201 and post(fleet.b, new)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(new) == 1
    finally:
        fleet.stop()


def redis_key_hex(fleet, key):
    """The hex digest part of `key`'s Redis key (the only in-flight one)."""
    names = fleet.backend.command("KEYS", fleet.prefix + "*")["KEYS"]
    held = [n for n in names if fleet.backend.command("GET", n)["GET"].startswith("I|")]
    assert len(held) == 1, held
    return held[0][len(fleet.prefix):]


def test_an_evicting_redis_forgets_records_and_their_retries_run_again(upstream, tmp_path, key):
    """allkeys-lru (or any volatile-* policy: every key here has an expiry)
    evicts what it likes: a record goes, and its retry runs a second time."""
    backend = RedisBackend(workdir=str(tmp_path), redis_args=("--maxmemory", "8mb",
                                                              "--maxmemory-policy", "allkeys-lru")).start()
    fleet = Fleet(upstream, backend, store_extra={"timeout_ms": 5000})
    try:
        s1, _, _ = post(fleet.a, key)
        assert s1 == 201
        names = backend.command("KEYS", fleet.prefix + "*")["KEYS"]
        assert len(names) == 1
        fill(backend, lambda: backend.command("EXISTS", names[0])["EXISTS"] == 0)
        s2, h2, _ = post(fleet.b, key)
        assert s2 == 201 and h2.get("idempotent-replayed") is None, "the record was evicted"
        assert upstream.executions(key) == 2, "the documented cost of an evicting policy"
    finally:
        fleet.stop()
        backend.stop()


def batch_script():
    """The store's Lua script, as src/store/batch.rs holds it (a Rust string
    whose lines end in a backslash, which drops the newline and the next
    line's indentation)."""
    with open(os.path.join(REPO, "src", "store", "batch.rs")) as f:
        src = f.read()
    literal = src.split('pub const BATCH_SCRIPT: &str = "', 1)[1].split('";', 1)[0]
    return re.sub(r"\\\n\s*", "", literal)


def test_a_late_renewal_never_shortens_the_hold_of_a_refused_record(small_redis):
    """A full Redis refuses a record and keeps the claim's marker for the
    TTL instead, so the request that ran never runs again. A renewal of that
    claim sent before the record's answer can land after it: it must not cut
    the hold back to the lock."""
    script, key, token = batch_script(), "hold-" + uuid.uuid4().hex, "00000000000000ab"
    prefix = f"I|{token}|"
    claim = resp_command(small_redis.redis_port, "EVAL", script, 1, key, "C", prefix + "f" * 32, 30_000)
    assert b"claimed" in claim, claim
    make_full(small_redis)
    try:
        record = "C|" + "f" * 32 + "|" + "r" * 2000
        wrote = resp_command(small_redis.redis_port, "EVAL", script, 1, key, "W", prefix, 86_400_000,
                             len(record), record)
        assert wrote.endswith(b"$1\r\n2\r\n"), wrote  # refused: the claim is held for the TTL
        renewed = resp_command(small_redis.redis_port, "EVAL", script, 1, key, "N", prefix, 30_000)
        assert renewed.endswith(b"$1\r\n1\r\n"), renewed
        pttl = int(resp_command(small_redis.redis_port, "PTTL", key).strip(b":\r\n"))
        assert pttl > 86_000_000, pttl
    finally:
        resp_command(small_redis.redis_port, "CONFIG", "SET", "maxmemory", "64mb")
