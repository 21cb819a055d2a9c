#!/usr/bin/env python3
"""Demo upstream: a payment service that executes every request it receives.

Each execution gets a fresh payment id, so a duplicate that slips through the
gateway is visible as a second id. It also counts executions per
Idempotency-Key, which the end-to-end tests read to prove exactly-once.

Test hooks (request headers; harmless in the demo):
  x-demo-status: 503        answer with this status
  x-demo-delay-ms: 1500     work this long before answering
  x-demo-hold: NAME         work until the test calls release(NAME) (tests only;
                            at most 60 s), so "still running" is a fact, not a guess
  x-demo-stall: NAME        answer the headers and half the body, then wait for
                            release(NAME) before the rest
  x-demo-response-bytes: N  answer with an N-byte body instead of JSON
  x-demo-binary: 1          with x-demo-response-bytes, bytes 0..255 repeated
  x-demo-unique: 1          with x-demo-response-bytes, the payment id repeated, so
                            every execution's body differs (a replay of the
                            wrong record shows)
  x-demo-echo: 1            answer with the request body itself (octet-stream)
  x-demo-reset: 1           execute, then drop the connection without answering
  x-demo-cut: 1             execute, answer the headers and half the body, drop

GET /__executions returns {"total": N, "by_key": {...}, "started": {...}}.
POST /__reset clears the counters.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.total = 0
        self.by_key = {}
        self.started = {}
        self.next_id = 1
        self.gates = {}

    def gate(self, name):
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def start(self, key):
        with self.lock:
            self.started[key] = self.started.get(key, 0) + 1

    def execute(self, key):
        with self.lock:
            self.total += 1
            self.by_key[key] = self.by_key.get(key, 0) + 1
            pid = self.next_id
            self.next_id += 1
            return pid

    def snapshot(self):
        with self.lock:
            return {"total": self.total, "by_key": dict(self.by_key), "started": dict(self.started)}

    def reset(self):
        with self.lock:
            self.total = 0
            self.by_key.clear()
            self.started.clear()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ledger = None  # set by serve()

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _send(self, status, body, content_type="application/json", extra=None):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        stall = self.headers.get("x-demo-stall")
        if stall:
            # Half the body, then nothing until the test says so: the
            # response is unfinished for as long as the test needs.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.ledger.gate(stall).wait(timeout=60)
            try:
                self.wfile.write(body[len(body) // 2:])
            except OSError:
                self.close_connection = True
            return
        self.wfile.write(body)

    def _read_body(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        # A GET may carry a body too; left unread, it would be parsed as the
        # next request on this keep-alive connection (a 400 for whoever is next).
        self._read_body()
        if self.path == "/__executions":
            return self._send(200, json.dumps(self.ledger.snapshot()).encode())
        self._execute(b"")

    def do_POST(self):
        body = self._read_body()
        if self.path == "/__reset":
            self.ledger.reset()
            return self._send(204, b"")
        self._execute(body)

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_POST

    def _execute(self, body):
        key = self.headers.get("idempotency-key", "")
        self.ledger.start(key)
        delay = int(self.headers.get("x-demo-delay-ms") or 0)
        if delay:
            time.sleep(delay / 1000.0)
        hold = self.headers.get("x-demo-hold")
        if hold:
            self.ledger.gate(hold).wait(timeout=60)
        pid = self.ledger.execute(key)
        if self.headers.get("x-demo-reset"):
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if self.headers.get("x-demo-cut"):
            payload = b"y" * 4000
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:2000])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status = int(self.headers.get("x-demo-status") or (201 if self.command == "POST" else 200))
        size = self.headers.get("x-demo-response-bytes")
        extra = {"x-payment-id": f"pay_{pid}", "set-cookie": f"session=s{pid}"}
        if self.headers.get("x-demo-echo"):
            return self._send(status, body or b"", "application/octet-stream", extra)
        if size is not None:
            n = int(size)
            if self.headers.get("x-demo-unique"):
                unit = f"pay_{pid}|".encode()
                payload = (unit * (n // len(unit) + 1))[:n]
                return self._send(status, payload, "application/octet-stream", extra)
            if self.headers.get("x-demo-binary"):
                payload = bytes(i % 256 for i in range(n))
                return self._send(status, payload, "application/octet-stream", extra)
            return self._send(status, b"x" * n, "text/plain", extra)
        try:
            amount = json.loads(body or b"{}").get("amount")
        except (ValueError, AttributeError):
            amount = None
        reply = {"id": f"pay_{pid}", "amount": amount, "status": "captured", "key": key}
        self._send(status, json.dumps(reply).encode(), extra=extra)


class Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of new connections
    # from the gateway (a storm test) would see resets, i.e. Envoy 503s.
    request_queue_size = 256
    daemon_threads = True


class PaymentService:
    """The upstream as an object, for tests: start() on a free port, stop()."""

    def __init__(self, host="127.0.0.1", port=0):
        self.ledger = Ledger()
        handler = type("BoundHandler", (Handler,), {"ledger": self.ledger})
        self.server = Server((host, port), handler)
        self.port = self.server.server_address[1]
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def executions(self, key=None):
        snap = self.ledger.snapshot()
        return snap["total"] if key is None else snap["by_key"].get(key, 0)

    def started(self, key):
        return self.ledger.snapshot()["started"].get(key, 0)

    def ledger_by_key(self):
        """Executions so far, by idempotency key."""
        return self.ledger.snapshot()["by_key"]

    def release(self, name):
        """Lets every request held with `x-demo-hold: name` (now or later) finish."""
        self.ledger.gate(name).set()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (the docker demo uses 0.0.0.0)")
    args = ap.parse_args()
    svc = PaymentService(host=args.host, port=args.port)
    print(f"payment service on {args.host}:{svc.port}", flush=True)
    try:
        svc.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
