"""`max_in_flight_bytes`: the bodies the running requests of one Wasm VM
hold are bounded, on every kind of gateway. Past the bound the filter gives
up only what it can do without: a response's copy for its record (the
record keeps no body, the retry gets `Idempotent-Replay-Body: omitted`, and
nothing runs twice), and in forwarding mode a new request (503
`in-flight-full` before its key is claimed: nothing ran, the retry runs).

One worker per gateway (one Envoy worker thread, one nginx worker): the
count is per VM. Before it, enough large responses at once could exhaust a
VM's memory and trap it, and its running claims would lapse."""

import http.client
import socket
import threading
import uuid

import pytest

from conftest import (ApisixRuntime, Envoy, apisix_conf, no_tick_timeouts, post, problem,
                      redis_store, renewable_timeouts, wait_for)

BUDGET = 65_536

STREAMING = ["local", "redis"]
FORWARDING = ["apisix-profile", "apisix"]


def one_worker_gateway(kind, upstream, request, store_port=None, **config):
    """A gateway of `kind` with one worker; `store_port`: where its Redis
    store's Webdis is, if not the session's."""
    config = {"max_request_body_bytes": 40_000, "max_response_body_bytes": BUDGET,
              "max_in_flight_bytes": BUDGET, **config}
    backend = None
    if kind == "local":
        # Room in each bucket's share for answers of up to 64 KiB.
        config["store"] = {"type": "local", "max_entries": 64, "max_bytes": 64 * 1024 * 1024}
    else:
        backend = request.getfixturevalue("redis_backend")
        config["store"] = redis_store(f"idem-inflight-{kind}-{uuid.uuid4().hex[:8]}:")
    if kind == "redis":
        renewable_timeouts(config)
    if kind == "apisix-profile":
        config.update(host="apisix-profile", forward={"upstream": "upstream"})
        no_tick_timeouts(config)
    webdis_port = store_port or (backend.webdis_port if backend else None)
    if kind == "apisix":
        conf = apisix_conf(config, upstream, backend)
        conf["store"]["cluster"] = f"127.0.0.1:{webdis_port}"
        return ApisixRuntime(conf, upstream.port, workers=1).start()
    return Envoy(config, upstream.port, concurrency=1, webdis_port=webdis_port).start()


def sized(n, **extra):
    return {"x-demo-response-bytes": str(n), **extra}


@pytest.mark.parametrize("kind", STREAMING)
def test_a_response_that_does_not_fit_beside_the_running_ones_is_recorded_without_its_body(
        kind, upstream, request):
    gw = one_worker_gateway(kind, upstream, request)
    try:
        run = uuid.uuid4().hex[:8]
        a, b, c = (f"inflight-{x}-{run}" for x in "abc")
        before = gw.stats().get("in_flight_full", 0)
        # A streams half of its 40,000 bytes, then stalls: 20,000 held.
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        conn.request("POST", "/payments", body=b"{}", headers={
            "idempotency-key": a, "content-type": "application/json", **sized(40_000, **{"x-demo-stall": a})})
        resp_a = conn.getresponse()
        first = resp_a.read(20_000)
        assert (resp_a.status, len(first)) == (201, 20_000)
        # B's 50,000 bytes do not fit beside them: the client gets them all,
        # the record keeps none.
        s, h, body = post(gw, b, headers=sized(50_000))
        assert (s, len(body)) == (201, 50_000)
        s, h, body = post(gw, b, headers=sized(50_000))
        assert (s, h.get("idempotent-replayed"), h.get("idempotent-replay-body"), body) == (
            201, "true", "omitted", b"")
        # A finishes within the budget (40,000 of 65,536): recorded whole.
        upstream.release(a)
        rest = resp_a.read()
        conn.close()
        assert len(first) + len(rest) == 40_000
        s, h, body = post(gw, a, body=b"{}", headers=sized(40_000))
        assert (s, h.get("idempotent-replayed"), len(body)) == (201, "true", 40_000)
        assert "idempotent-replay-body" not in h
        # Its bytes came back when it ended: 60,000 fit again.
        s, _, body = post(gw, c, headers=sized(60_000))
        assert (s, len(body)) == (201, 60_000)
        s, h, body = post(gw, c, headers=sized(60_000))
        assert (h.get("idempotent-replayed"), len(body)) == ("true", 60_000)
        assert [upstream.executions(k) for k in (a, b, c)] == [1, 1, 1]
        assert gw.stats()["in_flight_full"] - before == 1
    finally:
        gw.stop()


class StoreGate:
    """A relay to Webdis that can hold the next store request until told to
    let it go (and says when it holds one); every other passes at once."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.holding = threading.Event()
        self.opened = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_next(self):
        self.armed = True

    def release(self):
        self.opened.set()

    def stop(self):
        self.opened.set()
        self.listener.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, requests):
        try:
            while data := src.recv(65536):
                if requests:
                    with self.lock:
                        held, self.armed = self.armed, False
                    if held:
                        self.holding.set()
                        self.opened.wait(timeout=30)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.parametrize("kind", FORWARDING)
def test_forwarding_refuses_a_request_past_the_budget_before_claiming_it(kind, upstream, redis_backend, request):
    """A's 40,000-byte body is held while its claim waits at the store (the
    gate holds it). B's 30,000 bytes do not fit beside it: 503 before any
    claim. C's small body fits, but its 30,000-byte answer takes the count
    past the budget: relayed whole, recorded without its body."""
    gate = StoreGate(redis_backend.webdis_port)
    gw = one_worker_gateway(kind, upstream, request, lock_timeout_seconds=60, store_port=gate.port)
    try:
        run = uuid.uuid4().hex[:8]
        a, b, c = (f"inflight-{x}-{run}" for x in "abc")
        before = gw.stats().get("in_flight_full", 0) if gw.has_metrics else None
        answer_a = {}
        gate.hold_next()
        worker = threading.Thread(target=lambda: answer_a.update(
            status=post(gw, a, body=b"a" * 40_000)[0]))
        worker.start()
        try:
            assert gate.holding.wait(timeout=10), "A's claim reached the store"
            resp = post(gw, b, body=b"b" * 30_000)
            assert resp[0] == 503
            assert problem(resp)["type"].endswith("in-flight-full")
            assert resp[1].get("retry-after") == "1"
            assert not upstream.started(b)
            s, _, body = post(gw, c, headers=sized(30_000))
            assert (s, len(body)) == (201, 30_000)
        finally:
            gate.release()
            worker.join(timeout=30)
        assert answer_a.get("status") == 201
        s, h, body = post(gw, c, headers=sized(30_000))
        assert (s, h.get("idempotent-replay-body"), body) == (201, "omitted", b"")
        # B was never claimed: its retry runs, now that the bytes are back.
        s, _, _ = post(gw, b, body=b"b" * 30_000)
        assert s == 201
        assert [upstream.executions(k) for k in (a, b, c)] == [1, 1, 1]
        if gw.has_metrics:
            assert gw.stats()["in_flight_full"] - before == 2
    finally:
        gw.stop()
        gate.stop()


def recorded_whole(gw, key):
    """A fresh key answered with exactly the budget: its record keeps the
    body only if no other request holds a byte of the VM's count."""
    s, _, body = post(gw, key, headers=sized(BUDGET))
    assert (s, len(body)) == (201, BUDGET)
    s, h, body = post(gw, key, headers=sized(BUDGET))
    assert h.get("idempotent-replayed") == "true"
    return len(body) == BUDGET and "idempotent-replay-body" not in h


@pytest.mark.parametrize("kind", STREAMING + FORWARDING)
def test_every_outcome_gives_its_bytes_back(kind, upstream, request):
    """Requests ending every way the filter knows (recorded, replayed, 409,
    422, 413, released on a 5xx, an upstream reset or cut mid-answer, a client
    gone mid-response) leave nothing counted: afterwards an answer of exactly
    the budget is recorded whole. A path that kept its bytes would have every
    later answer recorded without its body, and on forwarding every request
    refused."""
    gw = one_worker_gateway(kind, upstream, request)
    try:
        run = uuid.uuid4().hex[:8]
        k = lambda name: f"inflight-{name}-{run}"  # noqa: E731
        assert post(gw, k("small"))[0] == 201
        assert post(gw, k("small"))[1].get("idempotent-replayed") == "true"
        assert post(gw, k("small"), body=b'{"amount": 7}')[0] == 422
        assert post(gw, k("large"), headers=sized(50_000))[0] == 201
        assert post(gw, k("too-large"), body=b"x" * 40_001)[0] == 413
        assert post(gw, k("5xx"), headers={"x-demo-status": "503"})[0] == 503
        for name in ("reset", "cut"):
            try:
                post(gw, k(name), headers={f"x-demo-{name}": "1"})
            except (http.client.HTTPException, OSError):
                pass  # streaming: the answer breaks off where the upstream's did
        # A retry while the original runs: 409.
        original = threading.Thread(target=lambda: post(gw, k("running"), headers={"x-demo-hold": k("running")}))
        original.start()
        try:
            wait_for(lambda: upstream.started(k("running")), what="the original running")
            assert post(gw, k("running"))[0] == 409
        finally:
            upstream.release(k("running"))
            original.join(timeout=30)
        # A client that leaves halfway through a 40,000-byte answer.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
            s.sendall(b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Idempotency-Key: " + k("gone").encode() + b"\r\nx-demo-response-bytes: 40000\r\n"
                      b"x-demo-stall: " + k("gone").encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
            wait_for(lambda: upstream.executions(k("gone")) == 1, what="the upstream answering")
            if kind in STREAMING:
                s.recv(1024)
        upstream.release(k("gone"))
        # Filters may outlive their exchange a moment (a write out): the
        # count is back to zero once some probe is recorded whole.
        probes = iter(range(100))
        wait_for(lambda: recorded_whole(gw, k(f"probe{next(probes)}")), timeout=20,
                 what="an answer of the whole budget recorded with its body")
    finally:
        gw.stop()
