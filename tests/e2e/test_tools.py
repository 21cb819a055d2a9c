"""The tools a newcomer meets first: make demo's flags and its answer to a
busy port, make check-config's messages and the files it reads, redis_key's
errors. Each check runs the tool as a user would."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from gateway import free_port, port_in_use


@pytest.fixture(scope="module")
def examples():
    """Builds the two examples once; returns their paths."""
    subprocess.run(["cargo", "build", "-q", "--example", "check_config", "--example", "redis_key"],
                   cwd=REPO, check=True, timeout=900)
    base = os.path.join(REPO, "target", "debug", "examples")
    return {name: os.path.join(base, name) for name in ("check_config", "redis_key")}


def run(cmd, stdin=subprocess.DEVNULL, timeout=60):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, stdin=stdin, timeout=timeout)


def check(examples, tmp_path, files):
    paths = []
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        paths.append(str(path))
    out = run([examples["check_config"], *paths])
    return out.returncode, out.stdout + out.stderr


# ------------------------------------------------------------- make demo


def test_make_demo_passes_args_to_the_demo_scripts():
    for target, script in (("demo", "demo/gateway.py --port 12345"),
                           ("demo-fleet", "demo/gateway.py --fleet --port 12345"),
                           ("demo-client", "demo/client_story.py --port 12345")):
        out = run(["make", "-n", target, "ARGS=--port 12345"])
        assert script in out.stdout, (target, out.stdout)


def free_pair():
    """A port p with p + 1 free too (the fleet uses both)."""
    while True:
        p = free_port()
        if p < 65535 and not port_in_use(p + 1):
            return p


@pytest.mark.parametrize("fleet,flag", [(False, "--port"), (False, "--upstream-port"), (True, "--webdis-port")])
def test_a_busy_port_is_one_line_naming_it_and_the_flag(fleet, flag):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        ports = {f: str(free_pair()) for f in ("--port", "--admin-port", "--upstream-port",
                                               "--redis-port", "--webdis-port")}
        ports[flag] = str(port)
        args = [a for f, p in ports.items() for a in (f, p)] + (["--fleet"] if fleet else [])
        out = run([sys.executable, "demo/gateway.py", *args], timeout=60)
    finally:
        busy.close()
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"port {port} " in lines[0] and f"choose another with {flag}" in lines[0], lines[0]
    assert f"make {'demo-fleet' if fleet else 'demo'} ARGS='{flag} " in lines[0]


# ---------------------------------------------------------- check-config


def test_check_config_without_files_prints_usage_instead_of_reading_stdin(examples):
    # stdin stays open: a tool that waits on it would time out here.
    proc = subprocess.Popen([examples["check_config"]], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert err.startswith("usage: check_config FILE")
    # make check-config without FILES says the same.
    out = run(["make", "-s", "check-config"], timeout=300)
    assert out.returncode != 0 and "usage: check_config FILE" in out.stderr


def test_check_config_reads_stdin_when_asked(examples):
    out = subprocess.run([examples["check_config"], "-"], input='{"ttl_seconds": 0}', capture_output=True,
                       text=True, timeout=20)
    assert out.returncode == 1
    assert "<stdin>: invalid configuration: ttl_seconds: must be between 1 and 31536000 (got 0)" in out.stdout


def test_check_config_json_syntax_errors_have_line_and_column(examples, tmp_path):
    code, out = check(examples, tmp_path, {"a.json": '{"ttl_seconds": 5,\n "required": tru}\n'})
    assert code == 1
    assert "a.json: line 2, column 17: JSON syntax error: expected ident" in out, out


@pytest.mark.parametrize("doc,line", [
    ({"ttl_seconds": -1}, "ttl_seconds: must be a whole number between 1 and 31536000 (got -1)"),
    ({"ttl_seconds": "5"}, 'ttl_seconds: must be a whole number between 1 and 31536000 (got string "5")'),
    ({"max_key_length": 1.5}, "max_key_length: must be a whole number between 1 and 8192 (got 1.5)"),
    ({"max_request_body_bytes": -3}, "max_request_body_bytes: must be a whole number from 0 to 67108864 (got -3)"),
    ({"store": {"max_entries": 5000000000}}, "store.max_entries: must be a whole number between 16 and 10000000"),
    ({"store": {"max_bytes": "256MiB"}},
     "store.max_bytes: must be a whole number, at least 25600000 for max_entries 100000 (4096 per bucket of 16 "
     "entries), and must be at most 1099511627776 (got string \"256MiB\")"),
    ({"store": {"type": "redis", "cluster": "w", "cache_entries": -1}},
     "store.cache_entries: must be a whole number, 0 (no cache) or between 16 and 10000000 (got -1)"),
    ({"lock_timeout_seconds": -1},
     "lock_timeout_seconds: must be a whole number, at least 1, and must not exceed ttl_seconds (86400) (got -1)"),
])
def test_check_config_names_the_allowed_range_not_the_rust_type(examples, tmp_path, doc, line):
    code, out = check(examples, tmp_path, {"c.json": json.dumps(doc)})
    assert code == 1
    assert line in out, out
    assert "expected u" not in out


@pytest.mark.parametrize("doc,line", [
    ({"store": {"type": "local", "cluster": "webdis"}},
     "store.cluster: `cluster` belongs to the redis store, and this store is local (store.type)"),
    ({"store": {"cluster": "webdis"}},
     "store.cluster: `cluster` belongs to the redis store, and this store is local (store.type)"),
    ({"store": {"type": "redis", "cluster": "webdis", "max_entries": 100}},
     "store.max_entries: `max_entries` belongs to the local store, and this store is redis (store.type)"),
    ({"cluster": "webdis"}, "cluster: `cluster` is a field of the redis store: move it into \"store\""),
    # Both stores take max_bytes: it belongs in "store", whichever it is.
    ({"max_bytes": 1000000}, "max_bytes: `max_bytes` is a field of the store: move it into \"store\""),
])
def test_check_config_says_which_store_a_field_belongs_to(examples, tmp_path, doc, line):
    code, out = check(examples, tmp_path, {"c.json": json.dumps(doc)})
    assert code == 1
    assert line in out, out


ENVOY_TWO_FILTERS = """\
static_resources:
  listeners:
  - name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          http_filters:
          - name: good
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: good
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"required": true}'
                vm_config: { runtime: envoy.wasm.runtime.v8, code: { local: { filename: x.wasm } } }
          - name: defaults
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: defaults
                vm_config: { runtime: envoy.wasm.runtime.v8, code: { local: { filename: x.wasm } } }
          - name: bad
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bad
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{"ttl_seconds": 0}'
                vm_config: { runtime: envoy.wasm.runtime.v8, code: { local: { filename: x.wasm } } }
"""


def test_check_config_checks_every_filter_in_an_envoy_yaml(examples, tmp_path):
    code, out = check(examples, tmp_path, {"envoy.yaml": ENVOY_TWO_FILTERS})
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("ok: ") and 'Wasm filter "good"' in lines[0]
    assert lines[1].startswith("ok: ") and 'Wasm filter "defaults"' in lines[1]
    assert 'Wasm filter "bad" at static_resources.listeners[0].filter_chains[0].filters[0]' in lines[2]
    assert lines[2].endswith("ttl_seconds: must be between 1 and 31536000 (got 0)")


def test_check_config_checks_the_shipped_envoy_and_apisix_files(examples):
    out = run([examples["check_config"], "envoy/envoy-docker.yaml", "apisix/apisix.yaml"])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    with open(os.path.join(REPO, "apisix", "apisix.yaml")) as f:
        routes = yaml.safe_load(f)["routes"]
    assert len(lines) == 1 + len(routes)
    assert all(line.startswith("ok: ") for line in lines)


def test_check_config_reports_a_bad_apisix_plugin_conf(examples, tmp_path):
    apisix = ("routes:\n  - id: r1\n    uri: /p\n    plugins:\n      idempotency:\n"
              "        conf:\n          host: apisix\n          forward: {upstream: 'a:1'}\n")
    code, out = check(examples, tmp_path, {"apisix.yaml": apisix})
    assert code == 1
    assert 'apisix.yaml: plugin "idempotency" at routes[0].plugins.idempotency: ' in out
    assert "the local store needs shared data, which APISIX does not provide" in out


def test_check_config_says_when_a_yaml_file_holds_no_configuration(examples, tmp_path):
    code, out = check(examples, tmp_path, {"x.yaml": "admin: {}\n"})
    assert code == 1 and "x.yaml: no filter configuration found" in out


# ------------------------------------------------------------- redis_key


def test_redis_key_errors_are_words(examples, tmp_path):
    conf = tmp_path / "conf.json"
    conf.write_text('{"store": {"type": "redis", "cluster": "webdis"}}')
    out = run([examples["redis_key"], str(conf), '"unterminated', "-"])
    assert out.returncode == 2
    assert out.stderr.strip() == ("the filter would refuse this key with 400 invalid-key: "
                                  "the idempotency key is malformed: missing closing quote")
    out = run([examples["redis_key"], str(conf), '"k"'])
    assert out.returncode == 2 and "scope_headers is authorization: give one value per header" in out.stderr
    out = run([examples["redis_key"], str(conf), '"k"', "Bearer x"])
    assert out.returncode == 0 and out.stdout.startswith("idem:") and len(out.stdout.strip()) == 5 + 32
