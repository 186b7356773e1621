"""Which parameters are sparsified: ordered ``(regex, spec)`` rules over parameter paths.

A parameter's path is its keys joined by ``/`` (``encoder/block_0/mlp/fc1/kernel``;
NNX ``.value`` suffixes are dropped). Rules are tried in order and the first
whose regex ``re.fullmatch``-es the path decides; a spec of ``None`` means dense.
Unmatched parameters are dense. A rule that decides no parameter is an error,
so a typo in a regex cannot silently leave a model dense.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import jax

from nmsparse import masks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class NMSpec:
  """An N:M pattern along the contraction ``axes`` of one kernel (negative axes count from the end).

  ``axes=None`` means the input axis of a 2-D ``Dense`` kernel ``(in, out)``; a kernel
  with more axes (``DenseGeneral``, or layers stacked by ``nn.scan``) must name them,
  which :func:`resolve` enforces.
  """

  n: int
  m: int
  axes: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    if self.axes is not None:
      axes = (self.axes,) if isinstance(self.axes, int) else tuple(self.axes)
      object.__setattr__(self, 'axes', axes)
    if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n <= self.m:
      raise ValueError(f'Invalid N:M pattern {self.n}:{self.m}: need integers with 0 < N <= M.')

  @property
  def density(self) -> float:
    return self.n / self.m

  def replace(self, **kw) -> 'NMSpec':
    return dataclasses.replace(self, **kw)

  def __str__(self) -> str:
    return f'{self.n}:{self.m}@{"default" if self.axes is None else list(self.axes)}'


Spec = Optional[NMSpec]
Rules = Sequence[tuple[str, Spec]]


def parse_nm(text: str) -> tuple[int, int]:
  """``'1:8'`` -> ``(1, 8)``, with a clear error for anything else."""
  try:
    n, m = (int(x) for x in str(text).split(':'))
  except ValueError:
    raise ValueError(f'Cannot parse N:M pattern {text!r}: write it as "N:M", e.g. "2:4".') from None
  NMSpec(n, m)
  return n, m


def path_str(path: Sequence[Any]) -> str:
  """Joins a ``jax.tree_util`` key path (or tuple of keys) with ``/``; drops NNX ``.value`` attributes."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]  # NNX variables: ``.../kernel.value``.
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return '/'.join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf)]`` of a params pytree in flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), x) for p, x in flat]


def resolve(rules: Rules, params: PyTree, *, log: bool = True,
            allow_unused: bool = False) -> PyTree:
  """Maps every leaf of ``params`` to its ``NMSpec`` (or ``None`` for dense).

  ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` s. Each spec is checked
  against its leaf's shape (rank >= 2, axes in range, contraction divisible by
  M) and errors name the parameter. Returns a pytree of specs with the params
  structure (``None`` leaves for dense parameters).
  """
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f'Sparsity rule #{i} is {rule!r}; each rule is a (regex, NMSpec or None) pair.')
    pattern, spec = rule
    if spec is not None and not isinstance(spec, NMSpec):
      raise TypeError(f'Sparsity rule #{i} ({pattern!r}) has spec {spec!r}; use NMSpec(n, m, axes) or None.')
    try:
      compiled.append((re.compile(pattern), spec))
    except re.error as e:
      raise ValueError(f'Sparsity rule #{i} has an invalid regex {pattern!r}: {e}') from None
  used = [0] * len(compiled)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, lines = [], []
  for path, leaf in flat:
    name = path_str(path)
    spec = None
    for i, (rx, s) in enumerate(compiled):
      if rx.fullmatch(name):
        used[i] += 1
        spec = s
        break
    if spec is not None:
      shape = tuple(leaf.shape)
      if len(shape) < 2:
        raise ValueError(
            f'Sparsity rule {rules[i][0]!r} gives N:M {spec.n}:{spec.m} to {name!r} with shape '
            f'{shape}, which is not a kernel (rank < 2). Narrow the regex, e.g. end it with "kernel".')
      if spec.axes is None:
        if len(shape) > 2:
          raise ValueError(
              f'Sparsity rule {rules[i][0]!r} gives N:M {spec.n}:{spec.m} to {name!r} with shape '
              f'{shape} but no contraction axes: a kernel of rank {len(shape)} needs them named, '
              f'e.g. NMSpec({spec.n}, {spec.m}, axes=(-3,)) for a DenseGeneral q/k/v kernel '
              f'(embed, heads, head_dim), axes=(-3, -2) for an attention output (heads, head_dim, '
              f'embed), axes=(-2,) for Dense kernels stacked by nn.scan (layers, in, out).')
        spec = spec.replace(axes=(-2,))
      masks.check_nm(shape, spec.n, spec.m, spec.axes, name=name)
      lines.append(f'  {name:60s} {str(shape):22s} {spec.n}:{spec.m} axes {list(spec.axes)}')
    specs.append(spec)
  unused = [rules[i][0] for i, c in enumerate(used) if c == 0]
  if unused and not allow_unused:
    names = [n for n, _ in named_leaves(params)]
    raise ValueError(
        f'Sparsity rule(s) {unused} matched no parameter (regexes must fullmatch a path). '
        f'Parameter paths look like: {names[:8]}{" ..." if len(names) > 8 else ""}')
  if log:
    logging.info('N:M sparsity: %d of %d parameters sparsified\n%s', len(lines), len(flat),
                 '\n'.join(lines) if lines else '  (none)')
  return jax.tree_util.tree_unflatten(treedef, specs)


def spec_leaves(specs: PyTree) -> list[Spec]:
  """Flat list of specs (``None`` kept) in the params flatten order."""
  return jax.tree_util.tree_leaves(specs, is_leaf=lambda x: x is None or isinstance(x, NMSpec))


def map_sparse(fn, specs: PyTree, *trees: PyTree, dense=None) -> PyTree:
  """``fn(spec, *leaves)`` on sparsified leaves; ``dense(*leaves)`` (default: first leaf) elsewhere."""
  dense = dense or (lambda x, *_: x)
  return jax.tree.map(lambda s, *xs: dense(*xs) if s is None else fn(s, *xs), specs, *trees,
                      is_leaf=lambda x: x is None or isinstance(x, NMSpec))


def summarize(specs: PyTree, params: PyTree) -> dict[str, float]:
  """Counts of sparsified parameters and the overall kept fraction of the model."""
  total = kept = sparse_total = 0
  for s, x in zip(spec_leaves(specs), jax.tree_util.tree_leaves(params)):
    size = math.prod(x.shape)
    total += size
    if s is None:
      kept += size
    else:
      sparse_total += size
      kept += size * s.n // s.m
  return dict(params=total, sparsified=sparse_total, kept=kept, density=kept / max(total, 1))


# ----------------------------------------------------------------------------- presets
# Paths differ between models; presets match the usual Flax module names used by
# this project's models and by stock Flax layers. Pass ``extra`` rules to adapt.

# The MLP's block (a path component named like one, optionally numbered: ``MlpBlock_0``), then
# any sub-path to a kernel. A name that only starts like one (``mlp_head``, ``cpb_mlp``) is not it.
_MLP = r'(.*/)?(mlp|Mlp|MLP|MlpBlock|mlp_block|ffn|FFN|feed_forward|FeedForward)(_\d+)?/(.*/)?kernel'
_QKV = r'(.*/)?(query|key|value|q|k|v|qkv)/kernel'
_OUT = r'(.*/)?(attn|attention|MultiHeadDotProductAttention|SelfAttention|MultiHeadAttention|self_attention|encoder_decoder_attention)[^/]*/(out|o)/kernel'


def preset(name: str, n: int, m: int, *, mlp_axes: tuple[int, ...] = (-2,),
           qkv_axes: tuple[int, ...] = (-3,),
           out_axes: tuple[int, ...] = (-3, -2)) -> list[tuple[str, Spec]]:
  """Rules for a named layer set at N:M.

  ``'mlp'``: the MLP kernels (the paper's ViT/SwinV2 default); ``'mlp_qkv'``: MLP
  plus attention Q, K, V; ``'all'``: every attention (Q, K, V, output) and MLP
  kernel. The default axes fit stock Flax layers: ``Dense`` kernels ``(in, out)``
  (axis -2), ``MultiHeadDotProductAttention`` Q/K/V ``(embed, heads, head_dim)``
  (axis -3) and output ``(heads, head_dim, embed)`` (axes -3, -2); negative axes
  keep holding when blocks are stacked by ``nn.scan``.
  """
  mlp = (_MLP, NMSpec(n, m, mlp_axes))
  qkv = (_QKV, NMSpec(n, m, qkv_axes))
  out = (_OUT, NMSpec(n, m, out_axes))
  sets = {'mlp': [mlp], 'mlp_qkv': [mlp, qkv], 'all': [mlp, qkv, out]}
  if name not in sets:
    raise ValueError(f'Unknown sparsity preset {name!r}; choose one of {sorted(sets)}.')
  return sets[name]
