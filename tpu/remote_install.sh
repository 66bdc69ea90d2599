#!/usr/bin/env bash
# Runs ON each TPU VM worker (tpu/setup.sh calls it there), not on your workstation: creates the
# virtual environment .venv in this checkout and installs moejax with pip install -e '.[tpu]'.
# JAX >= 0.7 needs Python >= 3.11 and the TPU images are Ubuntu 22.04 (Python 3.10), so when no
# python3.13/3.12/3.11/python3 of at least 3.11 is there, python3.11 is installed with apt.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

new_enough() {
  command -v "$1" >/dev/null 2>&1 && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

apt_install() {
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@"
}

if ! new_enough .venv/bin/python; then
  python=
  for candidate in python3.13 python3.12 python3.11 python3; do
    if new_enough "$candidate"; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "remote_install.sh: no Python >= 3.11 here; installing python3.11 with apt" >&2
    apt_install python3.11 python3.11-venv
    python=python3.11
  fi
  rm -rf .venv
  if ! "$python" -m venv .venv; then  # Debian/Ubuntu keep venv (ensurepip) in a separate package
    rm -rf .venv
    apt_install "$python-venv"
    "$python" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -e '.[tpu]'
.venv/bin/python -c 'import jax, moejax; print("moejax installed, jax", jax.__version__)'
