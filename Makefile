# Quick start: `make demo` runs a full update cycle, `make test` the suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-vm deb image demo-os boot-os demo-fleet test lint typecheck unit fuzz bench clean

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

# A bootable OS disk image with the agent inside (Debian bookworm, mmdebstrap;
# root): build/os-image/disk.img. Cached in ~/.cache/updater-vm/osimage by the
# hash of its inputs. REPO_URL: the release repository its agent polls.
image: setup
	$(PY) -m devtools.osimage $(if $(REPO_URL),--repo-url $(REPO_URL))

# The image updating itself under QEMU (root; a few minutes): 1.0.0 boots,
# its agent installs 1.1.0 from a repository on loopback, reboots into it and
# blesses it; the guest's console summarised. The machine stays in build/os-demo.
demo-os: setup
	$(PY) -m devtools.osupdate demo --workdir build/os-demo

# Boot the demo's machine again, its serial console on this terminal (Ctrl-A X quits).
boot-os: setup
	$(PY) -m devtools.osupdate boot --workdir build/os-demo

# A fleet rolling out a release under the etcd reboot lock (root; ~10 minutes):
# MACHINES VMs of the image, a 3-member etcd cluster on loopback, a client
# calling each machine's service and failing over; each machine's version and
# state over time, `updatectl fleet status`, and the client's answered/failed count.
demo-fleet: setup
	$(PY) -m devtools.osfleet --workdir build/fleet-demo --machines $(or $(MACHINES),2)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

# The parsers' property-based fuzzing, with many more examples than make test
# (HYPOTHESIS_PROFILE=fuzz: tests/fuzzing.py). Minutes, not seconds.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q -m fuzz -p no:cacheprovider

bench: setup
	$(PY) -m bench.install_throughput
	$(PY) -m bench.idle_agent
	$(PY) -m bench.fleet_rollout
	$(PY) -m bench.delta --size-mib 1024
	$(PY) -m bench.release_index

clean:
	rm -rf $(VENV) build demo-run bench-run .mypy_cache .ruff_cache .pytest_cache
