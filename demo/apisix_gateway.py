#!/usr/bin/env python3
"""nginx with APISIX's Wasm runtime (wasm-nginx-module 0.7.0 on wasmtime
0.38.1, built by `make apisix-runtime`), calling the filter the way APISIX
does: apisix/runtime/apisix_driver.lua reproduces apisix/wasm.lua.

`ApisixRuntime` has the interface of gateway.Envoy that the tests use
(start, stop, port, request, log), so one test can run on either host.
APISIX has no metrics for Wasm filters (define_metric is a no-op there), so
`stats()` is refused rather than answered with nothing.
"""

import atexit
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from gateway import DEFAULT_WASM, free_port, http_request, terminate_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_DIR = os.environ.get("APISIX_RUNTIME_CACHE", os.path.join(REPO, ".cache", "apisix-runtime"))
DRIVER_DIR = os.path.join(REPO, "apisix", "runtime")
TEMPLATE = os.path.join(DRIVER_DIR, "nginx.conf.template")
NGINX = "/usr/sbin/nginx"


def runtime_built():
    return os.path.exists(os.path.join(RUNTIME_DIR, "nginx-modules", "ngx_http_wasm_module.so"))


class ApisixRuntime:
    """One nginx (master + `workers` workers, one VM each) with the filter on
    the routes given: [{"id", "prefix", "conf"}], or one route "/" with `conf`."""

    # define_metric and increment_metric answer OK and do nothing there.
    has_metrics = False

    def __init__(self, conf=None, upstream_port=None, routes=None, workers=2, wasm_path=DEFAULT_WASM,
                 listen_port=None, cpus=None, with_filter=True, env=None):
        if not runtime_built():
            raise RuntimeError(f"APISIX's runtime is not built in {RUNTIME_DIR}: run `make apisix-runtime`")
        self.routes = routes if routes is not None else [{"id": "default", "prefix": "/", "conf": conf}]
        self.upstream_port = upstream_port
        self.workers = workers
        self.wasm_path = wasm_path
        self.cpus = cpus
        self.with_filter = with_filter
        # Extra environment for nginx (tests: a stepped clock).
        self.env = env
        self._port_given = listen_port is not None
        self.port = listen_port
        self.h2c_port = None
        self.workdir = tempfile.mkdtemp(prefix="idem-apisix-")
        self.config_path = os.path.join(self.workdir, "nginx.conf")
        self.routes_path = os.path.join(self.workdir, "routes.json")
        self.log_path = os.path.join(self.workdir, "error.log")
        self.proc = None
        atexit.register(self.stop)

    def render(self):
        with open(TEMPLATE) as f:
            text = f.read()
        if not self.with_filter:
            # The baseline: the same nginx proxying, without the driver.
            text = "\n".join(l for l in text.splitlines()
                             if "apisix_driver" not in l and "wasm_vm" not in l
                             and "ngx_http_wasm_module" not in l)
        fields = {
            "RUNTIME": RUNTIME_DIR, "DRIVER_DIR": DRIVER_DIR, "WORKDIR": self.workdir,
            "WORKERS": str(self.workers), "WASM": self.wasm_path, "ROUTES": self.routes_path,
            "ACCESS_LOG": os.path.join(self.workdir, "access.log"),
            "UPSTREAM_PORT": str(self.upstream_port), "LISTEN_PORT": str(self.port),
            "H2C_PORT": str(self.h2c_port),
            # As root, nginx would switch its workers to `nobody`.
            "USER_DIRECTIVE": "user root;" if os.geteuid() == 0 else "",
        }
        for k, v in fields.items():
            text = text.replace("{{" + k + "}}", v)
        return text

    def write_config(self):
        with open(self.routes_path, "w") as f:
            json.dump({"routes": self.routes}, f)
        with open(self.config_path, "w") as f:
            f.write(self.render())

    def start(self, timeout=30):
        for attempt in range(3):
            if not self._port_given:
                self.port = free_port()
            self.h2c_port = free_port()
            self.write_config()
            for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(self.workdir, d), exist_ok=True)
            open(self.log_path, "a").close()
            pin = ["taskset", "-c", self.cpus] if self.cpus else []
            self.proc = subprocess.Popen(
                pin + [NGINX, "-p", self.workdir, "-c", self.config_path, "-e", self.log_path],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None)
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                in_use = "Address already in use" in self.log()
                self._terminate()
                if not in_use or self._port_given or attempt == 2:
                    raise
        return self

    def _wait_ready(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            log = self.log()
            # Every worker has loaded the module (or there is none to load).
            loaded = log.count("loaded wasm plugin") >= self.workers or not self.with_filter
            if loaded and self._serves():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx not ready after {timeout}s:\n{self.log()}")

    def _serves(self):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.connect()
            conn.close()
            return True
        except OSError:
            return False

    def reload(self, routes=None):
        """`nginx -s reload`: new workers (new VMs) with the routes given (or the
        same ones); waits until the new workers have loaded the module."""
        if routes is not None:
            self.routes = routes
        self.write_config()
        before = self.log().count("loaded wasm plugin")
        subprocess.run([NGINX, "-p", self.workdir, "-c", self.config_path, "-s", "reload"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while self.log().count("loaded wasm plugin") < before + self.workers:
            if time.time() > deadline:
                raise RuntimeError(f"nginx reload did not load the module:\n{self.log()}")
            time.sleep(0.05)
        return self

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stats(self, prefix=None):
        raise NotImplementedError("APISIX keeps no metrics for Wasm filters (define_metric is a no-op there)")

    def _terminate(self, sig=signal.SIGTERM):
        terminate_group(self.proc, sig)

    def stop(self):
        self._terminate(signal.SIGQUIT if self.proc and self.proc.poll() is None else signal.SIGTERM)
        if not os.environ.get("IDEM_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def request(self, method, path, headers=None, body=None, timeout=30):
        return http_request(self.port, method, path, headers, body, timeout)
