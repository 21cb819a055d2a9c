#!/usr/bin/env python3
"""make soak: a long, steady mix of traffic over both stores, then checks
that every key executed exactly once and that memory stayed flat after the
local store filled. Not part of make test (10 minutes by default).

Each "payment" is one of:
  fresh      one request, new key
  retries    the same request sent 2-3 times in a row (lost answers)
  storm      the same request sent by 4 clients at once
  mismatch   a completed key reused with another amount (must be 422)
All on 127.0.0.1: the demo payment service, Redis + Webdis, and one Envoy
(2 workers) per store; the local store has max_entries 20 000 so that it
fills and evicts during the run.
"""

import argparse
import collections
import os
import random
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "demo"))
from gateway import Envoy  # noqa: E402
from payment_service import PaymentService  # noqa: E402
from redis_backend import RedisBackend  # noqa: E402


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak:
    def __init__(self, name, envoy, upstream):
        self.name = name
        self.envoy = envoy
        self.upstream = upstream
        self.lock = threading.Lock()
        self.statuses = collections.Counter()
        self.kinds = collections.Counter()
        self.keys = []
        self.errors = []

    def send(self, key, amount, delay_ms=0):
        headers = {"idempotency-key": key, "content-type": "application/json"}
        if delay_ms:
            headers["x-demo-delay-ms"] = str(delay_ms)
        try:
            s, h, _ = self.envoy.request("POST", "/payments", headers, f'{{"amount": {amount}}}'.encode(), timeout=30)
        except Exception as e:  # noqa: BLE001 - a soak counts every failure
            s, h = "error", {}
            with self.lock:
                self.errors.append(repr(e))
        label = f"{s} replay" if h.get("idempotent-replayed") == "true" else str(s)
        with self.lock:
            self.statuses[label] += 1
        return s

    def payment(self, rng):
        key = f"soak-{self.name}-{uuid.uuid4().hex}"
        kind = rng.choices(["fresh", "retries", "storm", "mismatch"], [60, 20, 10, 10])[0]
        with self.lock:
            self.keys.append(key)
            self.kinds[kind] += 1
        if kind == "fresh":
            self.send(key, 1)
        elif kind == "retries":
            for _ in range(rng.randint(2, 3)):
                self.send(key, 2)
        elif kind == "storm":
            threads = [threading.Thread(target=self.send, args=(key, 3, 50)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            self.send(key, 4)
            if self.send(key, 5) != 422:
                with self.lock:
                    self.errors.append(f"mismatch not refused for {key}")

    def report(self):
        ledger = self.upstream.ledger.snapshot()["by_key"]
        per_key = collections.Counter(ledger.get(k, 0) for k in self.keys)
        stats = self.envoy.stats()
        ok = set(per_key) == {1} and not self.errors
        return ok, per_key, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--rate", type=float, default=60.0, help="payments per second per store")
    ap.add_argument("--max-entries", type=int, default=20_000)
    args = ap.parse_args()

    upstream = PaymentService().start()
    backend = RedisBackend().start()
    gateways = {
        "local": Envoy({"store": {"type": "local", "max_entries": args.max_entries}}, upstream.port),
        "redis": Envoy({"store": {"type": "redis", "cluster": "webdis", "key_prefix": f"soak-{time.time_ns()}:"}},
                       upstream.port, webdis_port=backend.webdis_port),
    }
    try:
        for g in gateways.values():
            g.start()
        soaks = {name: Soak(name, g, upstream) for name, g in gateways.items()}
        memory = {name: [("start", rss_mib(g.proc.pid))] for name, g in gateways.items()}
        rng = random.Random(2026)
        pool = ThreadPoolExecutor(64)
        started = time.time()
        next_mark = started + args.seconds / 2
        period = 1.0 / args.rate
        n = 0
        print(f"soak: {args.seconds} s, {args.rate:.0f} payments/s per store, local max_entries {args.max_entries}",
              flush=True)
        while time.time() - started < args.seconds:
            for soak in soaks.values():
                pool.submit(soak.payment, random.Random(rng.random()))
            n += 1
            if time.time() >= next_mark:
                for name, g in gateways.items():
                    memory[name].append(("middle", rss_mib(g.proc.pid)))
                next_mark = float("inf")
            if n % int(args.rate * 30) == 0:
                print(f"  {time.time() - started:5.0f} s: {n} payments per store", flush=True)
            time.sleep(max(0.0, started + n * period - time.time()))
        pool.shutdown(wait=True)
        all_ok = True
        for name, soak in soaks.items():
            memory[name].append(("end", rss_mib(gateways[name].proc.pid)))
            ok, per_key, stats = soak.report()
            all_ok &= ok
            requests = sum(soak.statuses.values())
            stopped = stats.get("replays", 0) + stats.get("conflicts", 0)
            print(f"\n[{name} store]")
            print(f"  payments: {len(soak.keys)} ({dict(soak.kinds)}), requests: {requests}")
            print(f"  answers: {dict(sorted(soak.statuses.items()))}")
            print(f"  duplicates stopped: {stopped} (replays {stats.get('replays', 0)}, "
                  f"409 {stats.get('conflicts', 0)}), mismatches 422: {stats.get('mismatches', 0)}")
            print(f"  executions per key: {dict(sorted(per_key.items()))}  (every key exactly once: {ok})")
            print(f"  counters: stored {stats.get('stored', 0)}, evicted {stats.get('evicted', 0)}, "
                  f"store_errors {stats.get('store_errors', 0)}, entries {stats.get('entries', 0)}")
            print("  Envoy RSS: " + ", ".join(f"{label} {mib:.1f} MiB" for label, mib in memory[name]))
            if soak.errors:
                print(f"  errors ({len(soak.errors)}): {soak.errors[:3]}")
        print("\nsoak " + ("passed" if all_ok else "FAILED"))
        return 0 if all_ok else 1
    finally:
        for g in gateways.values():
            g.stop()
        backend.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
