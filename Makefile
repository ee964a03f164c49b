# shoprank: two commands on a fresh machine.
#   make demo   set up, start a local Ray head, submit the pipeline job (data, encoder, embedding, ranker, evaluation)
#   make test   set up, run the fast tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
DASHBOARD := http://127.0.0.1:8265
PRESET ?= demo

.PHONY: setup demo test test-all bench cluster-up cluster-down stop clean

setup: $(STAMP)

# torch first, pinned: it takes the CPU build on this disk; a bare `torch` requirement
# could pull a multi-GB CUDA build. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

cluster-up: setup
	$(BIN)/shoprank cluster up

cluster-down: setup
	$(BIN)/shoprank cluster down

stop: cluster-down

# The job runs every stage so far (data, encoder fine-tuning, embedding and index, ranking
# features, XGBoost ranker, offline evaluation); each is
# skipped when its config hash is unchanged, so a second `make demo` reuses the finished run.
demo: cluster-up
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
		python jobs/evaluate.py --config $(PRESET) --set run.root=$(CURDIR)/runs
	@echo "Run directory: $(CURDIR)/runs/$(PRESET)  (manifest: $(CURDIR)/runs/$(PRESET)/manifest.json)"
	@echo "Stop the local Ray head with: make stop"

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

bench: setup
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf runs test-output .pytest_cache
