#!/usr/bin/env bash
# Make this checkout runnable: the system tools the agent and its tests use
# (installed with apt-get when missing and we are root) and a virtualenv with
# the Python dependencies. Idempotent and quick when everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Every command and file the code, tests, demos and benchmarks use, with the
# Debian package that provides it: scripts/tools.list (tests/test_tools.py
# keeps it complete).
missing=()
while read -r what pkg _; do
  case "$what" in ''|'#'*) continue ;; esac
  if [[ $what == /* ]]; then
    [ -e "$what" ] || missing+=("$pkg")
  else
    command -v "$what" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$what" >/dev/null 2>&1 \
      || missing+=("$pkg")
  fi
done < scripts/tools.list
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing system packages: $pkgs" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || apt-get update
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  else
    echo "bootstrap: missing system packages (install them as root): $pkgs" >&2
  fi
fi

# The QEMU boot tests download Debian's cloud kernel (apt-get download): apt
# needs its package lists, which a slimmed image may have deleted.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "bootstrap: fetching the package lists (for the cloud kernel)" >&2
  apt-get update -qq >/dev/null || apt-get update
fi

stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q --config-settings editable_mode=compat -e '.[test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
