"""Checks of what a newcomer reads first: the LICENSE, the README's
prerequisites and its list of the tests `make test` skips."""

import ast
import os
import re
import tomllib

from conftest import PROFILES, REPO


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def section(readme, title):
    return readme.split(title, 1)[1].split("\n#", 1)[0]


def test_license_is_the_apache_2_0_text_cargo_toml_names():
    cargo = tomllib.loads(read("Cargo.toml"))
    assert cargo["package"]["license"] == "Apache-2.0"
    text = read("LICENSE")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # The whole text, not an excerpt: all nine sections.
    assert all(f"\n   {n}. " in text for n in range(1, 10))


def test_readme_prerequisites_name_rustup_the_rust_version_venv_and_linux():
    rust_version = tomllib.loads(read("Cargo.toml"))["package"]["rust-version"]
    pre = section(read("README.md"), "### Prerequisites")
    assert "rustup" in pre
    assert f"Rust **{rust_version}** or newer" in pre, f"rust-version is {rust_version}"
    assert "python3-venv" in pre
    assert "Linux" in pre


def skipping_tests():
    """Test functions with a pytest.skip of their own, and those that use a
    profile conftest skips on the other stores (a `store` of its own)."""
    local_only = {name for name, conf in PROFILES.items() if "store" in conf}
    found = set()
    for name in os.listdir(os.path.join(REPO, "tests", "e2e")):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        tree = ast.parse(read(os.path.join("tests", "e2e", name)))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            src = ast.unparse(fn)
            if "pytest.skip(" in src or any(f"gateways({p!r})" in src for p in local_only):
                found.add(fn.name)
    return found


def test_the_readme_lists_every_test_make_test_may_skip():
    table = section(read("README.md"), "### What `make test` skips, and why")
    listed = set(re.findall(r"`(test_\w+)`", table))
    skipping = skipping_tests()
    assert skipping, "the scan finds the skipping tests"
    assert skipping - listed == set(), "skipping tests missing from the README's table"
    assert listed - skipping == set(), "the README's table names tests that no longer skip"
