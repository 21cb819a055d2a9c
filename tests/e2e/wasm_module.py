"""Reads a WebAssembly module's imports and exports with their signatures
(the binary format's type, import and export sections), for the ABI tests."""

VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}


def _leb(data, i):
    result = shift = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i


def _name(data, i):
    n, i = _leb(data, i)
    return data[i:i + n].decode(), i + n


def read_module(path):
    """Returns (imports, exports): imports as {(module, name): (params, results)}
    for functions, exports as a set of names."""
    data = open(path, "rb").read()
    assert data[:4] == b"\0asm", "not a wasm module"
    types, imports, exports = [], {}, set()
    i = 8
    while i < len(data):
        section, i = data[i], i + 1
        size, i = _leb(data, i)
        end = i + size
        if section == 1:  # types
            count, j = _leb(data, i)
            for _ in range(count):
                assert data[j] == 0x60
                j += 1
                n, j = _leb(data, j)
                params = tuple(VALTYPES[data[j + k]] for k in range(n))
                j += n
                n, j = _leb(data, j)
                results = tuple(VALTYPES[data[j + k]] for k in range(n))
                j += n
                types.append((params, results))
        elif section == 2:  # imports
            count, j = _leb(data, i)
            for _ in range(count):
                module, j = _name(data, j)
                name, j = _name(data, j)
                kind, j = data[j], j + 1
                if kind == 0:
                    index, j = _leb(data, j)
                    imports[(module, name)] = types[index]
                elif kind == 1:  # table
                    j += 1
                    flags, j = _leb(data, j)
                    _, j = _leb(data, j)
                    if flags & 1:
                        _, j = _leb(data, j)
                elif kind == 2:  # memory
                    flags, j = _leb(data, j)
                    _, j = _leb(data, j)
                    if flags & 1:
                        _, j = _leb(data, j)
                elif kind == 3:  # global
                    j += 2
        elif section == 7:  # exports
            count, j = _leb(data, i)
            for _ in range(count):
                name, j = _name(data, j)
                j += 1
                _, j = _leb(data, j)
                exports.add(name)
        i = end
    return imports, exports


def read_abi_table(path):
    """Parses apisix/wasm-nginx-module-*.abi: {(module, name): (params, results, note)}."""
    table = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        module, name, rest = line.split(" ", 2)
        sig, _, note = rest.partition(") -> (")
        params = tuple(p.strip() for p in sig.strip("(").split(",") if p.strip())
        results_text, _, note = note.partition(")")
        results = tuple(r.strip() for r in results_text.split(",") if r.strip())
        table[(module, name)] = (params, results, note.strip())
    return table
