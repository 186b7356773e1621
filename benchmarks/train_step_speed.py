"""Train-step time of a ViT-S-like (or T5-small-sized) model, dense and under every recipe, side by side.

    python benchmarks/train_step_speed.py [--model vit|t5] [--rounds 5] [--steps_per_round 2] [--nm 1:8]
                                          [--only ste,mdgf/mlp]

The model is ViT-S width/heads/MLP (384, 6 heads, MLP 1536) at depth 6 on 32x32x3
images with patch 4 (64 tokens, GAP pooling), batch 64, float32. Each step is the
real one of ``experiments.train.make_train_step`` (``sp.update``, forward and
backward through ``sp.apply``, clip + AdamW built by ``experiments.optimizer`` with
``sp.scale_by_adam``; jitted with the state donated), timed with
``block_until_ready``. Every recipe runs in its sparse phase, between a dense warm-up
and a fine-tune of 10 % each as in the paper's configs (so the compiled step holds every
phase's code, as in a real run); SDGF at its last (target N:M) stage; STEP after its
switch (``t_max=0``: the switch fires in the warm-up step). Sparsity on the MLP kernels (``mlp``) and on
the MLP + Q, K, V kernels (``mlp_qkv``).

``--model t5``: T5.1.1-small (d_model 512, 8 + 8 layers, 6 heads of 64, d_ff 1024, vocab
32128) on span-corruption batches of 128 input and 32 target tokens, batch 8; sparsity
on the MLPs (``mlp``: wi_0, wi_1, wo) and on every kernel of every block (``all``: plus
q, k, v, o of self- and cross-attention).

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
import dataclasses
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
from configs import common  # noqa: E402
from experiments import train as train_lib  # noqa: E402
from experiments.data import defaults  # noqa: E402

RECIPES = ('ste', 'srste', 'mdgf', 'sdgf', 'step', 'oneshot', 'hard')
PRESETS = {'vit': ('mlp', 'mlp_qkv'), 't5': ('mlp', 'all')}
TARGET = 1.02
TOTAL_STEPS = 1_000_000  # Long, so that no schedule moves during the benchmark.
PHASE_FRAC = 0.1  # Dense warm-up and fine-tune fractions around the timed sparse phase.
# ViT-S width/heads/MLP at depth 6 on 32x32x3 images, patch 4 (64 tokens), GAP.
WIDTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 384, 6, 1536, 4, 32, 10
# T5.1.1-small (d_model 512, 8 + 8 layers, 6 heads of 64, d_ff 1024, vocab 32128).
T5_INPUTS, T5_TARGETS = 128, 32
DEFAULTS = {'vit': dict(depth=6, batch=64), 't5': dict(depth=8, batch=8)}


def _common(c: ml_collections.ConfigDict, recipe: str, layers: str, nm: str, batch: int) -> None:
  # A dense warm-up and a fine-tune of 10 % each, as in the paper's configs, so the step holds
  # every phase's code as in a real run; the timed steps are in the sparse phase.
  over = {'dense_frac': PHASE_FRAC, 'finetune_frac': PHASE_FRAC}
  if recipe == 'step':  # Switch at the end of the first (warm-up) step: the mask phase is timed.
    over = {'step.t_min_steps': 0, 'step.t_max_steps': 0, 'finetune_frac': PHASE_FRAC}
  elif recipe == 'dense':
    over = {}
  c.batch_size = batch
  c.seed = 0
  c.total_steps = TOTAL_STEPS
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4, clip=1.0, schedule='cosine',
      warmup_steps=10, base_batch=None))
  c.sparsity = ml_collections.ConfigDict(dict(
      recipe=common.typed(nmsparse.recipe_config(recipe, **over)), nm=nm, layers=layers,
      rules=ml_collections.config_dict.placeholder(tuple)))


def make_config(model: str, recipe: str, layers: str, nm: str, depth: int,
                batch: int) -> ml_collections.ConfigDict:
  """A config for ``experiments.train.setup``: the model above, AdamW, one recipe."""
  c = ml_collections.ConfigDict()
  if model == 'vit':
    c.task = 'classification'
    c.model = ml_collections.ConfigDict(dict(
        name='vit', variant=f'S/{PATCH}', num_classes=CLASSES, channels=3,
        kwargs=dict(depth=depth, pool_type='gap', posemb='learn')))
    c.data = ml_collections.ConfigDict(dict(image_size=IMAGE))
    c.loss = 'softmax_xent'
  else:
    c.task = 'span_corruption'
    c.model = ml_collections.ConfigDict(dict(
        name='t5', variant='small', vocab_size=32128, dropout_rate=0.0,
        kwargs=dict(num_encoder_layers=depth, num_decoder_layers=depth)))
    c.data = defaults.text(inputs_length=T5_INPUTS, targets_length=T5_TARGETS)
    c.z_loss = 1e-4
  _common(c, recipe, layers, nm, batch)
  return c


def make_batch(model: str, batch: int) -> dict:
  rng = np.random.default_rng(0)
  if model == 'vit':
    return {'image': jnp.asarray(rng.standard_normal((batch, IMAGE, IMAGE, 3), np.float32)),
            'label': jnp.asarray(rng.integers(0, CLASSES, (batch,)), jnp.int32)}
  return {'inputs': jnp.asarray(rng.integers(2, 32000, (batch, T5_INPUTS)), jnp.int32),
          'targets': jnp.asarray(rng.integers(2, 32000, (batch, T5_TARGETS)), jnp.int32)}


def describe(model: str, depth: int, batch: int) -> str:
  if model == 'vit':
    return (f'ViT width {WIDTH}, depth {depth}, {HEADS} heads, MLP {MLP}, {(IMAGE // PATCH) ** 2} tokens '
            f'(32x32x3, patch {PATCH}, GAP), batch {batch}')
  return (f'T5.1.1-small (d_model 512, {depth} + {depth} layers, 6 heads, d_ff 1024, vocab 32128), '
          f'inputs {T5_INPUTS} and targets {T5_TARGETS} tokens, batch {batch}')


def model_flops(model: str, params, depth: int, batch: int) -> float:
  """FLOPs of one train step (forward + backward): 6 * matmul params * rows, plus attention."""
  total = 0.0
  if model == 'vit':
    tokens = batch * (IMAGE // PATCH) ** 2
    for path, x in nmsparse.rules.named_leaves(params):
      if not path.endswith('kernel'):
        continue
      size = float(np.prod(x.shape))
      if path.startswith('embedding'):
        total += 4 * size * tokens  # No gradient w.r.t. the images.
      elif path.startswith('head'):
        total += 6 * size * batch  # After pooling.
      else:
        total += 6 * size * tokens
    seq = (IMAGE // PATCH) ** 2
    return total + depth * 3 * 4 * batch * seq * seq * WIDTH  # QK^T and AV, forward and backward.
  for path, x in nmsparse.rules.named_leaves(params):
    if path.endswith('kernel'):  # The embedding is a gather, not a matmul.
      total += 6 * float(np.prod(x.shape)) * batch * (T5_INPUTS if path.startswith('encoder') else T5_TARGETS)
  inner = 6 * 64
  attention = (T5_INPUTS * T5_INPUTS + T5_TARGETS * T5_TARGETS + T5_TARGETS * T5_INPUTS)
  return total + depth * 3 * 4 * batch * attention * inner


def _model_free_loss(model, params, batch, rng, train, config):
  """Stands in for the model in the overhead step: L = sum(w~^2) / 2000 over every leaf.

  The barrier materialises the effective params, as the matmuls of the real step do.
  """
  del model, batch, rng, train, config
  eff = jax.tree.leaves(jax.lax.optimization_barrier(params))
  loss = sum(jnp.sum(jnp.square(w)) for w in eff) * 5e-4
  return loss, {}, jnp.float32(1.0)


class Variant:
  """One compiled train step with its own (donated) state, and the same step without the model."""

  def __init__(self, name: str, recipe: str, layers: str, nm: str, batch: dict, config_args: tuple):
    self.name, self.recipe, self.layers = name, recipe, layers
    model, depth, batch_size = config_args
    s = train_lib.setup(make_config(model, recipe, layers, nm, depth, batch_size), steps_per_epoch=1000)
    self.batch = batch
    t0 = time.perf_counter()
    self.step_fn, self.state, metrics = self._build(s)
    self.compile_s = time.perf_counter() - t0
    m = jax.device_get(metrics)
    self.phase, self.density = int(m['sparsity/phase']), float(m['sparsity/density'])
    if recipe != 'dense' and self.phase != 1:
      raise RuntimeError(f'{name}: expected the sparse phase, got phase {self.phase}.')
    self._setup = s
    self.free_fn = self.free_state = None
    self.times: list[float] = []
    self.free_times: list[float] = []

  def _build(self, s):
    state = train_lib.create_state(s, jax.random.key(0))
    start = None
    if self.recipe == 'sdgf':  # The last stage: the target N:M, as every other recipe.
      start = max(s.sp.schedule(x).starts[-1] for x in nmsparse.rules.spec_leaves(s.sp.specs)
                  if x is not None) + 1
    elif self.recipe not in ('dense', 'step'):  # Past the dense warm-up.
      start = s.sp.phases.dense_end + 1
    if start is not None:
      state = state.replace(step=jnp.asarray(start, state.step.dtype))
    fn = train_lib.make_train_step(s)
    state, metrics = fn(state, self.batch)  # Compile; STEP switches here.
    state, metrics = fn(state, self.batch)
    jax.block_until_ready((state, metrics))
    return fn, state, metrics

  def run(self, steps: int) -> None:
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      self.times.append(time.perf_counter() - t0)

  def build_free(self) -> None:
    """The overhead step: the same train step (sparsity update, apply, its backward, clip + the
    recipe's AdamW, metrics) around a trivial loss instead of the model. Frees the full step's state."""
    self.state = None
    s = self._setup
    free = dataclasses.replace(s, task=dataclasses.replace(s.task, loss_fn=_model_free_loss))
    self.free_fn, self.free_state, _ = self._build(free)

  def run_free(self) -> float:
    t0 = time.perf_counter()
    self.free_state, metrics = self.free_fn(self.free_state, self.batch)
    jax.block_until_ready((self.free_state, metrics))
    self.free_times.append(time.perf_counter() - t0)
    return self.free_times[-1]

  def lowered_flops(self) -> float | None:
    try:
      cost = self.step_fn.lower(self.state, self.batch).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost['flops'])
    except (KeyError, TypeError, IndexError):  # A backend whose cost analysis has no FLOPs: MFU not shown.
      return None


def xla_cost(model: str, recipe: str, layers: str, nm: str, depth: int, batch_size: int,
             batch: dict) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of the compiled train step by XLA's cost analysis: no run, no timing noise."""
  s = train_lib.setup(make_config(model, recipe, layers, nm, depth, batch_size), steps_per_epoch=1000)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  cost = train_lib.make_train_step(s).lower(s.abstract_state, abstract_batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']), float(cost['bytes accessed'])


def xla_cost_table(names: list, args, depth: int, batch_size: int, batch: dict) -> None:
  """Prints every variant's compiled FLOPs and bytes accessed, and their ratios to the dense step."""
  print('XLA cost analysis of each compiled train step (deterministic: independent of machine load)')
  print(f'{"variant":18s} {"GFLOP":>9} {"vs dense":>9} {"GB accessed":>12} {"vs dense":>9}')
  ref = None
  for name, recipe, layers in names:
    flops, nbytes = xla_cost(args.model, recipe, layers, args.nm, depth, batch_size, batch)
    ref = ref or (flops, nbytes)
    print(f'{name:18s} {flops / 1e9:9.2f} {flops / ref[0]:9.4f} {nbytes / 1e9:12.3f} {nbytes / ref[1]:9.4f}',
          flush=True)


def schedule(variants: list, group: int) -> list:
  """One round: the dense reference before and after every ``group`` variants (D v v D v v D ...)."""
  dense, rest = variants[0], variants[1:]
  order = [dense]
  for i in range(0, len(rest), group):
    order += rest[i:i + group] + [dense]
  return order


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--steps_per_round', type=int, default=2)
  ap.add_argument('--nm', default='1:8')
  ap.add_argument('--only', default='',
                  help='comma-separated recipe names, presets or variant globs (e.g. "ste,mdgf/mlp"); '
                       'dense always runs')
  ap.add_argument('--group', type=int, default=2, help='variants between two dense reference timings')
  ap.add_argument('--overhead_rounds', type=int, default=20,
                  help='rounds of the model-free step that measures what each recipe adds')
  ap.add_argument('--no_control', action='store_true', help='skip the second, separately compiled dense step')
  ap.add_argument('--peak_size', type=int, default=2048)
  ap.add_argument('--model', choices=('vit', 't5'), default='vit',
                  help='vit: ViT-S-like (issue target); t5: T5.1.1-small-sized')
  ap.add_argument('--depth', type=int, default=None,
                  help='smaller for a quick check; the target is at 6 (ViT) and 8 + 8 (T5)')
  ap.add_argument('--batch', type=int, default=None, help='smaller for a quick check; default 64 (ViT), 8 (T5)')
  ap.add_argument('--xla_cost', action='store_true',
                  help='compile only and print XLA\'s FLOPs and bytes accessed per variant (no timing)')
  args = ap.parse_args()
  depth = args.depth or DEFAULTS[args.model]['depth']
  batch_size = args.batch or DEFAULTS[args.model]['batch']
  nmsparse.parse_nm(args.nm)

  names = [(f'{recipe}/{layers}', recipe, layers) for layers in PRESETS[args.model] for recipe in RECIPES]
  if args.only:
    pats = [p.strip() for p in args.only.split(',') if p.strip()]
    names = [v for v in names if any(fnmatch.fnmatch(v[0], p) or p in v[1:] for p in pats)]
  control = [] if args.no_control else [('dense (control)', 'dense', 'mlp')]
  names = [('dense', 'dense', 'mlp')] + control + names

  batch = make_batch(args.model, batch_size)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), '
        f'{jax.device_count()} device(s), {os.cpu_count()} cpu(s)')
  print(f'{describe(args.model, depth, batch_size)}, float32, AdamW; N:M {args.nm}; '
        f'{args.rounds} rounds x {args.steps_per_round} steps per variant, interleaved', flush=True)

  if args.xla_cost:
    xla_cost_table([n for n in names if n[0] != 'dense (control)'], args, depth, batch_size, batch)
    return

  variants = []
  for name, recipe, layers in names:
    v = Variant(name, recipe, layers, args.nm, batch, (args.model, depth, batch_size))
    print(f'  compiled {name:18s} in {v.compile_s:5.1f}s (phase {v.phase}, density {v.density:.3f})',
          flush=True)
    variants.append(v)

  n = args.peak_size
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  peak_times = []
  dense = variants[0]

  def paired(times_of_round, schedule_order, fn):
    """Per variant: fn(its time, mean of the two dense times around it) for this round."""
    out = {}
    for i, (v, t) in enumerate(times_of_round):
      if v is dense:
        continue
      before = next(tt for vv, tt in reversed(times_of_round[:i]) if vv is dense)
      after = next(tt for vv, tt in times_of_round[i + 1:] if vv is dense)
      out[v.name] = fn(t, 0.5 * (before + after))
    return out

  # 1. Full train steps. Each round: D v v D v v ... D, in alternating directions. A
  # variant's ratio in a round is its time over the mean of the two dense timings
  # around it, so the load drift of a shared machine cancels; median over rounds.
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
    for name, x in paired(stamps, order, lambda t, d: t / d).items():
      ratios[name].append(x)
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(matmul(a, b))
      peak_times.append(time.perf_counter() - t0)
    print(f'  round {r + 1}/{args.rounds} done', flush=True)

  # 2. The recipe's own cost: the same steps without the model (D v D v ... D), whose
  # difference to the dense one is all that a recipe adds (mask, ops forward and
  # backward, its optimizer, metrics). Short steps, so many pairs fit.
  flops = model_flops(args.model, dense.state.params, depth, batch_size)
  xla_flops = dense.lowered_flops()
  for v in variants:  # Only now: the full steps' states are released first (memory).
    v.build_free()
  extra = {v.name: [] for v in variants[1:]}
  for r in range(args.overhead_rounds):
    order = schedule(variants, 1)
    if r % 2:
      order = order[::-1]
    stamps = [(v, v.run_free()) for v in order]
    for name, x in paired(stamps, order, lambda t, d: t - d).items():
      extra[name].append(x)

  peak = 2.0 * n ** 3 / min(peak_times)  # The best the machine gave us.
  dense_t = float(np.median(dense.times))
  print(f'\nmatmul peak {peak / 1e9:.1f} GFLOP/s ({n}x{n} float32, best of {len(peak_times)}; '
        f'median {2.0 * n ** 3 / float(np.median(peak_times)) / 1e9:.1f}); '
        f'model {flops / 1e9:.1f} GFLOP per step'
        + (f' (XLA cost analysis of the dense step: {xla_flops / 1e9:.1f})' if xla_flops else ''))
  print(f'{"":18s} {"----------- full train step (wall clock) ------------":>53}   '
        f'{"------ recipe overhead ------":>29}')
  print(f'{"variant":18s} {"median ms":>9} {"min ms":>8} {"vs dense":>8} {"(spread)":>15} {"MFU":>6}   '
        f'{"extra ms":>14} {"est. ratio":>11} {"density":>8}')
  worst = worst_est = 0.0
  control = None
  for v in variants:
    t = float(np.median(v.times))
    if v is dense:
      ratio, spread, ex, est = 1.0, '', f'{float(np.median(dense.free_times)) * 1e3:6.1f} (step)', 1.0
    else:
      rs, xs = ratios[v.name], np.asarray(extra[v.name])
      ratio = float(np.median(rs))
      spread = f'[{min(rs):.3f}, {max(rs):.3f}]'
      x = float(np.median(xs))
      se = 1.2533 * float(np.std(xs)) / max(len(xs), 1) ** 0.5
      ex = f'{x * 1e3:+6.1f} +- {se * 1e3:4.1f}'
      est = 1.0 + x / dense_t
      if v.recipe == 'dense':
        control = ratio
      else:
        worst, worst_est = max(worst, ratio), max(worst_est, est)
    flag = '  > target' if v.recipe != 'dense' and max(ratio, est) > TARGET else ''
    print(f'{v.name:18s} {t * 1e3:9.1f} {min(v.times) * 1e3:8.1f} {ratio:8.3f} {spread:>15} '
          f'{flops / t / peak:6.1%}   {ex:>14} {est:11.3f} {v.density:8.3f}{flag}')
  print('vs dense: median over rounds of step time / mean of the two dense timings around it '
        '(spread: min, max over rounds).\n'
        'extra ms: median over rounds of the time the recipe adds to the same step without the model '
        '(+- standard error);\nest. ratio = 1 + extra / median dense step.')
  noise = '' if control is None else f'; the dense control gives {control:.3f}: the noise of this machine'
  print(f'target (every ratio <= {TARGET}): from the recipe overhead {"MET" if worst_est <= TARGET else "NOT MET"} '
        f'(worst {worst_est:.3f}); wall clock {"MET" if worst <= TARGET else "NOT MET"} (worst {worst:.3f}{noise})')


if __name__ == '__main__':
  main()
