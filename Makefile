# shoprank: two commands on a fresh machine.
#   make demo   set up, start a local Ray head, submit the pipeline job (data, encoder, embedding, ranker,
#               evaluation), then deploy the Serve app (variants A and B) and print its URL
#   make test   set up, run the fast tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (CI here), a module without a .pyc is compiled
# again by every process that imports it, every Ray worker included.
UV_INSTALL := $(BIN)/python -m uv pip install --quiet --compile-bytecode --python $(BIN)/python
TORCH := torch==2.13.0
DASHBOARD := http://127.0.0.1:8265
PRESET ?= demo
# The browser tests drive Debian's chromium (playwright cannot download its own browsers here).
CHROMIUM := /usr/bin/chromium
PROMTOOL := /usr/bin/promtool
HAPROXY := /usr/sbin/haproxy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup bytecode postgres haproxy demo test test-all bench cluster-up cluster-down stop clean clean-all

setup: $(STAMP)

# torch first, pinned, by pip: it takes the CPU build on this disk; a bare `torch` requirement
# could pull a multi-GB CUDA build. Then the project by uv, which keeps that torch and installs the
# rest in about 35 s where pip took about a minute (same versions). Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) uv
	$(UV_INSTALL) -e ".[dev]"
	touch $(STAMP)

cluster-up: setup $(HAPROXY)
	$(BIN)/shoprank cluster up

cluster-down: setup
	$(BIN)/shoprank cluster down

stop: setup
	$(BIN)/shoprank ui --stop --config $(PRESET) --set run.root=$(CURDIR)/runs
	$(BIN)/shoprank cluster down

# The job runs every stage so far (data, encoder fine-tuning, embedding and index, ranking
# features, XGBoost ranker, offline evaluation); each is
# skipped when its config hash is unchanged, so a second `make demo` reuses the finished run.
demo: cluster-up
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
		python jobs/pipeline.py --config $(PRESET) --set run.root=$(CURDIR)/runs
	@echo "Run directory: $(CURDIR)/runs/$(PRESET)  (manifest: $(CURDIR)/runs/$(PRESET)/manifest.json)"
	RAY_AUTH_MODE=token $(BIN)/shoprank serve --config $(PRESET) --set run.root=$(CURDIR)/runs
	$(BIN)/shoprank ui --detach --config $(PRESET) --set run.root=$(CURDIR)/runs
	@echo "Stop the web page, the Serve app and the local Ray head with: make stop"

# Serve's HAProxy ingress (the default where haproxy is installed; SHOPRANK_INGRESS, docs/serving.md): Debian's
# haproxy. The package's own system service is not wanted (Ray starts its haproxy itself, on loopback): stopped and
# disabled under systemd.
$(HAPROXY):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends haproxy
	if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now haproxy; fi

haproxy: $(HAPROXY)

# The event-store tests start a throwaway PostgreSQL server (Debian's initdb and pg_ctl).
POSTGRES_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends chromium

postgres:
	@test -n "$(POSTGRES_INITDB)" || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends postgresql; }

# The monitoring tests run Debian's promtool and start its prometheus (in a temporary directory, on loopback).
# Under systemd the package also starts a system-wide Prometheus on every interface (:9090): stopped and disabled.
$(PROMTOOL):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends prometheus
	if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus; fi

# The package's bytecode, written once before the tests: with PYTHONDONTWRITEBYTECODE set (CI here) an editable
# install's modules are never cached, so each of the suite's few hundred Python processes (Ray workers, Serve
# replicas, jobs) compiled the shoprank modules it imports again (all 76 compile in about 0.2 s of CPU); written here
# once, in under a second. Stale files are harmless: Python checks each against its source.
bytecode: setup
	$(BIN)/python -m compileall -q -j 0 platform

test: setup bytecode $(CHROMIUM) postgres $(PROMTOOL) $(HAPROXY)
	$(BIN)/python -m pytest

# the slow tests include every benchmark's smallest setting, and benchmarks/recommend.py needs the bench extra
test-all: setup bytecode $(CHROMIUM) postgres $(PROMTOOL) $(HAPROXY)
	$(UV_INSTALL) -e ".[dev,bench]"
	$(BIN)/python -m pytest -m "slow or not slow"

bench: setup $(HAPROXY)
	$(UV_INSTALL) -e ".[dev,bench]"
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/serve_levers.py --config $(PRESET) --set run.root=$(CURDIR)/runs --set serve.max_replicas=1

# clean: what can be rebuilt (the runs' outputs, logs, test output, caches), never what cannot: runs/secrets (API
# keys, the pseudonym key: a new one would orphan every pseudonym), the event store (shoppers' live events, its
# WAL and lock) and the registry (which run each variant serves). clean-all removes those too.
KEPT := secrets events.sqlite events.sqlite-wal events.sqlite-shm events.sqlite.lock registry.json
clean:
	if [ -d runs ]; then find runs -mindepth 1 -maxdepth 1 $(foreach kept,$(KEPT),! -name $(kept)) -exec rm -rf {} +; fi
	rm -rf test-output .pytest_cache
	@echo "Kept under runs/: the keys (secrets/), the event store (events.sqlite) and the registry; make clean-all removes them too"

clean-all:
	@echo "Removing runs/ whole: API keys, the pseudonym key, the event store and the registry with the runs"
	rm -rf runs test-output .pytest_cache
