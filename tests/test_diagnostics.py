"""Diagnostics against loop-based NumPy references and hand-computed cases, eager and jitted."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nmsparse import diagnostics as diag
from nmsparse import masks, rules
from nmsparse.rules import NMSpec


def _both(fn, *args):
  """Results of ``fn(*args)`` eagerly and under jit (args closed over where not arrays)."""
  return fn(*args), jax.jit(fn)(*args)


# ----------------------------------------------------------------------------- NumPy references

def ref_groups(w, axes, m):
  """Groups as lists of values by explicit index loops (contraction axes flattened row-major)."""
  w = np.asarray(w)
  axes = sorted(a % w.ndim for a in axes)
  rest = [a for a in range(w.ndim) if a not in axes]
  out = []
  for ridx in itertools.product(*(range(w.shape[a]) for a in rest)):
    flat = []
    for cidx in itertools.product(*(range(w.shape[a]) for a in axes)):
      idx = [0] * w.ndim
      for a, i in zip(rest, ridx):
        idx[a] = i
      for a, i in zip(axes, cidx):
        idx[a] = i
      flat.append(w[tuple(idx)])
    out += [flat[i:i + m] for i in range(0, len(flat), m)]
  return out


def ref_valid(w, spec):
  groups = ref_groups(w, spec.axes, spec.m)
  return sum(sum(v != 0 for v in g) <= spec.n for g in groups), len(groups)


def _params():
  rng = np.random.default_rng(0)
  return {
      'dense': {'kernel': jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                'bias': jnp.zeros(4)},
      'mlp': {'kernel': jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)},
      'scan': {'kernel': jnp.asarray(rng.standard_normal((2, 8, 3)), jnp.float32)},
      'out': {'kernel': jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32)},
  }


RULES = [('mlp/kernel', NMSpec(2, 4, (0,))), ('scan/kernel', NMSpec(1, 8, (-2,))),
         ('out/kernel', NMSpec(1, 4, (0, 1)))]


def _specs(params):
  return rules.resolve(RULES, params, log=False)


def _hard(params, specs):
  return rules.map_sparse(lambda s, w: jnp.where(masks.nm_mask(w, s.n, s.m, s.axes), w, 0.0),
                          specs, params)


# ----------------------------------------------------------------------------- sparsity

def test_sparsity_hand_case():
  # 4x2 kernel at 2:4 along axis 0: column 0 keeps 2 of 4, column 1 keeps 1 (a zero already).
  w = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -0.0]])
  p = {'k': w, 'b': jnp.ones(2)}
  specs = {'k': NMSpec(2, 4, (0,)), 'b': None}
  for r in _both(lambda p: diag.sparsity(p, specs), p):
    assert float(r) == 5 / 8  # -0.0 counts as zero; the bias is not counted
  for r in _both(lambda p: diag.nm_valid_fraction(p, specs), p):
    assert float(r) == 1.0
  # One more nonzero in column 1 is still 2:4-valid; two more is not.
  p2 = {'k': w.at[0, 1].set(5.0).at[2, 1].set(6.0), 'b': p['b']}
  assert float(diag.nm_valid_fraction(p2, specs)) == 0.5
  assert float(diag.sparsity(p2, specs)) == 3 / 8


def test_sparsity_matches_reference_per_param():
  params = _params()
  specs = _specs(params)
  hard = _hard(params, specs)
  hard['mlp']['kernel'] = hard['mlp']['kernel'].at[0, 0].set(0.0)  # one extra zero
  total, per = 0, {}
  zeros = 0
  for path, w in rules.named_leaves(hard):
    if path in ('mlp/kernel', 'scan/kernel', 'out/kernel'):
      z = int(np.sum(np.asarray(w) == 0))
      per[path] = z / w.size
      zeros += z
      total += w.size
  for r in _both(lambda p: diag.sparsity(p, specs), hard):
    np.testing.assert_allclose(float(r), zeros / total, rtol=1e-6)
  for r in _both(lambda p: diag.sparsity(p, specs, per_param=True), hard):
    assert set(r) == set(per)
    for k in per:
      np.testing.assert_allclose(float(r[k]), per[k], rtol=1e-6)


def test_nm_valid_fraction_matches_reference():
  params = _params()
  specs = _specs(params)
  spec_of = {p: s for (p, _), s in zip(rules.named_leaves(params), rules.spec_leaves(specs))}
  hard = _hard(params, specs)
  for r in _both(lambda p: diag.nm_valid_fraction(p, specs), hard):
    assert float(r) == 1.0
  # Dense weights: count with the loop reference.
  ok = tot = 0
  per = {}
  for path, w in rules.named_leaves(params):
    if spec_of[path] is not None:
      v, c = ref_valid(w, spec_of[path])
      per[path] = v / c
      ok, tot = ok + v, tot + c
  for r in _both(lambda p: diag.nm_valid_fraction(p, specs), params):
    np.testing.assert_allclose(float(r), ok / tot, rtol=1e-6)
  r = diag.nm_valid_fraction(params, specs, per_param=True)
  for k in per:
    np.testing.assert_allclose(float(r[k]), per[k], rtol=1e-6)
  # A partially broken hard kernel: exactly the reference's count of bad groups.
  rng = np.random.default_rng(1)
  broken = jax.tree.map(lambda x: x, hard)
  broken['scan']['kernel'] = broken['scan']['kernel'] + jnp.asarray(
      (rng.random((2, 8, 3)) < 0.1) * 1.0, jnp.float32)
  v, c = ref_valid(broken['scan']['kernel'], spec_of['scan/kernel'])
  assert v < c
  r = diag.nm_valid_fraction(broken, specs, per_param=True)
  np.testing.assert_allclose(float(r['scan/kernel']), v / c, rtol=1e-6)


def test_specs_mismatch_is_an_error():
  params = _params()
  with pytest.raises(ValueError, match='specs'):
    diag.sparsity(params, {'mlp': {'kernel': NMSpec(2, 4, (0,))}})


# ----------------------------------------------------------------------------- masks

def test_mask_flip_rate():
  params = _params()
  specs = _specs(params)
  ma = rules.map_sparse(lambda s, w: masks.nm_mask(w, s.n, s.m, s.axes), specs, params,
                        dense=lambda w: None)
  mb = jax.tree.map(lambda m: ~m, ma)
  n = sum(x.size for x in jax.tree.leaves(ma))
  for r in _both(diag.mask_flip_rate, ma, ma):
    assert float(r['mask_flip_rate']) == 0.0 and float(r['mask_flips']) == 0
  for r in _both(diag.mask_flip_rate, ma, mb):
    assert float(r['mask_flip_rate']) == 1.0 and float(r['mask_flips']) == n
  # Flip 3 entries of one kernel: SAD / total.
  mc = jax.tree.map(lambda m: m, ma)
  mc['mlp']['kernel'] = mc['mlp']['kernel'].at[0, :3].set(~mc['mlp']['kernel'][0, :3])
  sad = sum(int(np.sum(np.asarray(a, int) != np.asarray(b, int)))
            for a, b in zip(jax.tree.leaves(ma), jax.tree.leaves(mc)))
  assert sad == 3
  for r in _both(diag.mask_flip_rate, ma, mc):
    np.testing.assert_allclose(float(r['mask_flip_rate']), 3 / n, rtol=1e-6)
    assert float(r['mask_flips']) == 3


# ----------------------------------------------------------------------------- gradients

def test_grad_norms_hand_case():
  g = {'k': jnp.array([[3.0, 1.0], [4.0, 2.0]]), 'b': jnp.ones(2)}
  m = {'k': jnp.array([[True, False], [True, False]]), 'b': None}
  for r in _both(diag.grad_norms, g, m):
    np.testing.assert_allclose(float(r['kept_grad_norm']), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(r['pruned_grad_norm']), np.sqrt(5.0), rtol=1e-6)
    np.testing.assert_allclose(float(r['kept_grad_rms']), 5.0 / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(float(r['pruned_grad_rms']), np.sqrt(5.0 / 2), rtol=1e-6)
  # Dense phase: all kept, the pruned set is empty and reports 0.
  r = diag.grad_norms(g, {'k': jnp.ones((2, 2), bool), 'b': None})
  assert float(r['pruned_grad_norm']) == 0.0 and float(r['pruned_grad_rms']) == 0.0


def test_grad_norms_matches_reference():
  params = _params()
  specs = _specs(params)
  ms = rules.map_sparse(lambda s, w: masks.nm_mask(w, s.n, s.m, s.axes), specs, params,
                        dense=lambda w: None)
  grads = jax.tree.map(lambda w: jnp.sin(3.0 * w) + 0.1, params)
  kept, pruned = [], []
  for gl, ml in zip(jax.tree.leaves(grads), jax.tree.leaves(ms, is_leaf=lambda x: x is None)):
    if ml is None:
      continue
    gl, ml = np.asarray(gl, np.float64).ravel(), np.asarray(ml).ravel()
    kept += list(gl[ml])
    pruned += list(gl[~ml])
  for r in _both(diag.grad_norms, grads, ms):
    np.testing.assert_allclose(float(r['kept_grad_norm']), np.linalg.norm(kept), rtol=1e-5)
    np.testing.assert_allclose(float(r['pruned_grad_norm']), np.linalg.norm(pruned), rtol=1e-5)
    np.testing.assert_allclose(float(r['pruned_grad_rms']), np.sqrt(np.mean(np.square(pruned))),
                               rtol=1e-5)


def test_gradient_noise():
  # Two microbatches; kept entries agree exactly (no noise), pruned ones disagree.
  g = {'k': jnp.array([[[1.0, 2.0], [1.0, 0.0]],
                       [[1.0, 0.0], [1.0, 2.0]]]), 'b': jnp.ones((2, 3))}
  m = {'k': jnp.array([[True, False], [True, False]]), 'b': None}
  for r in _both(diag.gradient_noise, g, m):
    assert float(r['kept_grad_noise']) == 0.0
    np.testing.assert_allclose(float(r['kept_grad_signal']), 2.0)
    assert float(r['kept_grad_noise_ratio']) == 0.0
    # pruned: gbar = (1, 1), signal 2; per entry unbiased variance ((1)^2 + (1)^2) / 1 = 2.
    np.testing.assert_allclose(float(r['pruned_grad_signal']), 2.0)
    np.testing.assert_allclose(float(r['pruned_grad_noise']), 4.0)
    np.testing.assert_allclose(float(r['pruned_grad_noise_ratio']), 2.0)
  # Against NumPy on random stacks.
  rng = np.random.default_rng(3)
  b = 5
  g = {'k': jnp.asarray(rng.standard_normal((b, 8, 4)) + 0.5, jnp.float32)}
  mk = rng.random((8, 4)) < 0.5
  m = {'k': jnp.asarray(mk)}
  r = jax.jit(diag.gradient_noise)(g, m)
  x = np.asarray(g['k'], np.float64)
  for name, sel in (('kept', mk), ('pruned', ~mk)):
    xs = x[:, sel]
    signal = np.sum(xs.mean(0) ** 2)
    noise = np.sum(xs.var(0, ddof=1))
    np.testing.assert_allclose(float(r[f'{name}_grad_signal']), signal, rtol=1e-5)
    np.testing.assert_allclose(float(r[f'{name}_grad_noise']), noise, rtol=1e-5)
    np.testing.assert_allclose(float(r[f'{name}_grad_noise_ratio']), noise / signal, rtol=1e-5)
  with pytest.raises(ValueError, match='microbatches'):
    diag.gradient_noise({'k': jnp.ones((8, 4))}, m)


# ----------------------------------------------------------------------------- summary

def test_summary_flat_and_jittable():
  params = _params()
  specs = _specs(params)
  ms = rules.map_sparse(lambda s, w: masks.nm_mask(w, s.n, s.m, s.axes), specs, params,
                        dense=lambda w: None)
  hard = _hard(params, specs)
  grads = jax.tree.map(jnp.cos, params)
  stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), grads)

  def fn(hard, ms, grads, stacked):
    return diag.summary(hard, specs, masks=ms, prev_masks=ms, grads=grads,
                        microbatch_grads=stacked)

  for out in _both(fn, hard, ms, grads, stacked):
    assert {'sparsity', 'nm_valid', 'mask_flip_rate', 'mask_flips', 'kept_grad_norm',
            'pruned_grad_norm', 'kept_grad_rms', 'pruned_grad_rms',
            'kept_grad_noise_ratio', 'pruned_grad_noise_ratio'} <= set(out)
    assert all(jnp.ndim(v) == 0 for v in out.values())
    assert float(out['nm_valid']) == 1.0 and float(out['mask_flip_rate']) == 0.0
  assert set(diag.summary(hard, specs)) == {'sparsity', 'nm_valid'}
  with pytest.raises(ValueError, match='masks='):
    diag.summary(hard, specs, grads=grads)
