"""Diagnostics for a train loop to log: pure, jittable functions of params, masks and gradients.

Every function returns a jnp scalar or a flat dict of jnp scalars. ``specs`` is
the params-shaped pytree of ``NMSpec`` (``None`` = dense) from ``rules.resolve``;
mask pytrees are params-shaped with ``None`` for dense leaves, as from
``Sparsifier.masks``. Pass the *effective* weights (e.g. ``Sparsifier.hard_params``)
to ``sparsity`` and ``nm_valid_fraction``; the dense weights the optimizer updates
are not sparse under STE-like recipes.

Counts are accumulated per leaf in int32 and summed over leaves in float32, so
totals past 2^24 entries are approximate in the last digits (fine for logging).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from nmsparse import masks as masks_lib
from nmsparse import rules as rules_lib

PyTree = Any
Scalar = jax.Array


# ----------------------------------------------------------------------------- helpers

def _sparse_leaves(params: PyTree, specs: PyTree) -> list[tuple[str, rules_lib.NMSpec, jax.Array]]:
  """``[(path, spec, leaf)]`` for the sparsified leaves of ``params``."""
  named = rules_lib.named_leaves(params)
  spec_list = rules_lib.spec_leaves(specs)
  if len(named) != len(spec_list):
    raise ValueError(
        f'specs has {len(spec_list)} leaves but params has {len(named)}: pass the specs that '
        'rules.resolve(rules, params) returned for this params structure.')
  return [(path, s, x) for (path, x), s in zip(named, spec_list) if s is not None]


def _mask_pairs(masks: PyTree, tree: PyTree, what: str) -> list[tuple[jax.Array, Any]]:
  """Pairs each non-None mask leaf with the matching subtree of ``tree`` (params structure)."""
  pairs = []

  def collect(mask, x):
    if mask is not None:
      pairs.append((mask, x))
    return None

  try:
    jax.tree.map(collect, masks, tree, is_leaf=lambda x: x is None)
  except ValueError as e:
    raise ValueError(f'masks and {what} must have the same (params) structure: {e}') from None
  return pairs


def _frac(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0."""
  num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


def _sum_f32(xs) -> jax.Array:
  return sum((jnp.asarray(x, jnp.float32) for x in xs), jnp.zeros([], jnp.float32))


# ----------------------------------------------------------------------------- sparsity

def sparsity(params: PyTree, specs: PyTree, *, per_param: bool = False
             ) -> jax.Array | dict[str, jax.Array]:
  """Fraction of exact zeros over the sparsified kernels: ``sum_k #{w_k == 0} / sum_k size(w_k)``.

  ``-0.0`` counts as zero, NaN does not. With ``per_param=True`` returns
  ``{path: #{w == 0} / size(w)}`` for each sparsified kernel instead. With no
  sparsified kernel the total is 0.
  """
  leaves = _sparse_leaves(params, specs)
  zeros = {path: jnp.sum(w == 0) for path, _, w in leaves}
  if per_param:
    return {path: _frac(zeros[path], w.size) for path, _, w in leaves}
  total = sum(w.size for _, _, w in leaves)
  return _frac(_sum_f32(zeros.values()), total)


def _group_nonzeros(w: jax.Array, spec: rules_lib.NMSpec) -> jax.Array:
  """Nonzero count of each N:M group of ``w``, shape ``(pre, K // M, *post)``."""
  axes = masks_lib.normalize_axes(w.ndim, spec.axes)
  g, _ = masks_lib._to_groups(w != 0, axes, spec.m)  # pylint: disable=protected-access
  return jnp.sum(g, axis=2, dtype=jnp.int32)


def nm_valid_fraction(params: PyTree, specs: PyTree, *, per_param: bool = False
                      ) -> jax.Array | dict[str, jax.Array]:
  """Fraction of N:M groups with at most N nonzeros: ``#{g : nnz(g) <= N} / #groups``.

  Groups are the M consecutive entries along each spec's contraction axes (as in
  ``nm_mask``). 1.0 for hard-masked weights. ``per_param=True`` gives
  ``{path: fraction}``. With no sparsified kernel the total is 1.
  """
  leaves = _sparse_leaves(params, specs)
  valid, count = {}, {}
  for path, s, w in leaves:
    nnz = _group_nonzeros(w, s)
    valid[path], count[path] = jnp.sum(nnz <= s.n), nnz.size
  if per_param:
    return {p: _frac(valid[p], count[p]) for p in valid}
  if not leaves:
    return jnp.ones([], jnp.float32)
  return _frac(_sum_f32(valid.values()), sum(count.values()))


# ----------------------------------------------------------------------------- masks

def mask_flip_rate(mask_a: PyTree, mask_b: PyTree) -> dict[str, jax.Array]:
  """How much the N:M masks changed between two steps.

  ``mask_flips = sum_k #{a_k != b_k}`` (the sum of absolute differences of the
  0/1 masks) and ``mask_flip_rate = mask_flips / sum_k size(a_k)``: 0 for
  identical masks, 1 for complementary ones. ``None`` (dense) leaves are skipped;
  both trees need the same structure and shapes.
  """
  pairs = _mask_pairs(mask_a, mask_b, 'mask_b')
  total = 0
  for a, b in pairs:
    if b is None or jnp.shape(a) != jnp.shape(b):
      raise ValueError(f'mask_flip_rate: mask shapes differ ({jnp.shape(a)} vs '
                       f'{None if b is None else jnp.shape(b)}); compare masks of the same params.')
    total += math.prod(jnp.shape(a))
  flips = _sum_f32(jnp.sum(jnp.asarray(a, bool) != jnp.asarray(b, bool)) for a, b in pairs)
  return {'mask_flip_rate': _frac(flips, total), 'mask_flips': flips}


# ----------------------------------------------------------------------------- gradients

def grad_norms(grads: PyTree, masks: PyTree) -> dict[str, jax.Array]:
  """L2 norms of the gradient on kept and on pruned weights over all sparsified kernels.

  ``kept_grad_norm = sqrt(sum_k ||m_k * g_k||^2)``, ``pruned_grad_norm =
  sqrt(sum_k ||(1 - m_k) * g_k||^2)``, and the RMS per element
  ``*_grad_rms = norm / sqrt(#entries)`` to compare across densities (0 when a
  set is empty, e.g. pruned weights in the dense phase). ``masks`` has the
  params structure with ``None`` for dense leaves.
  """
  pairs = _mask_pairs(masks, grads, 'grads')
  sq_kept, sq_pruned, n_kept, n_pruned = [], [], [], []
  for mask, g in pairs:
    mask = jnp.asarray(mask, bool)
    g2 = jnp.square(jnp.asarray(g, jnp.float32))
    sq_kept.append(jnp.sum(jnp.where(mask, g2, 0.0)))
    sq_pruned.append(jnp.sum(jnp.where(mask, 0.0, g2)))
    k = jnp.sum(mask)
    n_kept.append(k)
    n_pruned.append(mask.size - k)
  out = {}
  for name, sq, n in (('kept', sq_kept, n_kept), ('pruned', sq_pruned, n_pruned)):
    sq, n = _sum_f32(sq), _sum_f32(n)
    out[f'{name}_grad_norm'] = jnp.sqrt(sq)
    out[f'{name}_grad_rms'] = jnp.sqrt(_frac(sq, n))
  return out


def gradient_noise(grads: PyTree, masks: PyTree) -> dict[str, jax.Array]:
  """Noise-to-signal ratio of per-microbatch gradients, on kept and on pruned weights.

  Each leaf of ``grads`` stacks B >= 2 microbatch gradients on a leading axis
  (``jax.tree.map(lambda *g: jnp.stack(g), *per_microbatch_grads)``); ``masks``
  has the params structure (no leading axis; ``None`` for dense leaves). Over
  the kept (resp. pruned) entries S of all sparsified kernels, with
  ``gbar = mean_b g_b``:

      signal = ||gbar_S||^2
      noise  = sum_{i in S} Var_b(g_{b,i})  = 1/(B-1) sum_b ||g_{b,S} - gbar_S||^2
      noise_ratio = noise / signal

  ``noise_ratio`` is the "simple" gradient noise scale tr(Sigma)/|G|^2 of
  McCandlish et al. (2018) measured per microbatch: a batch of b microbatches
  has a gradient whose noise equals its signal when b ~ noise_ratio. The
  paper's explanation predicts a much larger ratio on pruned weights than on kept
  ones as sparsity grows. (``signal`` is biased up by noise / B; keep B fixed
  when comparing runs.) Keys: ``{kept,pruned}_grad_{signal,noise,noise_ratio}``.
  """
  pairs = _mask_pairs(masks, grads, 'grads')
  acc = {k: [] for k in ('kept_signal', 'kept_noise', 'pruned_signal', 'pruned_noise')}
  for mask, g in pairs:
    g = jnp.asarray(g, jnp.float32)
    if g.ndim != jnp.ndim(mask) + 1 or g.shape[1:] != jnp.shape(mask) or g.shape[0] < 2:
      raise ValueError(
          f'gradient_noise needs grads stacked over B >= 2 microbatches on a leading axis: got a '
          f'gradient of shape {g.shape} for a mask of shape {jnp.shape(mask)}.')
    mask = jnp.asarray(mask, bool)
    gbar = jnp.mean(g, axis=0)
    var = jnp.sum(jnp.square(g - gbar), axis=0) / (g.shape[0] - 1)
    signal = jnp.square(gbar)
    acc['kept_signal'].append(jnp.sum(jnp.where(mask, signal, 0.0)))
    acc['kept_noise'].append(jnp.sum(jnp.where(mask, var, 0.0)))
    acc['pruned_signal'].append(jnp.sum(jnp.where(mask, 0.0, signal)))
    acc['pruned_noise'].append(jnp.sum(jnp.where(mask, 0.0, var)))
  out = {}
  for name in ('kept', 'pruned'):
    signal, noise = _sum_f32(acc[f'{name}_signal']), _sum_f32(acc[f'{name}_noise'])
    out[f'{name}_grad_signal'] = signal
    out[f'{name}_grad_noise'] = noise
    out[f'{name}_grad_noise_ratio'] = jnp.where(signal > 0, noise / jnp.where(signal > 0, signal, 1.0),
                                                jnp.where(noise > 0, jnp.inf, 0.0))
  return out


# ----------------------------------------------------------------------------- summary

def summary(params: PyTree, specs: PyTree, *, masks: Optional[PyTree] = None,
            prev_masks: Optional[PyTree] = None, grads: Optional[PyTree] = None,
            microbatch_grads: Optional[PyTree] = None) -> dict[str, jax.Array]:
  """One flat dict ready to log.

  Always ``sparsity`` and ``nm_valid`` of ``params`` (pass the effective weights);
  with ``masks`` and ``prev_masks`` the ``mask_flip_rate`` and ``mask_flips``;
  with ``masks`` and ``grads`` the ``grad_norms`` keys; with ``masks`` and
  ``microbatch_grads`` (stacked) the ``gradient_noise`` keys.
  """
  out = {'sparsity': sparsity(params, specs), 'nm_valid': nm_valid_fraction(params, specs)}
  needs_masks = [k for k, v in (('prev_masks', prev_masks), ('grads', grads),
                                ('microbatch_grads', microbatch_grads)) if v is not None]
  if needs_masks and masks is None:
    raise ValueError(f'summary: {needs_masks} need masks= (e.g. Sparsifier.masks(...) of this step).')
  if prev_masks is not None:
    out.update(mask_flip_rate(prev_masks, masks))
  if grads is not None:
    out.update(grad_norms(grads, masks))
  if microbatch_grads is not None:
    out.update(gradient_noise(microbatch_grads, masks))
  return out
