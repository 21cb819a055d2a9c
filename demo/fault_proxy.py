#!/usr/bin/env python3
"""A lossy path between a client and the gateway, on 127.0.0.1.

Each connection carries one HTTP/1.1 request (the demo client sends
Connection: close). The proxy forwards it to the gateway and reads the whole
response; then, with probability --drop, it closes the client's connection
without sending anything. The gateway (and the upstream) did the work; the
client never learns it. That is the situation idempotency keys exist for.

    python3 demo/fault_proxy.py --listen 10100 --gateway 127.0.0.1:10000 --drop 0.3
"""

import argparse
import random
import socket
import threading


def read_message(conn):
    """One HTTP/1.1 message framed by Content-Length (what the demo client and
    the gateway send). Reading to EOF instead would wait for Envoy's delayed
    close of the connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head + b"\r\n\r\n" + rest


class FaultProxy:
    def __init__(self, gateway, drop, port=0, seed=None):
        host, _, gport = gateway.rpartition(":")
        self.gateway = (host, int(gport))
        self.drop = drop
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.forwarded = 0
        self.dropped = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.running = True

    def start(self):
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self):
        self.running = False
        self.sock.close()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            request = read_message(conn)
            if request is None:
                return
            try:
                with socket.create_connection(self.gateway, timeout=60) as up:
                    up.sendall(request)
                    response = read_message(up)
                    if response is None:
                        return
            except OSError:
                return
            with self.lock:
                lose = self.random.random() < self.drop
                if lose:
                    self.dropped += 1
                else:
                    self.forwarded += 1
            if lose:
                # RST rather than FIN: the client sees a failure, not a reply.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            try:
                conn.sendall(response)
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, default=10100)
    ap.add_argument("--gateway", default="127.0.0.1:10000")
    ap.add_argument("--drop", type=float, default=0.3)
    args = ap.parse_args()
    proxy = FaultProxy(args.gateway, args.drop, port=args.listen).start()
    print(f"fault proxy 127.0.0.1:{proxy.port} -> {args.gateway}, dropping {args.drop:.0%} of responses", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
