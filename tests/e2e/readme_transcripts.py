#!/usr/bin/env python3
"""The README's transcripts, made by running the demos.

Each transcript in README.md sits in a ```console block after a marker line
`<!-- transcript: NAME -->`. This module runs what the block shows (`make
demo`'s walkthrough, `make demo-fleet`'s, `make demo-client`) on free ports
and renders it the way the README shows it: the demo's ports put back to
their defaults, the `date`, `server` and `x-envoy-upstream-service-time`
headers left out. tests/e2e/test_readme_transcripts.py compares the two;

    .venv/bin/python tests/e2e/readme_transcripts.py --update

rewrites the README's blocks from a fresh run.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
PY = sys.executable
TRIMMED_HEADERS = ("date", "server", "x-envoy-upstream-service-time")


def port_pair_free():
    """A port p with p + 1 free as well (the fleet's two gateways)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue


class Demo:
    """demo/gateway.py on free ports, read until it has printed its walkthrough."""

    def __init__(self, fleet):
        self.defaults = {"--port": 10000, "--admin-port": 9901, "--upstream-port": 8081}
        if fleet:
            self.defaults.update({"--redis-port": 6380, "--webdis-port": 7379})
        self.ports = {flag: port_pair_free() for flag in self.defaults}
        args = [a for flag, port in self.ports.items() for a in (flag, str(port))]
        self.proc = subprocess.Popen([PY, os.path.join(REPO, "demo", "gateway.py"), *args]
                                     + (["--fleet"] if fleet else []),
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError("the demo stopped:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("Ctrl-C stops everything."):
                break
        self.printed = "".join(lines)

    def back_to_defaults(self, text):
        """The actual ports as the README writes them (the defaults; the
        fleet's second gateway and admin are the first's + 1)."""
        for flag, default in self.defaults.items():
            for offset in (1, 0) if flag in ("--port", "--admin-port") else (0,):
                text = re.sub(rf"(?<=[:/]){self.ports[flag] + offset}\b", str(default + offset), text)
        return re.sub(r"/tmp/idem-envoy-[a-z0-9_]+/", "/tmp/idem-envoy-*/", text)

    def steps(self):
        """(comment, command) of each step of the printed walkthrough."""
        out, comment, pending = [], None, ""
        for line in self.printed.splitlines():
            if line.startswith("# "):
                comment = re.sub(r"^# \d+\. ", "", line)
            elif line.startswith(("curl ", "sleep ")) or pending:
                if line.endswith("\\"):
                    pending += line[:-1]
                    continue
                out.append((comment, pending + line))
                pending = ""
        return out

    def stop(self):
        """Stops the demo's whole process group: what it started too, even
        when the demo itself has already exited."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def trim(output):
    output = output.replace("\r\n", "\n")
    names = "|".join(TRIMMED_HEADERS)
    return re.sub(rf"(?im)^({names}): .*\n", "", output)


def started_demo(fleet, attempts=3):
    """A Demo, started again on other ports when one it was given was taken
    between the choice and the bind (another test's server, on a busy
    machine): the demo then stops with "already in use"."""
    for attempt in range(attempts):
        try:
            return Demo(fleet)
        except RuntimeError as e:
            if "already in use" not in str(e) or attempt == attempts - 1:
                raise


def walkthrough(fleet):
    demo = started_demo(fleet)
    try:
        lines = []
        for comment, command in demo.steps():
            out = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60)
            lines.append(f"$ # {comment}")
            lines.append("$ " + demo.back_to_defaults(command))
            text = trim(out.stdout)
            if text:
                lines.append(text.rstrip("\n"))
        return "\n".join(lines) + "\n"
    finally:
        demo.stop()


def demo_client():
    out = subprocess.run([PY, os.path.join(REPO, "demo", "client_story.py")], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    return "$ make demo-client\n" + out.stdout.rstrip("\n") + "\n"


RUNS = {"demo": lambda: walkthrough(False), "demo-fleet": lambda: walkthrough(True), "demo-client": demo_client}


def normalise(text):
    """What may differ between two honest runs: times, and the free ports
    demo-client picks."""
    text = re.sub(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z\]", "[TIME]", text)
    text = re.sub(r"elapsed: +[\d.]+ s", "elapsed: N s", text)
    return re.sub(r"(proxy|filter|service) :\d+", r"\1 :PORT", text)


BLOCK = re.compile(r"(<!-- transcript: ([\w-]+) -->\n```console\n)(.*?)(```\n)", re.S)


def readme_blocks(text=None):
    if text is None:
        with open(README) as f:
            text = f.read()
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def update(names):
    with open(README) as f:
        text = f.read()
    fresh = {name: RUNS[name]() for name in names}
    text = BLOCK.sub(lambda m: m.group(1) + fresh.get(m.group(2), m.group(3)) + m.group(4), text)
    with open(README, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update(sys.argv[2:] or list(RUNS))
    else:
        for name, run in RUNS.items():
            print(f"<!-- transcript: {name} -->\n{run()}")
