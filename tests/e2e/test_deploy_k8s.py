"""What the Istio and Envoy Gateway manifests (deploy/) give Envoy, checked
without a cluster: each manifest's patches are applied here as Istio and
Envoy Gateway apply them, to a minimal Envoy configuration of the kind they
generate; Envoy validates the result (`--mode validate`) and serves a keyed
request and its replay through it. And the OCI image `make oci` writes:
digests, sizes and media types, and the module where Istio's and Envoy
Gateway's image fetchers look for it."""

import copy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import uuid

import pytest
import yaml

from conftest import REPO, post
from gateway import DEFAULT_ENVOY, DEFAULT_WASM, Envoy
from test_own_envoy import wasm_server  # noqa: F401  (a fixture)

ISTIO = os.path.join(REPO, "deploy", "istio", "idempotency-envoyfilter.yaml")
EG = os.path.join(REPO, "deploy", "envoy-gateway", "idempotency-envoypatchpolicy.yaml")
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
with open(os.path.join(REPO, "Cargo.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["package"]["version"]
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def load(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    return docs[0]


def hcm(http_filters):
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": HCM_TYPE, "stat_prefix": "gateway",
                             "route_config": {"name": "r", "virtual_hosts": [{
                                 "name": "all", "domains": ["*"],
                                 "routes": [{"match": {"prefix": "/"},
                                             "route": {"cluster": "backend", "timeout": "30s"}}]}]},
                             "http_filters": http_filters}}


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def static_cluster(name, port):
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def bootstrap(listener, clusters):
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": [listener], "clusters": clusters}}


def wasm_config(http_filter):
    assert http_filter["typed_config"]["@type"] == WASM_TYPE
    return http_filter["typed_config"]["config"]


def plugin_config(http_filter):
    return json.loads(wasm_config(http_filter)["configuration"]["value"])


def validate(tmp_path, doc):
    path = tmp_path / "bootstrap.yaml"
    path.write_text(json.dumps(doc, indent=1))
    envoy = os.environ.get("ENVOY_BIN") or DEFAULT_ENVOY
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr


def serve_and_check(tmp_path, doc, upstream):
    path = tmp_path / "served.yaml"
    path.write_text(json.dumps(doc, indent=1))
    (tmp_path / "run").mkdir()
    envoy = Envoy({}, upstream.port, template=str(path), workdir=str(tmp_path / "run")).start()
    try:
        key = f'"k8s-{uuid.uuid4().hex}"'
        first, again = post(envoy, key), post(envoy, key)
        assert first[0] == 201 and "idempotent-replayed" not in first[1], first
        assert again[0] == 201 and again[1].get("idempotent-replayed") == "true", again
        assert upstream.executions(key) == 1
    finally:
        envoy.stop()


# ------------------------------------------------------------------ Istio


def istio_bootstrap(upstream_port, webdis_port):
    """The gateway configuration the EnvoyFilter makes: the HTTP_FILTER patch
    before the router, its config_discovery answered by the EXTENSION_CONFIG
    patch (ECDS), the remote module a local file (istio-agent's download),
    the LISTENER patch merged."""
    patches = load(ISTIO)["spec"]["configPatches"]
    by = {}
    for p in patches:
        by.setdefault(p["applyTo"], []).append(p)
    assert set(by) == {"EXTENSION_CONFIG", "HTTP_FILTER", "LISTENER"}
    ext = by["EXTENSION_CONFIG"][0]["patch"]
    assert ext["operation"] == "ADD"
    http = by["HTTP_FILTER"][0]
    assert http["match"]["context"] == "GATEWAY"
    assert http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert http["patch"]["operation"] == "INSERT_BEFORE"
    discovery = http["patch"]["value"]
    assert discovery["name"] == ext["value"]["name"]
    assert discovery["config_discovery"]["type_urls"] == [ext["value"]["typed_config"]["@type"]]
    delivered = copy.deepcopy(ext["value"])
    code = wasm_config(delivered)["vm_config"]["code"]
    assert code["remote"]["http_uri"]["uri"].startswith(("oci://", "https://"))
    assert re.fullmatch(r"[0-9a-f]{64}", code["remote"]["sha256"])
    wasm_config(delivered)["vm_config"]["code"] = {"local": {"filename": DEFAULT_WASM}}
    listener = {"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [hcm([delivered, ROUTER])]}]}
    merge = by["LISTENER"][0]
    assert merge["patch"]["operation"] == "MERGE" and merge["match"]["context"] == "GATEWAY"
    listener.update(merge["patch"]["value"])
    store = plugin_config(delivered)["store"]
    return bootstrap(listener, [static_cluster("backend", upstream_port),
                                static_cluster(store["cluster"], webdis_port)]), delivered


def test_istio_envoyfilter_sets_what_wasmplugin_cannot():
    _, delivered = istio_bootstrap(1, 2)
    config = wasm_config(delivered)
    assert config["allow_on_headers_stop_iteration"] is True
    assert config["failure_policy"] == "FAIL_RELOAD"
    assert plugin_config(delivered)["store"]["cluster"].startswith("outbound|7379||")


def test_istio_envoyfilter_result_validates_and_serves(tmp_path, upstream, redis_backend):
    doc, _ = istio_bootstrap(upstream.port, redis_backend.webdis_port)
    assert doc["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] > 1048576
    validate(tmp_path, doc)
    serve_and_check(tmp_path, doc, upstream)


# ------------------------------------------------------------ Envoy Gateway


def pointer_add(doc, path, value):
    """RFC 6902 `add` at a JSON pointer (arrays: insert before the index)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    at = doc
    for p in parts[:-1]:
        at = at[int(p)] if isinstance(at, list) else at[p]
    last = parts[-1]
    if isinstance(at, list):
        at.insert(len(at) if last == "-" else int(last), value)
    else:
        at[last] = value


def eg_bootstrap(upstream_port):
    """An Envoy Gateway-like listener (HTTP: the HCM in the default filter
    chain) with the EnvoyPatchPolicy applied as Envoy Gateway applies it."""
    policy = load(EG)
    assert policy["spec"]["type"] == "JSONPatch"
    listener = {"name": None, "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "default_filter_chain": {"filters": [hcm([ROUTER])]}}
    clusters = [static_cluster("backend", upstream_port)]
    for patch in policy["spec"]["jsonPatches"]:
        op = patch["operation"]
        assert op["op"] == "add"
        if patch["type"].endswith("Cluster"):
            assert op["path"] == "" and op["value"]["name"] == patch["name"]
            clusters.append(copy.deepcopy(op["value"]))
        else:
            assert patch["type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
            listener["name"] = listener["name"] or patch["name"]
            assert patch["name"] == listener["name"], "all patches on one listener"
            pointer_add(listener, op["path"], copy.deepcopy(op["value"]))
    return bootstrap(listener, clusters)


def eg_filter(doc):
    return doc["static_resources"]["listeners"][0]["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"][0]


def test_envoy_gateway_patch_sets_what_envoyextensionpolicy_cannot():
    doc = eg_bootstrap(1)
    config = wasm_config(eg_filter(doc))
    assert config["allow_on_headers_stop_iteration"] is True
    assert config["failure_policy"] == "FAIL_RELOAD"
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert config["vm_config"]["code"]["remote"]["http_uri"]["cluster"] in clusters
    assert plugin_config(eg_filter(doc))["store"]["cluster"] in clusters
    filters = doc["static_resources"]["listeners"][0]["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == ["idempotency", "envoy.filters.http.router"]


def test_envoy_gateway_patch_result_validates(tmp_path):
    validate(tmp_path, eg_bootstrap(1))


def test_envoy_gateway_patch_result_serves(tmp_path, upstream, redis_backend, wasm_server):  # noqa: F811
    """The module downloaded from a URL (a local server here) and checked
    against its sha256, the store on Webdis: clusters pointed at 127.0.0.1."""
    doc = eg_bootstrap(upstream.port)
    remote = wasm_config(eg_filter(doc))["vm_config"]["code"]["remote"]
    remote["http_uri"]["uri"] = f"http://127.0.0.1:{wasm_server}/idempotency_filter.wasm"
    with open(DEFAULT_WASM, "rb") as f:
        remote["sha256"] = hashlib.sha256(f.read()).hexdigest()
    clusters = doc["static_resources"]["clusters"]
    ports = {remote["http_uri"]["cluster"]: wasm_server,
             plugin_config(eg_filter(doc))["store"]["cluster"]: redis_backend.webdis_port}
    for i, c in enumerate(clusters):
        if c["name"] in ports:
            clusters[i] = static_cluster(c["name"], ports[c["name"]])
    serve_and_check(tmp_path, doc, upstream)


# ---------------------------------------------------------------- README


def test_the_readme_says_why_wasmplugin_is_not_enough():
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("### Istio and Envoy Gateway", 1)[1].split("\n## ", 1)[0]
    for needed in ("allow_on_headers_stop_iteration", "WasmPlugin", "EnvoyExtensionPolicy", "hang",
                   "deploy/istio/idempotency-envoyfilter.yaml",
                   "deploy/envoy-gateway/idempotency-envoypatchpolicy.yaml", "make oci", "8382"):
        assert needed in section, needed


# -------------------------------------------------------------------- OCI


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("oci") / "layout"
    run = subprocess.run([sys.executable, os.path.join(REPO, "deploy", "wasm_oci.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out


def blob(layout, desc):
    algo, _, hexdigest = desc["digest"].partition(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, "a blob's name is its digest"
    assert len(data) == desc["size"], desc
    return data


def test_oci_layout_index_and_every_digest(oci_layout):
    assert json.loads((oci_layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((oci_layout / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == [VERSION, f"{VERSION}-compat"]
    referenced = set()
    for m in index["manifests"]:
        assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        manifest = json.loads(blob(oci_layout, m))
        referenced.add(m["digest"])
        assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == m["mediaType"]
        for desc in [manifest["config"], *manifest["layers"]]:
            blob(oci_layout, desc)
            referenced.add(desc["digest"])
    stored = {"sha256:" + p.name for p in (oci_layout / "blobs" / "sha256").iterdir()}
    assert stored == referenced, "no missing and no stray blobs"


def manifest_of(layout, ref):
    index = json.loads((layout / "index.json").read_text())
    [m] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == ref]
    return json.loads(blob(layout, m))


def module_bytes():
    with open(DEFAULT_WASM, "rb") as f:
        return f.read()


def test_oci_variant_is_what_istio_and_envoy_gateway_pull(oci_layout):
    """Their fetchers' rule for the oci variant: exactly two layers, the
    module the raw bytes of the one of type ...wasm.content.layer.v1+wasm."""
    manifest = manifest_of(oci_layout, VERSION)
    assert manifest["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json"
    runtime = json.loads(blob(oci_layout, manifest["config"]))
    assert runtime["type"] == "envoy_proxy"
    assert len(manifest["layers"]) == 2
    [wasm] = [l for l in manifest["layers"] if l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm"]
    assert blob(oci_layout, wasm) == module_bytes()
    assert wasm["annotations"]["org.opencontainers.image.title"] == "plugin.wasm"
    # The ABI the module exports is the one the runtime config names.
    assert b"proxy_abi_version_0_2_1" in module_bytes() and runtime["abiVersions"] == ["v0.2.1"]


def test_compat_variant_holds_plugin_wasm_in_one_tar_gzip_layer(oci_layout):
    manifest = manifest_of(oci_layout, f"{VERSION}-compat")
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    raw = gzip.decompress(blob(oci_layout, layer))
    config = json.loads(blob(oci_layout, manifest["config"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames() == ["plugin.wasm"]
        assert tar.extractfile("plugin.wasm").read() == module_bytes()


def test_oci_layout_is_the_same_bytes_on_every_build(oci_layout, tmp_path):
    again = tmp_path / "again"
    subprocess.run([sys.executable, os.path.join(REPO, "deploy", "wasm_oci.py"), "--out", str(again)],
                   check=True, capture_output=True, timeout=120)
    assert (again / "index.json").read_bytes() == (oci_layout / "index.json").read_bytes()


def test_skopeo_reads_and_copies_the_layout(oci_layout, tmp_path):
    """An independent reader (skopeo checks every digest as it copies)."""
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    for ref in (VERSION, f"{VERSION}-compat"):
        out = subprocess.run(["skopeo", "copy", f"oci:{oci_layout}:{ref}", f"dir:{tmp_path / ref}"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
