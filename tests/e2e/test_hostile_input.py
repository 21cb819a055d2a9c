"""Hostile and broken clients: each gets a clear problem+json or Envoy's own
error, the upstream never executes a request twice (or a broken one at
all), and Envoy keeps serving. Runs once per store."""

import socket
import subprocess
import time
import uuid

from conftest import assert_outcome_unknown, post, problem, raw_request, settled, wait_for


def still_serving(gw, upstream):
    key = "alive-" + uuid.uuid4().hex
    assert post(gw, key)[0] == 201
    assert upstream.executions(key) == 1


def test_an_over_long_key_is_400_and_a_huge_header_is_the_proxys_own_refusal(gw, gateways, upstream):
    before = upstream.executions()
    # Past max_key_length (255), within every proxy's header limit.
    resp = post(gw, "k" * 4_000)
    assert resp[0] == 400 and problem(resp)["type"].endswith("invalid-key")
    # Past the proxy's own header limit the proxy answers itself: Envoy 431
    # (60 KiB by default); nginx under APISIX 400 (4 x 8 KiB buffers, which
    # APISIX leaves at nginx's default).
    req = (b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
           b"Idempotency-Key: " + b"k" * 70_000 + b"\r\n\r\n{}")
    resp = raw_request(gw.port, req)
    assert resp is None or resp[0] == (400 if gateways.kind == "apisix" else 431)
    assert upstream.executions() == before
    still_serving(gw, upstream)


def test_many_key_headers_are_400(gw, upstream):
    before = upstream.executions()
    headers = b"".join(b"Idempotency-Key: k%d\r\n" % i for i in range(50))
    resp = raw_request(gw.port, b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
                       + headers + b"\r\n{}")
    assert resp[0] == 400
    assert upstream.executions() == before


def test_a_body_that_stops_short_of_its_length_never_executes(gw, upstream):
    key = "short-" + uuid.uuid4().hex
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall((f"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\n"
               f"Content-Length: 1000\r\n\r\n").encode() + b"x" * 400)
    time.sleep(0.3)
    s.close()  # the client gives up mid-body
    time.sleep(0.3)
    assert upstream.executions(key) == 0, "an incomplete request is never forwarded"
    # Nothing was claimed either: the full request runs normally.
    assert post(gw, key, body=b"x" * 1000)[0] == 201
    assert upstream.executions(key) == 1
    still_serving(gw, upstream)


def test_a_declared_length_smaller_than_the_body_executes_once_at_most(gw, upstream):
    key = "smaller-" + uuid.uuid4().hex
    body = b'{"amount": 1}'
    junk = b"GARBAGE THAT IS NOT A REQUEST\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall((f"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body + junk)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
    assert data.startswith(b"HTTP/1.1 201"), data[:80]
    assert upstream.executions(key) == 1
    still_serving(gw, upstream)


def test_clients_that_vanish_mid_body_leave_envoy_serving(gw, upstream):
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: v-" + uuid.uuid4().hex.encode()
                  + b"\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
        s.close()
    still_serving(gw, upstream)


def test_http2_clients_get_the_same_semantics(gw, upstream):
    key = "h2-" + uuid.uuid4().hex

    def curl(body):
        out = subprocess.run(
            ["curl", "-s", "-i", "--http2-prior-knowledge", "-X", "POST", f"http://127.0.0.1:{gw.h2c_port}/payments",
             "-H", f"Idempotency-Key: {key}", "-H", "content-type: application/json", "--data-binary", body],
            capture_output=True, text=True, timeout=30)
        head, _, payload = out.stdout.partition("\r\n\r\n")
        return head, payload

    head1, body1 = curl('{"amount": 5}')
    assert head1.startswith("HTTP/2 201"), head1
    head2, body2 = curl('{"amount": 5}')
    assert head2.startswith("HTTP/2 201") and "idempotent-replayed: true" in head2.lower()
    assert body2 == body1
    head3, _ = curl('{"amount": 6}')
    assert head3.startswith("HTTP/2 422")
    assert upstream.executions(key) == 1


def test_a_client_gone_mid_response(gw, gateways, upstream):
    key = "midresp-" + uuid.uuid4().hex
    # The upstream sends half the answer, then stalls until released, so the
    # response cannot end before the client leaves, whatever the socket
    # buffers hold. (Forwarding mode, the APISIX profile, waits for the whole
    # answer before replying: there it is released at once.)
    size = 2_000_000  # above max_response_body_bytes (1 MiB)
    if gateways.forwarding:
        upstream.release(key)
    s = socket.create_connection(("127.0.0.1", gw.port))
    try:
        s.sendall((f"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\n"
                   f"Content-Type: application/json\r\nX-Demo-Response-Bytes: {size}\r\n"
                   f"X-Demo-Stall: {key}\r\nContent-Length: 2\r\n\r\n{{}}").encode())
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 201")
        s.close()  # reads the start of the answer, then leaves
        wait_for(lambda: upstream.executions(key) == 1, what="the upstream to act")
        resp = post(gw, key, body=b"{}", headers={"x-demo-response-bytes": str(size)})
    finally:
        upstream.release(key)
    if gateways.forwarding:
        # Forwarding mode recorded the whole answer before replying: replayed
        # (without its body: larger than max_response_body_bytes).
        assert resp[0] == 201 and resp[1].get("idempotent-replay-body") == "omitted"
    else:
        # The upstream acted and the response never completed: the key
        # records outcome-unknown (unknown_outcome's default, "record").
        if resp[0] == 409:  # the gateway was still ending the original
            resp = settled(gw, key, body=b"{}", headers={"x-demo-response-bytes": str(size)})
        assert_outcome_unknown(resp)
    assert upstream.executions(key) == 1
    still_serving(gw, upstream)
