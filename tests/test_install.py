"""`pip install .` alone is enough for the library: the README's install claim and its quickstart.

A fresh venv in a temporary folder gets the project installed as a user would (`pip install PATH`,
not editable, dependencies resolved by pip from pyproject.toml), with the lock file of this Python
as constraints so that the versions are the pinned ones and come from pip's cache. The README's
quickstart block then runs with that venv's Python, outside the checkout, and the experiment-side
packages (ml_collections, tensorflow_datasets, grain, clu) must be absent there: so the quickstart
provably needs nothing but what `pip install .` brings.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_adapters import readme_quickstart

LOCK = os.path.join(ROOT, 'requirements', f'lock-py{sys.version_info.major}.{sys.version_info.minor}.txt')
CORE = ('jax', 'flax', 'optax')
NOT_BROUGHT = ('ml_collections', 'tensorflow_datasets', 'grain', 'clu')


def copy_project(dest: str) -> str:
  """What `pip install .` reads (top-level files and the nmsparse package), without the checkout's
  build/, *.egg-info or caches, so that the build writes nothing into the shared work tree."""
  os.makedirs(dest)
  for name in os.listdir(ROOT):
    path = os.path.join(ROOT, name)
    if os.path.isfile(path):
      shutil.copy2(path, dest)
    elif name.startswith('nmsparse') and not name.endswith('.egg-info'):
      shutil.copytree(path, os.path.join(dest, name), ignore=shutil.ignore_patterns('__pycache__'))
  return dest


def run(cmd, what, *, cwd, env, timeout):
  __tracebackhide__ = True  # The failure names the command and shows its output; not the environment.
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  if out.returncode != 0:
    pytest.fail(f'{what} failed (exit {out.returncode}): {" ".join(cmd)}\n'
                f'--- stderr (end) ---\n{out.stderr[-6000:]}\n--- stdout (end) ---\n{out.stdout[-2000:]}')
  return out


@pytest.fixture
def venv_dir(tmp_path):
  """A folder for the venv, deleted afterwards: about 600 MB, and pytest keeps three runs' tmp_paths."""
  yield str(tmp_path / 'venv')
  shutil.rmtree(tmp_path / 'venv', ignore_errors=True)


def test_pip_install_alone_runs_the_readme_quickstart(tmp_path, venv_dir):
  if not os.path.exists(LOCK):
    pytest.fail(f'no lock file {LOCK} for Python {sys.version.split()[0]}: make one with '
                f'bash scripts/lock.sh {sys._base_executable}')
  block = readme_quickstart()
  assert block, 'README.md has no ```python block under its "## Quickstart" heading'
  # Nothing of the checkout or of the test venv may leak into the fresh venv's runs.
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV', 'PYTHONSTARTUP', 'PIP_REQUIRE_VIRTUALENV')}
  env.update(PYTHONNOUSERSITE='1', PIP_DISABLE_PIP_VERSION_CHECK='1', JAX_PLATFORMS='cpu')
  venv = venv_dir
  python = os.path.join(venv, 'bin', 'python')
  # No pip inside the venv (nothing the project needs): this Python's pip installs into it.
  run([sys._base_executable, '-m', 'venv', '--without-pip', venv], 'python -m venv', cwd=tmp_path, env=env,
      timeout=120)
  source = copy_project(str(tmp_path / 'src'))
  run([sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-compile', '-c', LOCK, source],
      'pip install . (with the lock as constraints)', cwd=tmp_path, env=env, timeout=900)

  probe = ('import importlib, nmsparse\n'
           'print("nmsparse", nmsparse.__file__)\n'
           f'for name in {CORE + NOT_BROUGHT!r}:\n'
           '  try:\n'
           '    importlib.import_module(name)\n'
           '    print("present", name)\n'
           '  except ImportError:\n'
           '    print("absent", name)\n')
  lines = run([python, '-I', '-c', probe], 'importing in the fresh venv', cwd=tmp_path, env=env,
              timeout=300).stdout.splitlines()
  assert lines[0].startswith(f'nmsparse {venv}'), f'nmsparse is not the installed copy: {lines[0]}'
  assert [f'present {name}' for name in CORE] == lines[1:1 + len(CORE)], lines
  present = [line.split()[1] for line in lines[1 + len(CORE):] if line.startswith('present')]
  assert not present, f'`pip install .` brought {present}: the venv would not show that the quickstart needs only jax, flax, optax'

  script = tmp_path / 'quickstart.py'
  script.write_text(block)
  out = run([python, '-I', str(script)], 'the README quickstart in a venv made by `pip install .` alone',
            cwd=tmp_path, env=env, timeout=600).stdout
  achieved = [line for line in out.splitlines() if line.startswith('achieved sparsity')]
  assert achieved, f'the quickstart printed no "achieved sparsity" line:\n{out}'
  # Its kernels keep N of every M weights, so (1 - N/M) of each is zero.
  spec = re.search(r'NMSpec\((\d+),\s*(\d+)\)', block)
  if spec:
    n, m = map(int, spec.groups())
    percents = re.findall(r"'([\d.]+)%'", achieved[0])
    assert percents and all(abs(float(p) - 100 * (1 - n / m)) < 0.05 for p in percents), (achieved[0], n, m)
