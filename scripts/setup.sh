#!/usr/bin/env bash
# Sets up a fresh machine for nmsparse: a virtual environment in .venv with the
# requirements and the package (editable). Idempotent: a second run is quick.
# Picks the newest Python >= 3.11 it finds (3.12+ gets the newest JAX).
#   bash scripts/setup.sh          # environment only (what the tests need)
#   bash scripts/setup.sh --data   # + Fashion-MNIST from Debian's dataset-fashion-mnist package
#   bash scripts/setup.sh --text   # + KJV and WEB Bibles from Debian (the offline T5 text tasks)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_DATA=0
WITH_TEXT=0
for arg in "$@"; do
  case "$arg" in
    --data) WITH_DATA=1 ;;
    --text) WITH_TEXT=1 ;;
    *) echo "setup: unknown option $arg (use --data and/or --text)" >&2; exit 2 ;;
  esac
done
if [ "$WITH_TEXT" = 1 ] && ! { command -v bible >/dev/null && command -v diatheke >/dev/null; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages bible-kjv sword-text-web diatheke"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bible-kjv sword-text-web diatheke >/dev/null || {
    echo "setup: could not apt-get install bible-kjv sword-text-web diatheke (needs root)." >&2; exit 1; }
fi
if [ "$WITH_DATA" = 1 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian package dataset-fashion-mnist (31 MB)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || {
    echo "setup: could not apt-get install dataset-fashion-mnist. Without root: apt-get download" \
         "dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR, then pass" \
         "--config.data.source_dir=DIR/usr/share/datasets/fashion-mnist" >&2; exit 1; }
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.12 /root/.pyenv/versions/3.12.*/bin/python3 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: need Python >= 3.11 (set PYTHON=/path/to/python3)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "setup: $(.venv/bin/python -c 'import sys, jax, flax, optax; print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")')"
