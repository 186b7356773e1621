"""Tests for nmsparse.ops: forward formulas and vector-Jacobian products.

Forwards are checked against docs/method.md §2 computed in NumPy. Gradients are
checked against hand derivations: for L(w~) = sum(c * w~^2) the gradient reaching
the effective weight is g = 2 c w~, and for L(w~) = sum((x @ w~) * y) it is
g = x^T y; the op then maps g to the table's "gradient reaching W". MDGF's
decay-scaled backward is also checked against central finite differences in float64.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nmsparse import ops
from nmsparse.ops import hard_mask, mdgf, srste, ste

SRSTE_DEFAULT_LAMBDA = 2e-4
K, N_OUT = 8, 3


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((K, N_OUT)).astype(np.float32)
  w[0, 0] = 0.0
  mask = rng.random((K, N_OUT)) < 0.5
  mask[0, :] = True
  mask[1, :] = False
  c = rng.uniform(0.5, 2.0, (K, N_OUT)).astype(np.float32)
  x = rng.standard_normal((5, K)).astype(np.float32)
  y = rng.standard_normal((5, N_OUT)).astype(np.float32)
  return w, mask, c, x, y


# ----------------------------------------------------------------------------- NumPy formulas

def fwd_np(name, w, mask, a=None):
  m = mask.astype(np.float64)
  w = w.astype(np.float64)
  if name == 'mdgf':
    return (m + (1 - m) * a) * w
  return m * w


def bwd_np(name, g, w, mask, a=None, lam=SRSTE_DEFAULT_LAMBDA, backward=None):
  """The table's "gradient reaching W", from g = dL/dw~."""
  m = mask.astype(np.float64)
  g = g.astype(np.float64)
  if name == 'hard_mask':
    return m * g
  if name == 'ste':
    return g
  if name == 'srste':
    return g + lam * (1 - m) * w.astype(np.float64)
  if backward == 'straight_through':
    return g
  assert backward == 'decay_scaled'
  return (m + (1 - m) * a) * g


OPS = {
    'hard_mask': lambda w, mask, a: hard_mask(w, mask),
    'ste': lambda w, mask, a: ste(w, mask),
    'srste': lambda w, mask, a: srste(w, mask),
    'mdgf_st': lambda w, mask, a: mdgf(w, mask, a, 'straight_through'),
    'mdgf_ds': lambda w, mask, a: mdgf(w, mask, a, 'decay_scaled'),
    # The general op with array (not Python number) scalars: the path a train step takes
    # when it selects them by phase.
    'flow_hard_mask': lambda w, mask, a: ops.flow(w, mask, *map(jnp.float32, (0, 0, 0))),
    'flow_ste': lambda w, mask, a: ops.flow(w, mask, *map(jnp.float32, (0, 1, 0))),
    'flow_srste': lambda w, mask, a: ops.flow(w, mask, *map(jnp.float32, (0, 1, SRSTE_DEFAULT_LAMBDA))),
    'flow_mdgf_st': lambda w, mask, a: ops.flow(w, mask, a, jnp.float32(1), jnp.float32(0)),
    'flow_mdgf_ds': lambda w, mask, a: ops.flow(w, mask, a, a, jnp.float32(0)),
}
CASES = list(OPS)


def spec_of(case):
  case = case.removeprefix('flow_')
  if case.startswith('mdgf'):
    return 'mdgf', ('straight_through' if case == 'mdgf_st' else 'decay_scaled')
  return case, None


A = 0.3


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize('case', CASES)
def test_forward_formula(case, data):
  w, mask, *_ = data
  name, _ = spec_of(case)
  out = OPS[case](jnp.asarray(w), jnp.asarray(mask), jnp.float32(A))
  assert out.dtype == jnp.float32 and out.shape == w.shape
  np.testing.assert_allclose(np.asarray(out), fwd_np(name, w, mask, A), rtol=1e-6, atol=1e-7)


def test_forward_hand_values():
  w = jnp.array([2.0, -3.0, 4.0, -5.0])
  m = jnp.array([True, False, True, False])
  np.testing.assert_array_equal(np.asarray(hard_mask(w, m)), [2.0, 0.0, 4.0, 0.0])
  np.testing.assert_array_equal(np.asarray(ste(w, m)), [2.0, 0.0, 4.0, 0.0])
  np.testing.assert_array_equal(np.asarray(srste(w, m, 0.5)), [2.0, 0.0, 4.0, 0.0])
  np.testing.assert_allclose(np.asarray(mdgf(w, m, jnp.float32(0.25))), [2.0, -0.75, 4.0, -1.25])
  # a = 1: dense; a = 0: the plain N:M mask.
  np.testing.assert_array_equal(np.asarray(mdgf(w, m, jnp.float32(1.0))), np.asarray(w))
  np.testing.assert_array_equal(np.asarray(mdgf(w, m, jnp.float32(0.0))), [2.0, 0.0, 4.0, 0.0])


def test_forward_with_float_mask():
  w = jnp.array([2.0, -3.0, 4.0, -5.0])
  m = jnp.array([1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(ste(w, m)), [2.0, 0.0, 4.0, 0.0])
  np.testing.assert_allclose(np.asarray(mdgf(w, m, 0.5)), [2.0, -1.5, 4.0, -2.5])


def test_forward_bfloat16_keeps_dtype():
  w = jnp.array([2.0, -3.0, 4.0, -5.0], jnp.bfloat16)
  m = jnp.array([True, False, True, False])
  for out in (hard_mask(w, m), ste(w, m), srste(w, m), mdgf(w, m, jnp.float32(0.5))):
    assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(mdgf(w, m, jnp.float32(0.5)), np.float32),
                             [2.0, -1.5, 4.0, -2.5])


# ----------------------------------------------------------------------------- backward

def sq_loss(op, c):
  return lambda w, mask, a: jnp.sum(c * op(w, mask, a) ** 2)


@pytest.mark.parametrize('case', CASES)
def test_vjp_square_loss(case, data):
  w, mask, c, *_ = data
  name, backward = spec_of(case)
  got = jax.grad(sq_loss(OPS[case], jnp.asarray(c)))(jnp.asarray(w), jnp.asarray(mask),
                                                     jnp.float32(A))
  g = 2 * c.astype(np.float64) * fwd_np(name, w, mask, A)  # dL/dw~ by hand.
  expect = bwd_np(name, g, w, mask, A, backward=backward)
  np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', CASES)
def test_vjp_matmul_loss(case, data):
  w, mask, _, x, y = data
  name, backward = spec_of(case)

  def loss(w, mask, a):
    return jnp.sum((jnp.asarray(x) @ OPS[case](w, mask, a)) * jnp.asarray(y))

  got = jax.grad(loss)(jnp.asarray(w), jnp.asarray(mask), jnp.float32(A))
  g = x.T.astype(np.float64) @ y.astype(np.float64)  # d/dW~ of sum((x W~) * y).
  np.testing.assert_allclose(np.asarray(got), bwd_np(name, g, w, mask, A, backward=backward),
                             rtol=1e-5, atol=1e-6)


def test_vjp_hand_values():
  """Linear loss sum(c * w~) so g = c exactly; values worked out by hand."""
  w = jnp.array([2.0, -3.0, 4.0, -5.0])
  m = jnp.array([True, False, True, False])
  c = jnp.array([1.0, 2.0, 3.0, 4.0])

  def grad(op):
    return np.asarray(jax.grad(lambda w: jnp.sum(c * op(w)))(w))

  np.testing.assert_allclose(grad(lambda w: hard_mask(w, m)), [1.0, 0.0, 3.0, 0.0])
  np.testing.assert_allclose(grad(lambda w: ste(w, m)), [1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(grad(lambda w: srste(w, m, 0.5)), [1.0, 2.0 - 1.5, 3.0, 4.0 - 2.5])
  np.testing.assert_allclose(grad(lambda w: mdgf(w, m, jnp.float32(0.25))), [1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(grad(lambda w: mdgf(w, m, jnp.float32(0.25), 'decay_scaled')),
                             [1.0, 0.5, 3.0, 1.0])
  np.testing.assert_allclose(
      grad(lambda w: mdgf(w, m, jnp.float32(0.25), backward='decay_scaled')), [1.0, 0.5, 3.0, 1.0])


def test_srste_default_lambda_is_2e_4():
  w = jnp.array([50.0, -50.0, 100.0, 10.0])
  m = jnp.array([True, False, False, True])
  got = np.asarray(jax.grad(lambda w: jnp.sum(srste(w, m)))(w))
  # g = 1 everywhere; pruned entries get + 2e-4 * w.
  np.testing.assert_allclose(got, [1.0, 1.0 - 0.01, 1.0 + 0.02, 1.0], rtol=0, atol=1e-6)
  got = np.asarray(jax.grad(lambda w: jnp.sum(srste(w, m, 1e-3)))(w))
  np.testing.assert_allclose(got, [1.0, 1.0 - 0.05, 1.0 + 0.1, 1.0], rtol=0, atol=1e-6)
  got = np.asarray(jax.grad(lambda w: jnp.sum(srste(w, m, lam=0.0)))(w))
  np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 1.0], rtol=0, atol=0)


@contextlib.contextmanager
def enable_x64():
  """float64 inside, the previous setting restored on exit (also when the body raises)."""
  prev = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', prev)


@pytest.fixture
def x64():
  with enable_x64():
    yield


def test_mdgf_decay_scaled_matches_finite_differences(x64):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((4, 3))
  mask = rng.random((4, 3)) < 0.5
  c = rng.uniform(0.5, 2.0, (4, 3))
  a = 0.37

  def loss_np(w):  # The forward formula in NumPy, float64.
    m = mask.astype(np.float64)
    wt = (m + (1 - m) * a) * w
    return np.sum(c * wt ** 2) + np.sum(np.sin(wt))

  def loss(w, backward):
    wt = mdgf(w, jnp.asarray(mask), jnp.asarray(a, jnp.float64), backward)
    return jnp.sum(jnp.asarray(c) * wt ** 2) + jnp.sum(jnp.sin(wt))

  eps = 1e-6
  fd = np.zeros_like(w)
  for idx in np.ndindex(w.shape):
    e = np.zeros_like(w)
    e[idx] = eps
    fd[idx] = (loss_np(w + e) - loss_np(w - e)) / (2 * eps)
  wj = jnp.asarray(w, jnp.float64)
  assert wj.dtype == jnp.float64
  got = np.asarray(jax.grad(loss)(wj, 'decay_scaled'))
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-8)
  # The forward itself in float64 equals the NumPy formula.
  np.testing.assert_allclose(float(loss(wj, 'decay_scaled')), loss_np(w), rtol=1e-12)
  # Straight-through is not the true gradient for pruned weights (a != 1).
  st = np.asarray(jax.grad(loss)(wj, 'straight_through'))
  assert not np.allclose(st[~mask], fd[~mask], rtol=1e-3)
  np.testing.assert_allclose(st[mask], fd[mask], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize('before', [False, True])
def test_x64_switch_is_restored_after_use_and_after_an_error(before):
  """The float64 switch of the finite-difference test (``x64`` fixture) gives float64 inside and
  puts back whatever was set before, also when the body raises, so no later test runs in float64.
  Checked here in both starting states, whatever ran before this test."""
  outer = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', before)
  try:
    dtype = jnp.float64 if before else jnp.float32
    assert jnp.asarray(1.0).dtype == dtype
    with enable_x64():
      assert jnp.asarray(1.0).dtype == jnp.float64
    assert jax.config.read('jax_enable_x64') == before and jnp.asarray(1.0).dtype == dtype
    with pytest.raises(RuntimeError, match='inside'):
      with enable_x64():
        assert jnp.asarray(1.0).dtype == jnp.float64
        raise RuntimeError('inside')
    assert jax.config.read('jax_enable_x64') == before and jnp.asarray(1.0).dtype == dtype
  finally:
    jax.config.update('jax_enable_x64', outer)


def test_default_mdgf_backward_is_straight_through():
  assert ops.DEFAULT_MDGF_BACKWARD == 'straight_through'
  w = jnp.array([2.0, -3.0])
  m = jnp.array([True, False])
  np.testing.assert_allclose(np.asarray(jax.grad(lambda w: jnp.sum(mdgf(w, m, 0.1) * 3.0))(w)),
                             [3.0, 3.0])


# ----------------------------------------------------------------------------- mask and decay

@pytest.mark.parametrize('case', CASES)
def test_mask_and_decay_get_zero_gradient(case, data):
  w, mask, c, *_ = data
  f = sq_loss(OPS[case], jnp.asarray(c))
  gm, ga = jax.grad(f, argnums=(1, 2))(jnp.asarray(w), jnp.asarray(mask, jnp.float32),
                                      jnp.float32(A))
  np.testing.assert_array_equal(np.asarray(gm), 0.0)
  np.testing.assert_array_equal(np.asarray(ga), 0.0)


@pytest.mark.parametrize('case', CASES)
def test_bool_mask_vjp(case, data):
  w, mask, c, *_ = data
  name, backward = spec_of(case)
  out, vjp = jax.vjp(lambda w: OPS[case](w, jnp.asarray(mask), jnp.float32(A)), jnp.asarray(w))
  (gw,) = vjp(jnp.asarray(c))
  np.testing.assert_allclose(np.asarray(gw), bwd_np(name, c, w, mask, A, backward=backward),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- jit / vmap

@pytest.mark.parametrize('case', CASES)
def test_under_jit(case, data):
  w, mask, c, *_ = data
  name, backward = spec_of(case)
  f = jax.jit(jax.value_and_grad(sq_loss(OPS[case], jnp.asarray(c))))
  val, got = f(jnp.asarray(w), jnp.asarray(mask), jnp.float32(A))
  wt = fwd_np(name, w, mask, A)
  np.testing.assert_allclose(float(val), np.sum(c * wt ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got), bwd_np(name, 2 * c * wt, w, mask, A, backward=backward),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', CASES)
def test_under_vmap(case, data):
  w, mask, c, *_ = data
  name, backward = spec_of(case)
  rng = np.random.default_rng(9)
  B = 3
  ws = rng.standard_normal((B,) + w.shape).astype(np.float32)
  ms = rng.random((B,) + w.shape) < 0.5
  As = np.array([0.0, 0.5, 1.0], np.float32)
  f = jax.jit(jax.vmap(jax.grad(sq_loss(OPS[case], jnp.asarray(c)))))
  got = np.asarray(f(jnp.asarray(ws), jnp.asarray(ms), jnp.asarray(As)))
  fwd = jax.vmap(OPS[case])(jnp.asarray(ws), jnp.asarray(ms), jnp.asarray(As))
  for b in range(B):
    wt = fwd_np(name, ws[b], ms[b], As[b])
    np.testing.assert_allclose(np.asarray(fwd[b]), wt, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[b], bwd_np(name, 2 * c * wt, ws[b], ms[b], As[b], backward=backward),
                               rtol=1e-5, atol=1e-6)


def test_mdgf_traced_decay_under_jit():
  w = jnp.array([2.0, -3.0, 4.0, -5.0])
  m = jnp.array([True, False, True, False])
  f = jax.jit(lambda w, a: jax.grad(lambda w: jnp.sum(mdgf(w, m, a, 'decay_scaled') ** 2))(w))
  for a in (0.0, 0.5, 1.0):
    s = np.array([1.0, a, 1.0, a])
    np.testing.assert_allclose(np.asarray(f(w, jnp.float32(a))), 2 * s * s * np.asarray(w),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- errors

def test_unknown_mdgf_backward_raises_under_grad():
  w = jnp.ones(4)
  m = jnp.array([True, False, True, False])
  with pytest.raises(ValueError, match='bogus'):
    jax.grad(lambda w: jnp.sum(mdgf(w, m, jnp.float32(0.5), 'bogus')))(w)


def test_unknown_mdgf_backward_raises_on_forward_call():
  """A misspelled backward must not be silently accepted when no gradient is taken
  (evaluation, export): the forward-only call must raise too (no silent errors: reference bug 6,
  docs/method.md §5)."""
  w = jnp.ones(4)
  m = jnp.array([True, False, True, False])
  with pytest.raises(ValueError, match='bogus'):
    mdgf(w, m, jnp.float32(0.5), 'bogus')
  with pytest.raises(ValueError, match='decay-scaled'):
    jax.jit(functools.partial(mdgf, backward='decay-scaled'))(w, m, jnp.float32(0.5))


@pytest.mark.parametrize('traced', [False, True])
def test_flow_of_one_one_zero_is_the_identity_whatever_the_mask(traced, data):
  """The dense phase of a train step: w~ = w and dL/dw = dL/dw~ exactly, mask ignored."""
  w, mask, c, *_ = data
  scalars = tuple(map(jnp.float32, (1, 1, 0))) if traced else (1.0, 1.0, 0.0)

  @jax.jit
  def loss(w, mask, scalars):
    return jnp.sum(jnp.asarray(c) * ops.flow(w, mask, *scalars) ** 2)

  out = ops.flow(jnp.asarray(w), jnp.asarray(mask), *scalars)
  np.testing.assert_array_equal(np.asarray(out), w)
  got = jax.grad(loss)(jnp.asarray(w), jnp.asarray(mask), scalars)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(2 * jnp.asarray(c) * jnp.asarray(w)))
