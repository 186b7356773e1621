"""Tests for nmsparse.masks: N:M keep-masks.

Expected masks come from a NumPy loop reference written here (stable argsort of
-|w| per group, so ties go to the lower index) or from hand-written examples.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from nmsparse import argsort_mask, check_nm, nm_mask, ops, topk_mask

# Every pattern asked for, plus ones that reach each algorithm of nm_mask:
# pairwise (small M), argmax passes, argmin (drop) passes with several passes
# (14:16, 30:32), and the stable-sort path (12:32, 20:64).
PATTERNS = [
    (2, 4), (1, 4), (3, 4),
    (1, 8), (2, 8), (4, 8), (7, 8),
    (1, 16), (2, 16), (4, 16), (8, 16), (14, 16), (15, 16),
    (1, 32), (3, 32), (12, 32), (30, 32),
    (1, 64), (20, 64),
    (1, 128),
]
# A smaller set for the (slower) hypothesis tests; still covers every path.
HYP_PATTERNS = [(2, 4), (1, 4), (1, 8), (7, 8), (4, 16), (14, 16), (3, 32), (12, 32), (1, 128)]
COLS = 3

FAST = settings(max_examples=15, deadline=None)


# ----------------------------------------------------------------------------- reference

def ref_rows(x: np.ndarray, n: int, m: int) -> np.ndarray:
  """NumPy loop reference on a 2-D array whose rows are split into groups of m."""
  keep = np.zeros(x.shape, bool)
  for r in range(x.shape[0]):
    for g0 in range(0, x.shape[1], m):
      grp = np.abs(x[r, g0:g0 + m].astype(np.float64))
      order = np.argsort(-grp, kind='stable')
      keep[r, g0 + order[:n]] = True
  return keep


def ref_mask(w, n: int, m: int, axes=(0,)) -> np.ndarray:
  """Reference mask: flatten the (sorted) contraction axes row-major, group by m."""
  w = np.asarray(w, np.float64)
  axes = sorted(a % w.ndim for a in axes)
  other = [a for a in range(w.ndim) if a not in axes]
  perm = other + axes
  t = np.transpose(w, perm)
  flat = t.reshape(math.prod(t.shape[:len(other)]), -1)
  keep = ref_rows(flat, n, m).reshape(t.shape)
  return np.transpose(keep, np.argsort(perm))


@functools.lru_cache(maxsize=None)
def jitted(n, m, axis=0, fn=nm_mask):
  return jax.jit(functools.partial(fn, n=n, m=m, axis=axis))


def mask(w, n, m, axis=0, fn=nm_mask):
  """The mask under jit (one compile per pattern, shape and axis: much cheaper than eager)."""
  return np.asarray(jitted(n, m, axis, fn)(jnp.asarray(w)))


def int_weights(rng, shape, lo=-3, hi=3):
  return rng.integers(lo, hi + 1, size=shape).astype(np.float32)


def group_counts(mask, m, axis=0):
  """Kept entries per group along a single axis."""
  mk = np.moveaxis(np.asarray(mask), axis, -1)
  return mk.reshape(*mk.shape[:-1], mk.shape[-1] // m, m).sum(-1)


# ----------------------------------------------------------------------------- hand examples

def test_ties_lower_index_wins_hand_example():
  w = jnp.array([[1.0], [-1.0], [1.0], [0.0]])  # A (in=4, out=1) kernel: one group.
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 1, 4))[:, 0], [True, False, False, False])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 2, 4))[:, 0], [True, True, False, False])
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 3, 4))[:, 0], [True, True, True, False])


def test_hand_example_magnitude_not_sign():
  w = jnp.array([[0.1, -5.0, 3.0, -0.2, 2.0, -2.5, 0.0, 1.0]]).T  # (8, 1)
  np.testing.assert_array_equal(
      np.asarray(nm_mask(w, 2, 4))[:, 0], [False, True, True, False, True, True, False, False])
  np.testing.assert_array_equal(
      np.asarray(nm_mask(w, 1, 8))[:, 0], [False, True, False, False, False, False, False, False])
  np.testing.assert_array_equal(
      np.asarray(nm_mask(w, 7, 8))[:, 0], [True, True, True, True, True, True, False, True])


def test_n_equals_m_keeps_everything():
  w = jnp.arange(24.0).reshape(8, 3)
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 8, 8)), np.ones((8, 3), bool))
  assert nm_mask(w, 4, 4).dtype == jnp.bool_


def test_groups_are_along_axis0_of_dense_kernel():
  # Along axis 0 (in) every column keeps row 0; grouping along axis 1 (out, the trap)
  # would keep column 0 of every row instead.
  w = np.array([[9, 8, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
  mk = np.asarray(nm_mask(jnp.asarray(w), 1, 4))
  expect = np.zeros((4, 4), bool)
  expect[0, :] = True
  np.testing.assert_array_equal(mk, expect)


# ----------------------------------------------------------------------------- every pattern

@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_matches_numpy_reference_with_ties(n, m):
  rng = np.random.default_rng(1000 * n + m)
  shape = (2 * m, COLS)
  for w in (int_weights(rng, shape), int_weights(rng, shape, -1, 1),
            rng.standard_normal(shape).astype(np.float32)):
    mk = mask(w, n, m)
    assert mk.dtype == bool and mk.shape == shape
    np.testing.assert_array_equal(mk, ref_mask(w, n, m))
    np.testing.assert_array_equal(group_counts(mk, m), n)


PAIRWISE = [(1, 2), (2, 4), (1, 4), (3, 4), (3, 8), (4, 8), (8, 16), (3, 32)]


@pytest.mark.parametrize('n,m', PAIRWISE, ids=[f'{n}:{m}' for n, m in PAIRWISE])
def test_both_pairwise_forms_match_reference_with_ties(n, m):
  # nm_mask runs one of them per platform (lax.platform_dependent): CPU the broadcast form,
  # TPU and GPU the strided slices. Both are checked here, on CPU, on (pre, G, m, *post) views.
  from nmsparse import masks
  rng = np.random.default_rng(7 * n + m)
  for groups, post in ((4, (COLS,)), (3, (COLS,)), (4, (2, 3))):
    w = int_weights(rng, (groups * m, *post), -2, 2)  # Many ties.
    g = jnp.abs(jnp.asarray(w)).reshape(1, groups, m, *post)
    expect = ref_mask(w, n, m)
    for form in (masks._pairwise_keep, masks._pairwise_keep_broadcast):
      np.testing.assert_array_equal(np.asarray(form(g, n, m)).reshape(w.shape), expect,
                                    err_msg=f'{form.__name__} {groups} groups, {post}')


@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_every_platform_choice_matches_reference(n, m):
  # nm_mask on CPU runs _keep_cpu only; the TPU and GPU choices are checked here on the same data.
  from nmsparse import masks
  rng = np.random.default_rng(3 * n + m)
  w = int_weights(rng, (2 * m, COLS), -2, 2)
  g = jnp.abs(jnp.asarray(w)).reshape(1, 2, m, COLS)
  for choose in (masks._keep_cpu, masks._keep_tpu, masks._keep_gpu):
    np.testing.assert_array_equal(np.asarray(choose(g, n, m)).reshape(w.shape), ref_mask(w, n, m),
                                  err_msg=choose.__name__)


@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_all_equal_group_keeps_first_n(n, m):
  w = np.zeros((2 * m, COLS), np.float32)
  w[:, 1], w[:, 2] = 1.0, -2.0
  w[m:, 0] = -0.5
  expect = np.zeros((2 * m, COLS), bool)
  expect[:n] = expect[m:m + n] = True
  np.testing.assert_array_equal(mask(w, n, m), expect)


@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_eager_equals_jit_and_reference(n, m):
  rng = np.random.default_rng(7 * n + m)
  w = int_weights(rng, (2 * m, COLS))
  eager = np.asarray(nm_mask(jnp.asarray(w), n, m))
  np.testing.assert_array_equal(eager, ref_mask(w, n, m))
  np.testing.assert_array_equal(eager, mask(w, n, m))


# ----------------------------------------------------------------------------- properties

@st.composite
def pattern_and_weights(draw, patterns=tuple(HYP_PATTERNS), integer=None):
  n, m = draw(st.sampled_from(patterns))
  if integer is None:
    integer = draw(st.booleans())
  shape = (2 * m, COLS)
  if integer:
    w = draw(hnp.arrays(np.int8, shape, elements=st.integers(-3, 3))).astype(np.float32)
  else:
    # No subnormals: XLA flushes them to zero on CPU and TPU, so |1e-45| ties with 0 there and the
    # NumPy reference (which keeps them) would rank them differently.
    w = draw(hnp.arrays(np.float32, shape,
                        elements=st.floats(-10, 10, width=32, allow_nan=False, allow_subnormal=False)))
  return n, m, w


@FAST
@given(pattern_and_weights())
def test_property_exactly_n_per_group_and_reference(args):
  n, m, w = args
  mk = mask(w, n, m)
  np.testing.assert_array_equal(group_counts(mk, m), n)
  np.testing.assert_array_equal(mk, ref_mask(w, n, m))


@FAST
@given(pattern_and_weights())
def test_property_idempotent(args):
  n, m, w = args
  mk = mask(w, n, m)
  masked = np.where(mk, w, np.float32(0))
  np.testing.assert_array_equal(mask(masked, n, m), mk)


@FAST
@given(pattern_and_weights(integer=True))
def test_property_jit_and_eager_equal_the_reference(args):
  """Eager and jitted nm_mask each equal the NumPy reference (not only each other: a bug shared
  by both paths would pass a comparison of the two)."""
  n, m, w = args
  ref = ref_mask(w, n, m)
  np.testing.assert_array_equal(np.asarray(jitted(n, m)(jnp.asarray(w))), ref)
  np.testing.assert_array_equal(np.asarray(nm_mask(jnp.asarray(w), n, m)), ref)


@FAST
@given(pattern_and_weights())
def test_property_topk_and_argsort_equal_the_reference(args):
  """The two comparison masks (lax.top_k, double argsort) each equal the NumPy reference. They
  share nm_mask's grouping (and argsort_mask its sort), so comparing them with nm_mask proves
  nothing about either."""
  n, m, w = args
  ref = ref_mask(w, n, m)
  np.testing.assert_array_equal(mask(w, n, m, fn=topk_mask), ref)
  np.testing.assert_array_equal(mask(w, n, m, fn=argsort_mask), ref)


@FAST
@given(pattern_and_weights(integer=True))
def test_property_sign_invariant(args):
  n, m, w = args
  np.testing.assert_array_equal(mask(-w, n, m), mask(w, n, m))


@pytest.mark.parametrize('n,m', [(2, 4), (1, 8), (7, 8), (12, 32), (1, 128)])
def test_topk_and_argsort_agree_on_ties(n, m):
  rng = np.random.default_rng(n + 3 * m)
  w = int_weights(rng, (2 * m, COLS), -1, 1)
  ref = ref_mask(w, n, m)
  np.testing.assert_array_equal(mask(w, n, m, fn=topk_mask), ref)
  np.testing.assert_array_equal(mask(w, n, m, fn=argsort_mask), ref)
  np.testing.assert_array_equal(mask(w, n, m), ref)


# ----------------------------------------------------------------------------- axes

def test_axis0_of_in_out():
  rng = np.random.default_rng(0)
  w = int_weights(rng, (16, 5))
  np.testing.assert_array_equal(mask(w, 2, 4, axis=0), ref_mask(w, 2, 4))
  np.testing.assert_array_equal(mask(w, 2, 4), ref_mask(w, 2, 4))
  # Another axis really groups along that axis (shape (16, 8): both divisible).
  w2 = int_weights(rng, (16, 8))
  np.testing.assert_array_equal(mask(w2, 1, 8, axis=1),
                                ref_mask(w2, 1, 8, axes=(1,)))
  np.testing.assert_array_equal(mask(w2, 1, 8, axis=-1),
                                ref_mask(w2, 1, 8, axes=(1,)))


@pytest.mark.parametrize('n,m', [(2, 4), (1, 8)])
def test_negative_axis_on_scanned_kernel_equals_per_layer(n, m):
  rng = np.random.default_rng(1)
  w = jnp.asarray(int_weights(rng, (3, 16, 5)))  # (L, in, out)
  got = mask(w, n, m, axis=-2)
  per_layer = np.stack([mask(w[l], n, m, axis=0) for l in range(3)])
  np.testing.assert_array_equal(got, per_layer)
  np.testing.assert_array_equal(got, np.stack([ref_mask(np.asarray(w[l]), n, m) for l in range(3)]))
  np.testing.assert_array_equal(group_counts(got, m, axis=1), n)


@pytest.mark.parametrize('n,m', [(2, 4), (1, 4), (1, 8), (3, 8), (1, 32), (12, 32)])
def test_qkv_kernel_and_last_axis_every_algorithm(n, m):
  # Every algorithm (pairwise, passes, two-level passes, sort) on a q/k/v kernel
  # (embed, heads, head_dim) grouped along embed, whose trailing axes stay unmerged,
  # and along the last axis (nothing after the group axis).
  rng = np.random.default_rng(7)
  w = int_weights(rng, (64, 3, 5))
  np.testing.assert_array_equal(mask(w, n, m, axis=0), ref_mask(w, n, m, axes=(0,)))
  w2 = int_weights(rng, (3, 64))
  np.testing.assert_array_equal(mask(w2, n, m, axis=-1), ref_mask(w2, n, m, axes=(1,)))


def test_axes01_equals_reshaped_kernel():
  rng = np.random.default_rng(2)
  h, hd, e = 3, 4, 6  # 12 contraction entries; groups of 4 straddle heads (3 * 4 = 12).
  w = jnp.asarray(int_weights(rng, (h, hd, e)))
  for n, m in [(1, 4), (2, 4), (1, 12)]:
    got = mask(w, n, m, axis=(0, 1))
    flat = mask(w.reshape(h * hd, e), n, m, axis=0).reshape(h, hd, e)
    np.testing.assert_array_equal(got, flat)
    np.testing.assert_array_equal(got, ref_mask(np.asarray(w), n, m, axes=(0, 1)))
  # Order of the axes tuple does not matter; negative spelling works too.
  np.testing.assert_array_equal(mask(w, 1, 4, axis=(1, 0)),
                                mask(w, 1, 4, axis=(-3, -2)))


def test_axes01_with_head_dim_not_multiple_of_m():
  # head_dim 2 < M = 4: groups span two heads; only the flattened size must divide.
  rng = np.random.default_rng(3)
  w = jnp.asarray(int_weights(rng, (6, 2, 5)))
  got = mask(w, 1, 4, axis=(0, 1))
  np.testing.assert_array_equal(got, mask(w.reshape(12, 5), 1, 4).reshape(6, 2, 5))


def test_non_contiguous_axes_02():
  rng = np.random.default_rng(4)
  a, b, c = 4, 3, 2  # contraction over axes 0 and 2: 8 entries per b.
  w = int_weights(rng, (a, b, c))
  got = mask(w, 2, 4, axis=(0, 2))
  # Independent: move b to the front, flatten (a, c) row-major, group along it.
  t = np.transpose(w, (1, 0, 2)).reshape(b, a * c)
  expect = np.transpose(ref_rows(t, 2, 4).reshape(b, a, c), (1, 0, 2))
  np.testing.assert_array_equal(got, expect)
  np.testing.assert_array_equal(got.transpose(1, 0, 2).reshape(b, -1, 4).sum(-1), 2)
  got8 = mask(w, 3, 8, axis=(0, 2))
  np.testing.assert_array_equal(got8, ref_mask(w, 3, 8, axes=(0, 2)))


def test_non_contiguous_axes_rank4():
  rng = np.random.default_rng(5)
  w = int_weights(rng, (2, 4, 3, 2))
  got = mask(w, 1, 4, axis=(1, 3))
  np.testing.assert_array_equal(got, ref_mask(w, 1, 4, axes=(1, 3)))


def test_conv_hwio_groups_along_input_channels():
  rng = np.random.default_rng(6)
  w = int_weights(rng, (3, 3, 8, 4))
  got = mask(w, 2, 4, axis=2)
  np.testing.assert_array_equal(got, ref_mask(w, 2, 4, axes=(2,)))
  np.testing.assert_array_equal(got, mask(w, 2, 4, axis=-2))


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize('n,m', [(0, 4), (-1, 4), (5, 4), (3, 0)])
def test_invalid_n(n, m):
  with pytest.raises(ValueError, match=f'{n}:{m}'):
    nm_mask(jnp.ones((8, 2)), n, m)
  with pytest.raises(ValueError):
    check_nm((8, 2), n, m)


def test_not_divisible_names_shape_and_m():
  with pytest.raises(ValueError) as e:
    nm_mask(jnp.ones((6, 3)), 2, 4)
  msg = str(e.value)
  assert '(6, 3)' in msg and 'M=4' in msg
  with pytest.raises(ValueError, match='M=8'):
    nm_mask(jnp.ones((2, 3, 5)), 1, 8, axis=(0, 1))  # 6 not divisible by 8.
  # The reference code lets groups straddle rows; a (4, 2) kernel at 1:8 is 8 weights but
  # only 4 per column, so it must still fail.
  with pytest.raises(ValueError):
    nm_mask(jnp.ones((4, 2)), 1, 8)


def test_check_nm_names_parameter():
  with pytest.raises(ValueError) as e:
    check_nm((12, 7), 1, 8, axis=0, name='encoder/mlp/wi/kernel')
  msg = str(e.value)
  assert 'encoder/mlp/wi/kernel' in msg and '(12, 7)' in msg and '8' in msg
  with pytest.raises(ValueError, match='my_param'):
    check_nm((16, 7), 0, 8, name='my_param')
  assert check_nm((3, 16, 5), 2, 4, axis=-2, name='x') == (1,)
  assert check_nm((4, 2, 5), 1, 8, axis=(1, 0)) == (0, 1)


def test_bad_axes():
  with pytest.raises(ValueError):
    nm_mask(jnp.ones((8, 4)), 2, 4, axis=2)
  with pytest.raises(ValueError):
    nm_mask(jnp.ones((8, 4)), 2, 4, axis=(0, 0))
  with pytest.raises(ValueError):
    nm_mask(jnp.ones((8, 4)), 2, 4, axis=())


def test_non_integer_pattern():
  with pytest.raises((TypeError, ValueError)):
    nm_mask(jnp.ones((8, 4)), 2.0, 4)


# ----------------------------------------------------------------------------- NaN / inf / dtypes

@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_nan_still_keeps_exactly_n(n, m):
  rng = np.random.default_rng(11 * n + m)
  w = rng.standard_normal((2 * m, COLS)).astype(np.float32)
  w[m // 2, 0] = np.nan                 # One NaN (group 0 of column 0).
  w[-1, 0] = np.nan                     # NaN in the last slot (group 1 of column 0).
  w[:, 1] = np.nan                      # Whole groups of NaN.
  w[::2, 2] = np.nan                    # Half NaN.
  mk = mask(w, n, m)
  np.testing.assert_array_equal(group_counts(mk, m), n)
  # NaN counts as the largest magnitude: a lone NaN is always kept.
  assert mk[m // 2, 0] and mk[-1, 0]


@pytest.mark.parametrize('n,m', PATTERNS, ids=[f'{n}:{m}' for n, m in PATTERNS])
def test_inf_group_keeps_exactly_n(n, m):
  w = np.ones((2 * m, COLS), np.float32)
  w[:, 0] = np.inf
  w[:, 1] = -np.inf
  w[m - 1, 2] = np.inf                  # A lone inf in the last slot of a group is kept.
  mk = mask(w, n, m)
  np.testing.assert_array_equal(group_counts(mk, m), n)
  np.testing.assert_array_equal(mk, ref_mask(w, n, m))


@pytest.mark.parametrize('n,m', [(2, 4), (1, 8), (7, 8), (4, 16), (12, 32), (1, 128)])
def test_bfloat16(n, m):
  rng = np.random.default_rng(n * m)
  w32 = int_weights(rng, (2 * m, COLS))
  w32[:, 1] = rng.standard_normal(2 * m).astype(np.float32)
  wb = jnp.asarray(w32, jnp.bfloat16)
  mk = mask(wb, n, m)
  assert mk.dtype == bool
  np.testing.assert_array_equal(mk, ref_mask(np.asarray(wb.astype(jnp.float32)), n, m))


def test_float16_and_integer_inputs():
  w = np.array([[3], [-7], [1], [7], [0], [2], [-2], [5]], np.int32)
  np.testing.assert_array_equal(np.asarray(nm_mask(jnp.asarray(w), 1, 4)), ref_mask(w, 1, 4))
  np.testing.assert_array_equal(np.asarray(nm_mask(jnp.asarray(w), 1, 8)), ref_mask(w, 1, 8))
  np.testing.assert_array_equal(np.asarray(nm_mask(jnp.asarray(w, jnp.float16), 2, 4)),
                                ref_mask(w, 2, 4))


def test_gradient_through_the_mask_is_the_mask_selected_upstream_gradient():
  """The mask's selection contributes no gradient term: dL/dw = m * dL/dw~ for w~ = m(w) * w.

  Hand example: w = (1, -2, 3, 0.5) is one group at 2:4, so m = (0, 1, 1, 0) (|-2| and |3|) and
  w~ = (0, -2, 3, 0). With L = sum(c w~) + sum(w~^2) / 2 and c = (10, 20, 30, 40), the upstream
  gradient is dL/dw~ = c + w~ = (10, 18, 33, 40), and the mask-selected gradient is
  (0, 18, 33, 0). This holds for both ways of applying the mask (select, and multiply by the
  mask as a float, where a mask that carried a derivative would add w * dm/dw), for the library's
  hard-mask op, and agrees with central finite differences (the mask is locally constant: the
  perturbation is far below the gaps between magnitudes).
  """
  w = jnp.array([[1.0], [-2.0], [3.0], [0.5]])
  c = jnp.array([[10.0], [20.0], [30.0], [40.0]])
  want = [0.0, 18.0, 33.0, 0.0]

  def loss(w, apply):
    wt = apply(w, nm_mask(w, 2, 4))
    return jnp.sum(c * wt) + 0.5 * jnp.sum(wt ** 2)

  applies = {
      'select': lambda w, mk: jnp.where(mk, w, 0.0),
      'multiply': lambda w, mk: mk.astype(w.dtype) * w,
      'ops.hard_mask': ops.hard_mask,
  }
  np.testing.assert_array_equal(np.asarray(nm_mask(w, 2, 4))[:, 0], [False, True, True, False])
  for name, apply in applies.items():
    g = jax.grad(loss)(w, apply)
    np.testing.assert_allclose(np.asarray(g)[:, 0], want, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss), static_argnums=1)(w, apply))[:, 0],
                               want, rtol=0, atol=1e-6, err_msg=name)
    eps = 1e-2
    fd = [(float(loss(w.at[i, 0].add(eps), apply)) - float(loss(w.at[i, 0].add(-eps), apply))) / (2 * eps)
          for i in range(4)]
    np.testing.assert_allclose(fd, want, rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_magnitude_key_orders_like_abs_with_nan_on_top(dtype):
  from nmsparse import masks
  values = [0.0, -0.0, 1e-3, -1e-3, 1.0, -2.0, 3.5, np.inf, -np.inf, np.nan, -np.nan]
  key = np.asarray(masks.magnitude_key(jnp.asarray(values, dtype))).astype(np.int64)
  mag = np.abs(np.asarray(jnp.asarray(values, dtype).astype(jnp.float32), np.float64))
  for i in range(len(values)):
    for j in range(len(values)):
      if np.isnan(values[i]) or np.isnan(values[j]):
        # NaN above every number; two NaNs compare equal here (same payload up to sign).
        expect = int(np.isnan(values[i])) - int(np.isnan(values[j]))
      else:
        expect = int(mag[i] > mag[j]) - int(mag[i] < mag[j])
      assert np.sign(key[i] - key[j]) == expect, (values[i], values[j])
