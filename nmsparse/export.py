"""Compressed N:M storage with an exact round trip (offline, NumPy).

A kernel that is N:M along its contraction ``axes`` is stored as

* ``values``: the N kept values of each group, ``(groups, N)``, original dtype,
  in ascending in-group position. Groups are ordered like the kernel with its
  contraction axes moved last (row-major over the other axes, then group index);
  inside a group positions run over the contraction axes flattened row-major,
  exactly as ``masks.nm_mask`` groups them.
* ``indices``: each group's sorted kept positions ``c_1 < ... < c_N`` as the rank
  of that N-subset in the combinatorial number system,
  ``r = sum_{i=1..N} C(c_i, i)`` in ``[0, C(M, N))``. The ranks of ``g``
  consecutive groups are packed into one base-``C(M, N)`` word
  ``w = sum_j r_j C(M, N)^j`` of ``b = bitlength(C(M, N)^g - 1)`` bits, with
  ``C(M, N)^g < 2^63`` and ``g`` minimising ``b / g`` (smallest ``g`` on ties), so the
  index cost per group approaches the entropy bound ``log2 C(M, N)``. Words are
  concatenated little-endian into a ``uint8`` byte array. When even one rank needs
  63 bits or more (e.g. 16:128) each group is stored as an M-bit bitmap instead.

Which N entries are kept: the nonzeros; a group with fewer than N nonzeros fills
its slots with zeros deterministically, ``-0.0`` before ``+0.0`` (to keep its
sign bit) and lower index first. The round trip is then bit-exact (NaN payloads,
``-0.0``, bfloat16 included); the only exception is a group holding more than N
entries with a nonzero bit pattern because some are ``-0.0``: those that do not fit
come back as ``+0.0`` (numerically equal).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nmsparse import masks as masks_lib
from nmsparse import rules as rules_lib

PyTree = Any
_MAX_WORD = 1 << 63


# ----------------------------------------------------------------------------- packing plan

def index_plan(n: int, m: int) -> tuple[str, int, int]:
  """``(encoding, groups_per_word g, bits_per_word b)`` for N:M position indices.

  ``'rank'``: ``g`` groups per word with ``C(M,N)^g < 2^63`` minimising
  ``b / g``, ``b = bitlength(C(M,N)^g - 1)``. ``'bitmap'`` (``C(M,N) >= 2^63``):
  one M-bit word per group.
  """
  c = math.comb(m, n)
  if c >= _MAX_WORD:
    return 'bitmap', 1, m
  best = None
  g = 1
  while c**g < _MAX_WORD:
    b = (c**g - 1).bit_length()
    if best is None or b * best[0] < best[1] * g:  # b / g < best_b / best_g
      best = (g, b)
    if c == 1:
      break
    g += 1
  return 'rank', best[0], best[1]


def index_bits_per_group(n: int, m: int) -> float:
  """Bits of index storage per group, ``b / g`` (before padding to whole bytes)."""
  _, g, b = index_plan(n, m)
  return b / g


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedKernel:
  """An N:M kernel in compressed form (a pytree leaf); ``decompress_kernel`` inverts it."""

  values: np.ndarray  # (groups, n), original dtype
  indices: np.ndarray  # uint8 bytes of the packed position indices
  shape: tuple[int, ...]
  dtype: np.dtype
  n: int
  m: int
  axes: tuple[int, ...]  # normalized (non-negative, sorted) contraction axes
  encoding: str  # 'rank' | 'bitmap'
  groups_per_word: int
  bits_per_word: int

  @property
  def num_groups(self) -> int:
    return math.prod(self.shape) // self.m

  @property
  def nbytes(self) -> int:
    """Stored bytes: values plus index bytes (metadata not counted)."""
    return self.values.nbytes + self.indices.nbytes


def _index_bytes(num_groups: int, n: int, m: int) -> int:
  _, g, b = index_plan(n, m)
  return (-(-num_groups // g) * b + 7) // 8


def _binom_table(m: int, n: int) -> np.ndarray:
  """``T[c, i] = C(c, i)`` for ``c < m``, ``i <= n`` as uint64 (all < C(m, n) < 2^63)."""
  return np.array([[math.comb(c, i) for i in range(n + 1)] for c in range(m)], np.uint64)


# ----------------------------------------------------------------------------- grouping

def _group_view(w: np.ndarray, axes: tuple[int, ...], m: int) -> np.ndarray:
  """``(groups, m)`` view: contraction axes moved last, flattened row-major, split in groups."""
  rest = [a for a in range(w.ndim) if a not in axes]
  return np.transpose(w, rest + list(axes)).reshape(-1, m)


def _ungroup(g: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
  rest = [a for a in range(len(shape)) if a not in axes]
  perm = rest + list(axes)
  x = g.reshape([shape[a] for a in perm])
  return np.transpose(x, np.argsort(perm))


def _bits(x: np.ndarray) -> np.ndarray:
  """The raw bit pattern of ``x`` as unsigned integers of the same width."""
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def _nonzero(x: np.ndarray) -> np.ndarray:
  """``x != 0`` (NaN counts as nonzero, -0.0 as zero); works for bfloat16 and ints."""
  if x.dtype == np.bool_:
    return x
  return x != np.zeros((), x.dtype)


def _cumcount(x: np.ndarray) -> np.ndarray:
  """Running count of True along axis 1 as int16 (a column loop: fast for short rows)."""
  out = np.empty(x.shape, np.int16)
  acc = np.zeros(x.shape[0], np.int16)
  for j in range(x.shape[1]):
    acc += x[:, j]
    out[:, j] = acc
  return out


def _select(groups: np.ndarray, nz: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
  """Bool ``(G, M)``, exactly N slots per group: nonzeros, then -0.0, then +0.0; low index first."""
  sel = nz.copy()
  need = np.nonzero(count < n)[0]
  if need.size == 0:
    return sel
  sub, nzs = groups[need], nz[need]
  if jnp.issubdtype(sub.dtype, jnp.floating):  # bfloat16 and float8 included
    negz = ~nzs & (_bits(sub) != 0)
  else:
    negz = np.zeros_like(nzs)
  room = (n - count[need])[:, None]
  pick_neg = negz & (_cumcount(negz) <= room)
  room = room - _cumcount(pick_neg)[:, -1:]
  posz = ~nzs & ~negz
  sel[need] = nzs | pick_neg | (posz & (_cumcount(posz) <= room))
  return sel


# ----------------------------------------------------------------------------- bit packing

def _pack_words(words: np.ndarray, b: int) -> np.ndarray:
  """Concatenates the low ``b`` bits of each uint64 word, little-endian, into bytes."""
  if b == 0 or words.size == 0:
    return np.zeros(0, np.uint8)
  shifts = np.arange(b, dtype=np.uint64)
  bits = ((words[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
  return np.packbits(bits.reshape(-1), bitorder='little')


def _unpack_words(data: np.ndarray, count: int, b: int) -> np.ndarray:
  if b == 0 or count == 0:
    return np.zeros(count, np.uint64)
  bits = np.unpackbits(data, bitorder='little', count=count * b).reshape(count, b)
  return (bits.astype(np.uint64) << np.arange(b, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def _encode(sel: np.ndarray, n: int, m: int) -> tuple[np.ndarray, str, int, int]:
  encoding, g, b = index_plan(n, m)
  if encoding == 'bitmap':
    return np.packbits(sel.reshape(-1), bitorder='little'), encoding, g, b
  num = sel.shape[0]
  pos = np.nonzero(sel)[1].reshape(num, n)  # ascending within each group
  table = _binom_table(m, n)
  ranks = np.zeros(num, np.uint64)
  for i in range(n):  # r = sum_i C(c_i, i), i = 1..N
    ranks += table[pos[:, i], i + 1]
  c = np.uint64(math.comb(m, n))
  ranks = np.concatenate([ranks, np.zeros(-num % g, np.uint64)]).reshape(-1, g)
  words = np.zeros(ranks.shape[0], np.uint64)
  for j in range(g - 1, -1, -1):  # Horner: w = sum_j r_j C^j
    words = words * c + ranks[:, j]
  return _pack_words(words, b), encoding, g, b


def _decode(c: CompressedKernel) -> np.ndarray:
  """Bool ``(G, M)`` selection of the kept slots."""
  num, n, m = c.num_groups, c.n, c.m
  if c.encoding == 'bitmap':
    return np.unpackbits(c.indices, bitorder='little', count=num * m).reshape(num, m).astype(bool)
  g, b = c.groups_per_word, c.bits_per_word
  words = _unpack_words(c.indices, -(-num // g), b)
  base = np.uint64(math.comb(m, n))
  ranks = np.empty((words.size, g), np.uint64)
  for j in range(g):
    ranks[:, j] = words % base
    words = words // base
  ranks = ranks.reshape(-1)[:num]
  table = _binom_table(m, n)
  sel = np.zeros((num, m), bool)
  rows = np.arange(num)
  for i in range(n, 0, -1):  # c_i = max{c : C(c, i) <= r}; r -= C(c_i, i)
    ci = np.searchsorted(table[:, i], ranks, side='right') - 1
    ranks = ranks - table[ci, i]
    sel[rows, ci] = True
  return sel


# ----------------------------------------------------------------------------- kernels

def compress_kernel(w: Any, n: int, m: int, axes: masks_lib.Axes = (-2,), *,
                    name: Optional[str] = None) -> CompressedKernel:
  """Compresses an exactly N:M kernel (at most N nonzeros per group of M along ``axes``).

  Raises ValueError naming the kernel (``name``) and the number of groups with
  more than N nonzeros otherwise. See the module docstring for the format.
  """
  w = np.asarray(w)
  axes = masks_lib.check_nm(w.shape, n, m, axes, name=name)
  groups = _group_view(w, axes, m)
  nz = _nonzero(groups)
  count = _cumcount(nz)[:, -1]
  bad = int((count > n).sum())
  if bad:
    what = f'parameter {name!r}' if name else 'kernel'
    raise ValueError(f'{what} with shape {w.shape} is not {n}:{m} along axes {axes}: {bad} of '
                     f'{groups.shape[0]} groups have more than {n} nonzeros. Export the hard-masked '
                     'weights (Sparsifier.hard_params) or check the spec.')
  sel = _select(groups, nz, count, n)
  values = groups[sel].reshape(groups.shape[0], n)
  indices, encoding, g, b = _encode(sel, n, m)
  return CompressedKernel(values=values, indices=indices, shape=tuple(w.shape), dtype=w.dtype,
                          n=n, m=m, axes=axes, encoding=encoding, groups_per_word=g,
                          bits_per_word=b)


def decompress_kernel(c: CompressedKernel) -> np.ndarray:
  """The dense kernel of ``c``: kept values at their positions, ``+0.0`` elsewhere."""
  sel = _decode(c)
  groups = np.zeros(sel.shape, c.dtype)
  groups[sel] = c.values.reshape(-1)
  return _ungroup(groups, c.shape, c.axes)


# ----------------------------------------------------------------------------- trees

def _is_spec(x) -> bool:
  return x is None or isinstance(x, rules_lib.NMSpec)


def _zip(params: PyTree, specs: PyTree) -> tuple[list[tuple[str, Any, Any]], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  spec_list = rules_lib.spec_leaves(specs)
  if len(flat) != len(spec_list):
    raise ValueError(f'specs has {len(spec_list)} leaves but params has {len(flat)}: pass the specs '
                     'that rules.resolve returned for this params structure.')
  return [(rules_lib.path_str(p), s, x) for (p, x), s in zip(flat, spec_list)], treedef


def compress(params: PyTree, specs: PyTree) -> PyTree:
  """Params tree with every sparsified kernel a ``CompressedKernel``; dense leaves as NumPy arrays."""
  validate(params, specs)
  items, treedef = _zip(params, specs)
  out = [np.asarray(x) if s is None else compress_kernel(x, s.n, s.m, s.axes, name=path)
         for path, s, x in items]
  return jax.tree_util.tree_unflatten(treedef, out)


def decompress(compressed: PyTree) -> PyTree:
  """Inverse of ``compress``: NumPy arrays everywhere."""
  return jax.tree.map(lambda x: decompress_kernel(x) if isinstance(x, CompressedKernel) else x,
                      compressed, is_leaf=lambda x: isinstance(x, CompressedKernel))


def validate(params: PyTree, specs: PyTree) -> dict[str, dict[str, Any]]:
  """Checks that every sparsified kernel is N:M along its spec's axes.

  Raises one ValueError listing each violating kernel (path, number of groups
  with more than N nonzeros). Otherwise returns ``{path: {'shape', 'n', 'm',
  'axes', 'groups', 'max_nonzeros'}}`` for the sparsified kernels.
  """
  items, _ = _zip(params, specs)
  report, bad = {}, []
  for path, s, x in items:
    if s is None:
      continue
    x = np.asarray(x)
    axes = masks_lib.check_nm(x.shape, s.n, s.m, s.axes, name=path)
    nnz = _cumcount(_nonzero(_group_view(x, axes, s.m)))[:, -1]
    nbad = int((nnz > s.n).sum())
    if nbad:
      bad.append(f'  {path} {x.shape} {s.n}:{s.m} axes {list(axes)}: {nbad} of {nnz.size} groups '
                 f'have more than {s.n} nonzeros (max {int(nnz.max())})')
    report[path] = dict(shape=tuple(x.shape), n=s.n, m=s.m, axes=axes, groups=int(nnz.size),
                        max_nonzeros=int(nnz.max(initial=0)))
  if bad:
    raise ValueError(f'{len(bad)} sparsified kernel(s) violate their N:M pattern:\n' + '\n'.join(bad) +
                     '\nExport the hard-masked weights (Sparsifier.hard_params) of the final step.')
  return report


def size_report(params: PyTree, specs: PyTree) -> dict[str, Any]:
  """Storage of ``compress(params, specs)`` computed from shapes alone (metadata not counted).

  ``dense_bytes = sum size * itemsize`` over all leaves; ``compressed_bytes =
  values_bytes + index_bytes + dense_leaf_bytes`` with ``values_bytes = groups *
  N * itemsize`` and ``index_bytes = ceil(ceil(groups / g) * b / 8)`` per kernel;
  ``ratio = dense_bytes / compressed_bytes``. ``patterns['N:M']`` gives the index
  bits per group ``b / g`` beside the entropy bound ``log2 C(M, N)``. Works on
  ``jax.ShapeDtypeStruct`` leaves.
  """
  items, _ = _zip(params, specs)
  dense = values = index = dense_leaves = 0
  patterns = {}
  for path, s, x in items:
    size, itemsize = math.prod(x.shape), np.dtype(x.dtype).itemsize
    dense += size * itemsize
    if s is None:
      dense_leaves += size * itemsize
      continue
    masks_lib.check_nm(x.shape, s.n, s.m, s.axes, name=path)
    groups = size // s.m
    values += groups * s.n * itemsize
    index += _index_bytes(groups, s.n, s.m)
    encoding, g, b = index_plan(s.n, s.m)
    patterns[f'{s.n}:{s.m}'] = dict(
        encoding=encoding, groups_per_word=g, bits_per_word=b, index_bits_per_group=b / g,
        entropy_bits_per_group=math.log2(math.comb(s.m, s.n)))
  compressed = values + index + dense_leaves
  return dict(dense_bytes=dense, compressed_bytes=compressed, values_bytes=values,
              index_bytes=index, dense_leaf_bytes=dense_leaves,
              ratio=dense / compressed if compressed else 1.0, patterns=patterns)
