"""Tests for nmsparse.step_optimizer (STEP: Adam with a frozen v for N:M mask learning).

Expected values come from optax.adam or from NumPy/closed-form re-derivations
of the STEP formulas, never from the code under test.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

# ``nmsparse/__init__`` re-exports the function ``step_adam``, which shadows the
# submodule attribute of the same name; fetch the module itself.
sa = importlib.import_module('nmsparse.step_optimizer')

B1, B2, EPS = 0.9, 0.999, 1e-8
MASK = {'dense': {'kernel': True, 'bias': False}, 'out': {'kernel': True}}
SPARSE = (('dense', 'kernel'), ('out', 'kernel'))


def make_params():
  rng = np.random.default_rng(0)
  return {
      'dense': {'kernel': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                'bias': jnp.zeros((4,), jnp.float32)},
      'out': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
  }


def make_grads(n, seed=1):
  rng = np.random.default_rng(seed)
  p = make_params()
  return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
          for _ in range(n)]


def run(tx, grads, *, jit=False, params=None, state=None):
  """Applies ``grads`` one by one; returns [(updates, params, state)] per step."""
  params = make_params() if params is None else params
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append((u, params, state))
  return out


def get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def trees_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def assert_trees_ulp(a, b, maxulp=4):
  """Equal up to float rounding: at most ``maxulp`` units in the last place apart.

  STEP divides the sparse leaves' v by a selected bias-correction scalar (one fused,
  in-place pass) where optax divides the whole tree: XLA may round the last bits
  differently, and nothing more.
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=maxulp)


# --------------------------------------------------------------------------- #
# Precondition phase == optax.adam.


@pytest.mark.parametrize('jit', [False, True])
def test_no_switch_equals_optax_adam(jit):
  grads = make_grads(20)
  ref = run(optax.adam(1e-2, B1, B2, EPS), grads, jit=jit)
  # Callable mask, as optax.masked accepts.
  got = run(sa.step_adam(1e-2, B1, B2, EPS, sparse_mask=lambda p: MASK,
                         t_max=None, threshold=0.0), grads, jit=jit)
  for (u_r, p_r, s_r), (u_g, p_g, s_g) in zip(ref, got):
    assert_trees_ulp(u_r, u_g)
    assert_trees_ulp(p_r, p_g, maxulp=64)  # Sums of 20 updates, each a few ulp apart.
    assert trees_equal(s_r[0].mu, s_g[0].mu) and trees_equal(s_r[0].nu, s_g[0].nu)
    assert not bool(sa.switched(s_g))
  assert int(sa.find_step_state(got[-1][2]).switch_step) == -1


def test_weight_decay_equals_optax_adamw():
  grads = make_grads(6)
  ref = run(optax.adamw(1e-2, B1, B2, EPS, weight_decay=0.1), grads)
  got = run(sa.step_adam(1e-2, B1, B2, EPS, weight_decay=0.1, sparse_mask=MASK,
                         threshold=0.0), grads)
  for (u_r, p_r, _), (u_g, p_g, _) in zip(ref, got):
    for x, y in zip(jax.tree.leaves((u_r, p_r)), jax.tree.leaves((u_g, p_g))):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- #
# Switch by t_max; frozen v; mask-phase update.


def test_t_max_switch_freezes_sparse_nu():
  k, n = 5, 12
  grads = make_grads(n)
  hist = run(sa.scale_by_step_adam(B1, B2, EPS, sparse_mask=MASK, t_max=k, threshold=0.0),
             grads, jit=True)
  states = [h[2] for h in hist]  # states[i] is after update i + 1.
  for i in range(k):
    assert not bool(states[i].switched) and int(states[i].switch_step) == -1
  assert bool(states[k].switched) and int(states[k].switch_step) == k + 1
  assert all(bool(s.switched) and int(s.switch_step) == k + 1 for s in states[k:])
  # Updates 1..k+1 are plain Adam (the switch applies from the next step).
  ref = run(optax.scale_by_adam(B1, B2, EPS), grads[:k + 1], jit=True)
  for (u_r, _, _), (u_g, _, _) in zip(ref, hist[:k + 1]):
    assert_trees_ulp(u_r, u_g)
  for path in SPARSE:
    frozen = get(states[k].nu, path)
    for s in states[k + 1:]:
      assert np.array_equal(get(s.nu, path), frozen)
  for prev, cur in zip(states[k:], states[k + 1:]):
    for path in SPARSE + (('dense', 'bias'),):
      assert not np.array_equal(get(prev.mu, path), get(cur.mu, path))
    assert not np.array_equal(get(prev.nu, ('dense', 'bias')), get(cur.nu, ('dense', 'bias')))
    assert int(cur.z_count) == k + 1  # No Z recorded after the switch.


@pytest.mark.parametrize('frozen_eps', [None, 1e-3])
def test_mask_phase_update_matches_numpy(frozen_eps):
  k, n = 4, 9
  grads = make_grads(n, seed=7)
  hist = run(sa.scale_by_step_adam(B1, B2, EPS, sparse_mask=MASK, t_max=k, threshold=0.0,
                                   frozen_eps=frozen_eps), grads)
  t0 = k + 1
  e2 = EPS if frozen_eps is None else frozen_eps
  for path in SPARSE + (('dense', 'bias'),):
    sparse = path in SPARSE
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
      g = get(g, path).astype(np.float64)
      m = B1 * m + (1 - B1) * g
      if not (sparse and t > t0):
        v = B2 * v + (1 - B2) * g * g
      m_hat = m / (1 - B1 ** t)
      if sparse and t > t0:
        want = m_hat / (np.sqrt(v / (1 - B2 ** t0)) + e2)
      else:
        want = m_hat / (np.sqrt(v / (1 - B2 ** t)) + EPS)
      np.testing.assert_allclose(get(hist[t - 1][0], path), want, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# AutoSwitch statistic and threshold path.


@pytest.mark.parametrize('statistic', ['mean', 'geomean'])
def test_z_matches_numpy(statistic):
  window, n = 4, 7
  tx = sa.scale_by_step_adam(sparse_mask=MASK, threshold=0.0, window=window,
                             statistic=statistic)
  state0 = tx.init(make_params())
  assert math.isnan(float(sa.autoswitch_statistic(state0)))
  hist = run(tx, make_grads(n, seed=3), state=state0)
  states = [state0] + [h[2] for h in hist]
  zs = []
  for t in range(1, n + 1):
    # Pooled over both sparse kernels (not a mean of per-leaf means); bias excluded.
    dv = np.concatenate([
        (get(states[t].nu, p).astype(np.float64) - get(states[t - 1].nu, p)).ravel()
        for p in SPARSE])
    z = np.abs(dv).mean() if statistic == 'mean' else np.exp(np.log(np.abs(dv)).mean())
    zs.append(z)
    s = states[t]
    assert int(s.z_count) == t
    np.testing.assert_allclose(float(s.z_window[(t - 1) % window]), z, rtol=1e-5)
    np.testing.assert_allclose(float(sa.autoswitch_statistic(s)),
                               np.mean(zs[-window:]), rtol=1e-5)


def test_geomean_guards_log_zero():
  # Step 1 with g = 0 on half the sparse elements: dv is exactly 0 there. An
  # unguarded log gives Z = exp(-inf) = 0, which would pass any threshold.
  tx = sa.scale_by_step_adam(sparse_mask=MASK, threshold=0.0, window=2, statistic='geomean')
  g = jax.tree.map(lambda x: jnp.asarray(np.arange(x.size).reshape(x.shape) % 2, jnp.float32),
                   make_params())
  state = run(tx, [g])[-1][2]
  absdv = np.concatenate([get(state.nu, p).ravel() for p in SPARSE]).astype(np.float64)
  tiny = float(np.finfo(np.float32).tiny)
  want = np.exp(np.mean(np.log(absdv + tiny)))
  assert (absdv == 0).any() and want > 0
  np.testing.assert_allclose(float(sa.autoswitch_statistic(state)), want, rtol=1e-4)


def _constant_grad_zbar(b2, window, steps):
  """Closed form for g = 1 everywhere: v_t = 1 - b2^t, Z_t = (1 - b2) b2^(t-1)."""
  z = [(1 - b2) * b2 ** (t - 1) for t in range(1, steps + 1)]
  return [float(np.mean(z[max(0, t - window):t])) for t in range(1, steps + 1)]


@pytest.mark.parametrize('t_min,scale_free,expected', [
    (0, False, 7), (9, False, 10), (0, True, 7)])
def test_threshold_switch_step(t_min, scale_free, expected):
  b2, window, steps = 0.9, 3, 12
  zbar = _constant_grad_zbar(b2, window, steps)
  tested = [zb / (1 - b2 ** t) for t, zb in enumerate(zbar, start=1)] if scale_free else zbar
  assert all(a > b for a, b in zip(tested, tested[1:]))  # Decreasing: fires once below.
  thr = math.sqrt(tested[5] * tested[6])  # Between the values at steps 6 and 7.
  tx = sa.scale_by_step_adam(b2=b2, sparse_mask=MASK, threshold=thr, window=window,
                             t_min=t_min, scale_free=scale_free)
  ones = jax.tree.map(jnp.ones_like, make_params())
  states = [h[2] for h in run(tx, [ones] * steps, jit=True)]
  flags = [bool(s.switched) for s in states]
  assert flags == [t >= expected for t in range(1, steps + 1)]
  assert int(states[-1].switch_step) == expected


def test_threshold_respects_t_min():
  tx = sa.scale_by_step_adam(sparse_mask=MASK, threshold=1e9, window=5, t_min=3)
  states = [h[2] for h in run(tx, make_grads(6))]
  assert [bool(s.switched) for s in states] == [False, False, False, True, True, True]
  assert int(states[-1].switch_step) == 4


# --------------------------------------------------------------------------- #
# State access.


def test_find_step_state_in_chain_and_inject_hyperparams():
  params = make_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sa.step_adam(1e-2, sparse_mask=MASK, t_max=2, threshold=0.0))
  st = tx.init(params)
  assert isinstance(sa.find_step_state(st), sa.StepAdamState)
  assert not bool(sa.switched(st))

  inj = optax.inject_hyperparams(sa.step_adam)(
      learning_rate=1e-2, weight_decay=1e-4, sparse_mask=MASK, t_max=2, threshold=0.0)
  states = [h[2] for h in run(inj, make_grads(3), jit=True)]
  assert [bool(sa.switched(s)) for s in states] == [False, False, True]
  assert int(sa.find_step_state(states[-1]).switch_step) == 3
  assert sa.find_step_state(states[-1]).z_window.shape == (1000,)


def test_find_step_state_errors():
  params = make_params()
  with pytest.raises(ValueError, match='No StepAdamState'):
    sa.find_step_state(optax.adam(1e-3).init(params))
  one = sa.step_adam(1e-3, sparse_mask=MASK)
  with pytest.raises(ValueError, match='Found 2 StepAdamStates'):
    sa.switched(optax.chain(one, one).init(params))


def test_prefix_mask_and_mismatch():
  params = make_params()
  prefix = {'dense': True, 'out': False}
  tx = sa.scale_by_step_adam(sparse_mask=prefix, threshold=0.0, window=2)
  state = run(tx, make_grads(1))[-1][2]
  dv = [np.abs(get(state.nu, p)).ravel() for p in (('dense', 'kernel'), ('dense', 'bias'))]
  np.testing.assert_allclose(float(state.z_window[0]), np.concatenate(dv).mean(), rtol=1e-5)
  bad = sa.scale_by_step_adam(sparse_mask={'dense': {'kernel': True}})
  with pytest.raises(ValueError, match='sparse_mask'):
    bad.init(params)


# --------------------------------------------------------------------------- #
# Checkpointing.


@pytest.mark.parametrize('save_after', [2, 5])
def test_orbax_round_trip_keeps_phase(tmp_path, save_after):
  ocp = pytest.importorskip('orbax.checkpoint')
  grads = make_grads(9)
  tx = sa.step_adam(1e-2, sparse_mask=MASK, t_max=3, threshold=0.0, window=4)
  full = run(tx, grads, jit=True)
  _, params, state = full[save_after - 1]
  path = tmp_path / 'ckpt'
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {'params': params, 'opt_state': state})
  with ocp.StandardCheckpointer() as ckpt:
    target = jax.eval_shape(lambda: {'params': params, 'opt_state': state})
    restored = ckpt.restore(path, target)
  r_state = restored['opt_state']
  assert bool(sa.switched(r_state)) == (save_after > 3)
  assert trees_equal(r_state, state)
  resumed = run(tx, grads[save_after:], jit=True, params=restored['params'], state=r_state)
  for (u_f, p_f, s_f), (u_r, p_r, s_r) in zip(full[save_after:], resumed):
    assert trees_equal(u_f, u_r) and trees_equal(p_f, p_r) and trees_equal(s_f, s_r)
  assert int(sa.find_step_state(resumed[-1][2]).switch_step) == 4


# --------------------------------------------------------------------------- #
# Option validation.


@pytest.mark.parametrize('kwargs,option', [
    (dict(b2=1.0), 'b2'),
    (dict(b2=0.0), 'b2'),
    (dict(b1=1.0), 'b1'),
    (dict(eps=-1.0), 'eps'),
    (dict(window=0), 'window'),
    (dict(window=2.5), 'window'),
    (dict(t_min=5, t_max=2), 't_max'),
    (dict(t_min=-1), 't_min'),
    (dict(statistic='median'), 'statistic'),
    (dict(threshold=-1.0), 'threshold'),
    (dict(frozen_eps=-1.0), 'frozen_eps'),
    (dict(sparse_mask=None), 'sparse_mask'),
])
def test_bad_options_raise(kwargs, option):
  kwargs = {'sparse_mask': MASK, **kwargs}
  with pytest.raises(ValueError, match=f"'{option}'"):
    sa.scale_by_step_adam(**kwargs)


def test_bad_weight_decay_raises():
  with pytest.raises(ValueError, match="'weight_decay'"):
    sa.step_adam(1e-3, weight_decay=-0.1, sparse_mask=MASK)
