#!/usr/bin/env bash
# Sets up a fresh machine for nmsparse: a virtual environment in .venv with the
# requirements at the exact versions of requirements/lock-pyX.Y.txt (X.Y: .venv's Python; made by
# scripts/lock.sh) and the package (editable). Idempotent: a run on a .venv that already matches
# the lock checks it and installs nothing (about a second, no network).
# Picks the newest Python >= 3.11 it finds (3.12 gets the newest JAX); PYTHON=/path/to/python3 picks one.
#   bash scripts/setup.sh          # environment only (what the tests need)
#   bash scripts/setup.sh --data   # + Fashion-MNIST from Debian's dataset-fashion-mnist package
#   bash scripts/setup.sh --text   # + KJV and WEB Bibles from Debian (the offline T5 text tasks)
#   bash scripts/setup.sh --gpu    # + jax's CUDA plugin (5 GB) in .venv/cuda, for GPU plans (--mode=compile)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_DATA=0
WITH_TEXT=0
WITH_GPU=0
for arg in "$@"; do
  case "$arg" in
    --data) WITH_DATA=1 ;;
    --text) WITH_TEXT=1 ;;
    --gpu) WITH_GPU=1 ;;
    *) echo "setup: unknown option $arg (use --data, --text and/or --gpu)" >&2; exit 2 ;;
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
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ -x .venv/bin/python ]; then
  VER=$(pyver .venv/bin/python); BASE=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
  WHO=".venv's Python ($BASE)"; OTHER="rm -rf .venv && PYTHON=/path/to/python3.12 bash scripts/setup.sh"
else
  VER=$(pyver "$PY"); BASE=$(command -v "$PY"); WHO="$BASE"; OTHER="PYTHON=/path/to/python3.12 bash scripts/setup.sh"
fi
LOCK=requirements/lock-py$VER.txt
if [ ! -f "$LOCK" ]; then
  echo "setup: no lock file $LOCK for Python $VER, $WHO; there are: $(cd requirements 2>/dev/null && ls lock-py*.txt 2>/dev/null | tr '\n' ' ')" >&2
  echo "setup: make one with 'bash scripts/lock.sh $BASE' (and commit it), or use a Python that has one: $OTHER" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
# check_venv: exit status 0 if .venv has exactly the lock's versions and nmsparse is this checkout
# (editable; packages the lock does not pin only get a warning), 1 if something must be installed
# (says what), 2 if requirements.txt names a package that the lock does not pin.
check_venv() {
  .venv/bin/python -I - "$LOCK" "$PWD" <<'PY'
import importlib.metadata as md, importlib.util, os, re, sys
lock, root = sys.argv[1], sys.argv[2]
norm = lambda name: re.sub(r'[-_.]+', '-', name).lower()
pins = {}
for line in open(lock):
  line = line.split('#')[0].strip()
  if line:
    name, _, version = line.partition('==')
    pins[norm(name)] = version.strip()
wanted = [norm(re.split(r'[<>=!~;\[ ]', l.strip())[0]) for l in open(os.path.join(root, 'requirements.txt'))
          if l.strip() and not l.strip().startswith('#')]
unpinned = [name for name in wanted if name not in pins]
if unpinned:
  print(f'setup: requirements.txt names {", ".join(unpinned)}, which {lock} does not pin: '
        f'run bash scripts/lock.sh and commit the lock files it writes.', file=sys.stderr)
  sys.exit(2)
have = {norm(d.metadata['Name']): d.version for d in md.distributions()}
wrong = [f'{name}=={version} (have {have.get(name, "none")})' for name, version in sorted(pins.items())
         if have.get(name) != version]
spec = importlib.util.find_spec('nmsparse')
if spec is None or os.path.dirname(spec.origin) != os.path.join(root, 'nmsparse'):
  wrong.append(f'nmsparse, editable from {root} (have {spec.origin if spec else "none"})')
if wrong:
  print(f'setup: .venv differs from {lock} in {len(wrong)} packages: {", ".join(wrong[:4])}' +
        (', ...' if len(wrong) > 4 else ''))
  sys.exit(1)
extra = sorted(f'{name}=={have[name]}' for name in set(have) - set(pins) - {'nmsparse', 'setuptools', 'wheel'})
if extra:
  print(f'setup: warning: .venv also has packages that {lock} does not pin: {" ".join(extra)}', file=sys.stderr)
PY
}
status=0
check_venv || status=$?
case $status in
  0) echo "setup: .venv already matches $LOCK" ;;
  1)
    echo "setup: installing the versions of $LOCK"
    .venv/bin/python -m pip install -q -c "$LOCK" pip
    .venv/bin/python -m pip install -q -c "$LOCK" -r requirements.txt
    .venv/bin/python -m pip install -q --no-deps -e .
    check_venv || { echo "setup: .venv still differs from $LOCK after installing" >&2; exit 1; } ;;
  *) exit 1 ;;
esac
# The TPU compiler for --mode=compile (plans a TPU run without a TPU): libtpu, pinned to the lock's
# jax, installed into .venv/libtpu, which is not on the import path, so that CPU runs never load it
# (no TPU probing, no warnings); compile mode points JAX at it.
TPU_PIN=$(grep -E '^libtpu==' "requirements/libtpu-py$VER.txt")
if [ "$(cat .venv/libtpu/PIN 2>/dev/null)" != "$TPU_PIN" ]; then
  echo "setup: installing $TPU_PIN into .venv/libtpu (TPU compiler for --mode=compile)"
  rm -rf .venv/libtpu
  .venv/bin/python -m pip install -q --no-deps --target .venv/libtpu "$TPU_PIN"
  echo "$TPU_PIN" > .venv/libtpu/PIN
fi
# --gpu: jax's CUDA plugin and NVIDIA's libraries (about 5 GB) into .venv/cuda, for GPU plans
# (--mode=compile --topology=h100:8); off the import path like libtpu.
if [ "$WITH_GPU" = 1 ]; then
  CUDA_PINS=requirements/cuda-py$VER.txt
  [ -f "$CUDA_PINS" ] || { echo "setup: no $CUDA_PINS: GPU plans are pinned for Python 3.12 only." >&2; exit 1; }
  if ! cmp -s "$CUDA_PINS" .venv/cuda/PINS 2>/dev/null; then
    echo "setup: installing jax's CUDA plugin and NVIDIA's libraries into .venv/cuda (about 5 GB)"
    rm -rf .venv/cuda
    .venv/bin/python -m pip install -q --no-deps --target .venv/cuda -r "$CUDA_PINS"
    cp "$CUDA_PINS" .venv/cuda/PINS
  fi
fi
echo "setup: $(.venv/bin/python -c 'import sys, jax, flax, optax; print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")')"
