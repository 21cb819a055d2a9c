#!/usr/bin/env python3
"""make demo-client: the payment service, Envoy with the filter, a fault proxy
that loses 30% of the responses, and the retrying client paying N times.
Prints the client's report: many attempts, exactly N executions."""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fault_proxy import FaultProxy  # noqa: E402
from gateway import REPO, Envoy  # noqa: E402
from payment_service import PaymentService  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--drop", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    upstream = PaymentService().start()
    envoy = Envoy({}, upstream.port).start()
    proxy = FaultProxy(f"127.0.0.1:{envoy.port}", args.drop, seed=args.seed).start()
    try:
        print(f"client -> fault proxy :{proxy.port} (drops {args.drop:.0%} of responses) "
              f"-> Envoy + filter :{envoy.port} -> payment service :{upstream.port}\n", flush=True)
        code = subprocess.call(
            ["cargo", "run", "--release", "-q", "--example", "payments_client", "--",
             "--gateway", f"127.0.0.1:{proxy.port}", "--upstream", f"127.0.0.1:{upstream.port}",
             "-n", str(args.n), "--seed", str(args.seed)], cwd=REPO)
        print(f"\nfault proxy: {proxy.dropped} responses dropped, {proxy.forwarded} delivered")
        return code
    finally:
        proxy.stop()
        envoy.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
