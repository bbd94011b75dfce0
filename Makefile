# `make up` runs the local gateway, `make test` the whole suite, `make check`
# the fast part (lint, types, unit tests). Each builds its own virtual
# environment from pyproject.toml on first use: `up` only what `up` needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UP_STAMP := $(VENV)/.up-stamp
STAMP := $(VENV)/.test-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: up test check lint types bench soak protos envoy-config clean

# owners-tools: the tools that own the formats (tests/owners), pinned in tools/versions.env.
include tools/owners.mk

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(UP_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[gateway]'
	touch $(UP_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[gateway,test]'
	touch $(STAMP) $(UP_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[gateway,test,bench]'
	touch $(BENCH_STAMP)

up: $(UP_STAMP)
	$(BIN)/mirror-sampler up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check extproc tests tools bench
	$(BIN)/ruff format --check extproc tests tools bench

types: $(STAMP)
	$(BIN)/mypy

# Lint, types, unit and property tests: under a minute.
check: lint types
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Debian's chromium, for the test that opens the static compare report in a
# browser (tests/service/test_compare_html.py); as root, or through sudo.
.PHONY: browser
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		command -v apt-get >/dev/null || { echo "browser: no chromium and no apt-get: the HTML report test skips"; exit 0; }; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		echo "installing chromium (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	}

# Everything: unit, service (every transport) and end-to-end (a real Envoy).
# One pytest process per core (TEST_JOBS=1 for one process).
TEST_JOBS ?= auto
test: lint types browser owners-tools
	MIRROR_TEST_ENVOY_1_39=$(abspath $(ENVOY_GATEWAY_ENVOY)) $(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

# The load generators wrk and hey (Debian/Ubuntu packages), installed here in
# the open rather than by a benchmark script; sudo when not root.
LOAD_GENERATORS := wrk hey
.PHONY: load-generators
load-generators:
	@missing=""; for t in $(LOAD_GENERATORS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null || { echo "bench needs$$missing on PATH: install them, then run make again"; exit 1; }; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		echo "installing$$missing (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# Native Envoy mirroring vs Envoy + sampler (each transport) vs inline;
# writes bench/results/latest.{md,json,png}.
bench: $(BENCH_STAMP) load-generators
	$(BIN)/python bench/run.py $(ARGS)

# Steady load per transport: sampler memory slope, open files and Envoy's
# ext_proc error counters, against stated bounds.
soak: $(BENCH_STAMP) load-generators
	$(BIN)/python bench/soak.py $(ARGS)

# Regenerates the ext_proc wire contract (tests/unit/test_wire.py checks it is fresh).
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# Regenerates envoy/envoy.yaml (and envoy-module.yaml; envoy-compare.yaml, envoy.yaml with the capture
# points of extproc/data/compare.yaml) for docker compose (tests check they are fresh).
envoy-config: $(UP_STAMP)
	$(BIN)/mirror-sampler envoy-config --for compose --inline module --config extproc/data/http-mirror.yaml --output envoy/envoy-module.yaml
	$(BIN)/mirror-sampler envoy-config --for compose --config extproc/data/http-mirror.yaml --output envoy/envoy.yaml
	$(BIN)/mirror-sampler compare envoy-config envoy/envoy.yaml --config extproc/data/compare.yaml --routes extproc/data/http-mirror.yaml \
		--observer mirror-sampler-compare:50061 --output envoy/envoy-compare.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
