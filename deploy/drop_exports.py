#!/usr/bin/env python3
"""Removes named exports from a WebAssembly module, in place.

`make build` runs it on the filter: the proxy-wasm SDK (0.2.5) exports
`proxy_on_log`, and Envoy enters the VM for it once per stream although the
filter does nothing there (Envoy only calls the callbacks a module exports;
APISIX never calls this one). Without the export that VM entry is gone
(BENCHMARKS.md: the per-request cost with and without it). The function's
code stays in the module, unexported; nothing else changes. Idempotent: a
module without the export is left as it is.

usage: drop_exports.py MODULE.wasm [NAME ...]   (default: UNUSED_SDK_EXPORTS)
"""

import sys

EXPORT_SECTION = 7
# The SDK's exports the filter has no use for. proxy_on_done stays: the
# filter needs it, and APISIX logs an error for each request without it.
UNUSED_SDK_EXPORTS = ("proxy_on_log",)


def leb(data, i):
    """An unsigned LEB128 at data[i]: (value, index after it)."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def to_leb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def drop_exports(module, names):
    """The module without the exports `names`, and the names it dropped."""
    if module[:4] != b"\0asm":
        raise ValueError("not a WebAssembly module")
    out, dropped, i = bytearray(module[:8]), [], 8
    while i < len(module):
        section = module[i]
        size, body = leb(module, i + 1)
        end = body + size
        if section != EXPORT_SECTION:
            out += module[i:end]
            i = end
            continue
        count, j = leb(module, body)
        kept = []
        for _ in range(count):
            start = j
            length, j = leb(module, j)
            name = module[j:j + length].decode()
            j += length + 1  # the name, then the export's kind
            _, j = leb(module, j)  # its index
            if name in names:
                dropped.append(name)
            else:
                kept.append(module[start:j])
        content = to_leb(len(kept)) + b"".join(kept)
        out += bytes([EXPORT_SECTION]) + to_leb(len(content)) + content
        i = end
    return bytes(out), dropped


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    path, names = sys.argv[1], set(sys.argv[2:] or UNUSED_SDK_EXPORTS)
    with open(path, "rb") as f:
        module = f.read()
    trimmed, dropped = drop_exports(module, names)
    if dropped:
        with open(path, "wb") as f:
            f.write(trimmed)
        print(f"{path}: export {', '.join(sorted(dropped))} removed")


if __name__ == "__main__":
    main()
