"""Train-step time of a ViT-S-like model, dense and under every nmsparse recipe, side by side.

    python benchmarks/train_step_speed.py [--rounds 5] [--steps_per_round 2] [--nm 1:8] [--only ste,mdgf/mlp]

The model is ViT-S width/heads/MLP (384, 6 heads, MLP 1536) at depth 6 on 32x32x3
images with patch 4 (64 tokens, GAP pooling), batch 64, float32. Each step is the
real one of ``experiments.train.make_train_step`` (``sp.update``, forward and
backward through ``sp.apply``, clip + AdamW built by ``experiments.optimizer`` with
``sp.scale_by_adam``; jitted with the state donated), timed with
``block_until_ready``. Every recipe runs in its sparse phase: no dense warm-up, no
fine-tune; SDGF at its last (target N:M) stage; STEP after its switch (``t_max=0``:
the switch fires in the warm-up step). Sparsity on the MLP kernels (``mlp``) and on
the MLP + Q, K, V kernels (``mlp_qkv``).

All variants are compiled first, then timed round-robin: each of ``--rounds`` rounds
times ``--steps_per_round`` steps of every variant, with the dense step timed again
after every ``--group`` variants (D v v D v v ... D) and a large float32 matmul for the
machine's peak. A variant's ratio in a round is its median step time over the mean of
the two dense timings around it, so the load drift of a shared machine cancels; the
table gives the median over rounds (and the spread). ``dense (control)``, a second,
separately compiled dense step timed like the recipes, shows the noise floor.
Columns: median ms per step, ratio to dense, model FLOP utilisation (model FLOPs
of the step / median step time / measured matmul peak). Target: every ratio <= 1.02.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import nmsparse  # noqa: E402
from experiments import train as train_lib  # noqa: E402

RECIPES = ('ste', 'srste', 'mdgf', 'sdgf', 'step', 'oneshot', 'hard')
PRESETS = ('mlp', 'mlp_qkv')
TARGET = 1.02
WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, BATCH, CLASSES = 384, 6, 6, 1536, 4, 32, 64, 10
TOTAL_STEPS = 1_000_000  # Long, so that no schedule moves during the benchmark.


def make_config(recipe: str, layers: str, nm: str) -> ml_collections.ConfigDict:
  """A classification config for ``experiments.train.setup``: the ViT above, AdamW, one recipe."""
  over = {}
  if recipe == 'step':  # Switch at the end of the first (warm-up) step: the mask phase is timed.
    over = {'step.t_min_steps': 0, 'step.t_max_steps': 0}
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.model = ml_collections.ConfigDict(dict(
      name='vit', variant=f'S/{PATCH}', num_classes=CLASSES, channels=3,
      kwargs=dict(depth=DEPTH, pool_type='gap', posemb='learn')))
  c.data = ml_collections.ConfigDict(dict(image_size=IMAGE))
  c.loss = 'softmax_xent'
  c.batch_size = BATCH
  c.seed = 0
  c.total_steps = TOTAL_STEPS
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4, clip=1.0, schedule='cosine',
      warmup_steps=10, base_batch=None))
  c.sparsity = ml_collections.ConfigDict(dict(
      recipe=nmsparse.recipe_config(recipe, **over), nm=nm, layers=layers, rules=None))
  return c


def model_flops(params) -> float:
  """FLOPs of one train step (forward + backward) of the ViT: 6 * matmul params * rows + attention."""
  tokens = BATCH * (IMAGE // PATCH) ** 2
  total = 0.0
  for path, x in nmsparse.rules.named_leaves(params):
    if not path.endswith('kernel'):
      continue
    size = float(np.prod(x.shape))
    if path.startswith('embedding'):
      total += 4 * size * tokens  # No gradient w.r.t. the images.
    elif path.startswith('head'):
      total += 6 * size * BATCH  # After pooling.
    else:
      total += 6 * size * tokens
  seq = (IMAGE // PATCH) ** 2
  total += DEPTH * 3 * 4 * BATCH * seq * seq * WIDTH  # QK^T and AV, forward and backward.
  return total


class Variant:
  """One compiled train step with its own (donated) state."""

  def __init__(self, name: str, recipe: str, layers: str, nm: str, batch: dict):
    self.name, self.recipe, self.layers = name, recipe, layers
    s = train_lib.setup(make_config(recipe, layers, nm), steps_per_epoch=1000)
    self.setup = s
    state = train_lib.create_state(s, jax.random.key(0))
    if recipe == 'sdgf':  # The last stage: the target N:M, as every other recipe.
      start = int(s.sp.stage_starts()[-1]) + 1
      state = state.replace(step=jnp.asarray(start, state.step.dtype))
    self.step_fn = train_lib.make_train_step(s)
    self.batch = batch
    t0 = time.perf_counter()
    state, metrics = self.step_fn(state, batch)  # Compile; STEP switches here.
    state, metrics = self.step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    self.compile_s = time.perf_counter() - t0
    self.state = state
    m = jax.device_get(metrics)
    self.phase, self.density = int(m['sparsity/phase']), float(m['sparsity/density'])
    if recipe != 'dense' and self.phase != 1:
      raise RuntimeError(f'{name}: expected the sparse phase, got phase {self.phase}.')
    self.times: list[float] = []

  def run(self, steps: int) -> None:
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      self.times.append(time.perf_counter() - t0)

  def lowered_flops(self) -> float | None:
    try:
      cost = self.step_fn.lower(self.state, self.batch).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost['flops'])
    except Exception:  # pylint: disable=broad-except
      return None


def schedule(variants: list, group: int) -> list:
  """One round: the dense reference before and after every ``group`` variants (D v v D v v D ...)."""
  dense, rest = variants[0], variants[1:]
  order = [dense]
  for i in range(0, len(rest), group):
    order += rest[i:i + group] + [dense]
  return order


def main() -> None:
  global DEPTH, BATCH  # pylint: disable=global-statement
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--steps_per_round', type=int, default=2)
  ap.add_argument('--nm', default='1:8')
  ap.add_argument('--only', default='',
                  help='comma-separated recipe names, presets or variant globs (e.g. "ste,mdgf/mlp"); '
                       'dense always runs')
  ap.add_argument('--group', type=int, default=2, help='variants between two dense reference timings')
  ap.add_argument('--no_control', action='store_true', help='skip the second, separately compiled dense step')
  ap.add_argument('--peak_size', type=int, default=2048)
  ap.add_argument('--depth', type=int, default=DEPTH, help='smaller for a quick check; the target is at 6')
  ap.add_argument('--batch', type=int, default=BATCH, help='smaller for a quick check; the target is at 64')
  args = ap.parse_args()
  DEPTH, BATCH = args.depth, args.batch
  nmsparse.parse_nm(args.nm)

  names = [(f'{recipe}/{layers}', recipe, layers) for layers in PRESETS for recipe in RECIPES]
  if args.only:
    pats = [p.strip() for p in args.only.split(',') if p.strip()]
    names = [v for v in names if any(fnmatch.fnmatch(v[0], p) or p in v[1:] for p in pats)]
  control = [] if args.no_control else [('dense (control)', 'dense', 'mlp')]
  names = [('dense', 'dense', 'mlp')] + control + names

  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.standard_normal((BATCH, IMAGE, IMAGE, 3), np.float32)),
           'label': jnp.asarray(rng.integers(0, CLASSES, (BATCH,)), jnp.int32)}
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), '
        f'{jax.device_count()} device(s), {os.cpu_count()} cpu(s)')
  print(f'ViT width {WIDTH}, depth {DEPTH}, {HEADS} heads, MLP {MLP}, {(IMAGE // PATCH) ** 2} tokens '
        f'(32x32x3, patch {PATCH}, GAP), batch {BATCH}, float32, AdamW; N:M {args.nm}; '
        f'{args.rounds} rounds x {args.steps_per_round} steps per variant, interleaved', flush=True)

  variants = []
  for name, recipe, layers in names:
    v = Variant(name, recipe, layers, args.nm, batch)
    print(f'  compiled {name:18s} in {v.compile_s:5.1f}s (phase {v.phase}, density {v.density:.3f})',
          flush=True)
    variants.append(v)

  n = args.peak_size
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  peak_times = []

  # Each round: D v v D v v ... D, in alternating directions. A variant's ratio in a
  # round is its time over the mean of the two dense timings around it, so the
  # load drift of a shared machine cancels; the table reports the median over rounds.
  ratios = {v.name: [] for v in variants[1:]}
  for r in range(args.rounds):
    order = schedule(variants, args.group)
    if r % 2:
      order = order[::-1]
    stamps = []
    for v in order:
      start = len(v.times)
      v.run(args.steps_per_round)
      stamps.append((v, float(np.median(v.times[start:]))))
    for i, (v, t) in enumerate(stamps):
      if v is variants[0]:
        continue
      before = next(tt for vv, tt in reversed(stamps[:i]) if vv is variants[0])
      after = next(tt for vv, tt in stamps[i + 1:] if vv is variants[0])
      ratios[v.name].append(t / (0.5 * (before + after)))
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(matmul(a, b))
      peak_times.append(time.perf_counter() - t0)
    print(f'  round {r + 1}/{args.rounds} done', flush=True)

  peak = 2.0 * n ** 3 / min(peak_times)  # The best the machine gave us.
  flops = model_flops(variants[0].state.params)
  xla_flops = variants[0].lowered_flops()
  print(f'\nmatmul peak {peak / 1e9:.1f} GFLOP/s ({n}x{n} float32, best of {len(peak_times)}; '
        f'median {2.0 * n ** 3 / float(np.median(peak_times)) / 1e9:.1f}); '
        f'model {flops / 1e9:.1f} GFLOP per step'
        + (f' (XLA cost analysis of the dense step: {xla_flops / 1e9:.1f})' if xla_flops else ''))
  print(f'{"variant":18s} {"median ms":>10} {"min ms":>9} {"vs dense":>9} {"(spread)":>15} {"MFU":>6} {"density":>8}')
  worst = 0.0
  for v in variants:
    t = float(np.median(v.times))
    if v is variants[0]:
      ratio, spread = 1.0, ''
    else:
      rs = ratios[v.name]
      ratio = float(np.median(rs))
      spread = f'[{min(rs):.3f}, {max(rs):.3f}]'
      if v.recipe != 'dense':
        worst = max(worst, ratio)
    flag = '  > target' if v.recipe != 'dense' and ratio > TARGET else ''
    print(f'{v.name:18s} {t * 1e3:10.1f} {min(v.times) * 1e3:9.1f} {ratio:9.3f} {spread:>15} '
          f'{flops / t / peak:6.1%} {v.density:8.3f}{flag}')
  print('vs dense: median over rounds of (step time / mean of the two dense timings around it); '
        'spread: min and max over rounds.')
  print(f'target (every ratio <= {TARGET}): {"MET" if worst <= TARGET else "NOT MET"} (worst {worst:.3f})')


if __name__ == '__main__':
  main()
