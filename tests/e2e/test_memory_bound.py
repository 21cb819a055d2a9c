"""Hostile traffic against the byte budget (`store.max_bytes`): one scope
sends as many distinct keys as it can for a few seconds to an endpoint
answering 256 KiB. Envoy's resident memory stays within the budget plus a
stated margin (the table's fixed cost is created at start-up, before the
baseline), nothing that still runs is evicted, retries of the records that
survive are replayed byte for byte, and evicted ones run again with their
own bytes, never another record's. The same for the Redis store's replay
cache, which a key's first retry fills: there each key is retried once
during the flood. Checked against the mutant: with a budget too large to
bind (only the entries bound the table) the same traffic grew Envoy by
36 MiB (local store) and 43 MiB (replay cache, when records filled it as
they were stored), and both tests failed; with it, by 7 and 13 MiB.

Every response body is the upstream's payment id repeated (x-demo-unique),
so a replay of the wrong record cannot pass for the right one."""

import http.client
import threading
import time
import uuid

import pytest

from conftest import Envoy, RedisBackend, post, redis_store, wait_for

SIZE = 256 * 1024
# 8 buckets (128 entries) of 1,000,000 bytes: two 256 KiB records each (a
# record is charged its 262 KB plus a third for Envoy's allocator), so at
# most 16 survive whatever the traffic. With entries alone the table could
# hold 128 of them (34 MB).
MAX_BYTES = 8_000_000
MAX_ENTRIES = 128
SURVIVORS_AT_MOST = 16
# What the filter does not bound, on top of max_bytes: the requests in
# flight (six clients' 256 KiB answers, copied by Envoy and the filter),
# the Wasm VMs' memory growing to hold them, and the allocator's slack.
MARGIN = 16 * 1024 * 1024
FLOOD_SECONDS = 4
# Retries of the newest answers (each is a 256 KiB round trip).
RETRIED = 300
CLIENTS = 6
HEADERS = {"x-demo-response-bytes": str(SIZE), "x-demo-unique": "1"}


def rss(envoy):
    with open(f"/proc/{envoy.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def own_bytes(headers, body):
    """The body the upstream made for this execution (its payment id)."""
    unit = f"{headers['x-payment-id']}|".encode()
    return body == (unit * (SIZE // len(unit) + 1))[:SIZE]


def flood(gw, prefix, seconds, watch, retried=False):
    """CLIENTS clients, each sending fresh keys one after another on its own
    connection for `seconds`, and with `retried` each key's retry right
    after its answer (on Redis the first retry is what fills the replay
    cache). Returns [(key, payment id, body)] in the order the answers
    arrived; `watch()` runs meanwhile (memory peaks)."""
    answers, lock = [], threading.Lock()
    stop = time.time() + seconds
    errors = []

    def client(c):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        n = 0
        try:
            while time.time() < stop:
                key = f"{prefix}{c}-{n}"
                n += 1
                conn.request("POST", "/payments", body=b"{}", headers={
                    "idempotency-key": key, "content-type": "application/json", **HEADERS})
                r = conn.getresponse()
                body = r.read()
                headers = {k.lower(): v for k, v in r.getheaders()}
                if r.status != 201 or not own_bytes(headers, body):
                    errors.append((key, r.status, headers))
                    return
                if retried:
                    conn.request("POST", "/payments", body=b"{}", headers={
                        "idempotency-key": key, "content-type": "application/json", **HEADERS})
                    r = conn.getresponse()
                    again = r.read()
                    if (r.status, r.getheader("idempotent-replayed"), again) != (201, "true", body):
                        errors.append((key, r.status, "retry not replayed byte for byte"))
                        return
                with lock:
                    answers.append((key, headers["x-payment-id"], body))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        watch()
        time.sleep(0.05)
    assert not errors, errors[:3]
    return answers


def check_retries(gw, upstream, answers):
    """Retries, newest first: a survivor is replayed byte for byte (same
    payment id, same bytes); an evicted record runs again and gets its own
    new bytes. Newest first, so that a retry that runs again (and records)
    can only push out records already checked. The survivors are the newest
    of their buckets: all among the last RETRIED. Returns (replayed, ran)."""
    replayed = ran = 0
    for key, pid, body in list(reversed(answers))[:RETRIED]:
        s, h, b = post(gw, key, body=b"{}", headers=HEADERS)
        assert s == 201, (key, s)
        if h.get("idempotent-replayed") == "true":
            assert h["x-payment-id"] == pid and b == body, f"{key}: replayed another record's bytes"
            assert upstream.executions(key) == 1
            replayed += 1
        else:
            assert h["x-payment-id"] != pid and own_bytes(h, b), key
            assert upstream.executions(key) == 2
            ran += 1
    return replayed, ran


def test_a_flood_of_large_answers_stays_within_max_bytes_and_running_requests_survive(upstream):
    gw = Envoy({"store": {"type": "local", "max_entries": MAX_ENTRIES, "max_bytes": MAX_BYTES}},
               upstream.port, concurrency=2).start()
    prefix = "flood-" + uuid.uuid4().hex[:8] + "-"
    held = [f"{prefix}held-{i}" for i in range(3)]
    originals, threads = {}, []
    try:
        # Warm-up: connections, pools, the VMs' first requests.
        for i in range(20):
            assert post(gw, f"{prefix}warm-{i}")[0] == 201
        baseline = rss(gw)
        # Requests that run through the whole flood (the upstream holds
        # them until released): their keys must never be evicted.
        for key in held:
            def run(k=key):
                originals[k] = post(gw, k, body=b"{}", headers={**HEADERS, "x-demo-hold": prefix})
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        wait_for(lambda: sum(upstream.started(k) for k in held) == 3, what="the held requests to run")
        peak = [baseline]
        answers = flood(gw, prefix, FLOOD_SECONDS, lambda: peak.__setitem__(0, max(peak[0], rss(gw))))
        peak[0] = max(peak[0], rss(gw))
        stats = gw.stats()
        growth = peak[0] - baseline
        print(f"\nlocal store: {len(answers)} answers of 256 KiB in {FLOOD_SECONDS} s; Envoy RSS "
              f"{baseline / 2**20:.1f} MiB -> peak {peak[0] / 2**20:.1f} MiB (+{growth / 2**20:.1f}); "
              f"bytes_held {stats['bytes_held']}, evicted_for_space {stats['evicted_for_space']}, "
              f"bodies_omitted {stats['bodies_omitted']}")
        assert len(answers) > 8 * SURVIVORS_AT_MOST, "enough traffic to fill the budget many times over"
        assert growth < MAX_BYTES + MARGIN, (growth, stats)
        assert 0 < stats["bytes_held"] <= MAX_BYTES, stats
        assert stats["evicted_for_space"] >= len(answers) - SURVIVORS_AT_MOST, stats
        assert stats["bodies_omitted"] == 0, stats
        # The running requests were never evicted: still in progress.
        for key in held:
            s, _, _ = post(gw, key, body=b"{}", headers=HEADERS)
            assert s == 409, (key, s)
        upstream.release(prefix)
        for t in threads:
            t.join(30)
        assert sorted(originals) == sorted(held)
        for key in held:
            s, h, b = originals[key]
            assert s == 201 and own_bytes(h, b) and upstream.executions(key) == 1
        # Retries: the held keys (their records are the newest), then the flood's.
        replayed, ran = check_retries(gw, upstream, answers + [
            (k, originals[k][1]["x-payment-id"], originals[k][2]) for k in held])
        assert ran > 0, "the flood evicted records"
        print(f"retries: {replayed} replayed byte for byte, {ran} evicted and run again")
        assert 8 <= replayed <= SURVIVORS_AT_MOST, (replayed, ran)
        assert gw.stats()["bytes_held"] <= MAX_BYTES
    finally:
        upstream.release(prefix)
        gw.stop()


def test_a_flood_of_large_answers_keeps_the_replay_cache_within_max_bytes(upstream):
    backend = RedisBackend().start()
    gw = None
    try:
        # Short records: Redis holds each of them (350 KB of base64) only briefly.
        gw = Envoy({"ttl_seconds": 60, "store": redis_store(
                        "idem-flood:", cache_entries=MAX_ENTRIES, max_bytes=MAX_BYTES)},
                   upstream.port, concurrency=2, webdis_port=backend.webdis_port).start()
        prefix = "cflood-" + uuid.uuid4().hex[:8] + "-"
        for i in range(20):
            assert post(gw, f"{prefix}warm-{i}")[0] == 201
        baseline = rss(gw)
        peak = [baseline]
        answers = flood(gw, prefix, 3, lambda: peak.__setitem__(0, max(peak[0], rss(gw))), retried=True)
        peak[0] = max(peak[0], rss(gw))
        stats = gw.stats()
        growth = peak[0] - baseline
        print(f"\nreplay cache: {len(answers)} answers of 256 KiB, each retried once, in 3 s; Envoy RSS "
              f"{baseline / 2**20:.1f} MiB -> peak {peak[0] / 2**20:.1f} MiB (+{growth / 2**20:.1f}); "
              f"bytes_held {stats['bytes_held']}")
        assert len(answers) > 4 * SURVIVORS_AT_MOST
        assert growth < MAX_BYTES + MARGIN, (growth, stats)
        assert 0 < stats["bytes_held"] <= MAX_BYTES, stats
        # Redis has every record: every retry is replayed byte for byte,
        # the cache's survivors without asking Redis.
        hits = stats["cache_hits"]
        for key, pid, body in list(reversed(answers))[:RETRIED]:
            s, h, b = post(gw, key, body=b"{}", headers=HEADERS)
            assert (s, h.get("idempotent-replayed"), h.get("x-payment-id")) == (201, "true", pid), key
            assert b == body and upstream.executions(key) == 1, key
        hits = gw.stats()["cache_hits"] - hits
        print(f"retries: the newest {min(RETRIED, len(answers))} all replayed byte for byte, {hits} from the cache")
        assert 1 <= hits <= SURVIVORS_AT_MOST
        assert gw.stats()["bytes_held"] <= MAX_BYTES
    finally:
        if gw:
            gw.stop()
        backend.stop()
