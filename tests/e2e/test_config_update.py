"""A configuration update while a request's call is out (Envoy).

Envoy deletes a replaced configuration's root context once the last stream
that used it has ended, and deleting a root cancels the HTTP calls it made.
The filter's root owns the calls that must outlive their request (a
forwarded request whose client left, the Redis store's batches), so it
answers `on_done` with "not yet" until they are settled, keeps renewing
their claims from its tick, and then says it is done.

Here the listener comes from a file (LDS) and is replaced with a plugin
configuration that differs in one field, while a forwarded payment whose
client gave up is held by the upstream past the lock. Envoy drains the old
listener in a second (`--drain-time-s 1`). Before the fix the call was
cancelled with the old root: nothing was recorded, the claim lapsed
unrenewed, and the retry ran the payment again.
"""

import json
import os
import time
import uuid

import pytest
import yaml

from conftest import redis_store, wait_for
from gateway import Envoy, free_port, render


class ListenerFromFile(Envoy):
    """Envoy whose listeners come from a file it watches (LDS), so that
    update() replaces them as a control plane's push would."""

    def __init__(self, plugin_config, upstream_port, **kw):
        # The listener's port is part of its identity: an update keeps it.
        super().__init__(plugin_config, upstream_port, listen_port=free_port(), concurrency=1,
                         extra_args=["--drain-time-s", "1"], **kw)
        self.lds_path = os.path.join(self.workdir, "lds.json")

    def rendered(self, plugin_config):
        """The bootstrap, which names the listener file; writes that file."""
        config = self.update(plugin_config)
        config["dynamic_resources"] = {"lds_config": {
            "path_config_source": {"path": self.lds_path}, "resource_api_version": "V3"}}
        config["node"] = {"id": "gateway", "cluster": "gateway"}
        return json.dumps(config)

    def update(self, plugin_config, vm_id="idempotency"):
        """Writes the listeners for `plugin_config`, in the VM `vm_id`;
        returns the rest of the configuration."""
        config = yaml.safe_load(render(self.port, self.admin_port or 0, self.upstream_port, plugin_config,
                                       self.wasm_path, vm_id=vm_id, webdis_port=self.webdis_port,
                                       unreachable_port=self._unreachable.getsockname()[1]))
        listeners = config["static_resources"].pop("listeners")
        for listener in listeners:
            listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        # Envoy reloads the file when it is moved into place.
        with open(self.lds_path + ".tmp", "w") as f:
            json.dump({"resources": listeners}, f)
        os.replace(self.lds_path + ".tmp", self.lds_path)
        return config

    def listener_updates(self):
        return int(json.loads(self.admin("/stats?format=json&filter=^listener_manager.listener_modified$"))
                   ["stats"][0]["value"])


def post(gw, key, hold=None, timeout=30):
    headers = {"content-type": "application/json", "idempotency-key": key}
    if hold:
        headers["x-demo-hold"] = hold
    return gw.request("POST", "/payments", headers, b'{"amount": 1}', timeout=timeout)


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_forwarded_payment_survives_a_configuration_update_with_its_client_gone(upstream, store, request):
    lock_s = 5
    config = {"forward": {"upstream": "upstream"}, "lock_timeout_seconds": lock_s}
    webdis_port = None
    if store == "redis":
        backend = request.getfixturevalue("redis_backend")
        webdis_port = backend.webdis_port
        # Store calls short enough for the lock to be renewable.
        config["store"] = redis_store(f"idem-update-{uuid.uuid4().hex[:8]}:", timeout_ms=500)
    gw = ListenerFromFile(config, upstream.port, webdis_port=webdis_port).start()
    try:
        key, gate = f"update-{uuid.uuid4()}", f"hold-{uuid.uuid4()}"
        with pytest.raises(OSError):
            post(gw, key, hold=gate, timeout=0.5)  # the client gives up
        deadline = time.time() + 10
        while not upstream.started(key) and time.time() < deadline:
            time.sleep(0.05)
        assert upstream.started(key), "the payment reached the upstream"

        # One field changes: a new plugin configuration, a new root context.
        gw.update({**config, "max_response_body_bytes": 1024 * 1024 + 1})
        deadline = time.time() + 10
        while gw.listener_updates() < 1 and time.time() < deadline:
            time.sleep(0.1)
        assert gw.listener_updates() == 1
        # Past the old listener's drain and past the lock: the claim is
        # still held (renewed by the old root's tick).
        time.sleep(lock_s + 1.5)
        status, _, _ = post(gw, key)
        assert status == 409, "the payment still runs: its claim was renewed"

        upstream.release(gate)
        deadline = time.time() + 10
        while time.time() < deadline:
            status, headers, _ = post(gw, key)
            if status != 409:
                break
            time.sleep(0.2)
        assert status == 201
        assert headers.get("idempotent-replayed") == "true", "the answer was recorded after the update"
        assert upstream.executions(key) == 1
        assert "configuration replaced: its root stays" in gw.log()
        deadline = time.time() + 5
        while "root has settled its calls and goes" not in gw.log() and time.time() < deadline:
            time.sleep(0.2)
        assert "root has settled its calls and goes" in gw.log()
        assert "could not go" not in gw.log()
    finally:
        gw.stop()


def test_a_new_vm_ends_the_old_vms_calls_as_a_killed_gateway_would(upstream, redis_backend):
    """What the root cannot keep: an update that changes the module or its
    vm_config (here its vm_id) starts a new VM, and Envoy destroys the old
    one once its last stream has ended, with the root that waits for its
    calls. Documented in the README's failure table as a killed gateway:
    the claim lapses after the lock and a retry runs again. (The Redis
    store, since a new vm_id also starts new shared data.)"""
    lock_s = 5
    config = {"forward": {"upstream": "upstream"}, "lock_timeout_seconds": lock_s,
              "store": redis_store(f"idem-vm-{uuid.uuid4().hex[:8]}:", timeout_ms=500)}
    gw = ListenerFromFile(config, upstream.port, webdis_port=redis_backend.webdis_port).start()
    try:
        key, gate = f"vm-{uuid.uuid4()}", f"hold-{uuid.uuid4()}"
        with pytest.raises(OSError):
            post(gw, key, hold=gate, timeout=0.5)
        deadline = time.time() + 10
        while not upstream.started(key) and time.time() < deadline:
            time.sleep(0.05)
        assert upstream.started(key)
        gw.update(config, vm_id="idempotency-next")
        time.sleep(lock_s + 1.5)
        try:
            status, headers, _ = post(gw, key)
        finally:
            upstream.release(gate)
        assert (status, headers.get("idempotent-replayed")) == (201, None), "the claim lapsed: it ran again"
        wait_for(lambda: upstream.executions(key) == 2, what="the held original to finish too")
    finally:
        gw.stop()
