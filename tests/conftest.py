"""Shared fixtures: a tiny synthetic Fashion-MNIST-shaped source (idx files) that the tests write themselves."""

import gzip
import os
import struct
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests compile many small programs and run each a few times. XLA's CPU backend without LLVM's
# optimisation passes compiles them 3-4x faster (a T5 train step: 23 s -> 7 s) and runs them slower,
# which tiny models do not notice; values agree to float32 rounding (no fast-math either way; a ViT
# run's losses differ in the 7th digit). Set before JAX starts its CPU backend; subprocesses inherit
# it. test_adapters and test_t5 compile this way per jit already. NMSPARSE_TEST_OPTIMIZED_XLA=1 keeps
# the default optimisation.
if not os.environ.get('NMSPARSE_TEST_OPTIMIZED_XLA') and 'xla_backend_optimization_level' not in os.environ.get(
    'XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# Runs of the same tiny configs share compiled programs through JAX's persistent cache: subprocess
# runs (``run_main`` passes the directory on), and, in process, a test's reference and its run, or
# the two pytest-xdist workers. Only programs that take a second or more to compile are stored.
# NMSPARSE_TEST_COMPILE_CACHE names another directory (an empty one measures a cold start).
COMPILE_CACHE = os.environ.get('NMSPARSE_TEST_COMPILE_CACHE') or os.path.join(
    tempfile.gettempdir(), f'nmsparse-test-jax-cache-{os.getuid()}')
jax.config.update('jax_compilation_cache_dir', COMPILE_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def idx_bytes(array: np.ndarray) -> bytes:
  """The idx format: magic (0, 0, 0x08 = uint8, ndim), big-endian uint32 sizes, then the data."""
  return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def write_fmnist_source(folder, num_train: int = 256, num_test: int = 64, seed: int = 0) -> str:
  """Learnable synthetic 28x28 images: class k lights up a horizontal band at rows 2k..2k+5."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
      images[i, 2 * k:2 * k + 6, :] += 150
    for kind, arr in (('images-idx3', images), ('labels-idx1', labels)):
      with open(os.path.join(folder, f'{prefix}-{kind}-ubyte.gz'), 'wb') as f:
        f.write(gzip.compress(idx_bytes(arr)))
  return str(folder)


@pytest.fixture(scope='session')
def fmnist_source(tmp_path_factory) -> str:
  return write_fmnist_source(tmp_path_factory.mktemp('fmnist_source'))


def run_main(args, *, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
  """Runs ``python -m experiments.main ARGS`` from the repo root and returns the finished process."""
  full_env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **(env or {}))
  out = subprocess.run([sys.executable, '-m', 'experiments.main', *args], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
  if check and out.returncode != 0:
    raise AssertionError(f'experiments.main {args} failed ({out.returncode}):\n{out.stderr[-5000:]}')
  return out


def parse_main_flags(args, monkeypatch) -> dict:
  """``experiments.main``'s flags parsed in this process, as ``python -m experiments.main ARGS`` would
  parse them (fresh flag values, repo root as working directory); returns ``{flag: value}``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  argv = ['main', *args]
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads --config.* overrides from sys.argv.
  flag_values = flags.FlagValues()
  holders = main_lib.define_flags(flag_values)
  assert main_lib.parse_flags(argv, flag_values) == ['main']
  return {name: holder.value for name, holder in holders.items()}


def run_main_in_process(args, monkeypatch) -> dict:
  """``python -m experiments.main ARGS`` in this process: the same flag parsing, then ``main.run``
  (the entry point's work, without the subprocess, its interpreter start-up and its imports)."""
  from experiments import main as main_lib  # pylint: disable=g-import-not-at-top
  f = parse_main_flags(args, monkeypatch)
  return main_lib.run(f['mode'], f['config'], f['workdir'])
