"""FLOPs accounting for N:M sparse inference and training, with the convention written down.

Inference (multiply-accumulates, MACs). A kernel of rank >= 2 with contraction
size K (the product of its contraction dims) and output size O (the rest, with
any leading stacked-layer axes multiplying in) costs, per forward,

    macs = tokens * K * O * density = tokens * size(kernel) * density,

``density = N / M`` for a sparsified kernel and 1 for a dense one; ``tokens`` is
how many input vectors meet the kernel per forward (sequence length for a
transformer block, output positions for a conv, 1 for a classification head on
the class token). Matmuls without parameters (attention scores and the
attention-weighted sum of values) come in through ``extra_macs`` and are dense.
Only leaves whose path matches ``include`` (default: names ending in ``kernel``)
and of rank >= 2 are counted: embedding tables, biases and norms are not.

Training (FLOPs, 1 MAC = 2 FLOPs). A step is the forward matmul, the
input-gradient matmul and the weight-gradient matmul of every kernel, each with
the forward's MAC count at its own density, so ``3 x`` the forward when all are
dense (``extra_macs`` count ``3 x`` too; the first layer's unneeded input
gradient is counted like the others):

* dense phase, recipe ``dense``: all three dense;
* forward and input gradient at the step's density; the weight gradient is
  dense for recipes that send gradients to pruned weights (``ste``, ``srste``,
  ``mdgf``, ``sdgf``, ``mdgf_sdgf``, ``step``'s mask phase, the per-step
  fine-tune) and at the same density for hard-mask recipes (``oneshot``,
  ``hard``, the frozen fine-tune);
* MDGF's forward ``(m + (1 - m) a(t)) W`` is dense while ``a(t) >= mdgf_threshold``
  (1e-3 by default) and N:M after; its input gradient likewise;
* SDGF: each layer at the N:M of its own stage (``Sparsifier.schedule``);
* STEP: dense until ``switch_step`` (data dependent: read ``switch_step`` from
  its optimizer state, ``nmsparse.step_optimizer.find_step_state(opt_state).switch_step``),
  the STE mask phase after.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Optional, Union

import numpy as np

from nmsparse import recipes as recipes_lib
from nmsparse import rules as rules_lib

PyTree = Any
Tokens = Union[int, Callable[[str], Optional[int]]]
KERNELS = r'(.*/)?kernel'


def _kernels(params: PyTree, specs: Optional[PyTree], tokens: Tokens,
             include: Optional[str]) -> list[tuple[str, Optional[rules_lib.NMSpec], float]]:
  """``[(path, spec, dense forward MACs)]`` of the counted kernels."""
  named = rules_lib.named_leaves(params)
  spec_list = [None] * len(named) if specs is None else rules_lib.spec_leaves(specs)
  if len(spec_list) != len(named):
    raise ValueError(f'specs has {len(spec_list)} leaves but params has {len(named)}: pass the '
                     'specs that rules.resolve returned for this params structure.')
  rx = re.compile(include) if include is not None else None
  out = []
  for (path, x), s in zip(named, spec_list):
    shape = tuple(getattr(x, 'shape', ()))
    if len(shape) < 2 or (rx is not None and not rx.fullmatch(path)):
      if s is not None:
        raise ValueError(f'Sparsified parameter {path!r} {shape} is not counted as a kernel by '
                         f'include={include!r}: widen the include regex.')
      continue
    t = tokens(path) if callable(tokens) else tokens
    if t is None or t == 0:
      continue
    if not isinstance(t, (int, np.integer)) or t < 0:
      raise ValueError(f'tokens for {path!r} must be a non-negative int, got {t!r}.')
    out.append((path, s, float(int(t) * math.prod(shape))))
  return out


def inference_macs(params: PyTree, specs: Optional[PyTree] = None, *, tokens_per_kernel: Tokens = 1,
                   extra_macs: float = 0, include: Optional[str] = KERNELS) -> dict[str, Any]:
  """Multiply-accumulates of one forward pass: ``sum_k tokens_k * size_k * density_k + extra_macs``.

  ``tokens_per_kernel``: an int for every kernel, or a callable ``path -> int``
  (0 or None skips that kernel). ``specs`` (from ``rules.resolve``; None = all
  dense) gives each kernel's density N/M. ``params`` may hold arrays or
  ``jax.ShapeDtypeStruct``. Returns ``macs``, ``dense_macs`` (every kernel at
  density 1), ``extra_macs``, ``sparsified_dense_macs`` (the sparsified kernels
  at density 1) and ``per_param`` (``{path: macs}``).
  """
  per, dense, sparsified = {}, 0.0, 0.0
  for path, s, f in _kernels(params, specs, tokens_per_kernel, include):
    per[path] = f if s is None else f * s.n / s.m
    dense += f
    sparsified += 0.0 if s is None else f
  return dict(macs=sum(per.values()) + extra_macs, dense_macs=dense + extra_macs,
              extra_macs=float(extra_macs), sparsified_dense_macs=sparsified, per_param=per)


def _as_sparsifier(recipe: Any, specs: Optional[PyTree], total_steps: Optional[int]
                   ) -> recipes_lib.Sparsifier:
  if isinstance(recipe, recipes_lib.Sparsifier):
    return recipe if specs is None else recipes_lib.Sparsifier(recipe.recipe, specs)
  if specs is None:
    raise ValueError('training_flops needs specs= when given a Recipe or a recipe config.')
  if isinstance(recipe, recipes_lib.Recipe):
    return recipes_lib.Sparsifier(recipe, specs)
  if total_steps is None:
    raise ValueError('training_flops: pass total_steps= with a recipe config, or a Recipe/Sparsifier.')
  return recipes_lib.Sparsifier(recipes_lib.Recipe.from_config(recipe, total_steps), specs)


def training_flops(params: PyTree, specs: Optional[PyTree], recipe: Any, tokens: Tokens, *,
                   batch_size: int = 1, extra_macs: float = 0, total_steps: Optional[int] = None,
                   switch_step: Optional[int] = None, mdgf_threshold: float = 1e-3,
                   include: Optional[str] = KERNELS) -> dict[str, Any]:
  """Training FLOPs of a whole run under the module's convention.

  ``recipe``: a ``Sparsifier``, a ``Recipe`` or a recipe config (with
  ``total_steps``). ``tokens`` per example for each kernel (int or callable
  ``path -> int``, as ``inference_macs``), times ``batch_size`` examples per
  step; ``extra_macs`` are parameter-free MACs per example forward. Per kernel k
  and step,

      flops_k = 2 * F_k * (d_fwd + d_in + d_w),   F_k = tokens_k * batch_size * size_k

  with the densities of the step's phase (module docstring), plus
  ``2 * 3 * extra_macs * batch_size``. Returns ``flops`` (the run),
  ``dense_flops`` (the same run fully dense), ``ratio`` = flops / dense_flops,
  ``per_phase`` (``{'dense', 'sparse', 'finetune'}`` totals) and ``segments``: a
  list of ``{phase, stage, start, end, steps, forward, weight_grad,
  flops_per_step, flops}`` over step ranges ``[start, end)`` of constant cost.
  """
  sp = _as_sparsifier(recipe, specs, total_steps)
  r, ph = sp.recipe, sp.phases
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  kernels = _kernels(params, sp.specs, tokens, include)
  extra = float(extra_macs) * batch_size
  fwd_total = sum(f for _, _, f in kernels) * batch_size + extra

  def step_flops(fwd: Callable, wgrad_dense: bool) -> float:
    """2 * (forward + input grad + weight grad) MACs with ``fwd(spec) -> density``."""
    macs = 3.0 * extra
    for _, s, f in kernels:
      d = 1.0 if s is None else fwd(s)
      macs += f * batch_size * (2.0 * d + (1.0 if wgrad_dense else d))
    return 2.0 * macs

  segments = []

  def add(phase, stage, start, end, forward, weight_grad, per_step):
    if end > start:
      segments.append(dict(phase=phase, stage=stage, start=int(start), end=int(end),
                           steps=int(end - start), forward=forward, weight_grad=weight_grad,
                           flops_per_step=per_step, flops=per_step * (end - start)))

  dense_step = 6.0 * fwd_total
  final = lambda s: s.n / s.m
  if r.name == 'dense':
    add('dense', 0, 0, ph.total, 'dense', 'dense', dense_step)
  elif r.name == 'step':
    if switch_step is None:
      raise ValueError('recipe "step" switches at a data-dependent step: pass switch_step= (the '
                       'first step of its mask phase: '
                       'nmsparse.step_optimizer.find_step_state(opt_state).switch_step).')
    if not 0 <= switch_step <= ph.total:
      raise ValueError(f'switch_step={switch_step} lies outside the run of {ph.total} steps.')
    sw = min(int(switch_step), ph.finetune_start)
    add('dense', 0, 0, sw, 'dense', 'dense', dense_step)
    add('sparse', 0, sw, ph.finetune_start, 'sparse', 'dense', step_flops(final, True))
  else:
    add('dense', 0, 0, ph.dense_end, 'dense', 'dense', dense_step)
    rows = sp.rows
    hard = rows[recipes_lib.SPARSE].bwd == 0.0  # The mask reaches the weight gradient too.
    schedules = [None if s is None else sp.schedule(s) for _, s, _ in kernels]
    # Segments of constant N:M: every layer's stage starts (SDGF layers each run their own).
    cuts = sorted({ph.dense_end, ph.finetune_start} | {
        x for sc in schedules if sc is not None for x in sc.starts if ph.dense_end <= x < ph.finetune_start})
    # MDGF: first sparse step whose a(t) < threshold (a is non-increasing in t).
    cross = ph.dense_end
    if r.decay is not None and ph.sparse_steps > 0:
      a = np.asarray(r.decay(np.arange(ph.sparse_steps)))
      below = np.nonzero(a < mdgf_threshold)[0]
      cross = ph.dense_end + (int(below[0]) if below.size else ph.sparse_steps)
    for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
      by_spec = {s: n / m for (_, s, _), sc in zip(kernels, schedules) if s is not None
                 for n, m in [sc.patterns[int(sc.stage(lo))]]}
      wg = 'sparse' if hard else 'dense'
      mid = min(max(cross, lo), hi)
      add('sparse', k, lo, mid, 'dense', wg, step_flops(lambda s: 1.0, not hard))
      add('sparse', k, mid, hi, 'sparse', wg, step_flops(by_spec.__getitem__, not hard))
  if r.name != 'dense':
    frozen = sp.rows[recipes_lib.FINETUNE].bwd == 0.0
    add('finetune', 0, ph.finetune_start, ph.total, 'sparse', 'sparse' if frozen else 'dense',
        step_flops(final, not frozen))
  per_phase = {p: sum(s['flops'] for s in segments if s['phase'] == p)
               for p in ('dense', 'sparse', 'finetune')}
  total = sum(per_phase.values())
  dense_total = dense_step * ph.total
  return dict(flops=total, dense_flops=dense_total, ratio=total / dense_total if dense_total else 1.0,
              per_phase=per_phase, segments=segments)
