"""The README's metrics table against a running Envoy: every metric under
its /stats name and its /stats/prometheus name, with its type, and no metric
left out of the table. Envoy runs envoy/per-route.template.yaml, whose two
filter instances (different names) count into the same metrics."""

import os
import re
import uuid

import pytest

from conftest import REPO, Envoy, post


def table():
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| (counter|gauge) \|", section, re.M)
    assert len(rows) >= 10, "the metrics table has rows of name | Prometheus name | type"
    return {name: (prom, kind) for name, prom, kind in rows}


@pytest.fixture(scope="module")
def envoy(upstream):
    gw = Envoy({}, upstream.port, template=os.path.join(REPO, "envoy", "per-route.template.yaml")).start()
    # One keyed request through each instance: /payments has its own.
    for path in ("/payments", "/orders"):
        assert post(gw, "metrics-" + uuid.uuid4().hex, path=path)[0] == 201
    yield gw
    gw.stop()


def test_every_metric_has_its_stats_name(envoy):
    stats = envoy.stats()
    assert set(stats) == set(table()), "the table and /stats list the same metrics"
    assert stats["requests_protected"] == 2, "both instances count into one metric"


def test_every_metric_has_its_prometheus_name_and_type(envoy):
    text = envoy.admin("/stats/prometheus")
    types = dict(re.findall(r"^# TYPE (idempotency_\w+) (\w+)$", text, re.M))
    expected = {prom: kind for prom, kind in table().values()}
    assert types == expected
    assert re.search(r"^idempotency_requests_protected\{\} 2$", text, re.M)
    # Envoy's own statistics of the plugin carry the filter's name.
    assert re.search(r"^# TYPE envoy_wasm_idempotency_vm_reload counter$", text, re.M)
