"""What a result was computed with: package versions, nmsparse's git commit, the CPU and JAX's devices.

    from experiments import environment
    environment.describe()  # -> JSON-ready dict; every run writes it to its workdir's environment.json

A package that is not installed, or a checkout that is not a git repository, is
recorded as ``None`` (with the reason for git), never guessed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys

import jax

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'numpy',
            'ml_collections')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ISA extensions that change what XLA's CPU backend emits (x86 'flags', ARM 'Features').
_ISA = re.compile(r'^(sse|ssse|avx|fma|f16c|amx|bmi|aes|vaes|gfni|vpclmul|sha|popcnt|asimd|sve|fphp|'
                  r'bf16|i8mm|asimddp)')


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
  """Installed version of each distribution (None: not installed)."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_state(root: str = ROOT) -> dict:
  """``{'commit', 'dirty'}`` of the checkout at ``root``; dirty: a tracked file differs from the commit."""
  def git(*args: str) -> str:
    return subprocess.run(['git', '--no-optional-locks', '-C', root, *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
    return {'commit': None, 'dirty': None, 'error': f'{type(e).__name__}: {e}'}
  return {'commit': commit, 'dirty': dirty}


def cpu_info(cpuinfo: str) -> dict:
  """Model name and ISA extensions from the text of ``/proc/cpuinfo`` (first processor)."""
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(':')
    if not sep:
      if fields:  # A blank line ends the first processor's block.
        break
      continue
    fields.setdefault(key.strip(), value.strip())
  flags = (fields.get('flags') or fields.get('Features') or '').split()
  return {'model': fields.get('model name') or fields.get('Model') or fields.get('CPU part'),
          'isa': sorted(f for f in flags if _ISA.match(f))}


def _read_cpuinfo() -> dict:
  try:
    with open('/proc/cpuinfo') as f:
      return cpu_info(f.read())
  except FileNotFoundError:  # Not Linux.
    return {'model': platform.processor() or None, 'isa': None}


def describe() -> dict:
  """Python, package versions, nmsparse's commit, CPU, platform, JAX devices and XLA_FLAGS (JSON-ready)."""
  devices = jax.devices()
  return {
      'python': platform.python_version(),
      'packages': package_versions(),
      'nmsparse': git_state(),
      'cpu': _read_cpuinfo() | {'count': os.cpu_count()},
      'platform': platform.platform(),
      'machine': platform.machine(),
      'jax': {'backend': devices[0].platform, 'device_kind': devices[0].device_kind,
              'device_count': len(devices), 'process_count': jax.process_count()},
      'XLA_FLAGS': os.environ.get('XLA_FLAGS'),
      'executable': sys.executable,
  }
