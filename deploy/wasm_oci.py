#!/usr/bin/env python3
"""Writes the filter as a Wasm OCI image, in an OCI image layout on disk,
without Docker or a registry (make oci).

Two images of the same module, one manifest each in the layout's index:

* `<version>`: the *oci* variant of the Wasm image specification that Istio
  and Envoy Gateway pull (solo-io/wasm spec.md): an OCI image manifest whose
  config is `application/vnd.module.wasm.config.v1+json` and whose exactly
  two layers are that config and the raw module,
  `application/vnd.module.wasm.content.layer.v1+wasm`. (Their fetchers take
  the layer of that media type from an image of exactly two layers.)
* `<version>-compat`: the *compat* variant: one
  `application/vnd.oci.image.layer.v1.tar+gzip` layer holding `plugin.wasm`,
  which the same fetchers also accept, and any OCI registry stores.

No tool from a package registry writes these media types to a layout
offline (oras, crane and skopeo are Go binaries outside pip/apt/npm here;
PyPI's `oras` talks to registries only), hence these few lines. Push the
layout with any OCI tool, e.g.
`oras cp --from-oci-layout target/oci/idempotency-filter:0.1.0 REGISTRY/idempotency-filter:0.1.0`.

Usage: wasm_oci.py [--wasm PATH] [--out DIR] [--version V]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WASM = os.path.join(REPO, "target", "wasm32-wasip1", "release", "idempotency_filter.wasm")

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"


def canonical(doc):
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    def __init__(self, out):
        self.out = out
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(os.path.join(out, "blobs", "sha256"))

    def blob(self, data, media_type, annotations=None):
        """Stores data under its digest; returns its descriptor."""
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.out, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        desc = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc

    def finish(self, manifests):
        with open(os.path.join(self.out, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with open(os.path.join(self.out, "index.json"), "wb") as f:
            f.write(canonical({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}))


def compat_layer(wasm):
    """plugin.wasm in a tar.gz, byte for byte the same on every build."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size, info.mode, info.mtime = len(wasm), 0o444, 0
        tar.addfile(info, io.BytesIO(wasm))
    return gzip.compress(raw.getvalue(), mtime=0), hashlib.sha256(raw.getvalue()).hexdigest()


def build(wasm_path, out, version):
    with open(wasm_path, "rb") as f:
        wasm = f.read()
    if wasm[:4] != b"\0asm":
        sys.exit(f"{wasm_path} is not a Wasm module")
    layout = Layout(out)
    annotations = {"org.opencontainers.image.version": version,
                   "org.opencontainers.image.description": "HTTP idempotency filter (proxy-wasm) for Envoy",
                   "org.opencontainers.image.licenses": "Apache-2.0"}
    # The oci variant: the runtime config (the spec's fields), as the
    # manifest's config and as the first of the two layers.
    runtime = canonical({"type": "envoy_proxy", "abiVersions": ["v0.2.1"],
                         "config": {"rootIds": ["idempotency"]}})
    config = layout.blob(runtime, WASM_CONFIG)
    layers = [layout.blob(runtime, WASM_CONFIG, {TITLE: "runtime-config.json"}),
              layout.blob(wasm, WASM_LAYER, {TITLE: "plugin.wasm"})]
    oci = canonical({"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers,
                     "annotations": annotations})
    # The compat variant: an ordinary image config, one tar.gz layer.
    gz, diff_id = compat_layer(wasm)
    image_config = canonical({"architecture": "wasm", "os": "wasip1",
                              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
                              "config": {}})
    compat = canonical({"schemaVersion": 2, "mediaType": MANIFEST,
                        "config": layout.blob(image_config, OCI_CONFIG),
                        "layers": [layout.blob(gz, TAR_GZIP, {TITLE: "plugin.wasm"})],
                        "annotations": annotations})
    manifests = [layout.blob(oci, MANIFEST, {REF_NAME: version}),
                 layout.blob(compat, MANIFEST, {REF_NAME: f"{version}-compat"})]
    layout.finish(manifests)
    return manifests


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    with open(os.path.join(REPO, "Cargo.toml"), "rb") as f:
        default_version = tomllib.load(f)["package"]["version"]
    ap.add_argument("--wasm", default=WASM)
    ap.add_argument("--out", default=os.path.join(REPO, "target", "oci", "idempotency-filter"))
    ap.add_argument("--version", default=default_version)
    args = ap.parse_args(argv)
    if not os.path.exists(args.wasm):
        sys.exit(f"{args.wasm} is missing: run make build first")
    manifests = build(args.wasm, args.out, args.version)
    print(f"wrote the OCI image layout {os.path.relpath(args.out)}")
    for m in manifests:
        print(f"  {m['annotations'][REF_NAME]:<16} {m['digest']}")


if __name__ == "__main__":
    main()
