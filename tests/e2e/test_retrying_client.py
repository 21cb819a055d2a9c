"""At-least-once delivery, exactly-once effect: the retrying client pays N
times through a path that loses 30% of the gateway's responses, and the
upstream executes each payment exactly once (for every store)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "demo"))
from fault_proxy import FaultProxy  # noqa: E402

CLIENT = os.path.join(REPO, "target", "release", "examples", "payments_client")


@pytest.fixture(scope="session")
def client_binary():
    subprocess.run(["cargo", "build", "--release", "-q", "--example", "payments_client"],
                   cwd=REPO, check=True, timeout=900)
    return CLIENT


def test_lost_responses_and_retries_still_execute_each_payment_once(gw, upstream, client_binary):
    proxy = FaultProxy(f"127.0.0.1:{gw.port}", drop=0.3, seed=11).start()
    try:
        n = 25
        out = subprocess.run(
            [client_binary, "--gateway", f"127.0.0.1:{proxy.port}", "--upstream", f"127.0.0.1:{upstream.port}",
             "-n", str(n), "--seed", str(gw.port), "--base-ms", "10", "--cap-ms", "200", "--timeout-ms", "20000"],
            capture_output=True, text=True, timeout=300)
        report = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
        report = {k.strip(): v.strip() for k, v in report.items()}
        assert out.returncode == 0, out.stdout + out.stderr
        assert report["upstream executions"] == str(n)
        assert report["exactly once"] == "yes"
        assert proxy.dropped > 0, "the path really lost responses"
        assert int(report["responses lost"]) == proxy.dropped
        assert int(report["retries"]) >= proxy.dropped
        assert int(report["replayed answers"]) > 0, "retries were answered from the record"
    finally:
        proxy.stop()
