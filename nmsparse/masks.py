"""N:M keep-masks: the N largest-magnitude entries of every group of M.

Groups are M consecutive entries along the contraction axis (or axes, flattened
in row-major order) of a kernel. A Flax ``Dense`` kernel is ``(in, out)``, so the
default axis is 0; kernels stacked by ``nn.scan`` carry leading layer axes, so
address their contraction axes from the end (``axis=-2``).

Ties are broken deterministically: the lower index inside a group wins.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
from jax import lax

Axes = Union[int, Sequence[int]]

# Above this many argmax/argmin passes a sort-based mask is cheaper.
_MAX_PASSES = 8


def normalize_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
  """Returns the sorted, non-negative contraction axes for a rank-``ndim`` array."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes:
    raise ValueError('N:M axes must name at least one axis.')
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'N:M axis {a} is out of range for an array of rank {ndim}.')
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f'N:M axes {axes} repeat an axis (rank {ndim}).')
  return tuple(sorted(out))


def check_nm(shape: Sequence[int], n: int, m: int, axis: Axes = 0,
             name: str | None = None) -> tuple[int, ...]:
  """Validates an N:M pattern for a kernel shape; returns the normalized axes.

  Raises ValueError naming the parameter (``name``), its shape and the pattern
  when ``not 0 < n <= m`` or when the contraction size is not divisible by M.
  """
  what = f'parameter {name!r} with shape {tuple(shape)}' if name else f'shape {tuple(shape)}'
  if not (isinstance(n, int) and isinstance(m, int)):
    raise TypeError(f'N:M needs integers, got N={n!r}, M={m!r} for {what}.')
  if m <= 0 or n <= 0 or n > m:
    raise ValueError(f'Invalid N:M pattern {n}:{m} for {what}: need 0 < N <= M.')
  axes = normalize_axes(len(shape), axis)
  k = math.prod(shape[a] for a in axes)
  if k % m:
    raise ValueError(
        f'N:M {n}:{m} does not fit {what}: the contraction size along axes {axes} '
        f'is {k}, which is not divisible by M={m}. Choose an M that divides {k} '
        'or leave this parameter dense.')
  return axes


def _to_groups(x: jax.Array, axes: tuple[int, ...], m: int):
  """Views ``x`` as ``(pre, K // m, m, *post)``; returns the view and an inverse.

  The axes after the contraction axes stay as they are: merging them (``heads x head_dim``
  of a q/k/v kernel) would change the minor dimensions of the array, which on TPU is a
  relayout copy of the whole kernel. Leading axes are merged (major dimensions, free).
  """
  lo, hi = axes[0], axes[-1]
  perm = None
  if axes != tuple(range(lo, hi + 1)):  # Non-contiguous: gather them at `lo`.
    rest = [a for a in range(x.ndim) if a not in axes]
    perm = rest[:lo] + list(axes) + rest[lo:]
    x = jnp.transpose(x, perm)
    hi = lo + len(axes) - 1
  shape = x.shape
  pre, post = math.prod(shape[:lo]), shape[hi + 1:]
  k = math.prod(shape[lo:hi + 1])
  g = x.reshape(pre, k // m, m, *post)

  def back(y):
    y = y.reshape(shape)
    if perm is not None:
      y = jnp.transpose(y, [perm.index(i) for i in range(len(perm))])
    return y

  return g, back


def _pairwise_keep(a: jax.Array, n: int, m: int) -> jax.Array:
  """rank_i = #{j : a_j > a_i or (a_j == a_i and j < i)}; keep rank_i < n. O(M) per entry.

  Works on the M strided slices ``a[:, :, j]`` of a group, so that no array keeps the
  small group axis in a tiled position (on TPU that padding cost 4x the bytes at 2:4).
  (Reading a 2-D kernel's groups of 4 as runs of 8 rows, TPU's tile height, cut one mask
  pass from 1.7x to 0.69x an elementwise pass in isolation, but made the ViT-B/16 2:4
  train step on v4 move 1.022x dense's HBM bytes instead of 1.016x: not kept.)
  """
  cols = [a[:, :, j] for j in range(m)]
  keeps = []
  for i in range(m):
    rank = jnp.zeros(cols[i].shape, jnp.int32)
    for j in range(m):
      if j != i:  # A tie goes to the lower index: j beats i on equality only when j < i.
        beats = cols[j] > cols[i] if j > i else cols[j] >= cols[i]
        rank = rank + beats.astype(jnp.int32)
    keeps.append(rank < n)
  return jnp.stack(keeps, axis=2)


def _pairwise_keep_broadcast(a: jax.Array, n: int, m: int) -> jax.Array:
  """The same rank as :func:`_pairwise_keep`, one broadcast compare per group member.

  One fused loop over the grouped array and O(M) instructions: on CPU 2.2x faster than the
  strided slices at 2:4; on TPU and GPU it moves more bytes for M <= 8 (the small group axis
  is tiled there), but for M = 16 or 32 on GPU it is one pass where argmax passes are several.
  """
  idx = lax.broadcasted_iota(jnp.int32, (1, 1, m) + (1,) * (a.ndim - 3), 2)
  rank = jnp.zeros(a.shape, jnp.int32)
  for j in range(m):  # Member j beats entry i if larger, or equal with j < i.
    aj = a[:, :, j:j + 1]
    beats = jnp.where(j < idx, aj >= a, aj > a) & (idx != j)
    rank = rank + beats.astype(jnp.int32)
  return rank < n


def _pick(v: jax.Array, idx: jax.Array, better) -> jax.Array:
  """Index (keepdims) of the entry of each group (axis 2) that ``better`` prefers to every other.

  ``better(va, ia, vb, ib)`` says whether ``(va, ia)`` beats ``(vb, ib)``; it must be a
  total order (ties broken by index), so the result does not depend on reduction order.
  Groups longer than 16 are reduced in two levels, chunks of 16 then the chunks'
  winners: XLA's CPU backend vectorises reductions of up to 16 entries far better
  (1:32 and 1:128 masks run 10x faster so).
  """
  def combine(a, b):
    take_a = better(a[0], a[1], b[0], b[1])
    return lax.select(take_a, a[0], b[0]), lax.select(take_a, a[1], b[1])

  def reduce(v, i, axis):
    init = (jnp.zeros((), v.dtype), jnp.array(-1, jnp.int32))  # Index -1: never better than an entry.
    return lax.reduce((v, i), init, combine, (axis,))

  p, g, m, *post = v.shape
  if m > 16 and m % 16 == 0:
    split = (p, g, m // 16, 16, *post)
    v, idx = reduce(v.reshape(split), idx.reshape(split), 3)
  return reduce(v, idx, 2)[1][:, :, None]


def _first_max(va, ia, vb, ib):
  """The larger magnitude wins; among equal ones the lower index; index -1 (none) always loses."""
  return (ib < 0) | ((ia >= 0) & ((va > vb) | ((va == vb) & (ia < ib))))


def _last_min(va, ia, vb, ib):
  """The smaller magnitude wins; among equal ones the higher index; index -1 (none) always loses."""
  return (ib < 0) | ((ia >= 0) & ((va < vb) | ((va == vb) & (ia > ib))))


def _passes_keep(a: jax.Array, n: int, m: int) -> jax.Array:
  """min(N, M-N) passes over each group, each picking one entry. O(passes) per entry."""
  idx = lax.broadcasted_iota(jnp.int32, a.shape, 2)
  if n <= m - n:  # Pick the n largest, first occurrence (lower index) wins.
    keep = jnp.zeros(a.shape, bool)
    for _ in range(n):  # Entries already picked take index -1: they never win again.
      keep = keep | (idx == _pick(a, jnp.where(keep, -1, idx), _first_max))
    return keep
  # Drop the m - n smallest; among equal smallest the higher index goes first.
  keep = jnp.ones(a.shape, bool)
  for _ in range(m - n):
    keep = keep & (idx != _pick(a, jnp.where(keep, idx, -1), _last_min))
  return keep


def _sorted_keep(a: jax.Array, n: int, m: int) -> jax.Array:
  """Stable sort by descending magnitude (ties: lower index first); O(M log M)."""
  order = jnp.argsort(-a, axis=2, stable=True)
  rank = jnp.argsort(order, axis=2, stable=True)
  return rank < n


def magnitude_key(w: jax.Array) -> jax.Array:
  """An array that orders like ``|w|``, NaN above every number (inf included); one bitwise op.

  For IEEE floats the bits of a non-negative value, read as a signed integer, order like the
  value, and a NaN's bits exceed inf's (``abs`` clears the sign bit of a NaN too). XLA
  recomputes it inside every fusion that reads it: a ``where(isnan)``, or a mask of the sign
  bit, made the GPU compiler write the grouped kernel to memory first (2.6x the bytes at 8:16).
  Integers: ``jnp.abs``.
  """
  a = jnp.abs(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    return a
  return lax.bitcast_convert_type(a, jnp.dtype(f'int{jnp.finfo(w.dtype).bits}'))


def nm_mask(w: jax.Array, n: int, m: int, axis: Axes = 0) -> jax.Array:
  """Boolean N:M keep-mask of ``w``: True for the N largest |w| of each group of M.

  ``mask[g, i] = rank_i(|w_g|) < N`` where ``rank`` orders a group of M
  consecutive entries along ``axis`` by decreasing magnitude, ties broken by
  lower index. ``axis`` may be a tuple of contraction axes, flattened in
  row-major order before grouping (``DenseGeneral`` output projections).

  The algorithm is chosen per (N, M) and platform (``lax.platform_dependent``) for speed: a
  pairwise rank in one fused pass for small groups (on GPU also for several kept of 16 or
  32), min(N, M - N) argmax passes otherwise (two-level reductions past M = 16), a stable
  sort past 8 passes. Every algorithm gives the same mask. NaN counts as
  the largest magnitude, so every group still keeps exactly N entries.
  """
  axes = check_nm(w.shape, n, m, axis)
  if n == m:
    return jnp.ones(w.shape, bool)
  a = magnitude_key(lax.stop_gradient(w))
  g, back = _to_groups(a, axes, m)
  keep = lax.platform_dependent(g, cpu=functools.partial(_keep_cpu, n=n, m=m),
                                tpu=functools.partial(_keep_tpu, n=n, m=m),
                                default=functools.partial(_keep_gpu, n=n, m=m))
  return back(keep)


# The algorithm per (N, M) and platform, as measured in benchmarks/mask_speed.py: CPU time; TPU
# (v5e) and GPU (H100) HBM bytes of the compiled mask, from its optimised HLO. All give one mask.


def _small_group(n: int, m: int) -> bool:
  """Groups where a pairwise rank beats argmax passes on CPU and TPU: M <= 4, or 3+ passes of 8."""
  return m <= 4 or (m <= 8 and min(n, m - n) >= 3)


def _keep_cpu(g: jax.Array, n: int, m: int) -> jax.Array:
  if _small_group(n, m):
    return _pairwise_keep_broadcast(g, n, m)  # 2:4 in 1.1-1.5x the time of 1:16 (strided: 2.5x).
  return _keep_passes_or_sort(g, n, m)


def _keep_tpu(g: jax.Array, n: int, m: int) -> jax.Array:
  if _small_group(n, m):
    return _pairwise_keep(g, n, m)  # One fused pass (1:4 by argmax: 2.7x an elementwise pass, now 1.7x).
  # Else argmax passes: in a train step XLA stages the kernel on chip for them, and XLA's own
  # byte count (its roofline) prices the pairwise rank's M slices 5-15x higher (1:8, 8:16).
  return _keep_passes_or_sort(g, n, m)


def _keep_gpu(g: jax.Array, n: int, m: int) -> jax.Array:
  if m <= 8:
    return _pairwise_keep(g, n, m)
  if m <= 32 and min(n, m - n) >= 2:
    # One fused pass where each argmax pass would read the kernel again (8:16: 6.5x an elementwise
    # pass -> 0.62x up to 4M-entry kernels, 2.1x at 4096 x 4096). The broadcast form is O(M)
    # instructions; the strided slices, O(M^2), made SDGF steps compile 5-9x slower.
    return _pairwise_keep_broadcast(g, n, m)
  return _keep_passes_or_sort(g, n, m)


def _keep_passes_or_sort(g: jax.Array, n: int, m: int) -> jax.Array:
  if min(n, m - n) <= _MAX_PASSES:
    return _passes_keep(g, n, m)
  return _sorted_keep(g, n, m)


def topk_mask(w: jax.Array, n: int, m: int, axis: Axes = 0) -> jax.Array:
  """Reference N:M mask through ``lax.top_k`` on each group (same ties). For comparison."""
  axes = check_nm(w.shape, n, m, axis)
  g, back = _to_groups(jnp.abs(w), axes, m)
  g = jnp.moveaxis(g, 2, -1)
  _, idx = lax.top_k(g, n)
  keep = jnp.any(idx[..., None] == jnp.arange(m), axis=-2)
  return back(jnp.moveaxis(keep, -1, 2))


def argsort_mask(w: jax.Array, n: int, m: int, axis: Axes = 0) -> jax.Array:
  """Reference N:M mask by double argsort, the usual approach elsewhere. For comparison."""
  axes = check_nm(w.shape, n, m, axis)
  g, back = _to_groups(jnp.abs(w), axes, m)
  return back(_sorted_keep(g, n, m))
