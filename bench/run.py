#!/usr/bin/env python3
"""make bench: what the filter costs, measured against Envoy without it.

Everything on 127.0.0.1:
  * upstream: nginx (Debian), one worker, keep-alive, reads request bodies and
    answers a fixed 1 KiB body (an Envoy direct_response would be the
    bottleneck once requests carry bodies);
  * gateway: Envoy 1.40 with ONE worker thread, the same configuration with
    and without the filter (envoy/envoy.template.yaml, filter block removed);
  * load: wrk (Debian) with a Lua script (bench/wrk_keys.lua) that gives each
    request a fresh Idempotency-Key, a fixed one, or none.

Each scenario: warm-up, then several fixed-duration runs against the
baseline and the filter, interleaved; the median is reported, and the ratio
filter/baseline of requests per second. Writes BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "demo"))
from apisix_gateway import ApisixRuntime, runtime_built  # noqa: E402
from gateway import DEFAULT_WASM, Envoy, free_port  # noqa: E402
from redis_backend import RedisBackend  # noqa: E402

KIB = 1024
# Envoy (what is measured) gets its own core; the load generator, the
# upstream and the store share the other. On a 2-core machine this removes
# most of the run-to-run noise that comes from everything competing.
ENVOY_CPUS = "1"
LOAD_CPUS = "0"


class Nginx:
    def __init__(self, body_bytes=KIB):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="idem-bench-nginx-")
        conf = f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 16m;
    client_body_buffer_size 128k;
    client_body_temp_path {self.dir}/body_temp;
    proxy_temp_path {self.dir}/proxy_temp;
    fastcgi_temp_path {self.dir}/fastcgi_temp;
    uwsgi_temp_path {self.dir}/uwsgi_temp;
    scgi_temp_path {self.dir}/scgi_temp;
    default_type application/json;
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            # nginx reads (and discards) the request body, then answers
            # 1 KiB from its configuration.
            return 200 "{"x" * body_bytes}";
        }}
    }}
}}
"""
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["taskset", "-c", LOAD_CPUS, "nginx", "-c", self.conf, "-p", self.dir],
                                     stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def cpu_seconds(pids):
    """User + system CPU time of processes (all their threads) so far."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def gateway_pids(gateway):
    """The processes that serve: Envoy itself, or nginx's workers."""
    return gateway.worker_pids() if isinstance(gateway, ApisixRuntime) else [gateway.proc.pid]


def wrk(port, mode, body_bytes, duration, connections, key="bench-replay", pids=None, store_pids=None):
    env = dict(os.environ, IDEM_MODE=mode, IDEM_BODY=str(body_bytes), IDEM_KEY=key)
    pids = pids or []
    store_pids = store_pids or {}
    cpu0 = cpu_seconds(pids) if pids else 0.0
    store0 = {name: cpu_seconds([pid]) for name, pid in store_pids.items()}
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", os.path.join(HERE, "wrk_keys.lua"),
         f"http://127.0.0.1:{port}/payments"],
        capture_output=True, text=True, env=env, timeout=duration + 60)
    cpu = cpu_seconds(pids) - cpu0 if pids else 0.0
    store_cpu = {name: cpu_seconds([pid]) - store0[name] for name, pid in store_pids.items()}
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))

    def latency(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", text, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, "p50_ms": latency(50), "p99_ms": latency(99),
            # Envoy's own CPU per request: what the filter costs the gateway,
            # whatever else (the load generator, the store) limits throughput.
            "cpu_us": cpu * 1e6 / max(requests, 1), "busy": cpu / duration,
            # Redis's and Webdis's CPU per request (the store's side of the cost).
            "redis_cpu_us": store_cpu.get("redis", 0.0) * 1e6 / max(requests, 1),
            "webdis_cpu_us": store_cpu.get("webdis", 0.0) * 1e6 / max(requests, 1),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "raw": text}


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


SDK_REFERENCE_WASM = os.path.join(HERE, "sdk-reference-filter", "target", "wasm32-wasip1", "release",
                                  "sdk_reference_filter.wasm")
RAW_REFERENCE_WASM = os.path.join(HERE, "raw-reference-filter", "target", "wasm32-wasip1", "release",
                                  "raw_reference_filter.wasm")
# The filter built with --features self-profile (its own target directory, so
# the product build is untouched).
PROFILE_TARGET = os.path.join(REPO, "target", "self-profile")
PROFILE_WASM = os.path.join(PROFILE_TARGET, "wasm32-wasip1", "release", "idempotency_filter.wasm")

SCENARIOS = [
    # name, store, wrk mode, request body bytes, what it shows
    # References: what the host itself costs, under any filter.
    ("0 reference: a no-op Wasm filter, fresh keys", "sdk:noop", "fresh", KIB),
    ("0b reference: raw Wasm answering after the body (the floor of any replay)", "ref:reply-after-body", "fresh", KIB),
    ("0c reference: raw Wasm making one store call per request", "ref:store-call", "fresh", KIB),
    ("0d reference: raw Wasm forwarding after the whole body (the floor of any fresh key)",
     "ref:forward-after-body", "fresh", KIB),
    # The same floors on the SDK the product uses (proxy-wasm 0.2.5), doing
    # only the host work a fresh key or a replay cannot skip on the local
    # store, and a fresh key on the Redis store with the worker's group commit
    # (bench/sdk-reference-filter): what stands between them and the product
    # is the product's own work.
    ("0e reference: SDK filter doing only a fresh key's unavoidable host work (local store)",
     "sdk:sdk-fresh-floor", "fresh", KIB),
    ("0f reference: SDK filter doing only a replay's unavoidable host work (local store)",
     "sdk:sdk-replay-floor", "replay", KIB),
    ("0g reference: SDK filter doing only a fresh key's unavoidable host work (Redis store, group commit)",
     "sdk:sdk-redis-fresh-floor", "fresh", KIB),
    ("1 fresh key, local store, 1 KiB", "local", "fresh", KIB),
    ("2 replay, local store", "local", "replay", KIB),
    ("3 unprotected (GET)", "local", "get", 0),
    ("3b POST without a key (filter runs, passes it on)", "local", "nokey", KIB),
    ("4 fresh key, local store, 64 KiB", "local", "fresh", 64 * KIB),
    ("5 fresh key, Redis store, 1 KiB", "redis", "fresh", KIB),
    ("5c fresh key, Redis store, 1 connection (latency)", "redis", "fresh", KIB),
    ("6 replay, Redis store", "redis", "replay", KIB),
    ("6b replay, Redis store without the replay cache", "redis-nocache", "replay", KIB),
    # Forwarding mode on Envoy (the filter sends the request itself, records
    # the whole answer, then replies): the cost of never losing an outcome.
    ("7 fresh key, local store, forwarding mode", "local-forward", "fresh", KIB),
    ("8 fresh key, Redis store, forwarding mode", "redis-forward", "fresh", KIB),
    # APISIX's Wasm runtime (make apisix-runtime): nginx with one worker, the
    # filter driven as APISIX drives it, against the same nginx proxying
    # without it. Redis store, forwarding mode (APISIX's only mode).
    ("A0 reference: APISIX runtime, a no-op Wasm filter", "apisix-noop", "fresh", KIB),
    # The SDK filter doing only the host work of A1 and A2 (one call at a
    # time within the request: a claim, the forwarded request and a record;
    # or one read of a record), plain Webdis commands instead of the script.
    ("A0b reference: APISIX runtime, SDK filter doing only a replay's host work (one store call)",
     "apisix-sdk:sdk-apisix-replay-floor", "replay", KIB),
    ("A0c reference: APISIX runtime, SDK filter doing only a fresh key's host work (three calls)",
     "apisix-sdk:sdk-apisix-fresh-floor", "fresh", KIB),
    ("A1 fresh key, APISIX runtime (Redis, forwarding)", "apisix", "fresh", KIB),
    ("A2 replay, APISIX runtime (Redis, forwarding)", "apisix", "replay", KIB),
]


# The targets (ratios), each with the reference row whose ratio is
# the most any filter on this SDK could reach there: the SDK filter doing
# only that path's unavoidable host work. A replay on Redis makes no store
# call (the replay cache), so its floor is the local one. (scenario id,
# target, floor id)
TARGETS = [
    ("1", 0.70, "0e"),
    ("2", 1.5, "0f"),
    ("3", 0.97, None),
    ("5", 0.60, "0g"),
    ("6", 1.3, "0f"),
]


# Rows without a target that still run beside their floor, in the same rounds.
FLOORS_BESIDE = {"A1": "A0c", "A2": "A0b"}


def floor_of(sid):
    """The name and store of scenario `sid`'s floor (TARGETS, FLOORS_BESIDE),
    if it has one."""
    floor_id = next((f for s, _, f in TARGETS if s == sid), None) or FLOORS_BESIDE.get(sid)
    return next(((name, store) for name, store, _, _ in SCENARIOS if name.split()[0] == floor_id), (None, None))


def spread(runs):
    """The lowest and highest of a scenario's per-round ratios."""
    ratios = runs["round_ratios"]
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def target_rows(results):
    """Per target: the scenario's ratio, its floor's (run in the same rounds,
    against the same baseline runs), and what stops it. Gateway CPU added:
    each one's CPU per request minus the baseline's."""
    rows = []
    for sid, target, _ in TARGETS:
        name, r = next(((n, r) for n, r in results.items() if n.split()[0] == sid), (None, None))
        if r is None:
            continue
        floor_name = floor_of(sid)[0]
        floor = r.get("floor")
        own_us = floor and r["filter"]["cpu_us"] - floor["cpu_us"]
        if r["ratio"] >= target:
            verdict = "met"
        elif floor is None:
            verdict = f"not met, by {target - r['ratio']:.2f} (no filter runs: run-to-run noise)"
        elif floor["ratio"] < target:
            gap = floor["ratio"] - r["ratio"]
            own = (f"the filter is {gap:.2f} under the floor ({own_us:.0f} µs of its own work per request)"
                   if gap > 0 else "the filter is level with its floor in this run (within run-to-run noise)")
            verdict = f"out of reach on this SDK: its floor is {target - floor['ratio']:.2f} under the target; {own}"
        else:
            verdict = (f"not met: the floor allows it; the filter's own work takes {floor['ratio'] - r['ratio']:.2f}"
                       f" ({own_us:.0f} µs per request)")
        verdict += f" (rounds: {spread(r['filter'])}" + (f"; floor {spread(floor)})" if floor else ")")
        rows.append((name, r["ratio"], target, floor_name or "", floor["ratio"] if floor else None, verdict))
    return rows


# Scenarios run with another number of connections than --connections.
CONNECTIONS = {"5c": 1}


def apisix_baseline(nginx):
    """APISIX's runtime without a filter, one worker, pinned like Envoy."""
    return ApisixRuntime(upstream_port=nginx.port, workers=1, cpus=ENVOY_CPUS, with_filter=False,
                         routes=[]).start()


def apisix_gateway(store, nginx, backend):
    """APISIX's runtime with the filter (`apisix`) or a reference filter."""
    if store == "apisix-noop":
        return ApisixRuntime({"noop": True}, nginx.port, workers=1, cpus=ENVOY_CPUS,
                             wasm_path=SDK_REFERENCE_WASM).start()
    if store.startswith("apisix-sdk:"):
        conf = {"mode": store.split(":", 1)[1], "store": f"127.0.0.1:{backend.webdis_port}",
                "upstream": f"127.0.0.1:{nginx.port}"}
        return ApisixRuntime(conf, nginx.port, workers=1, cpus=ENVOY_CPUS, wasm_path=SDK_REFERENCE_WASM).start()
    conf = {"host": "apisix", "max_request_body_bytes": 1 << 20,
            "store": {"type": "redis", "cluster": f"127.0.0.1:{backend.webdis_port}",
                      "key_prefix": f"bench-{time.time_ns()}:"},
            "forward": {"upstream": f"127.0.0.1:{nginx.port}"}}
    return ApisixRuntime(conf, nginx.port, workers=1, cpus=ENVOY_CPUS).start()


def filter_config(store):
    """The plugin configuration and module of a scenario's filter."""
    if store.startswith("sdk:"):
        return store[4:], {"wasm_path": SDK_REFERENCE_WASM}
    if store.startswith("ref:"):
        return store[4:], {"wasm_path": RAW_REFERENCE_WASM}
    config = {"max_request_body_bytes": 1 << 20}
    if store.startswith("redis"):
        config["store"] = {"type": "redis", "cluster": "webdis", "key_prefix": f"bench-{time.time_ns()}:"}
        if store == "redis-nocache":
            config["store"]["cache_entries"] = 0
    if store.endswith("-forward"):
        config["forward"] = {"upstream": "upstream"}
    return config, {}


def run_scenario(name, store, mode, body, args, nginx, backend, floor_store=None):
    """Baseline and filter, interleaved. With `floor_store` (a target's
    floor), the floor runs in the same rounds too, against the same
    baseline runs: on a shared machine the speed drifts between scenarios,
    and a floor measured minutes apart can land on either side of its
    scenario."""
    gateways = {}
    if store.startswith("apisix"):
        gateways["baseline"] = apisix_baseline(nginx)
        if floor_store:
            gateways["floor"] = apisix_gateway(floor_store, nginx, backend)
        gateways["filter"] = apisix_gateway(store, nginx, backend)
    else:
        gateways["baseline"] = Envoy({}, nginx.port, concurrency=1, with_filter=False, cpus=ENVOY_CPUS)
        for label, which in (("floor", floor_store), ("filter", store)):
            if which:
                config, wasm = filter_config(which)
                gateways[label] = Envoy(config, nginx.port, concurrency=1, cpus=ENVOY_CPUS,
                                        webdis_port=backend.webdis_port if backend else None, **wasm)
    filtered = gateways["filter"]
    try:
        if not store.startswith("apisix"):
            for gateway in gateways.values():
                gateway.start()
        if mode == "replay":
            # One completed key that every request of the run replays.
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", filtered.port)
            conn.request("POST", "/payments", body=b"x" * body,
                         headers={"idempotency-key": "bench-replay", "content-type": "application/json"})
            assert conn.getresponse().read() is not None
        results = {label: [] for label in gateways}
        connections = CONNECTIONS.get(name.split()[0], args.connections)
        store_pids = {"redis": backend.redis.pid, "webdis": backend.webdis.pid} if backend else {}
        for target in gateways.values():
            wrk(target.port, mode, body, args.warmup, connections)
        for _ in range(args.runs):
            for label, target in gateways.items():
                results[label].append(wrk(target.port, mode, body, args.duration, connections,
                                          pids=gateway_pids(target), store_pids=store_pids))
        summary = {"connections": connections}
        for label, runs in results.items():
            summary[label] = {k: statistics.median(r[k] for r in runs)
                              for k in ("rps", "p50_ms", "p99_ms", "cpu_us", "busy", "redis_cpu_us", "webdis_cpu_us")}
            summary[label]["non2xx"] = sum(r["non2xx"] for r in runs)
        summary["ratio"] = summary["filter"]["rps"] / summary["baseline"]["rps"]
        # Each round's own ratio (the filter against the baseline run just
        # before it): their spread is how far one scenario's median can be
        # trusted on this machine.
        for label in ("filter", "floor"):
            if label in results:
                summary[label]["round_ratios"] = [f["rps"] / b["rps"]
                                                  for f, b in zip(results[label], results["baseline"])]
        if "floor" in summary:
            summary["floor"]["ratio"] = summary["floor"]["rps"] / summary["baseline"]["rps"]
        # APISIX has no metrics for Wasm filters; the references are not the filter.
        counted = filtered.has_metrics and not store.startswith(("ref:", "sdk:"))
        stats = filtered.stats() if counted else {}
        summary["filter_stats"] = {} if not counted else {
            k: stats.get(k, 0) for k in ("requests_protected", "stored", "replays", "cache_hits", "store_errors",
                                         "conflicts", "evicted", "store_calls", "store_operations")}
        return summary
    finally:
        for gateway in gateways.values():
            gateway.stop()


PROFILED = [
    ("fresh key, local store", "local", "fresh"),
    ("replay, local store", "local", "replay"),
    ("fresh key, Redis store", "redis", "fresh"),
]


def self_profile(store, mode, args, nginx, backend):
    """Where the filter's time goes: the self-profile build logs, every
    tick, the time spent in each callback and host call. Returns
    {name: (calls per request, microseconds per call)}."""
    config = {}
    if store == "redis":
        config["store"] = {"type": "redis", "cluster": "webdis", "key_prefix": f"prof-{time.time_ns()}:"}
    envoy = Envoy(config, nginx.port, concurrency=1, wasm_path=PROFILE_WASM, cpus=ENVOY_CPUS,
                  webdis_port=backend.webdis_port if backend else None).start()
    try:
        if mode == "replay":
            envoy.request("POST", "/payments", {"idempotency-key": "bench-replay", "content-type": "application/json"},
                          b"x" * KIB)
        wrk(envoy.port, mode, KIB, args.duration, args.connections)
        time.sleep(1.5)  # the next tick logs the totals
        # Each tick logs the one-second window since the previous one, per
        # VM (the main thread's VM serves no requests). The first window with
        # requests also holds the VM's start (creating the table), so it is
        # skipped; of the rest, the busiest is one in the middle of the load.
        best, best_requests, seen_first = {}, 0, False
        for line in envoy.log().splitlines():
            if "self-profile" not in line:
                continue
            window = {name: (int(calls), float(mean))
                      for name, calls, mean in re.findall(r" ([\w:]+)=(\d+) ([\d.]+)", line)}
            requests = window.get("context_create", (0, 0.0))[0]
            if requests and not seen_first:
                seen_first = True
                continue
            if requests > best_requests:
                best, best_requests = window, requests
        return {k: (c / best_requests, m) for k, (c, m) in best.items() if k != "tick"}
    finally:
        envoy.stop()


def memory_scenario(args, nginx):
    """Resident and allocated memory of the gateway as 100 000 distinct keys
    are stored (1 KiB responses), and once more past max_entries."""
    capacity = args.keys
    envoy = Envoy({"store": {"type": "local", "max_entries": capacity}}, nginx.port, concurrency=1,
                  cpus=ENVOY_CPUS).start()
    try:
        time.sleep(1)
        rss0, alloc0 = rss_kib(envoy.proc.pid), envoy.allocated_bytes()
        points = [("start (table created)", 0, rss0, alloc0)]
        target = capacity
        while envoy.stats().get("stored", 0) < target:
            wrk(envoy.port, "fresh", KIB, 5, args.connections)
        stored1 = envoy.stats()["stored"]
        rss1, alloc1 = rss_kib(envoy.proc.pid), envoy.allocated_bytes()
        points.append(("after filling max_entries", stored1, rss1, alloc1))
        while envoy.stats().get("stored", 0) < stored1 + capacity:
            wrk(envoy.port, "fresh", KIB, 5, args.connections)
        stored2 = envoy.stats()["stored"]
        rss2, alloc2 = rss_kib(envoy.proc.pid), envoy.allocated_bytes()
        points.append(("after as many again (evicting)", stored2, rss2, alloc2))
        per_record_rss = (rss1 - rss0) * 1024 / min(stored1, capacity)
        per_record_alloc = (alloc1 - alloc0) / min(stored1, capacity)
        return {"capacity": capacity, "points": points, "per_record_rss": per_record_rss,
                "per_record_alloc": per_record_alloc, "growth_after_full_kib": rss2 - rss1,
                "entries": envoy.stats().get("entries"), "evicted": envoy.stats().get("evicted")}
    finally:
        envoy.stop()


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    envoy_version = subprocess.run([os.environ.get("ENVOY_BIN", os.path.join(REPO, ".venv", "bin", "envoy")), "--version"],
                                   capture_output=True, text=True).stdout.strip().split("version:")[-1].strip()
    return f"{os.cpu_count()} cores, {cpu}; {platform.platform()}; Envoy {envoy_version}"


def write_svg(results, path):
    """A bar per scenario: requests per second with the filter over without
    it, the references (what any Wasm filter costs) in grey, 1.0 marked."""
    rows = list(results.items())
    bar_h, gap, width = 18, 6, 360
    # The label column fits the longest scenario name (about 7 px a character).
    left = 20 + 7 * max(len(name) for name, _ in rows)
    top = 30
    height = top + len(rows) * (bar_h + gap) + 30
    scale = width / max(1.6, max(r["ratio"] for _, r in rows) * 1.05)

    def esc(t):
        return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<text x="{left}" y="18" font-weight="bold">throughput with the filter / without it</text>']
    for i, (name, r) in enumerate(rows):
        y = top + i * (bar_h + gap)
        colour = "#999999" if "reference" in name else "#3b6ea5"
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{esc(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{r["ratio"] * scale:.1f}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{left + r["ratio"] * scale + 4:.1f}" y="{y + 13}">{r["ratio"]:.2f}</text>')
    one = left + scale
    out.append(f'<line x1="{one:.1f}" y1="{top - 4}" x2="{one:.1f}" y2="{height - 24}" stroke="#c0392b" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{one:.1f}" y="{height - 10}" text-anchor="middle" fill="#c0392b">1.0 (no filter)</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def write_markdown(results, profiles, memory, args, path):
    wasm_size = os.path.getsize(DEFAULT_WASM)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` ({time.strftime('%Y-%m-%d')}) on {machine()}.",
        "",
        f"Envoy with one worker thread, with and without the filter, in front of nginx (one worker, 1 KiB answers);"
        f" wrk, 1 thread, {args.connections} connections; {args.warmup} s warm-up, then {args.runs} runs of"
        f" {args.duration} s per configuration, interleaved; medians. All on 127.0.0.1 of a shared 2-core machine:"
        " compare ratios within one run, not absolute numbers across runs. Envoy is pinned to core"
        f" {ENVOY_CPUS}; wrk, nginx, Redis and Webdis share core {LOAD_CPUS}.",
        "",
        f"Filter module: `idempotency_filter.wasm`, {wasm_size:,} bytes.",
        "",
        "Ratio: requests per second with the filter over without it. Gateway CPU: the gateway's own CPU time per"
        " request (user + system, all threads; Envoy, or nginx's worker for the APISIX rows), which is what the"
        " filter adds whatever else limits throughput. The APISIX rows (A…) compare APISIX's Wasm runtime (nginx,"
        " one worker, pinned like Envoy) with and without the filter; there the filter forwards protected requests"
        " itself (forwarding mode).",
        "",
        "![Throughput with the filter over without it, per scenario](bench/ratios.svg)",
        "",
        "| scenario | baseline req/s | filter req/s | ratio | gateway CPU per request, baseline → filter | baseline p50 / p99 ms | filter p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        b, f = r["baseline"], r["filter"]
        lines.append(f"| {name} | {b['rps']:,.0f} | {f['rps']:,.0f} | **{r['ratio']:.2f}** | "
                     f"{b['cpu_us']:.0f} → {f['cpu_us']:.0f} µs | "
                     f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {f['p50_ms']:.2f} / {f['p99_ms']:.2f} |")
    lines += ["", "Filter counters per scenario (all runs): " + "; ".join(
        f"{name.split(' ')[0]}: " + ", ".join(f"{k} {v}" for k, v in r["filter_stats"].items() if v)
        for name, r in results.items()), ""]
    targets = target_rows(results)
    if targets:
        lines += [
            "## Targets and the floor under each",
            "",
            "Each target against its floor: the reference SDK filter that does only the host work"
            " that path cannot skip (0e, 0f, 0g), run again in the same rounds as the scenario, against the same"
            " baseline runs (its own row above ran minutes apart). A target above its floor is out of reach for"
            " any filter on this SDK; the distance from the floor to the scenario is the filter's own work, in"
            " throughput and in gateway CPU per request (the filter's minus the floor's). A fresh key on Redis (5) has its own"
            " floor, 0g: the same store traffic as the filter's, a claim when the body is in and a record while"
            " the response's last chunk is held, joined in the worker's group commit (one Webdis call per batch"
            " of up to 64 operations, one batch out at a time, the root resuming each stream), but Redis runs"
            " only a `SET NX` per claim and a `SET` per record; the filter's own work there includes its fuller"
            " script and record format. A replay on Redis (6) makes no store call (the replay cache), so its"
            " floor is the local one, 0f. Rounds: the lowest and highest of the ratios of single rounds (each"
            " run against the baseline run just before it), the noise under the medians.",
            "",
            "| scenario | ratio | target | floor | floor ratio | verdict |",
            "|---|---:|---:|---|---:|---|",
        ]
        for name, ratio, target, floor_name, floor_ratio, verdict in targets:
            floor_cell = "" if floor_ratio is None else f"{floor_ratio:.2f}"
            lines.append(f"| {name} | {ratio:.2f} | {target} | {floor_name} | {floor_cell} | {verdict} |")
        lines.append("")
    beside = [(name, r) for name, r in results.items() if name.split()[0] in FLOORS_BESIDE and "floor" in r]
    if beside:
        lines += [
            "## APISIX rows beside their floors",
            "",
            "APISIX's rows have no targets; each runs beside the SDK filter doing only its host work (A0b, A0c),"
            " in the same rounds, against the same baseline runs. The filter's own work is the difference in"
            " nginx CPU per request.",
            "",
            "| scenario | ratio | floor | floor ratio | nginx CPU per request: floor → filter |",
            "|---|---:|---|---:|---:|",
        ]
        for name, r in beside:
            floor_name = floor_of(name.split()[0])[0]
            lines.append(f"| {name} | {r['ratio']:.2f} | {floor_name.split()[0]} | {r['floor']['ratio']:.2f} |"
                         f" {r['floor']['cpu_us']:.0f} → {r['filter']['cpu_us']:.0f} µs |")
        lines.append("")
    batched = {name: r for name, r in results.items() if r["filter_stats"].get("store_calls")}
    if batched:
        lines += [
            "## Redis store: group commit and the store's own cost",
            "",
            "On Envoy each worker sends its requests' store operations (claims, records, releases) in one call"
            " per batch, one batch out at a time. Mean batch: `store_operations / store_calls` over the scenario."
            " Redis and Webdis CPU: each one's CPU time per request served. Operations per second: what one"
            " Redis executed for this gateway's worker (requests per second × operations per request);"
            " Redis's capacity is about 1 s ÷ its CPU per operation.",
            "",
            "| scenario | connections | mean batch (operations per call) | calls per request | operations per request |"
            " Redis CPU per request | Webdis CPU per request | store operations per second |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in batched.items():
            st = r["filter_stats"]
            per_request = st["store_operations"] / max(st["requests_protected"], 1)
            lines.append(f"| {name} | {r['connections']} | {st['store_operations'] / st['store_calls']:.1f} | "
                         f"{st['store_calls'] / max(st['requests_protected'], 1):.2f} | {per_request:.2f} | "
                         f"{r['filter']['redis_cpu_us']:.0f} µs | {r['filter']['webdis_cpu_us']:.0f} µs | "
                         f"{r['filter']['rps'] * per_request:,.0f} |")
        lines.append("")
    if profiles:
        names = [n for n in ("context_create", "request_headers", "request_body", "response_headers",
                             "response_body", "call_response", "done", "host:get_pairs", "host:get_body",
                             "host:shared_get", "host:shared_set", "host:metric", "host:send_response", "host:clock")]
        lines += [
            "## Where the filter's time goes",
            "",
            "The `self-profile` build (`cargo build --features self-profile`) times every callback the filter"
            " runs and every host call it makes (host calls are included in their callback's time; the two clock"
            " reads per span add about 0.4 µs each). Per request: calls × mean µs.",
            "",
            "| callback or host call | " + " | ".join(profiles) + " |",
            "|---|" + "---:|" * len(profiles),
        ]
        for n in names:
            cells = []
            for prof in profiles.values():
                if n in prof:
                    per_req, mean = prof[n]
                    cells.append(f"{per_req:.2f} × {mean:.2f} = {per_req * mean:.1f}")
                else:
                    cells.append("")
            if any(cells):
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        totals = []
        for prof in profiles.values():
            totals.append(f"{sum(c * m for k, (c, m) in prof.items() if not k.startswith('host:')):.1f} µs")
        lines += ["| **inside the filter, per request** | " + " | ".join(totals) + " |", ""]
    if memory:
        lines += [
            f"## Memory (local store, max_entries {memory['capacity']:,}, 1 KiB requests and responses)",
            "",
            "| point | records stored (cumulative) | Envoy RSS | Envoy heap allocated |",
            "|---|---:|---:|---:|",
        ]
        for label, stored, rss, alloc in memory["points"]:
            lines.append(f"| {label} | {stored:,} | {rss / 1024:,.1f} MiB | {alloc / (1 << 20):,.1f} MiB |")
        lines += [
            "",
            f"Per stored record: {memory['per_record_rss']:,.0f} bytes of resident memory,"
            f" {memory['per_record_alloc']:,.0f} bytes of Envoy heap (shared data lives there)."
            f" Growth while storing as many again past max_entries: {memory['growth_after_full_kib'] / 1024:,.1f} MiB"
            f" (entries {memory['entries']:,}, evicted {memory['evicted']:,}).",
            "",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--only", help="run only scenarios whose name contains this")
    ap.add_argument("--ids", help="run only these scenarios, by id (comma-separated: 0f,2,6); no profiles")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    args = ap.parse_args()
    for crate in ("sdk-reference-filter", "raw-reference-filter"):
        subprocess.run(["cargo", "build", "--release", "-q", "--target", "wasm32-wasip1", "--manifest-path",
                        os.path.join(HERE, crate, "Cargo.toml")], check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--target", "wasm32-wasip1", "--features", "self-profile",
                    "--target-dir", PROFILE_TARGET, "--manifest-path", os.path.join(REPO, "Cargo.toml")], check=True)
    nginx = Nginx().start()
    backend = None

    def store_backend():
        """Redis and Webdis, started once and pinned with the load (core 0)."""
        nonlocal backend
        if backend is None:
            backend = RedisBackend().start()
            for proc in (backend.redis, backend.webdis):
                subprocess.run(["taskset", "-pc", LOAD_CPUS, str(proc.pid)], capture_output=True)
        return backend

    results = {}
    try:
        for name, store, mode, body in SCENARIOS:
            if (args.only and args.only not in name) or (args.ids and name.split()[0] not in args.ids.split(",")):
                continue
            if store.startswith("apisix") and not runtime_built():
                print(f"{name}: skipped (make apisix-runtime first)", flush=True)
                continue
            needs_store = store.startswith(("redis", "apisix-sdk:")) or store in ("ref:store-call", "apisix",
                                                                 "sdk:sdk-redis-fresh-floor")
            r = run_scenario(name, store, mode, body, args, nginx, store_backend() if needs_store else None,
                             floor_store=floor_of(name.split()[0])[1])
            results[name] = r
            print(f"{name:40s} baseline {r['baseline']['rps']:9,.0f}/s  filter {r['filter']['rps']:9,.0f}/s"
                  f"  ratio {r['ratio']:.2f}  p99 {r['baseline']['p99_ms']:.2f} -> {r['filter']['p99_ms']:.2f} ms"
                  f"  envoy cpu/req {r['baseline']['cpu_us']:.0f} -> {r['filter']['cpu_us']:.0f} us"
                  f"  busy {r['baseline']['busy']:.0%} -> {r['filter']['busy']:.0%}"
                  f"  redis/webdis cpu/req {r['filter']['redis_cpu_us']:.0f}/{r['filter']['webdis_cpu_us']:.0f} us"
                  f"  {r['filter_stats']}" + (f"  floor alongside {r['floor']['ratio']:.2f} ({r['floor']['cpu_us']:.0f} us)" if "floor" in r else ""),
                  flush=True)
        for name, ratio, target, _, floor_ratio, verdict in target_rows(results):
            floor_text = "" if floor_ratio is None else f" floor {floor_ratio:.2f}"
            print(f"target {name}: {ratio:.2f} against {target}{floor_text}: {verdict}", flush=True)
        profiles = {}
        for name, store, mode in PROFILED:
            if args.ids or (args.only and args.only not in name):
                continue
            profiles[name] = self_profile(store, mode, args, nginx,
                                          store_backend() if store == "redis" else None)
            print(name, profiles[name], flush=True)
        memory = None if args.skip_memory else memory_scenario(args, nginx)
        if memory:
            print(json.dumps({k: v for k, v in memory.items() if k != "points"}), flush=True)
            for p in memory["points"]:
                print(p, flush=True)
        # The chart belongs to BENCHMARKS.md, which links it: a run written
        # elsewhere (--out) leaves both as they are.
        if os.path.abspath(args.out) == os.path.join(REPO, "BENCHMARKS.md"):
            write_svg(results, os.path.join(HERE, "ratios.svg"))
        write_markdown(results, profiles, memory, args, args.out)
        print(f"wrote {args.out}")
    finally:
        nginx.stop()
        if backend:
            backend.stop()


if __name__ == "__main__":
    main()
