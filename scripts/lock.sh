#!/usr/bin/env bash
# Pins exact versions. For each Python, a fresh venv in a temporary folder gets requirements.txt
# (the human-edited ranges) installed, and its `pip freeze --all`, less nmsparse, setuptools and
# wheel, becomes requirements/lock-pyX.Y.txt: the constraints file that scripts/setup.sh installs
# with (so CI too) and tests/test_install.py builds its venv with. Commit the lock files it writes.
#   bash scripts/lock.sh                      # Python 3.11 and 3.12 (found as setup.sh finds them)
#   bash scripts/lock.sh /path/to/python3.13  # one Python: makes or refreshes requirements/lock-py3.13.txt
#   bash scripts/lock.sh --upgrade [PYTHON]   # resolve anew: the newest versions requirements.txt allows
# Without --upgrade an existing lock is kept as constraints: its pins stay and only packages that
# requirements.txt added (or no longer needs) change. Each Python takes a few minutes with a cold
# pip cache (JAX, TensorFlow Datasets, ...); the venvs are deleted afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
UPGRADE=0
PYTHONS=()
for arg in "$@"; do
  case "$arg" in
    --upgrade) UPGRADE=1 ;;
    -*) echo "lock: unknown option $arg (use --upgrade and/or paths of Python interpreters)" >&2; exit 2 ;;
    *) PYTHONS+=("$arg") ;;
  esac
done

find_python() {  # find_python 3.12 -> an interpreter of that minor version, or nothing
  local cand
  for cand in "python$1" /root/.pyenv/versions/"$1".*/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$1" ]; then
      command -v "$cand"; return
    fi
  done
}

if [ ${#PYTHONS[@]} = 0 ]; then
  for minor in 3.11 3.12; do
    py=$(find_python "$minor")
    [ -n "$py" ] || { echo "lock: no Python $minor found; pass its path: bash scripts/lock.sh /path/to/python$minor" >&2; exit 1; }
    PYTHONS+=("$py")
  done
fi

mkdir -p requirements
for py in "${PYTHONS[@]}"; do
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "lock: $py is not a working Python interpreter" >&2; exit 1; }
  full=$("$py" -c 'import sys; print(sys.version.split()[0])')
  lock=requirements/lock-py$ver.txt
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/nmsparse-lock-py$ver.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "lock: Python $full: fresh venv in $tmp"
  "$py" -m venv "$tmp/venv"
  pip=("$tmp/venv/bin/python" -m pip)
  keep=()
  if [ "$UPGRADE" = 0 ] && [ -f "$lock" ]; then
    keep=(-c "$lock")
    echo "lock: keeping the pins of $lock (--upgrade resolves anew)"
  fi
  "${pip[@]}" install -q --upgrade pip "${keep[@]}"
  "${pip[@]}" install -q -r requirements.txt "${keep[@]}" || {
    echo "lock: requirements.txt does not install on Python $ver${keep:+ with the pins of $lock}." >&2
    [ ${#keep[@]} = 0 ] || echo "lock: if a range in requirements.txt now excludes a pin, rerun with --upgrade." >&2
    exit 1; }
  "${pip[@]}" check >/dev/null || { "${pip[@]}" check >&2; echo "lock: inconsistent set of packages on Python $ver" >&2; exit 1; }
  {
    echo "# Exact versions for Python $ver: made by scripts/lock.sh from requirements.txt with Python $full"
    echo "# on $(uname -s) $(uname -m). Do not edit: change requirements.txt and rerun the script."
    "${pip[@]}" freeze --all | grep -v -i -E '^(nmsparse|setuptools|wheel|distribute)([=@ ]|$)' | LC_ALL=C sort -f
  } > "$lock.new"
  mv "$lock.new" "$lock"
  echo "lock: wrote $lock ($(grep -c '==' "$lock") pins; $(grep -i -E '^(jax|jaxlib|flax|optax)==' "$lock" | tr '\n' ' '))"
  rm -rf "$tmp"
  trap - EXIT
done
