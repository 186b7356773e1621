"""Jitted N:M mask time on a 4096 x 4096 float32 kernel, side by side with the baselines.

    python benchmarks/mask_speed.py [--size 4096] [--reps 15]

For each N:M it prints the median time of ``nmsparse.nm_mask`` next to, measured
in the same run and interleaved: a ``lax.top_k`` mask, a double-argsort mask, and
one elementwise pass over the kernel (``jnp.abs``); then the ratios. Targets:
nm_mask / abs <= 3 for every N:M, top_k / nm_mask >= 5 for M <= 16.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import nmsparse

PATTERNS = ((2, 4), (1, 4), (1, 8), (1, 16), (1, 32), (1, 128))


def _timer(fn, *args):
  jax.block_until_ready(fn(*args))  # Compile and warm up.

  def once():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0

  return once


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', type=int, default=4096)
  ap.add_argument('--reps', type=int, default=15)
  ap.add_argument('--skip_argsort', action='store_true', help='skip the slow double-argsort baseline')
  args = ap.parse_args()
  w = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), '
        f'{jax.device_count()} device(s); kernel {args.size}x{args.size} float32; median of {args.reps}')
  abs_fn = jax.jit(jnp.abs)
  header = f'{"N:M":>6} {"nm_mask":>9} {"abs":>8} {"top_k":>9} {"argsort":>9}   {"mask/abs":>8} {"top_k/mask":>10} {"argsort/mask":>12}'
  print(header)
  ok = True
  for n, m in PATTERNS:
    fns = {
        'nm_mask': jax.jit(lambda x, n=n, m=m: nmsparse.nm_mask(x, n, m)),
        'abs': abs_fn,
        'top_k': jax.jit(lambda x, n=n, m=m: nmsparse.topk_mask(x, n, m)),
    }
    if not args.skip_argsort:
      fns['argsort'] = jax.jit(lambda x, n=n, m=m: nmsparse.argsort_mask(x, n, m))
    timers = {k: _timer(f, w) for k, f in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(args.reps):  # Interleaved, so drift hits every method alike.
      for k, t in timers.items():
        times[k].append(t())
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    r_abs = med['nm_mask'] / med['abs']
    r_topk = med['top_k'] / med['nm_mask']
    r_sort = med.get('argsort', float('nan')) / med['nm_mask']
    ok &= r_abs <= 3 and (m > 16 or r_topk >= 5)
    print(f'{n}:{m:<4} {med["nm_mask"]:8.1f}ms {med["abs"]:7.1f}ms {med["top_k"]:8.1f}ms '
          f'{med.get("argsort", float("nan")):8.1f}ms   {r_abs:8.2f} {r_topk:10.1f} {r_sort:12.1f}')
  print('targets (mask/abs <= 3; top_k/mask >= 5 for M <= 16):', 'MET' if ok else 'NOT MET')


if __name__ == '__main__':
  main()
