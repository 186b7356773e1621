"""Compressed N:M export: exact round trips, index cost near the entropy bound, validation, sizes."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse import export, masks, rules
from nmsparse.rules import NMSpec

PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 4), (1, 2), (1, 8), (2, 8), (4, 8), (1, 16), (2, 16),
            (8, 16), (1, 32), (4, 32), (1, 64), (8, 64), (1, 128), (8, 128), (16, 128)]
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def assert_bit_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_array_equal(bits(a), bits(b))


def random_nm(rng, shape, n, m, axes, dtype, neg_zero=0.2, drop=0.2):
  """An N:M kernel: nm_mask of a random kernel, some kept entries zeroed (+0.0 or -0.0)."""
  w = rng.standard_normal(shape).astype(np.float32)
  keep = np.asarray(masks.nm_mask(jnp.asarray(w), n, m, axes))
  return _drop(rng, w, keep, dtype, neg_zero, drop)


def random_nm_rows(rng, groups, out, n, m, dtype, neg_zero=0.2, drop=0.2):
  """NumPy-only N:M kernel ``(groups * m, out)`` along axis 0: N random slots of each group."""
  w = rng.standard_normal((groups * m, out)).astype(np.float32)
  rank = np.argsort(np.argsort(rng.random((groups, m, out)), axis=1), axis=1)
  return _drop(rng, w, (rank < n).reshape(groups * m, out), dtype, neg_zero, drop)


def _drop(rng, w, keep, dtype, neg_zero, drop):
  shape = w.shape
  w = np.where(keep, w, 0.0).astype(np.float32)
  dropped = keep & (rng.random(shape) < drop)  # groups with fewer than N nonzeros
  w[dropped] = np.where(rng.random(shape) < neg_zero, -0.0, 0.0)[dropped]
  return w.astype(dtype)


# ----------------------------------------------------------------------------- round trip

@settings(max_examples=60, deadline=None)
@given(pattern=st.sampled_from(PATTERNS), groups=st.integers(1, 3), out=st.integers(1, 3),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_round_trip_property(pattern, groups, out, dtype, seed):
  n, m = pattern
  rng = np.random.default_rng(seed)
  w = random_nm_rows(rng, groups, out, n, m, dtype)
  c = export.compress_kernel(w, n, m, (0,))
  assert c.values.shape == (groups * out, n) and c.values.dtype == w.dtype
  assert c.indices.dtype == np.uint8
  assert_bit_equal(export.decompress_kernel(c), w)


@pytest.mark.parametrize('shape,axes,n,m', [
    ((16, 6), (0,), 2, 4),  # Dense (in, out)
    ((3, 32, 5), (-2,), 1, 8),  # nn.scan-stacked (L, in, out)
    ((4, 8, 6), (0, 1), 1, 16),  # DenseGeneral out projection (heads, head_dim, embed)
    ((2, 8, 3, 4), (-3, -1), 2, 8),  # non-contiguous contraction axes
    ((3, 3, 16, 4), (2,), 1, 4),  # conv HWIO, groups along I
])
def test_round_trip_layouts(shape, axes, n, m):
  # The kernels are hard-masked by nm_mask: export's groups must be nm_mask's groups.
  rng = np.random.default_rng(0)
  w = random_nm(rng, shape, n, m, axes, np.float32)
  for dtype in DTYPES:
    wd = jnp.asarray(w.astype(dtype))  # a jax array, as Sparsifier.hard_params returns
    c = export.compress_kernel(wd, n, m, axes)
    assert_bit_equal(export.decompress_kernel(c), wd)


@pytest.mark.parametrize('n,m', [(2, 4), (1, 128), (16, 128)])
def test_round_trip_larger(n, m):
  rng = np.random.default_rng(1)
  w = random_nm(rng, (512, 384), n, m, (0,), np.float32)
  assert_bit_equal(export.decompress_kernel(export.compress_kernel(w, n, m, 0)), w)


def test_values_in_ascending_position_and_zero_fill():
  w = np.array([[0.0, 5.0], [7.0, 0.0], [0.0, -0.0], [-3.0, 0.0]], np.float32)
  c = export.compress_kernel(w, 2, 4, 0)
  # Column 0: nonzeros at 1, 3. Column 1: 5.0 at 0, then -0.0 (at 2) before any +0.0.
  np.testing.assert_array_equal(c.values, [[7.0, -3.0], [5.0, -0.0]])
  assert np.signbit(c.values[1, 1])
  assert_bit_equal(export.decompress_kernel(c), w)
  # All-zero groups pick the lowest positions.
  z = np.zeros((8, 1), np.float32)
  c = export.compress_kernel(z, 2, 8, 0)
  assert_bit_equal(export.decompress_kernel(c), z)


def test_negative_zeros_beyond_capacity_become_positive():
  w = np.array([[1.0], [-0.0], [2.0], [-0.0]], np.float32)  # 2 nonzeros + 2 x -0.0 at 2:4
  d = export.decompress_kernel(export.compress_kernel(w, 2, 4, 0))
  np.testing.assert_array_equal(d, w)  # numerically equal
  assert not np.signbit(d).any()


def test_nan_and_inf_are_kept_bitwise():
  w = np.array([[np.nan], [0.0], [0.0], [-np.inf]], np.float32)
  assert_bit_equal(export.decompress_kernel(export.compress_kernel(w, 2, 4, 0)), w)


# ----------------------------------------------------------------------------- index cost

def test_rank_encoding_by_hand():
  # 2:4 rank of {c1 < c2} is C(c1, 1) + C(c2, 2): {0,1} -> 0 + 0 = 0, {2,3} -> 2 + 3 = 5.
  w = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
  c = export.compress_kernel(w, 2, 4, 0)
  enc, g, b = export.index_plan(2, 4)
  assert (enc, g, b) == ('rank', c.groups_per_word, c.bits_per_word)
  word = 0 + 5 * 6  # ranks packed base C(4, 2) = 6, first group lowest
  assert int.from_bytes(c.indices.tobytes(), 'little') == word
  assert c.indices.nbytes == (b + 7) // 8


@pytest.mark.parametrize('n,m', [(2, 4), (1, 8), (1, 16)])
def test_index_bits_near_entropy(n, m):
  bound = math.log2(math.comb(m, n))
  enc, g, b = export.index_plan(n, m)
  assert math.comb(m, n)**g < 2**63
  assert b / g <= 1.02 * bound
  # The stored bytes of a real kernel too (padding included).
  rng = np.random.default_rng(2)
  w = random_nm(rng, (m * 64, 64), n, m, (0,), np.float32)
  c = export.compress_kernel(w, n, m, 0)
  assert c.indices.nbytes * 8 / c.num_groups <= 1.02 * bound


def test_index_plan_minimises_bits_per_group():
  for n, m in PATTERNS:
    enc, g, b = export.index_plan(n, m)
    cnk = math.comb(m, n)
    if enc == 'bitmap':
      assert cnk >= 2**63 and (g, b) == (1, m)
      continue
    assert b == (cnk**g - 1).bit_length()
    for h in range(1, 64):
      if cnk**h >= 2**63:
        break
      assert b / g <= (cnk**h - 1).bit_length() / h


# ----------------------------------------------------------------------------- trees

def _tree():
  rng = np.random.default_rng(3)
  params = {
      'mlp': {'kernel': jnp.asarray(random_nm(rng, (16, 4), 2, 4, (0,), np.float32)),
              'bias': jnp.arange(4.0)},
      'attn': {'out': {'kernel': jnp.asarray(
          random_nm(rng, (2, 8, 3), 1, 16, (0, 1), ml_dtypes.bfloat16))}},
  }
  specs = rules.resolve([('mlp/kernel', NMSpec(2, 4, (0,))),
                         ('attn/out/kernel', NMSpec(1, 16, (0, 1)))], params, log=False)
  return params, specs


def test_tree_round_trip():
  params, specs = _tree()
  c = export.compress(params, specs)
  assert isinstance(c['mlp']['kernel'], export.CompressedKernel)
  assert isinstance(c['mlp']['bias'], np.ndarray)
  out = export.decompress(c)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    assert_bit_equal(a, b)


def test_validate_names_bad_kernel():
  params, specs = _tree()
  report = export.validate(params, specs)
  assert report['mlp/kernel']['groups'] == 16 and report['attn/out/kernel']['groups'] == 3
  bad = jax.tree.map(lambda x: x, params)
  bad['mlp']['kernel'] = bad['mlp']['kernel'].at[:4, 1].set(1.0)  # one group fully dense
  with pytest.raises(ValueError, match=r"mlp/kernel.*1 of 16 groups") as e:
    export.validate(bad, specs)
  assert 'attn/out/kernel' not in str(e.value)
  with pytest.raises(ValueError, match='mlp/kernel'):
    export.compress(bad, specs)
  with pytest.raises(ValueError, match='1 of 16 groups'):
    export.compress_kernel(bad['mlp']['kernel'], 2, 4, 0)


def test_size_report_by_hand():
  params, specs = _tree()
  r = export.size_report(params, specs)
  # mlp: 64 f32 = 256 B dense; 16 groups * 2 values * 4 B = 128 B; 2:4 index: 17 groups per
  # 44-bit word -> 1 word = 44 bits -> 6 B. attn out: 48 bf16 = 96 B; 3 groups * 1 * 2 B = 6 B;
  # 1:16 index 4 bits each -> 12 bits -> 2 B. bias: 4 f32 = 16 B kept dense.
  assert r['dense_bytes'] == 256 + 96 + 16
  assert r['values_bytes'] == 128 + 6
  assert r['index_bytes'] == 6 + 2
  assert r['dense_leaf_bytes'] == 16
  assert r['compressed_bytes'] == 134 + 8 + 16
  assert r['ratio'] == pytest.approx(368 / 158)
  p = r['patterns']['2:4']
  assert p['index_bits_per_group'] == 44 / 17
  assert p['entropy_bits_per_group'] == pytest.approx(math.log2(6))
  assert r['patterns']['1:16']['index_bits_per_group'] == 4.0
  # The same numbers as the arrays compress() produces, and from shapes alone.
  c = export.compress(params, specs)
  stored = sum(x.nbytes for x in jax.tree.leaves(
      c, is_leaf=lambda x: isinstance(x, export.CompressedKernel)))
  assert stored == r['compressed_bytes']
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert export.size_report(shapes, specs) == r
