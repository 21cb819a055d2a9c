#!/usr/bin/env python3
"""Runs Envoy with the idempotency filter, natively, on 127.0.0.1.

Used by `make demo` (fixed ports, prints a curl walkthrough) and by the
end-to-end tests (free ports, several gateways at once). Every process it
starts is stopped by stop() or on exit.
"""

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO, "envoy", "envoy.template.yaml")
DEFAULT_WASM = os.path.join(REPO, "target", "wasm32-wasip1", "release", "idempotency_filter.wasm")
DEFAULT_ENVOY = os.path.join(REPO, ".venv", "bin", "envoy")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(listen_port, admin_port, upstream_port, plugin_config, wasm_path=DEFAULT_WASM,
           vm_id="idempotency", buffer_limit=8 * 1024 * 1024, unreachable_port=None, webdis_port=None,
           with_filter=True, access_log=None, template=TEMPLATE, operations=None, operations_port=0):
    with open(template) as f:
        text = f.read()
    if access_log is None and "# BEGIN access log" in text:
        text = cut(text, "          # BEGIN access log", "          # END access log\n")
    if operations is None and "# BEGIN operations listener" in text:
        text = cut(text, "  # BEGIN operations listener", "  # END operations listener\n")
    outcome = plugin_config.get("outcome_property") if isinstance(plugin_config, dict) else None
    if with_filter:
        methods = (plugin_config.get("methods") if isinstance(plugin_config, dict) else None) or ["POST", "PATCH"]
        text = text.replace("{{UNPROTECTED_METHOD}}", unprotected_method_matchers(methods))
    else:
        # The baseline: the same routes and chain without the filter.
        text = cut(text, "              # BEGIN unprotected routes", "              # END unprotected routes\n")
        text = cut(text, "          # BEGIN idempotency filter", "          # END idempotency filter\n")
    fields = {
        "LISTEN_PORT": str(listen_port),
        "ADMIN_PORT": str(admin_port),
        "UPSTREAM_PORT": str(upstream_port),
        "UNREACHABLE_PORT": str(unreachable_port or free_port()),
        "WEBDIS_PORT": str(webdis_port or free_port()),
        "BUFFER_LIMIT": str(buffer_limit),
        # A JSON string literal is a valid YAML double-quoted scalar.
        "PLUGIN_CONFIG": json.dumps(json.dumps(plugin_config) if not isinstance(plugin_config, str) else plugin_config),
        "VM_ID": vm_id,
        "WASM_PATH": wasm_path,
        "ACCESS_LOG": access_log or "",
        # Envoy prints "-" for filter state that was never set.
        "OUTCOME_FORMAT": f"%FILTER_STATE(wasm.{outcome}:PLAIN)%" if outcome else "-",
        "OPERATIONS_PORT": str(operations_port),
        "OPERATIONS_CONFIG": json.dumps(json.dumps(operations)),
    }
    for k, v in fields.items():
        text = text.replace("{{" + k + "}}", v)
    return text


def cut(text, begin, end):
    """text without the block from the line starting with `begin` through `end`."""
    start = text.index(begin)
    stop = text.index(end, start) + len(end)
    return text[:start] + text[stop:]


def unprotected_method_matchers(methods):
    """The route's header matchers (a YAML flow list) that only a method the
    filter does not protect passes: one inverted exact match per protected
    method, all of which must hold. Requests they pass take the routes that
    disable the filter. Rendered from the plugin configuration's own
    `methods`, so the two cannot drift apart. Exact matches, not one regex:
    in a paired check on GET the regex cost about 1 µs per request (0.963
    of Envoy without the filter, median of 7 rounds), the exact matches
    nothing measurable (1.006)."""
    return "[" + ", ".join(
        f'{{ name: ":method", string_match: {{ exact: {json.dumps(m.upper())} }}, invert_match: true }}'
        for m in sorted({m.upper() for m in methods})) + "]"


class Envoy:
    """One Envoy process with the filter. start() waits until it serves."""

    # Metrics made with define_metric show in /stats.
    has_metrics = True

    def __init__(self, plugin_config, upstream_port, concurrency=2, envoy_bin=None,
                 wasm_path=DEFAULT_WASM, listen_port=None, admin_port=None, workdir=None,
                 webdis_port=None, with_filter=True, cpus=None, access_log=False, template=TEMPLATE,
                 operations=None, env=None, extra_args=()):
        self.plugin_config = plugin_config
        # More of Envoy's command-line flags (tests: a short --drain-time-s).
        self.extra_args = list(extra_args)
        # Extra environment for Envoy's process (tests: a stepped clock).
        self.env = env
        # The plugin configuration of a key-operations listener (README
        # "Operations"), or None for none; its port is self.operations_port.
        self.operations = operations
        self.operations_port = None
        self._listeners_read = False
        self.upstream_port = upstream_port
        self.concurrency = concurrency
        self.envoy_bin = envoy_bin or os.environ.get("ENVOY_BIN") or DEFAULT_ENVOY
        self.wasm_path = wasm_path
        self.webdis_port = webdis_port
        self.with_filter = with_filter
        self.template = template
        # The `unreachable` cluster's port: bound here and never listened on,
        # so connections to it are refused for as long as this gateway runs
        # (a port merely picked free could be taken by the next server).
        self._unreachable = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._unreachable.bind(("127.0.0.1", 0))
        # Benchmarks pin Envoy to its own core(s) (taskset -c CPUS).
        self.cpus = cpus
        # Ports not given are chosen by Envoy itself (port 0) and read back
        # once it runs: a port merely found free beforehand can be taken by
        # any outgoing connection before Envoy binds it.
        self.port = listen_port
        self.admin_port = admin_port
        self._fixed_ports = (listen_port, admin_port)
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="idem-envoy-")
        self.config_path = os.path.join(self.workdir, "envoy.yaml")
        self.log_path = os.path.join(self.workdir, "envoy.log")
        self.admin_address_path = os.path.join(self.workdir, "admin.address")
        # An access log (one line per request), flushed every 100 ms.
        self.access_log_path = os.path.join(self.workdir, "access.log") if access_log else None
        self.proc = None

    def start(self, timeout=60, expect_failure=False):
        self.port, self.admin_port = self._fixed_ports
        self.operations_port, self._listeners_read = None, False
        if os.path.exists(self.admin_address_path):
            os.remove(self.admin_address_path)
        with open(self.config_path, "w") as f:
            f.write(self.rendered(self.plugin_config))
        log = open(self.log_path, "w")
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        self.proc = subprocess.Popen(
            pin + [self.envoy_bin, "-c", self.config_path, "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "--log-level", "warn", "--component-log-level", "wasm:info",
             "--file-flush-interval-msec", "100", "--admin-address-path", self.admin_address_path]
            + self.extra_args,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env} if self.env else None)
        atexit.register(self.stop)
        if expect_failure:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()}")
            if self._ready():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log()}")

    def rendered(self, plugin_config):
        """This gateway's Envoy configuration (YAML) with `plugin_config`."""
        return render(self.port or 0, self.admin_port or 0, self.upstream_port, plugin_config, self.wasm_path,
                      webdis_port=self.webdis_port, with_filter=self.with_filter,
                      unreachable_port=self._unreachable.getsockname()[1],
                      access_log=self.access_log_path, template=self.template,
                      operations=self.operations)

    def _ready(self):
        try:
            if self.admin_port is None:
                with open(self.admin_address_path) as f:
                    self.admin_port = int(f.read().strip().rpartition(":")[2])
            if not self._listeners_read:
                doc = json.loads(self.admin("/listeners?format=json"))
                ports = {l["name"]: l["local_address"]["socket_address"]["port_value"]
                         for l in doc["listener_statuses"]}
                # The gateway is the listener named so, or else the first; a
                # key-operations listener is named "operations".
                first = doc["listener_statuses"][0]["name"]
                self.port = self.port or ports.get("gateway") or ports[first]
                self.operations_port = ports.get("operations")
                if not self.port or self.operations_port == 0:
                    return False
                self._listeners_read = True
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                if r.status != 200:
                    return False
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except (OSError, ValueError, KeyError, IndexError):
            # Not up yet (or the address file half written): ask again.
            return False

    @property
    def h2c_port(self):
        """Where HTTP/2 clients (prior knowledge) connect: the same listener."""
        return self.port

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def access_lines(self):
        """The access log so far (started with access_log=True)."""
        if self.access_log_path is None:
            return []
        try:
            with open(self.access_log_path) as f:
                return f.read().splitlines()
        except OSError:  # not written yet
            return []

    def stop(self, sig=signal.SIGTERM):
        self._terminate(sig)
        # Keep the config and log when asked (IDEM_KEEP_LOGS=1) or on failure
        # paths that call log() first; otherwise leave nothing behind.
        if self.own_workdir and not os.environ.get("IDEM_KEEP_LOGS") and sig != signal.SIGKILL:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, sig):
        terminate_group(self.proc, sig)

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self, prefix="wasmcustom.idempotency."):
        """Counters and gauges whose names start with prefix, without it."""
        out = {}
        for line in self.admin("/stats?filter=" + prefix.replace(".", "\\.")).splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                try:
                    out[name[len(prefix):]] = int(value)
                except ValueError:
                    pass
        return out

    def allocated_bytes(self):
        return int(json.loads(self.admin("/memory"))["allocated"])

    def request(self, method, path, headers=None, body=None, timeout=30):
        return http_request(self.port, method, path, headers, body, timeout)


def http_request(port, method, path, headers=None, body=None, timeout=30):
    """One request to 127.0.0.1:port on a fresh connection; returns (status,
    headers dict with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def terminate_group(proc, sig=signal.SIGTERM):
    """Stops a process started in a session of its own, and everything it
    started: `sig` first, SIGKILL if it is still there 10 s later."""
    if proc and proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


CURL_WALKTHROUGH = """
Gateway: http://127.0.0.1:{port}   (Envoy admin: http://127.0.0.1:{admin}/stats?filter=idempotency)
Upstream: the payment service on 127.0.0.1:{upstream}; every execution gets a new payment id.

# 1. First request: executed, recorded
curl -si -X POST localhost:{port}/payments -H 'Idempotency-Key: "order-1001"' -H 'content-type: application/json' -d '{{"amount": 42}}'
# 2. The client retries (it never saw the answer): replayed, same payment id, Idempotent-Replayed: true
curl -si -X POST localhost:{port}/payments -H 'Idempotency-Key: "order-1001"' -H 'content-type: application/json' -d '{{"amount": 42}}'
# 3. Same key, another amount: 422
curl -si -X POST localhost:{port}/payments -H 'Idempotency-Key: "order-1001"' -H 'content-type: application/json' -d '{{"amount": 99}}'
# 4. A retry while the original is still running (the upstream takes 5 s here): 409 with Retry-After
curl -s -o /dev/null -w 'original: %{{http_code}}\\n' -X POST localhost:{port}/payments -H 'Idempotency-Key: "order-1002"' -H 'x-demo-delay-ms: 5000' -d '{{}}' & sleep 0.5; \\
curl -si -X POST localhost:{port}/payments -H 'Idempotency-Key: "order-1002"' -H 'x-demo-delay-ms: 5000' -d '{{}}'; echo; wait
# 5. A malformed key: 400
curl -si -X POST localhost:{port}/payments -H 'Idempotency-Key: "unterminated' -d '{{}}'
# 6. The counters
curl -s localhost:{admin}/stats?filter=idempotency
# 7. What the upstream executed
curl -s localhost:{upstream}/__executions
# 8. What the filter did with each request (access log, outcome_property; Envoy writes it every 100 ms)
sleep 0.5; cat {access_log}
"""


FLEET_WALKTHROUGH = """
Gateway A: http://127.0.0.1:{a}   Gateway B: http://127.0.0.1:{b}   (two Envoy processes)
Both keep key state in one Redis (127.0.0.1:{redis}) through Webdis (127.0.0.1:{webdis}).

# 1. The payment goes through gateway A
curl -si -X POST localhost:{a}/payments -H 'Idempotency-Key: "order-2001"' -H 'content-type: application/json' -d '{{"amount": 42}}'
# 2. The client's retry lands on gateway B: replayed from Redis, same payment id
curl -si -X POST localhost:{b}/payments -H 'Idempotency-Key: "order-2001"' -H 'content-type: application/json' -d '{{"amount": 42}}'
# 3. What Redis holds (prefix + hex digest of scope and key; expires by itself)
curl -s 'localhost:{webdis}/KEYS/idem:*'
# 4. What the upstream executed
curl -s localhost:{upstream}/__executions
"""


def port_in_use(port):
    """Whether a server could not bind 127.0.0.1:port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def refuse_busy_ports(ports, target):
    """Stops with one line naming the first busy port and the flag that
    moves it, rather than a traceback from deep inside a start-up.
    ports: (port, flag, what it is for)."""
    for port, flag, what in ports:
        if port_in_use(port):
            sys.exit(f"port {port} ({what}) is already in use: choose another with {flag}, "
                     f"e.g. make {target} ARGS='{flag} {port + 100}'")


def demo_fleet(args):
    from payment_service import PaymentService
    from redis_backend import RedisBackend

    refuse_busy_ports([(args.port, "--port", "gateway A"), (args.port + 1, "--port", "gateway B, --port + 1"),
                       (args.admin_port, "--admin-port", "gateway A's admin"),
                       (args.admin_port + 1, "--admin-port", "gateway B's admin, --admin-port + 1"),
                       (args.upstream_port, "--upstream-port", "the payment service"),
                       (args.redis_port, "--redis-port", "Redis"), (args.webdis_port, "--webdis-port", "Webdis")],
                      "demo-fleet")

    upstream = PaymentService(port=args.upstream_port).start()
    backend = RedisBackend(redis_port=args.redis_port, webdis_port=args.webdis_port).start()
    config = {"store": {"type": "redis", "cluster": "webdis"}}
    gateways = []
    try:
        for port, admin in ((args.port, args.admin_port), (args.port + 1, args.admin_port + 1)):
            gateways.append(Envoy(config, upstream.port, listen_port=port, admin_port=admin,
                                  webdis_port=backend.webdis_port).start())
        print(FLEET_WALKTHROUGH.format(a=gateways[0].port, b=gateways[1].port, redis=backend.redis_port,
                                       webdis=backend.webdis_port, upstream=upstream.port), flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while all(g.proc.poll() is None for g in gateways):
            time.sleep(0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for g in gateways:
            g.stop()
        backend.stop()
        upstream.stop()


def demo(argv):
    import argparse
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from payment_service import PaymentService

    ap = argparse.ArgumentParser(description="Envoy + idempotency filter + demo payment service")
    ap.add_argument("--port", type=int, default=10000, help="the gateway (the fleet: also --port + 1)")
    ap.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin (the fleet: also + 1)")
    ap.add_argument("--upstream-port", type=int, default=8081, help="the demo payment service")
    ap.add_argument("--config", default='{"outcome_property": "idempotency_outcome"}',
                    help="plugin configuration JSON")
    ap.add_argument("--fleet", action="store_true", help="two gateways (--port, --port+1) sharing one Redis")
    ap.add_argument("--redis-port", type=int, default=6380, help="Redis (--fleet)")
    ap.add_argument("--webdis-port", type=int, default=7379, help="Webdis (--fleet)")
    args = ap.parse_args(argv)
    if args.fleet:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        return demo_fleet(args)
    # SIGTERM (a supervisor, `kill`) must stop Envoy too, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    refuse_busy_ports([(args.port, "--port", "the gateway"), (args.admin_port, "--admin-port", "Envoy's admin"),
                       (args.upstream_port, "--upstream-port", "the payment service")], "demo")
    upstream = PaymentService(port=args.upstream_port).start()
    envoy = Envoy(json.loads(args.config), upstream.port, listen_port=args.port,
                  admin_port=args.admin_port, access_log=True).start()
    print(CURL_WALKTHROUGH.format(port=envoy.port, admin=envoy.admin_port, upstream=upstream.port,
                                  access_log=envoy.access_log_path), flush=True)
    print(f"Envoy log: {envoy.log_path}\nCtrl-C stops everything.", flush=True)
    try:
        while envoy.proc.poll() is None:
            time.sleep(0.5)
        print(envoy.log())
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        envoy.stop()
        upstream.stop()


if __name__ == "__main__":
    demo(sys.argv[1:])
