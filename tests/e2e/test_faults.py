"""Faults of the upstream, the store and the gateway. Afterwards the record
is what the README says it is, nothing runs without protection when the
store refuses, and nothing runs more than the documented number of times."""

import re
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Envoy, RedisBackend, assert_outcome_unknown, post, problem, redis_store, settled, wait_for
from test_redis_fleet import Fleet, eval_calls


def k(tag):
    return f"{tag}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- upstream


# Where the upstream may have acted but never answered in full, streaming mode
# cannot know the outcome. unknown_outcome chooses: "record" (the default)
# records the outcome-unknown problem, "release-after-lock" keeps the claim
# until the lock timeout (409), after which a retry runs again.
UNKNOWN_OUTCOME = {"record": "default", "release-after-lock": "release_after_lock"}


def after_unknown_outcome(gw, upstream, key, choice, path="/payments"):
    """What a retry gets, per choice, once the original's fate is written."""
    if choice == "record":
        assert_outcome_unknown(settled(gw, key, path=path))
        assert upstream.executions(key) == 1, "never run again"
    else:
        resp = post(gw, key, path=path)
        assert resp[0] == 409, resp
        problem(resp)
        assert upstream.executions(key) == 1
        # After the lock timeout (4 s) the next retry runs again.
        wait_for(lambda: post(gw, key, path=path)[0] != 409, timeout=15, what="the claim to lapse")
        assert upstream.executions(key) == 2


@pytest.mark.parametrize("choice", sorted(UNKNOWN_OUTCOME))
def test_an_upstream_reset_after_acting(gateways, upstream, choice):
    gw = gateways(UNKNOWN_OUTCOME[choice])
    key = k("reset")
    s, _, _ = post(gw, key, headers={"x-demo-reset": "1"})
    # Envoy's own 503, or the filter's 502 in forwarding mode: no answer either way.
    assert s in (502, 503)
    assert upstream.executions(key) == 1
    if gateways.forwarding:
        # Documented: forwarding mode's call fails alike for an upstream that
        # reset after acting and one that never got the request (the host
        # does not say which), so the key is released and the retry runs.
        assert post(gw, key)[0] == 201
        assert upstream.executions(key) == 2
        assert post(gw, key)[1].get("idempotent-replayed") == "true"
        return
    after_unknown_outcome(gw, upstream, key, choice)


@pytest.mark.parametrize("choice", sorted(UNKNOWN_OUTCOME))
def test_an_upstream_slower_than_the_route_timeout(gateways, upstream, choice):
    if gateways.forwarding:
        pytest.skip("forwarding mode times out by forward.timeout_ms, not Envoy's route timeout")
    gw = gateways(UNKNOWN_OUTCOME[choice])
    key = k("timeout")
    # /slow is routed with a 1 s timeout (envoy/envoy.template.yaml).
    s, _, _ = post(gw, key, path="/slow", headers={"x-demo-delay-ms": "1500"})
    assert s == 504
    wait_for(lambda: upstream.executions(key) == 1, what="the slow original to finish upstream")
    after_unknown_outcome(gw, upstream, key, choice, path="/slow")


def test_router_retries_run_after_the_filter_and_are_not_protected(gateways, upstream):
    """Documented, not defended: Envoy's router retries after the filter has
    let the request through, and the filter sees only the last answer. On a
    route that retries 5xx (the template's /retried), an upstream that acts
    and then answers 503 runs twice for one client request, which is why
    protected routes must not retry anything but connection failures."""
    if gateways.forwarding:
        pytest.skip("forwarding mode calls the upstream's cluster itself, past any route")
    gw = gateways("default")
    key = k("router-retry")
    s, _, _ = post(gw, key, path="/retried", headers={"x-demo-status": "503"})
    assert s == 503
    assert upstream.executions(key) == 2, "the router's retry ran the operation again"


@pytest.mark.parametrize("store", ["local", "redis"])
def test_forwarding_on_envoy_knows_a_failure_after_the_request_left(upstream, lone_backend, store):
    """Envoy's forwarding mode: Envoy answers the filter's call itself when
    the upstream fails, and names why. A reset after the request left, or an
    answer cut mid-body, may follow an operation that ran: the key records
    the outcome-unknown problem and never runs again. (A connection that
    never opened is released: test_semantics.py, forwarding mode tells
    Envoy's own replies from the upstream's.)"""
    config = {"forward": {"upstream": "upstream"}}
    if store == "redis":
        config["store"] = redis_store("fwd-fail-" + uuid.uuid4().hex[:8] + ":")
    gw = Envoy(config, upstream.port, concurrency=2, webdis_port=lone_backend.webdis_port).start()
    try:
        for fault in ("x-demo-reset", "x-demo-cut"):
            key = k("fwd-" + fault)
            first = post(gw, key, headers={fault: "1"})
            assert first[0] == 502 and problem(first)["type"].endswith("outcome-unknown"), first
            assert_outcome_unknown(post(gw, key))
            assert upstream.executions(key) == 1, fault
    finally:
        gw.stop()


def test_an_upstream_quieter_than_the_streams_idle_timeout(gateways, upstream):
    """The connection manager's own timeout (here a route's idle_timeout,
    Envoy's stream_idle_timeout) ends a stream whose request went upstream:
    the upstream may have acted, so the outcome is unknown, never a rerun."""
    if gateways.forwarding:
        pytest.skip("forwarding mode times out by forward.timeout_ms, not the route's idle timeout")
    gw = gateways("default")
    key = k("idle")
    # /idle: no route timeout, a 1 s idle timeout (envoy/envoy.template.yaml).
    s, _, _ = post(gw, key, path="/idle", headers={"x-demo-delay-ms": "1500"})
    assert s == 504
    wait_for(lambda: upstream.executions(key) == 1, what="the slow original to finish upstream")
    assert_outcome_unknown(settled(gw, key, path="/idle"))
    assert upstream.executions(key) == 1


@pytest.mark.parametrize("choice", sorted(UNKNOWN_OUTCOME))
def test_a_response_cut_mid_body(gateways, upstream, choice):
    gw = gateways(UNKNOWN_OUTCOME[choice])
    key = k("cut")
    try:
        post(gw, key, headers={"x-demo-cut": "1"})
    except Exception:
        pass  # the client sees a broken response
    assert upstream.executions(key) == 1
    if gateways.forwarding:
        # Forwarding mode never got a whole answer: released, the retry runs.
        assert post(gw, key)[0] == 201 and upstream.executions(key) == 2
        return
    after_unknown_outcome(gw, upstream, key, choice)


def test_a_response_slower_than_the_lock_timeout(gateways, upstream):
    """Claims live as long as their request: on Envoy the worker's tick
    renews them, so a slow upstream keeps its claim past the lock timeout,
    retries meanwhile get 409, and its late answer is recorded. APISIX has no
    tick: there the lock must outlast three forward.timeout_ms (the configuration
    checks it), and a call that times out has an unknown outcome."""
    lock = gateways("lock")  # lock_timeout_seconds 4 (APISIX: forward.timeout_ms 583, store 250)
    key = k("slow")
    before = lock.stats()["claims_renewed"] if lock.has_metrics else None
    with ThreadPoolExecutor(1) as pool:
        # The original runs upstream until the test lets it finish.
        original = pool.submit(post, lock, key, b"{}", {"x-demo-hold": key})
        try:
            wait_for(lambda: upstream.started(key) == 1, what="the original to start")
            started = time.time()
            time.sleep(max(0.0, started + 4.5 - time.time()))
            retry = post(lock, key, body=b"{}")
        finally:
            upstream.release(key)
        first = original.result()
    wait_for(lambda: upstream.executions(key) >= 1, what="the original to finish upstream")
    assert upstream.executions(key) == 1, (first[0], retry[0], "ran twice")
    if gateways.forwarding:
        # The forwarded call timed out (0.6 s): sent, outcome unknown. The
        # client and every retry get the outcome-unknown problem.
        assert first[0] == 502 and problem(first)["type"].endswith("outcome-unknown")
        assert_outcome_unknown(retry)
        assert_outcome_unknown(post(lock, key, body=b"{}"))
    else:
        assert retry[0] == 409, "renewed: the claim outlived its lock timeout"
        assert first[0] == 201
        s, h, b = settled(lock, key, body=b"{}")
        assert (s, h.get("idempotent-replayed"), b) == (201, "true", first[2]), "the late answer was recorded"
        if lock.has_metrics:
            assert lock.stats()["claims_renewed"] - before >= 1
    assert upstream.executions(key) == 1, "never twice"


# ---------------------------------------------------------------- store


@pytest.fixture
def lone_backend(tmp_path):
    backend = RedisBackend(workdir=str(tmp_path)).start()
    yield backend
    backend.stop()


def test_redis_killed_then_restarted(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend, store_extra={"timeout_ms": 400})
    try:
        key = k("redis-down")
        lone_backend.stop_redis()
        resp = post(fleet.a, key)
        assert resp[0] == 503 and problem(resp)["type"].endswith("store-unavailable")
        assert upstream.executions(key) == 0, "never executed without protection"
        # Under load too: 20 concurrent requests on both gateways, all refused.
        burst = [k("redis-down-burst") for _ in range(20)]
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda i: post(fleet.a if i % 2 else fleet.b, burst[i])[0], range(20)))
        assert answers == [503] * 20
        assert sum(upstream.executions(x) for x in burst) == 0
        lone_backend.start_redis()
        # Webdis re-opens its pooled Redis connections one failure at a time:
        # a few 503s (fail closed) until every connection is back.
        def healthy():
            probe = k("probe")
            return post(fleet.a, probe)[0] == 201 and post(fleet.b, probe)[0] == 201
        wait_for(healthy, timeout=30, what="Redis back in use on both gateways")
        # A pooled connection not yet reopened can still cost a 503, which
        # means nothing ran: those are retried, as a client would.
        def until_not_503(gw, key):
            for _ in range(50):
                resp = post(gw, key)
                if resp[0] != 503:
                    return resp
                time.sleep(0.1)
            return resp
        again = k("after")
        assert until_not_503(fleet.a, again)[0] == 201
        assert until_not_503(fleet.b, again)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(again) == 1
    finally:
        fleet.stop()


def test_redis_killed_while_requests_run_upstream(upstream, lone_backend):
    """Redis dies (SIGKILL, no persistence) while claimed requests are
    upstream. Their answers still reach the clients, unrecorded; nothing runs
    while Redis is gone; once it is back (empty), retries of those keys run
    again: the documented cost of losing Redis's data."""
    fleet = Fleet(upstream, lone_backend, store_extra={"timeout_ms": 400})
    try:
        keys = [k("inflight") for _ in range(10)]
        gate = k("gate")
        before = fleet.a.stats()["store_errors"]
        with ThreadPoolExecutor(10) as pool:
            running = [pool.submit(post, fleet.a, key, b"{}", {"x-demo-hold": gate}) for key in keys]
            try:
                wait_for(lambda: all(upstream.started(x) == 1 for x in keys), what="all ten upstream")
                lone_backend.stop_redis(sig=signal.SIGKILL)
            finally:
                upstream.release(gate)
            answers = [f.result()[0] for f in running]
        assert answers == [201] * 10, "the upstream acted: its answers go out, unrecorded"
        assert fleet.a.stats()["store_errors"] - before >= 10
        assert [upstream.executions(x) for x in keys] == [1] * 10
        # While Redis is gone: fail closed.
        assert post(fleet.b, keys[0])[0] == 503
        assert post(fleet.a, k("during"))[0] == 503
        assert upstream.executions(keys[0]) == 1
        lone_backend.start_redis()
        wait_for(lambda: post(fleet.a, k("probe"))[0] == 201, timeout=30, what="Redis back in use")
        for key in keys:
            resp = post(fleet.b, key)
            for _ in range(50):  # a pooled Webdis connection may still be reopening
                if resp[0] != 503:
                    break
                time.sleep(0.1)
                resp = post(fleet.b, key)
            assert resp[0] == 201 and resp[1].get("idempotent-replayed") is None
        assert [upstream.executions(x) for x in keys] == [2] * 10
        assert post(fleet.a, keys[0])[1].get("idempotent-replayed") == "true", "recorded this time"
    finally:
        fleet.stop()


@pytest.mark.parametrize("a_kind", ["envoy", "apisix"])
def test_redis_slower_than_the_store_timeout(upstream, lone_backend, a_kind):
    fleet = Fleet(upstream, lone_backend, (a_kind, "envoy"), store_extra={"timeout_ms": 300})
    try:
        key = k("redis-slow")
        # Redis 7 refuses DEBUG SLEEP by default: a script that busy-waits
        # 3 s blocks it just the same.
        spin = ("local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] "
                "repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - t0 > 3000000 return 1")
        evals = eval_calls(lone_backend)
        blocker = threading.Thread(target=lambda: lone_backend.command("EVAL", spin, "0"))
        blocker.start()
        wait_for(lambda: redis_busy(lone_backend.redis_port), what="the script to block Redis")
        resp = post(fleet.a, key)
        assert resp[0] == 503 and problem(resp)["type"].endswith("store-unavailable")
        blocker.join()
        assert upstream.executions(key) == 0
        # Both the claim and its cancel were queued behind the script. Redis
        # runs them once it is free, in whichever order Webdis's connections
        # deliver them, and either order leaves the key free.
        wait_for(lambda: eval_calls(lone_backend) >= evals + 3,
                 what="the script, the late claim and its cancel to run")
        assert fleet_keys(lone_backend, fleet) == {}, "the key is free"
        if fleet.a.has_metrics:
            assert fleet.a.stats()["claims_cancelled"] == 1
        assert post(fleet.a, key)[0] == 201, "the retry runs: the claim did not hold the key"
        assert post(fleet.b, key)[1].get("idempotent-replayed") == "true"
        assert upstream.executions(key) == 1
    finally:
        fleet.stop()


def redis_busy(port):
    """Redis answers PING at once unless a script holds it."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        s.settimeout(0.2)
        try:
            return not s.recv(64)
        except socket.timeout:
            return True


def fleet_keys(backend, fleet):
    """The fleet's Redis keys and their values."""
    names = backend.command("KEYS", fleet.prefix + "*")["KEYS"]
    return {n: backend.command("GET", n)["GET"] for n in names}


# A store call that carries one claim: the batch script's operations are
# named by letters after the keys (src/store/batch.rs), by source or by SHA.
CLAIM_CALL = re.compile(rb"^(GET|PUT) /EVAL(SHA)?/[^/ ]+/1/[^/ ]+/C/")


class HoldingProxy:
    """A TCP relay in front of Webdis that can hold the next claims until the
    test lets them through, so that their cancels reach Redis first. Once
    the gateway gives up and closes its side, a held claim still goes to
    Webdis, as a request stuck in a slow network would."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.armed = 0  # claims still to hold
        self.holding = 0  # claims held and not yet sent on
        self.held = threading.Event()
        self.go = threading.Event()
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.webdis_port = self.sock.getsockname()[1]
        self.conns = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_next_claim(self, count=1):
        """Holds the next `count` claims; `held` is set once all are held,
        `released` once all have gone on."""
        self.held.clear()
        self.go.clear()
        self.released.clear()
        self.armed = self.holding = count

    def let_claim_through(self):
        self.go.set()

    def _accept(self):
        while self.running:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._upstream, args=(client, server), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client), daemon=True).start()

    def _upstream(self, client, server):
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return  # the gateway left; the server side stays for the answer
                with self.lock:
                    hold = self.armed > 0 and CLAIM_CALL.search(data) is not None
                    if hold:
                        self.armed -= 1
                        if self.armed == 0:
                            self.held.set()
                if hold:
                    self.go.wait(timeout=30)
                server.sendall(data)
                if hold:
                    with self.lock:
                        self.holding -= 1
                        if self.holding == 0:
                            self.released.set()
        except OSError:
            pass

    def _downstream(self, server, client):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (server, client):
            s.close()

    def stop(self):
        self.running = False
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass


class SlowProxy(HoldingProxy):
    """The relay, holding every call to Webdis for `delay` seconds: a store
    whose answers come late but within the gateway's timeout."""

    def __init__(self, target_port, delay):
        super().__init__(target_port)
        self.delay = delay

    def _upstream(self, client, server):
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                time.sleep(self.delay)
                server.sendall(data)
        except OSError:
            pass


def test_renewals_through_a_slow_store_keep_a_short_lock(upstream, lone_backend):
    """Every Redis call takes 350 ms (of the 500 allowed) and the lock is
    5 s, just above the shortest Envoy accepts for such calls (1 s + 6 x
    500 ms + 0.5 s): the renewals, which wait for the batch in flight and
    then for their own, still land before the lock runs out. The original
    runs upstream for two locks; every retry meanwhile gets 409, and it runs
    once."""
    proxy = SlowProxy(lone_backend.webdis_port, 0.35)
    fleet = Fleet(upstream, proxy, lock_timeout_seconds=5, store_extra={"timeout_ms": 500})
    try:
        key = k("slow-store")
        with ThreadPoolExecutor(1) as pool:
            original = pool.submit(post, fleet.a, key, b"{}", {"x-demo-hold": key})
            try:
                wait_for(lambda: upstream.started(key) == 1, timeout=10, what="the original to start")
                until = time.time() + 10.5
                retries = []
                while time.time() < until:
                    retries.append(post(fleet.b, key, body=b"{}")[0])
                    time.sleep(0.5)
            finally:
                upstream.release(key)
            first = original.result()
        assert first[0] == 201
        assert set(retries) == {409}, retries
        assert upstream.executions(key) == 1
        assert fleet.a.stats()["claims_renewed"] >= 2
        s, h, _ = post(fleet.b, key, body=b"{}")
        assert (s, h.get("idempotent-replayed")) == (201, "true")
    finally:
        fleet.stop()
        proxy.stop()


# Envoy answers the 503 at once and lets the cancel run on its own; APISIX's
# rules chain it within the request, so the 503 waits for the cancel.
HOST_RULES = {
    "envoy": ({}, ("envoy", "envoy")),
    "apisix-profile": ({"host": "apisix-profile", "forward": {"upstream": "upstream"}}, ("envoy", "envoy")),
    "apisix": ({}, ("apisix", "envoy")),
}


@pytest.mark.parametrize("rules", sorted(HOST_RULES))
def test_a_cancel_that_overtakes_its_claim_still_frees_the_key(upstream, lone_backend, rules):
    proxy = HoldingProxy(lone_backend.webdis_port)
    config, kinds = HOST_RULES[rules]
    fleet = Fleet(upstream, proxy, kinds, store_extra={"timeout_ms": 300}, **config)
    try:
        # 1. The claim arrives a second after its cancel: the cancel leaves a
        #    tombstone, and the late claim removes it instead of claiming.
        key = k("overtaken")
        proxy.hold_next_claim()
        assert post(fleet.a, key)[0] == 503
        assert proxy.held.is_set()
        # Envoy answers at once and sends the cancel on its own: it lands
        # while the claim is still held.
        def tombstoned():
            values = fleet_keys(lone_backend, fleet).values()
            return [v[:2] for v in values if not v.startswith("C|")] == ["X|"]
        wait_for(tombstoned, what="the cancel's tombstone")
        proxy.let_claim_through()
        wait_for(lambda: proxy.released.is_set(), what="the held claim to reach Webdis")
        wait_for(lambda: fleet_keys(lone_backend, fleet) == {},
                 what="the late claim to remove its tombstone")
        assert post(fleet.a, key)[0] == 201
        assert upstream.executions(key) == 1
        # 2. A retry while the tombstone waits takes the key at once; the late
        #    claim then finds the retry's claim or record and sets nothing.
        key = k("retried-early")
        proxy.hold_next_claim()
        assert post(fleet.a, key)[0] == 503
        wait_for(tombstoned, what="the cancel's tombstone")
        assert post(fleet.b, key)[0] == 201, "a tombstone never blocks a retry"
        evals = eval_calls(lone_backend)
        proxy.let_claim_through()
        # Redis runs the late claim; it must not disturb the record.
        wait_for(lambda: eval_calls(lone_backend) > evals, what="the late claim to run")
        resp = post(fleet.a, key)
        assert resp[0] == 201 and resp[1].get("idempotent-replayed") == "true"
        assert upstream.executions(key) == 1
        # 3. Two requests with one key, one on each gateway, both claims
        #    overtaken by their cancels: each cancel leaves its own token
        #    among the key's tombstones, each late claim takes its own out,
        #    and the key is free. (One tombstone a key held only the first:
        #    the second late claim took the key for the lock time, 409.)
        key = k("both-overtaken")
        proxy.hold_next_claim(2)
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(post, gw, key) for gw in (fleet.a, fleet.b)]
            assert [a.result()[0] for a in answers] == [503, 503]

        def unsettled():
            return [v for v in fleet_keys(lone_backend, fleet).values() if v.startswith(("X|", "I|"))]
        wait_for(lambda: [v.count("|") for v in unsettled()] == [2], what="both cancels' tombstones")
        proxy.let_claim_through()
        wait_for(lambda: proxy.released.is_set(), what="the held claims to reach Webdis")
        wait_for(lambda: unsettled() == [], what="the late claims to remove their tombstones")
        assert post(fleet.b, key)[0] == 201
        assert upstream.executions(key) == 1
        if fleet.a.has_metrics:
            assert fleet.a.stats()["claims_cancelled"] == 3
    finally:
        proxy.let_claim_through()
        fleet.stop()
        proxy.stop()


def test_redis_flushed_forgets_records(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend)
    try:
        key = k("flushed")
        assert post(fleet.a, key)[0] == 201
        lone_backend.command("FLUSHALL")
        # Documented: the record is gone, so the retry runs again.
        assert post(fleet.b, key)[1].get("idempotent-replayed") is None
        assert upstream.executions(key) == 2
    finally:
        fleet.stop()


# ---------------------------------------------------------------- gateway


def test_gateway_killed_under_load_then_every_key_runs_at_most_once_more(upstream, lone_backend):
    fleet = Fleet(upstream, lone_backend, lock_timeout_seconds=4)
    try:
        keys = [k("load") for _ in range(30)]

        def send(key):
            try:
                return post(fleet.a, key, headers={"x-demo-delay-ms": "600"})[0]
            except Exception:
                return None

        with ThreadPoolExecutor(30) as pool:
            futures = [pool.submit(send, key) for key in keys]
            wait_for(lambda: sum(upstream.started(x) for x in keys) >= 10, what="load to reach the upstream")
            killed_at = time.time()
            fleet.a.stop(sig=9)
            answered = [f.result() for f in futures]
        fleet.a = fleet.new_gateway()
        time.sleep(max(0.0, killed_at + 4.3 - time.time()))
        for key in keys:
            # A claim still queued in Webdis at the kill may land after it and
            # hold its key for 4 s from then: a 409 changes nothing, retry it.
            deadline = time.time() + 15
            while True:
                s, h, _ = post(fleet.a, key)
                if s != 409 or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert s == 201, (key, s)
        for key, first in zip(keys, answered):
            runs = upstream.executions(key)
            assert 1 <= runs <= 2, (key, runs)
            if first == 201:
                assert runs == 1, "answered before the kill: recorded, so replayed"
    finally:
        fleet.stop()
