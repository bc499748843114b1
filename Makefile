# Quick start: `make demo` runs a full update cycle, `make test` the suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck unit bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m devtools.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) -m bench.install_throughput
	$(PY) -m bench.idle_agent
	$(PY) -m bench.fleet_rollout

clean:
	rm -rf $(VENV) demo-run bench-run .mypy_cache .ruff_cache .pytest_cache
