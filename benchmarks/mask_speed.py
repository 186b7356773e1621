"""Jitted N:M mask time on a 4096 x 4096 float32 kernel, side by side with the baselines.

    python benchmarks/mask_speed.py [--size 4096] [--reps 15] [--tpu v5e:2x2,h100:1]

For each N:M it prints the median time of ``nmsparse.nm_mask`` next to, measured
in the same run and interleaved (each call after a 128 MB pass, with cold caches as inside a
train step): a ``lax.top_k`` mask, a double-argsort mask, and
one elementwise pass over the kernel (``jnp.abs``); then the ratios. Targets:
nm_mask / abs <= 3 for every N:M, top_k / nm_mask >= 5 for M <= 16, and every
N:M within 2x of the 1:16 mask. ``--tpu TOPOLOGY`` also compiles each mask for one
device of that Cloud TPU topology (libtpu, no TPU needed) or GPU node and prints XLA's FLOPs,
bytes accessed and HBM bytes (from the optimised HLO) per mask pass, against one ``jnp.abs`` pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nmsparse  # noqa: E402

PATTERNS = ((2, 4), (1, 4), (1, 8), (1, 16), (1, 32), (1, 128))
COMPILED_PATTERNS = PATTERNS + ((2, 16), (4, 16), (8, 16))  # + SDGF's stages on the way to 1:16.


_FLUSH = None


def _flush_caches() -> None:
  """A 128 MB pass, so each timed call starts with cold caches, as inside a train step."""
  global _FLUSH
  if _FLUSH is None:
    _FLUSH = (jax.jit(lambda x: x * 2.0), jnp.ones((4096, 8192), jnp.float32))
  jax.block_until_ready(_FLUSH[0](_FLUSH[1]))


def _timer(fn, *args):
  jax.block_until_ready(fn(*args))  # Compile and warm up.

  def once():
    _flush_caches()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0

  return once


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', type=int, default=4096)
  ap.add_argument('--reps', type=int, default=15)
  ap.add_argument('--skip_argsort', action='store_true', help='skip the slow double-argsort baseline')
  ap.add_argument('--tpu', default=None,
                  help='also the compiled cost per mask on one device of these topologies (comma-separated): '
                       'a Cloud TPU (v5e:2x2) or a GPU node (h100:1, needs bash scripts/setup.sh --gpu)')
  args = ap.parse_args()
  w = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), '
        f'{jax.device_count()} device(s); kernel {args.size}x{args.size} float32; median of {args.reps}')
  abs_fn = jax.jit(jnp.abs)
  header = f'{"N:M":>6} {"nm_mask":>9} {"abs":>8} {"top_k":>9} {"argsort":>9}   {"mask/abs":>8} {"top_k/mask":>10} {"argsort/mask":>12}'
  ok = True
  rows = {}
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
    rows[n, m] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
  base = rows[1, 16]['nm_mask'] / rows[1, 16]['abs']  # The 1:16 mask in units of its abs pass.
  print(header + f' {"vs 1:16":>8}')
  for (n, m), med in rows.items():
    r_abs = med['nm_mask'] / med['abs']
    r_topk = med['top_k'] / med['nm_mask']
    r_sort = med.get('argsort', float('nan')) / med['nm_mask']
    r_16 = r_abs / base  # Each mask over its own interleaved abs pass, so load drift cancels.
    ok &= r_abs <= 3 and (m > 16 or r_topk >= 5) and r_16 <= 2
    print(f'{n}:{m:<4} {med["nm_mask"]:8.1f}ms {med["abs"]:7.1f}ms {med["top_k"]:8.1f}ms '
          f'{med.get("argsort", float("nan")):8.1f}ms   {r_abs:8.2f} {r_topk:10.1f} {r_sort:12.1f} {r_16:8.2f}')
  print('targets (mask/abs <= 3; top_k/mask >= 5 for M <= 16; within 2x of 1:16):', 'MET' if ok else 'NOT MET')
  for topology in filter(None, (args.tpu or '').split(',')):
    tpu_costs(topology, args.size)


def _ratio(a: float, b: float) -> float:
  return a / b if b else float('nan')


def tpu_costs(topology: str, size: int) -> None:
  """The cost of each mask compiled for one device of a TPU topology or GPU node (ahead of time)."""
  from experiments import compile_plan, hlo_bytes  # pylint: disable=g-import-not-at-top
  device = compile_plan.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  w = jax.ShapeDtypeStruct((size, size), jnp.float32, sharding=sharding)

  def cost(fn, x=w):
    compiled = jax.jit(fn).lower(x).compile()
    c = compiled.cost_analysis()
    c = (c[0] if isinstance(c, (list, tuple)) else c) or {}  # The GPU compiler gives none.
    hbm = sum(hlo_bytes.step_bytes(hlo_bytes.traffic(compiled.as_text())).values())
    return float(c.get('flops', 0.0)), float(c.get('bytes accessed', 0.0)), hbm

  _, abs_bytes, abs_hbm = cost(jnp.abs)
  print(f'\n{device.device_kind} ({topology}), one device, {size}x{size} float32: cost per mask pass '
        '(XLA\'s FLOPs and bytes accessed; HBM bytes from the optimised HLO, experiments/hlo_bytes.py)')
  print(f'{"N:M":>6} {"FLOPs":>12} {"bytes":>12} {"bytes/abs":>10} {"HBM bytes":>12} {"HBM/abs":>8}')
  for n, m in COMPILED_PATTERNS:
    flops, nbytes, hbm = cost(lambda x, n=n, m=m: nmsparse.nm_mask(x, n, m))
    print(f'{n}:{m:<4} {flops:12.3e} {nbytes:12.3e} {_ratio(nbytes, abs_bytes):10.2f} {hbm:12.3e} {hbm / abs_hbm:8.2f}')
  # A ViT-B q/k/v kernel (embed, heads, head_dim), grouped along embed: its trailing axes stay as
  # they are (merging them would relayout the whole kernel on TPU).
  qkv = jax.ShapeDtypeStruct((768, 12, 64), jnp.float32, sharding=sharding)
  _, qkv_abs, qkv_hbm = cost(jnp.abs, qkv)
  print(f'\nq/k/v kernel 768x12x64 float32, grouped along axis 0: bytes / abs')
  print(f'{"N:M":>6} {"bytes/abs":>10} {"HBM/abs":>8}')
  for n, m in COMPILED_PATTERNS:
    _, nbytes, hbm = cost(lambda x, n=n, m=m: nmsparse.nm_mask(x, n, m, 0), qkv)
    print(f'{n}:{m:<4} {_ratio(nbytes, qkv_abs):10.2f} {hbm / qkv_hbm:8.2f}')


if __name__ == '__main__':
  main()
