"""The copyable Envoy configurations (envoy/envoy-local.yaml,
envoy/envoy-redis.yaml): Envoy's own validation passes on each, with the
module from a file and from a URL (their `remote` block), and each serves a
keyed request and its replay, run as shipped with only the ports, the module
path and the listen address rewritten."""

import functools
import hashlib
import json
import http.server
import os
import re
import subprocess
import threading
import time
import uuid

import pytest
import yaml

from conftest import REPO, post
from gateway import DEFAULT_ENVOY, DEFAULT_WASM, Envoy, http_request

CONFIGS = ["envoy-local.yaml", "envoy-redis.yaml"]
SHIPPED_WASM = "/etc/envoy/idempotency_filter.wasm"


def text_of(name):
    with open(os.path.join(REPO, "envoy", name)) as f:
        return f.read()


def replace_once(text, old, new):
    assert text.count(old) == 1, f"expected exactly one {old!r}"
    return text.replace(old, new)


def with_remote_module(text, sha256, port):
    """The file with its commented `remote` block and `wasm_download` cluster
    switched on (and the local filename off), the download pointed at
    127.0.0.1:port over plain HTTP."""
    text = re.sub(r"\n *local:\n *filename: .*\n", "\n", text)
    for block in ("remote module", "remote cluster"):
        begin = re.search(rf"\n( *)# BEGIN {block}\n", text)
        end = text.index(f"# END {block}\n", begin.end())
        lines = text[begin.end():end].splitlines(keepends=True)
        indent = begin.group(1)
        body = "".join(l.replace(indent + "# ", indent, 1) for l in lines)
        text = text[:begin.start()] + "\n" + body.rstrip(" ") + text[end + len(f"# END {block}\n"):]
    text = re.sub(r"uri: https://[^\s]+", f"uri: http://127.0.0.1:{port}/idempotency_filter.wasm", text)
    text = re.sub(r"sha256: [0-9a-f]{64}.*", f"sha256: {sha256}", text)
    text = replace_once(text, "address: downloads.example.com, port_value: 443", f"address: 127.0.0.1, port_value: {port}")
    # Plain HTTP here: drop the TLS transport socket.
    text, n = re.subn(r"\n    transport_socket:\n(      .*\n)+", "\n", text)
    assert n == 1, "the wasm_download cluster's TLS block"
    return text


def validate(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text)
    envoy = os.environ.get("ENVOY_BIN") or DEFAULT_ENVOY
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr
    return path


def module_sha256():
    with open(DEFAULT_WASM, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name", CONFIGS)
def test_the_copyable_config_has_no_placeholders_and_marks_what_the_filter_needs(name):
    text = text_of(name)
    assert "{{" not in text and "<" not in text.replace("<=", "")
    doc = yaml.safe_load(text)
    listener = doc["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["allow_on_headers_stop_iteration"] is True
    assert wasm["failure_policy"] == "FAIL_RELOAD"
    assert wasm["vm_config"]["code"]["local"]["filename"] == SHIPPED_WASM
    assert listener["per_connection_buffer_limit_bytes"] > 1048576
    for setting in ("allow_on_headers_stop_iteration", "failure_policy", "per_connection_buffer_limit_bytes"):
        before = text[:text.index(setting + ":")].rsplit("\n", 8)
        assert any("REQUIRED" in line for line in before), f"{setting} is not marked REQUIRED"
    store = json.loads(wasm["configuration"]["value"])["store"]["type"]
    assert store == name.split("-")[1].split(".")[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_envoy_validates_the_copyable_config_with_the_module_from_a_file(tmp_path, name):
    validate(tmp_path, replace_once(text_of(name), SHIPPED_WASM, DEFAULT_WASM), name)


@pytest.mark.parametrize("name", CONFIGS)
def test_envoy_validates_the_copyable_config_with_the_module_from_a_url(tmp_path, name):
    text = with_remote_module(text_of(name), module_sha256(), 8000)
    assert "remote:" in text and "filename:" not in text
    validate(tmp_path, text, name)


@pytest.fixture
def wasm_server():
    """Serves target/.../idempotency_filter.wasm on 127.0.0.1 (the URL)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=os.path.dirname(DEFAULT_WASM))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def serve(text, upstream, redis_backend, tmp_path):
    """Envoy on the shipped file, its ports rewritten to free ones."""
    text = replace_once(text, "address: 0.0.0.0, port_value: 10000", "address: 127.0.0.1, port_value: 0")
    text = replace_once(text, "address: 127.0.0.1, port_value: 9901", "address: 127.0.0.1, port_value: 0")
    # The key-operations listener (envoy-local.yaml), if there is one.
    text = text.replace("address: 127.0.0.1, port_value: 9902", "address: 127.0.0.1, port_value: 0")
    text = replace_once(text, "port_value: 8081", f"port_value: {upstream.port}")
    if redis_backend:
        text = replace_once(text, "port_value: 7379", f"port_value: {redis_backend.webdis_port}")
    path = tmp_path / "template.yaml"
    path.write_text(text)
    # Envoy renders nothing into a file without {{...}} fields: it runs as is.
    return Envoy({}, upstream.port, template=str(path), workdir=str(tmp_path)).start()


@pytest.mark.parametrize("remote", [False, True], ids=["module-from-file", "module-from-url"])
@pytest.mark.parametrize("name", CONFIGS)
def test_the_copyable_config_serves_a_keyed_request_and_its_replay(tmp_path, request, upstream, name, remote):
    backend = request.getfixturevalue("redis_backend") if "redis" in name else None
    text = text_of(name)
    if remote:
        text = with_remote_module(text, module_sha256(), request.getfixturevalue("wasm_server"))
    else:
        text = replace_once(text, SHIPPED_WASM, DEFAULT_WASM)
    envoy = serve(text, upstream, backend, tmp_path)
    try:
        key = f'"own-envoy-{uuid.uuid4().hex}"'
        first = post(envoy, key)
        again = post(envoy, key)
        assert first[0] == 201 and "idempotent-replayed" not in first[1], first
        assert again[0] == 201 and again[1].get("idempotent-replayed") == "true", again
        assert again[2] == first[2]
        assert upstream.executions(key) == 1
        # A GET takes the twin route that disables the filter.
        assert envoy.request("GET", "/__executions")[0] == 200
    finally:
        envoy.stop()


def test_the_copyable_local_config_forgets_a_key_on_its_operations_listener(tmp_path, upstream):
    envoy = serve(replace_once(text_of("envoy-local.yaml"), SHIPPED_WASM, DEFAULT_WASM), upstream, None, tmp_path)
    try:
        assert envoy.operations_port, "envoy-local.yaml has an operations listener"
        key = f'"own-envoy-{uuid.uuid4().hex}"'
        assert post(envoy, key)[0] == 201

        def operation(method):
            status, _, body = http_request(envoy.operations_port, method, "/idempotency/key",
                                           {"idempotency-key": key})
            return status, json.loads(body)

        status, doc = operation("GET")
        assert status == 200 and doc["state"] == "completed" and doc["status"] == 201, doc
        status, doc = operation("DELETE")
        assert status == 200 and doc["forgotten"] == "completed", doc
        retry = post(envoy, key)
        assert retry[0] == 201 and "idempotent-replayed" not in retry[1]
        assert upstream.executions(key) == 2
        # The public listener has no such endpoint: the DELETE goes upstream.
        assert "x-payment-id" in envoy.request("DELETE", "/idempotency/key", {"idempotency-key": key})[1]
        assert post(envoy, key)[1].get("idempotent-replayed") == "true"
    finally:
        envoy.stop()


def test_the_readmes_operations_snippet_is_the_shipped_listener():
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("\n## Operations: inspect and forget a key\n", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert "- name: operations" in snippet
    assert snippet in text_of("envoy-local.yaml"), "the README's listener and envoy-local.yaml's differ"


def test_make_build_prints_the_modules_sha256():
    out = subprocess.run(["make", "-o", "setup", "build"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert f"sha256 {module_sha256()}" in out.stdout, out.stdout


def test_a_module_with_another_sha256_is_refused_and_requests_get_503(tmp_path, upstream, wasm_server):
    text = with_remote_module(text_of("envoy-local.yaml"), "deadbeef" * 8, wasm_server)
    envoy = serve(text, upstream, None, tmp_path)
    try:
        key = f'"own-envoy-{uuid.uuid4().hex}"'
        # The fetch is retried (retry_policy) before the plugin fails to load.
        deadline = time.time() + 60
        while "failed to load" not in envoy.log() and time.time() < deadline:
            time.sleep(0.2)
        assert "failed to load" in envoy.log()
        assert post(envoy, key)[0] == 503
        assert upstream.executions(key) == 0
    finally:
        envoy.stop()
