"""The one idempotency_filter.wasm must load in APISIX: every function it
imports must exist in wasm-nginx-module 0.7.0's host table with the same
signature (a missing or mistyped import fails the module's instantiation)."""

import os

from conftest import DEFAULT_WASM, REPO
from wasm_module import read_abi_table, read_module

TABLE = os.path.join(REPO, "apisix", "wasm-nginx-module-0.7.0.abi")


def test_every_import_exists_in_apisix_with_the_same_signature():
    imports, _ = read_module(DEFAULT_WASM)
    table = read_abi_table(TABLE)
    assert imports, "the module imports host functions"
    problems = []
    for (module, name), (params, results) in sorted(imports.items()):
        host = table.get((module, name))
        if host is None:
            problems.append(f"{module}.{name} is not provided by APISIX")
        elif host[:2] != (params, results):
            problems.append(f"{module}.{name}: module wants {params}->{results}, APISIX has {host[0]}->{host[1]}")
    assert not problems, "\n".join(problems)


def test_the_imports_apisix_lacks_or_types_differently_are_absent():
    imports, _ = read_module(DEFAULT_WASM)
    names = {name for (_, name) in imports}
    assert "proxy_get_log_level" not in names
    assert "proxy_get_metric" not in names


def test_the_module_exports_what_apisix_looks_for():
    _, exports = read_module(DEFAULT_WASM)
    assert "proxy_abi_version_0_2_1" in exports
    for callback in ["proxy_on_memory_allocate", "proxy_on_context_create", "proxy_on_configure",
                     "proxy_on_request_headers", "proxy_on_request_body", "proxy_on_http_call_response",
                     "proxy_on_done", "proxy_on_delete", "_initialize"]:
        assert callback in exports, callback


def test_the_table_parser_reads_what_the_file_says():
    table = read_abi_table(TABLE)
    assert table[("env", "proxy_get_metric")][:2] == (("i32", "i64"), ("i32",))
    assert table[("env", "proxy_set_shared_data")][2] == "UNIMPLEMENTED"
    assert table[("wasi_snapshot_preview1", "proc_exit")][:2] == (("i32",), ())
    assert ("env", "proxy_get_log_level") not in table
