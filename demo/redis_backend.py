"""Redis and Webdis (its HTTP front end) as child processes on 127.0.0.1.

The Redis store of the filter talks to Webdis over HTTP. Tests and the fleet
demo start both here; Webdis can be stopped and started again to show what
the filter does while the store is unreachable.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

from gateway import free_port


def _wait_port(port, proc, what, timeout=10, probe=None):
    """Until `proc` serves on `port`. With `probe` (bytes to send, answer
    prefix expected), the answer must come from the right server, not from
    whatever else may hold the port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if probe is None:
                    return
                s.sendall(probe[0])
                if s.recv(64).startswith(probe[1]):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not serving on {port} after {timeout}s")


class RedisBackend:
    def __init__(self, redis_port=None, webdis_port=None, workdir=None, redis_args=()):
        for tool in ("redis-server", "webdis"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is not installed (make setup installs redis-server and webdis)")
        self.redis_port = redis_port or free_port()
        self.webdis_port = webdis_port or free_port()
        # Ports picked free here can be taken before the servers bind them
        # (neither server can bind port 0 and say which it got): the first
        # start then moves to other ports. Ports asked for stay fixed.
        self._ports_chosen = (redis_port is None, webdis_port is None)
        # Extra redis-server arguments (tests: maxmemory and its policy).
        self.redis_args = list(redis_args)
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="idem-redis-")
        self.redis = None
        self.webdis = None
        atexit.register(self.stop)

    def start(self):
        self._start_on_a_free_port("redis", self.start_redis, self._ports_chosen[0])
        self._start_on_a_free_port("webdis", self.start_webdis, self._ports_chosen[1])
        return self

    def _start_on_a_free_port(self, name, start, port_was_chosen, attempts=3):
        for attempt in range(attempts):
            try:
                return start()
            except RuntimeError:
                self._stop(getattr(self, name))
                if not port_was_chosen or attempt == attempts - 1:
                    raise
                setattr(self, f"{name}_port", free_port())

    def start_redis(self):
        log = open(os.path.join(self.workdir, "redis.log"), "a")
        self.redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--dir", self.workdir, *self.redis_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.redis_port, self.redis, "redis-server", probe=(b"PING\r\n", b"+PONG"))

    def start_webdis(self):
        conf = os.path.join(self.workdir, "webdis.json")
        with open(conf, "w") as f:
            json.dump({
                "redis_host": "127.0.0.1", "redis_port": self.redis_port, "redis_auth": None,
                "http_host": "127.0.0.1", "http_port": self.webdis_port,
                "threads": 2, "pool_size": 16, "daemonize": False, "database": 0,
                "verbosity": 1, "logfile": os.path.join(self.workdir, "webdis.log"),
            }, f)
        self.webdis = subprocess.Popen(["webdis", conf], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.webdis_port, self.webdis, "webdis")
        # Webdis listens before its pool has reached Redis: wait until a
        # command goes through, so that the next store call is served.
        if self.redis is not None and self.redis.poll() is None:
            deadline = time.time() + 10
            while True:
                try:
                    if self.command("PING").get("PING") in ([True, "PONG"], "PONG"):
                        break
                except (OSError, ValueError, AttributeError):
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"webdis on {self.webdis_port} does not reach Redis")
                time.sleep(0.05)

    @staticmethod
    def _stop(proc, sig=signal.SIGTERM):
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_webdis(self):
        self._stop(self.webdis)

    def stop_redis(self, sig=signal.SIGTERM):
        self._stop(self.redis, sig)

    def stop(self):
        self._stop(self.webdis)
        self._stop(self.redis)
        # Logs and config go with it, unless kept for a look (IDEM_KEEP_LOGS=1).
        if self.own_workdir and not os.environ.get("IDEM_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def command(self, *parts):
        """One Redis command through Webdis, for tests: returns the JSON reply."""
        path = "/".join(urllib.request.quote(str(p), safe="") for p in parts)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.webdis_port}/{path}", timeout=5) as r:
            return json.loads(r.read())
