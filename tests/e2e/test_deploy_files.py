"""Static checks of what users deploy without us: the docker demo (no Docker
engine runs here) and the APISIX configuration. Every configuration the
files carry goes through the filter's own parser (examples/check_config)."""

import json
import os
import re
import subprocess

import pytest
import yaml

from conftest import REPO


def load(path):
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


def check_configs(docs):
    """Runs the filter's configuration parser on each document."""
    paths = []
    for i, doc in enumerate(docs):
        path = os.path.join(REPO, "target", f"deploy-conf-{i}.json")
        with open(path, "w") as f:
            f.write(doc if isinstance(doc, str) else json.dumps(doc))
        paths.append(path)
    out = subprocess.run(["cargo", "run", "-q", "--example", "check_config", "--", *paths],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def compose():
    return load("docker-compose.yml")


def test_compose_defines_the_whole_topology(compose):
    assert set(compose["services"]) == {"redis", "webdis", "payments", "envoy-a", "envoy-b", "apisix"}


def test_every_mounted_path_exists_and_the_wasm_is_read_only(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert source.startswith("./"), f"{name}: bind mounts are repo paths ({volume})"
            assert os.path.exists(os.path.join(REPO, source)), f"{name}: {source} does not exist"
            if source.endswith(".wasm"):
                assert mode == ["ro"], f"{name}: the .wasm must be mounted read-only"


def test_every_service_has_a_health_check_and_waits_for_healthy_dependencies(compose):
    for name, service in compose["services"].items():
        assert "healthcheck" in service, name
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
    for name in ("envoy-a", "envoy-b", "apisix"):
        assert {"webdis", "payments"} <= set(compose["services"][name]["depends_on"]), name


def test_ports_the_readme_names_are_published(compose):
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published[int(port.split(":")[0])] = name
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("### The Docker demo", 1)[1].split("\n## ", 1)[0]
    named = {int(p) for p in re.findall(r"localhost:(\d+)", section)}
    assert named, "the README's docker section names ports"
    assert named <= set(published), f"README names unpublished ports: {named - set(published)}"
    for service in re.findall(r"`(envoy-a|envoy-b|apisix|webdis|redis|payments)`", section):
        assert service in compose["services"]


def test_the_docker_envoy_config_points_at_compose_services(compose):
    envoy = load("envoy/envoy-docker.yaml")
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for name, cluster in clusters.items():
        host = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"]
        assert host in compose["services"], f"cluster {name} points at {host}"
    wasm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"]
    assert wasm["failure_policy"] == "FAIL_RELOAD"
    assert wasm["allow_on_headers_stop_iteration"] is True
    conf = json.loads(wasm["configuration"]["value"])
    assert conf["store"]["cluster"] in clusters
    # The route that bypasses the filter covers exactly the methods it does
    # not protect: one inverted exact match per method of the configuration.
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    bypass = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "typed_per_filter_config" in r]
    assert len(bypass) == 1
    assert bypass[0]["typed_per_filter_config"][hcm["http_filters"][0]["name"]]["disabled"] is True
    matchers = bypass[0]["match"]["headers"]
    assert all(m["name"] == ":method" and m["invert_match"] is True for m in matchers)
    methods = conf.get("methods", ["POST", "PATCH"])
    exact = [m["string_match"]["exact"] for m in matchers]
    assert sorted(exact) == sorted(methods)
    # The access log reads the filter state the configuration names.
    log_format = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    assert f"%FILTER_STATE(wasm.{conf['outcome_property']}:PLAIN)%" in log_format
    code, out = check_configs([conf])
    assert code == 0, out


def test_apisix_routes_carry_configurations_the_filter_accepts():
    routes = load("apisix/apisix.yaml")["routes"]
    confs = [r["plugins"]["idempotency"]["conf"] for r in routes]
    assert confs and all(c["host"] == "apisix" for c in confs)
    code, out = check_configs(confs)
    assert code == 0, out
    # The Admin API script carries the same configurations.
    script = open(os.path.join(REPO, "apisix", "admin-api.sh")).read()
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'\n", script, re.S)]
    assert [b["plugins"]["idempotency"]["conf"] for b in bodies] == confs


def test_apisix_config_loads_the_wasm_the_compose_file_mounts(compose):
    config = load("apisix/config.yaml")
    plugin = config["wasm"]["plugins"][0]
    assert plugin["name"] == "idempotency"
    mounts = [v.split(":")[1] for v in compose["services"]["apisix"]["volumes"]]
    assert plugin["file"] in mounts


def test_a_local_store_on_apisix_is_refused_with_a_clear_line():
    code, out = check_configs([{"host": "apisix", "forward": {"upstream": "payments:8081"}}])
    assert code == 1
    assert "store.type: the local store needs shared data, which APISIX does not provide" in out


def test_envoy_accepts_the_docker_config(tmp_path):
    """Envoy's own validation mode (no sockets, no DNS) on the docker config,
    with the module path pointed at the built filter."""
    from gateway import DEFAULT_ENVOY, DEFAULT_WASM
    text = open(os.path.join(REPO, "envoy", "envoy-docker.yaml")).read()
    assert "/etc/envoy/idempotency_filter.wasm" in text
    path = tmp_path / "envoy.yaml"
    path.write_text(text.replace("/etc/envoy/idempotency_filter.wasm", DEFAULT_WASM))
    envoy = os.environ.get("ENVOY_BIN") or DEFAULT_ENVOY
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr


def test_the_admin_api_config_has_what_admin_api_sh_needs():
    config = load("apisix/config-traditional.yaml")
    deployment = config["deployment"]
    assert deployment["role"] == "traditional"
    assert deployment["role_traditional"]["config_provider"] == "etcd"
    assert deployment["admin"]["admin_key"][0]["key"], "admin-api.sh sends it as X-API-KEY"
    assert config["apisix"].get("enable_admin", True) is True
    assert config["wasm"] == load("apisix/config.yaml")["wasm"], "the same plugin declaration"
