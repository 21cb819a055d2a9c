"""Bodies of every size up to the configured limits, in both directions, on
every kind of gateway. On APISIX's runtime, bodies of about 600 bytes and
more once trapped the VM (a self-built wasmtime whose memory.grow never
reached memory.size); these are its regression tests. The upstream echoes
the request body, so one exchange checks both directions byte for byte.

The local store shares store.max_bytes (256 MiB) equally among its buckets:
42 KB each with the default table, so it replays larger answers without
their body. These tests run it on a table with room for 1 MiB answers
(the `large_records` profile); the last one shows the default."""

import pytest

from conftest import post

LIMIT = 1_048_576  # max_request_body_bytes and max_response_body_bytes (defaults)

# 0 and 1; around the ~600 bytes where APISIX's runtime first trapped; nginx's
# 16 KiB in-memory body buffer (beyond it the body comes from a temp file);
# a 70 KB answer the host once refused; up to the limit exactly.
SIZES = [0, 1, 100, 599, 600, 601, 4096, 16_384, 16_385, 70_056, 500_000, LIMIT]


def binary(n):
    return bytes(i % 256 for i in range(n))


@pytest.mark.parametrize("size", SIZES)
def test_a_body_of_any_size_up_to_the_limits_is_forwarded_recorded_and_replayed(gateways, upstream, key, size):
    gw = gateways("large_records")
    body = binary(size)
    echo = {"x-demo-echo": "1", "content-type": "application/octet-stream"}
    s1, h1, b1 = post(gw, key, body=body, headers=echo)
    assert (s1, len(b1)) == (201, size)
    assert b1 == body, "the upstream got the request body, and the client its answer, unchanged"
    s2, h2, b2 = post(gw, key, body=body, headers=echo)
    assert (s2, h2.get("idempotent-replayed")) == (201, "true")
    assert b2 == body, "replayed byte for byte"
    assert upstream.executions(key) == 1


def test_bodies_past_the_limits_are_refused_or_replayed_without_body_and_the_filter_keeps_serving(
        gateways, upstream, key):
    gw = gateways("large_records")
    # A request body past the limit: 413, the upstream never sees it.
    s, _, _ = post(gw, key + "-req", body=binary(LIMIT + 1))
    assert s == 413 and upstream.executions(key + "-req") == 0
    # An answer past the limit: passed whole to the client, recorded without
    # its body, so the retry is told it was omitted (and does not run again).
    big = {"x-demo-response-bytes": str(LIMIT + 1), "x-demo-binary": "1"}
    s1, _, b1 = post(gw, key, headers=big)
    assert (s1, b1) == (201, binary(LIMIT + 1))
    s2, h2, b2 = post(gw, key, headers=big)
    assert (s2, h2.get("idempotent-replay-body"), b2) == (201, "omitted", b"")
    assert upstream.executions(key) == 1
    # And the next small request is served as usual.
    s3, _, _ = post(gw, key + "-after")
    assert s3 == 201 and upstream.executions(key + "-after") == 1


def test_with_the_default_byte_budget_a_large_answer_is_replayed_without_its_body_on_the_local_store(
        gw, gateways, upstream, key):
    """The default table: 6,250 buckets share store.max_bytes (256 MiB), 42 KB
    each. The local store keeps a 100 KB answer without its body: the client
    gets it whole, a retry gets status and headers, `Idempotent-Replay-Body:
    omitted`, and the operation never runs twice. Redis keeps it whole (the
    replay cache, 107 KB a bucket by default, skips it), so there the retry
    gets every byte."""
    size = 100_000
    big = {"x-demo-response-bytes": str(size), "x-demo-binary": "1"}
    before = gw.stats() if gw.has_metrics else None
    s1, h1, b1 = post(gw, key, headers=big)
    assert (s1, b1) == (201, binary(size))
    s2, h2, b2 = post(gw, key, headers=big)
    assert (s2, h2.get("idempotent-replayed"), h2.get("x-payment-id")) == (201, "true", h1["x-payment-id"])
    if gateways.kind == "local":
        assert (h2.get("idempotent-replay-body"), b2) == ("omitted", b"")
        assert gw.stats()["bodies_omitted"] - before["bodies_omitted"] == 1
    else:
        assert b2 == binary(size) and "idempotent-replay-body" not in h2
    assert upstream.executions(key) == 1
