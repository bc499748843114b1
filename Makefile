# Quick start: `make demo` runs a full update cycle, `make test` the suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-vm deb test lint typecheck unit fuzz bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) -m devtools.demo

# The same A/B cycle booted for real: QEMU, OVMF + systemd-boot, Debian's cloud
# kernel (downloaded once into ~/.cache/updater-vm). LOADER=grub: SeaBIOS + GRUB.
demo-vm: setup
	$(PY) -m devtools.vm_demo --loader $(or $(LOADER),systemd-boot)

# The agent as a Debian package (dpkg-deb, no debhelper): build/deb/updater_<version>_all.deb
deb: setup
	$(PY) -m devtools.deb --out build/deb

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

# The parsers' property-based fuzzing, with many more examples than make test
# (HYPOTHESIS_PROFILE=fuzz: tests/fuzzing.py). Minutes, not seconds.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q -m fuzz -p no:cacheprovider

bench: setup
	$(PY) -m bench.install_throughput
	$(PY) -m bench.idle_agent
	$(PY) -m bench.fleet_rollout

clean:
	rm -rf $(VENV) build demo-run bench-run .mypy_cache .ruff_cache .pytest_cache
