"""Recipes end to end on a params tree: forward, gradients, state, schedules, errors.

Expected values come from NumPy re-derivations of SPEC.md section 2 written here,
never from the code under test.
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nmsparse
from nmsparse import NMSpec

TOTAL = 100
LAM = 2e-4


def np_mask(w, n, m):
  """Reference N:M mask along axis 0 of a 2-D kernel: stable sort by -|w| per group."""
  w = np.asarray(w)
  k, o = w.shape
  out = np.zeros_like(w, bool)
  for g in range(k // m):
    for j in range(o):
      col = np.abs(w[g * m:(g + 1) * m, j])
      keep = np.argsort(-col, kind='stable')[:n]
      out[g * m + keep, j] = True
  return out


def make_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {'fc1': {'kernel': jax.random.normal(k1, (16, 8)), 'bias': jax.random.normal(k3, (8,))},
          'fc2': {'kernel': jax.random.normal(k2, (8, 4))}}


RULES = [(r'fc1/kernel', NMSpec(1, 4)), (r'fc2/kernel', NMSpec(2, 4))]
COEF = {'fc1': {'kernel': np.linspace(-1, 1, 128).reshape(16, 8).astype(np.float32),
                'bias': np.ones(8, np.float32)},
        'fc2': {'kernel': np.linspace(2, -2, 32).reshape(8, 4).astype(np.float32)}}


def linear_loss(eff):
  """L = sum(C * W~): dL/dW~ = C exactly, so every backward rule is checkable by hand."""
  return sum(jnp.sum(c * w) for c, w in zip(jax.tree.leaves(COEF), jax.tree.leaves(eff)))


def sparsifier(name, **kw):
  return nmsparse.make_sparsifier(nmsparse.recipe_config(name, **kw), RULES, make_params(),
                                  TOTAL, log=False)


def grads_at(sp, params, step, state=None, opt_state=None):
  state = sp.init(params) if state is None else state
  state = sp.update(params, state, step)
  return jax.grad(lambda p: linear_loss(sp.apply(p, state, step, opt_state)))(params)


@pytest.mark.parametrize('name', ['ste', 'srste', 'mdgf', 'mdgf_decay_scaled', 'oneshot', 'hard'])
def test_forward_and_gradient_match_the_formulas(name):
  kw = {}
  if name == 'mdgf_decay_scaled':
    name, kw = 'mdgf', dict(mdgf_backward='decay_scaled')
  if name == 'mdgf':
    kw.update({'decay.kind': 'linear', 'decay.rate': 0.01})
  sp = sparsifier(name, **kw)
  params = make_params()
  step = 30
  state = sp.update(params, sp.init(params), 0)  # oneshot/hard compute their mask at step 0.
  state = sp.update(params, state, step)
  eff = sp.apply(params, state, step)
  grads = jax.grad(lambda p: linear_loss(sp.apply(p, state, step)))(params)
  a = max(0.0, 1 - 0.01 * step)
  for layer, (n, m) in (('fc1', (1, 4)), ('fc2', (2, 4))):
    w = np.asarray(params[layer]['kernel'])
    mk = np_mask(w, n, m)
    c = COEF[layer]['kernel']
    if name == 'mdgf':
      want_fwd = np.where(mk, w, a * w)
      want_grad = c if kw.get('mdgf_backward') != 'decay_scaled' else np.where(mk, c, a * c)
    else:
      want_fwd = np.where(mk, w, 0.0)
      want_grad = {'ste': c, 'srste': c + LAM * np.where(mk, 0.0, w),
                   'oneshot': np.where(mk, c, 0.0), 'hard': np.where(mk, c, 0.0)}[name]
    np.testing.assert_allclose(eff[layer]['kernel'], want_fwd, rtol=1e-6)
    np.testing.assert_allclose(grads[layer]['kernel'], want_grad, rtol=1e-6, atol=1e-7)
  # Regression (reference bug 1): the bias of a sparse layer is kept, untouched, with its gradient.
  np.testing.assert_array_equal(eff['fc1']['bias'], params['fc1']['bias'])
  np.testing.assert_array_equal(grads['fc1']['bias'], COEF['fc1']['bias'])


def test_dense_recipe_is_identity():
  sp = sparsifier('dense')
  params = make_params()
  assert sp.apply(params, sp.init(params), 50) is params
  assert sp.init(params) == {}


def test_phases_dense_recipe_finetune():
  """Dense before dense_end, recipe between, final N:M hard mask in a frozen fine-tune."""
  sp = sparsifier('mdgf', dense_frac=0.2, finetune_frac=0.3, finetune_mask='frozen',
                  **{'decay.kind': 'exponential', 'decay.rate': 0.05})
  params = make_params()
  state = sp.init(params)
  w = np.asarray(params['fc1']['kernel'])
  mk = np_mask(w, 1, 4)
  eff = sp.apply(params, sp.update(params, state, 19), 19)
  np.testing.assert_array_equal(eff['fc1']['kernel'], w)                       # dense
  eff = sp.apply(params, sp.update(params, state, 20), 20)
  np.testing.assert_allclose(eff['fc1']['kernel'], np.where(mk, w, w), rtol=0)  # a(0) = 1
  eff = sp.apply(params, sp.update(params, state, 30), 30)
  np.testing.assert_allclose(eff['fc1']['kernel'], np.where(mk, w, math.exp(-0.5) * w), rtol=1e-6)
  # Fine-tune from step 70: the mask frozen at step 70 stays even after the weights change.
  state70 = sp.update(params, state, 70)
  moved = jax.tree.map(lambda x: -x if x.ndim == 2 else x, params)
  moved['fc1']['kernel'] = moved['fc1']['kernel'].at[::4].multiply(100.0)  # New winners.
  eff = sp.apply(moved, sp.update(moved, state70, 71), 71)
  np.testing.assert_array_equal(np.asarray(eff['fc1']['kernel']) != 0, mk)
  info = {k: float(v) for k, v in sp.info(71).items()}
  # Size-weighted: fc1 has 128 entries at 1:4, fc2 32 at 2:4.
  assert info == {'phase': 2.0, 'decay': 0.0, 'stage': 0.0, 'density': pytest.approx((128 * 0.25 + 32 * 0.5) / 160)}
  info = {k: float(v) for k, v in sp.info(10).items()}
  assert info['phase'] == 0 and info['decay'] == 1 and info['density'] == 1


def test_per_step_finetune_recomputes_the_mask():
  sp = sparsifier('mdgf', finetune_frac=0.5)
  params = make_params()
  moved = jax.tree.map(lambda x: -x if x.ndim == 2 else x, params)
  moved['fc1']['kernel'] = moved['fc1']['kernel'].at[::4].multiply(100.0)
  eff = sp.apply(moved, sp.init(moved), 60)
  np.testing.assert_array_equal(np.asarray(eff['fc1']['kernel']) != 0,
                                np_mask(moved['fc1']['kernel'], 1, 4))
  g = grads_at(sp, moved, 60)  # Reference fine-tune: STE, gradient straight through.
  np.testing.assert_allclose(g['fc1']['kernel'], COEF['fc1']['kernel'])


def test_oneshot_mask_is_frozen_at_the_first_sparse_step():
  sp = sparsifier('oneshot', dense_steps=10)
  p0 = make_params(0)
  p1 = make_params(1)
  state = sp.update(p0, sp.init(p1), 10)  # Mask taken from the weights of step 10.
  for step in (11, 50, 99):
    state = sp.update(p1, state, step)
    eff = sp.apply(p1, state, step)
    np.testing.assert_array_equal(np.asarray(eff['fc1']['kernel']) != 0,
                                  np_mask(p0['fc1']['kernel'], 1, 4))


def test_hard_mask_refreshes_every_f_steps():
  sp = sparsifier('hard', refresh_every=5, dense_steps=3)
  p0, p1 = make_params(0), make_params(1)
  state = sp.update(p0, sp.init(p0), 3)  # Refresh at 3, 8, 13, ...
  state = sp.update(p1, state, 7)        # Not a refresh step: still p0's mask.
  np.testing.assert_array_equal(state['masks']['fc1/kernel'], np_mask(p0['fc1']['kernel'], 1, 4))
  state = sp.update(p1, state, 8)
  np.testing.assert_array_equal(state['masks']['fc1/kernel'], np_mask(p1['fc1']['kernel'], 1, 4))


@pytest.mark.parametrize('kind,want', [
    ('stepwise', [(3, 4), (1, 4)]),            # fc1 target 1:4 -> 3:4, 2:4, 1:4 (padded below)
    ('densify', [(1, 32), (1, 16), (1, 8), (1, 4)]),
])
def test_sdgf_stages_move_every_layer(kind, want):
  """Regression (reference bugs 4 and 8): every sparse layer follows the schedule of the step,
  and a fresh sparsifier at a mid-interval step (a resumed run) is in that interval's stage."""
  params = {'q': {'kernel': jax.random.normal(jax.random.key(3), (64, 8))},
            'mlp': {'kernel': jax.random.normal(jax.random.key(4), (64, 8))}}
  rules = [(r'q/kernel', NMSpec(1, 4)), (r'mlp/kernel', NMSpec(1, 4))]
  cfg = nmsparse.recipe_config('sdgf', dense_steps=20, **{'structure.kind': kind})
  sp = nmsparse.make_sparsifier(cfg, rules, params, 100, log=False)
  pats = {'stepwise': [(3, 4), (2, 4), (1, 4)], 'densify': want}[kind]
  k = len(pats)
  starts = [20 + (i * 80) // k for i in range(k)]
  for i, (n, m) in enumerate(pats):
    mid = starts[i] + 5
    eff = sp.apply(params, {}, mid)
    for layer in ('q', 'mlp'):
      nz = (np.asarray(eff[layer]['kernel']) != 0).reshape(64 // m, m, 8).sum(1)
      assert (nz == n).all(), (kind, i, layer, nz.max())
    assert int(sp.stage(mid)) == i


def test_sdgf_geometric_not_divisible_is_a_clear_error():
  params = {'fc': {'kernel': jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
  cfg = nmsparse.recipe_config('sdgf', **{'structure.kind': 'geometric'})
  with pytest.raises(ValueError, match=r"geometric.*fc/kernel.*\(16, 8\).*M=32"):
    nmsparse.make_sparsifier(cfg, [(r'fc/kernel', NMSpec(1, 4))], params, 100, log=False)


def test_mdgf_sdgf_combined_moves_both():
  sp = sparsifier('mdgf_sdgf', **{'decay.kind': 'linear', 'decay.rate': 0.02})
  stages = [int(sp.stage(s)) for s in (0, 40, 80)]
  decays = [float(sp.decay_value(s)) for s in (0, 10, 40)]
  assert stages == [0, 1, 2] and decays == pytest.approx([1.0, 0.8, 0.2])


def test_step_recipe_turns_the_mask_on_at_the_switch():
  sp = sparsifier('step', **{'step.t_min_steps': 0, 'step.t_max_steps': 3, 'step.threshold': 0.0})
  params = make_params()
  tx = optax.chain(sp.scale_by_adam(), optax.scale(-0.1))
  opt = tx.init(params)
  w = np.asarray(params['fc1']['kernel'])
  assert np.array_equal(sp.apply(params, {}, 0, opt)['fc1']['kernel'], w)  # precondition: dense
  for _ in range(4):  # Switches at the end of update 4 = t_max + 1.
    opt = tx.update(params, opt, params)[1]
  eff = sp.apply(params, {}, 4, opt)
  np.testing.assert_array_equal(np.asarray(eff['fc1']['kernel']) != 0, np_mask(w, 1, 4))
  with pytest.raises(ValueError, match='opt_state'):
    sp.apply(params, {}, 4)


PHASED = {'dense_frac': 0.2, 'finetune_frac': 0.3}  # Dense 0-19, sparse 20-69, fine-tune 70-99.


def _ste_case(w, mk, c):
  return np.where(mk, w, 0), c


@pytest.mark.parametrize('name, kw, checks', [
    ('step', {'step.t_min_steps': 0, 'step.t_max_steps': 3, 'step.threshold': 0.0},
     {5: _ste_case}),
    ('ste', PHASED, {30: _ste_case, 75: _ste_case}),
    ('oneshot', {'dense_steps': 20}, {30: lambda w, mk, c: (np.where(mk, w, 0), np.where(mk, c, 0))}),
    ('mdgf', {**PHASED, 'decay.kind': 'exponential', 'decay.rate': 0.05},  # a(30) = exp(-0.05 * 10)
     {30: lambda w, mk, c: (np.where(mk, w, math.exp(-0.5) * w), c), 75: _ste_case}),
    ('srste', PHASED, {30: lambda w, mk, c: (np.where(mk, w, 0), c + LAM * np.where(mk, 0, w)),
                       75: _ste_case}),
])
def test_apply_has_no_conditional_and_follows_the_phase(name, kw, checks):
  """Every phase through one op with phase-selected scalars: no lax.cond/switch in apply.

  Dense phase (step 5 or 10): w and dL/dw = C exactly. Later steps: the forward and
  gradient of the recipe (or of the STE fine-tune), from NumPy with the reference mask.
  """
  sp = sparsifier(name, **kw)
  params = make_params()
  state = sp.init(params)
  opt = None
  if name == 'step':
    tx = optax.chain(sp.scale_by_adam(), optax.scale(-0.1))
    opt = tx.init(params)
  jaxpr = str(jax.make_jaxpr(lambda p, st, o: sp.apply(p, st, 5, o))(params, state, opt))
  assert ' cond[' not in jaxpr and 'switch' not in jaxpr
  w = np.asarray(params['fc1']['kernel'])
  c = COEF['fc1']['kernel']
  dense_step = 10
  np.testing.assert_array_equal(sp.apply(params, sp.update(params, state, dense_step), dense_step,
                                         opt)['fc1']['kernel'], w)
  np.testing.assert_array_equal(grads_at(sp, params, dense_step, state, opt)['fc1']['kernel'], c)
  if name == 'step':
    for _ in range(4):
      opt = tx.update(params, opt, params)[1]
  mk = np_mask(w, 1, 4)
  for step, want in checks.items():
    state = sp.update(params, state, step)  # One-shot takes its mask at its first sparse step.
    fwd, grad = want(w, mk, c)
    eff = sp.apply(params, state, step, opt)['fc1']['kernel']
    np.testing.assert_allclose(eff, fwd, rtol=1e-6, atol=0)
    np.testing.assert_allclose(grads_at(sp, params, step, state, opt)['fc1']['kernel'], grad,
                               rtol=1e-6, atol=1e-9)


def test_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  sp = sparsifier('oneshot')
  params = make_params()
  state = sp.update(params, sp.init(params), 0)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'state', state)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / 'state', jax.eval_shape(lambda: state))
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_remat_gives_the_same_schedule_and_gradients():
  """Regression (reference bug 6): no hidden retry at step 0 under gradient checkpointing."""
  sp = sparsifier('mdgf', **{'decay.kind': 'linear', 'decay.rate': 0.01})
  params = make_params()
  loss = lambda p, s: linear_loss(sp.apply(p, {}, s))
  g1 = jax.grad(loss)(params, 40)
  g2 = jax.jit(jax.grad(jax.checkpoint(loss)))(params, 40)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  e1 = jax.jit(jax.checkpoint(lambda p: sp.apply(p, {}, 40)))(params)
  assert not np.array_equal(e1['fc1']['kernel'], params['fc1']['kernel'])  # Not step 0 (dense).


def test_evaluation_uses_the_mask_and_decay_of_its_step():
  """Regression (reference bug 7): a model rebuilt outside the loop at step s is the trained one."""
  params = make_params()
  cfg = nmsparse.recipe_config('mdgf', **{'decay.kind': 'linear', 'decay.rate': 0.01})
  train_sp = nmsparse.make_sparsifier(cfg, RULES, params, TOTAL, log=False)
  eval_sp = nmsparse.make_sparsifier(cfg, RULES, jax.eval_shape(lambda: params), TOTAL, log=False)
  a = jax.jit(train_sp.apply)(params, {}, 37)
  b = eval_sp.apply(params, {}, 37)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  hard = eval_sp.hard_params(params, {}, 99)
  assert (np.asarray(hard['fc1']['kernel']) != 0).reshape(4, 4, 8).sum(1).max() == 1


@pytest.mark.parametrize('bad,match', [
    (dict(name='sr-ste'), "Unknown recipe 'sr-ste'"),
    (dict(finetune_mask='freeze'), 'finetune_mask'),
    (dict(mdgf_backward='scaled'), 'mdgf_backward'),
    (dict(dense_frac=0.7, finetune_frac=0.5), 'exceed the run'),
    (dict(dense_frac=1.5), r'\[0, 1\]'),
    (dict(**{'decay.kind': 'cosinus'}), 'Unknown decay'),
    (dict(name='step', dense_frac=0.1), 'AutoSwitch'),
])
def test_bad_recipe_configs_fail_clearly(bad, match):
  name = bad.pop('name', 'mdgf')
  with pytest.raises(ValueError, match=match):
    sparsifier(name, **bad)


def test_config_typos_and_wrong_types_fail():
  """Regression (reference bug 9): values are typed and keys are checked."""
  with pytest.raises((AttributeError, KeyError), match='srste_lamda'):
    nmsparse.recipe_config('mdgf', srste_lamda=1e-3)
  with pytest.raises(TypeError):
    nmsparse.recipe_config('mdgf', finetune_mask=False)


def test_plain_dict_config_works():
  cfg = nmsparse.recipe_config('srste').to_dict()
  sp = nmsparse.make_sparsifier(cfg, RULES, make_params(), TOTAL, log=False)
  assert sp.recipe.name == 'srste' and sp.recipe.srste_lambda == LAM


def test_library_imports_with_only_jax_flax_optax():
  """Regression (reference bug 11): the package imports with nothing but its core dependencies."""
  code = ('import sys\n'
          '# Experiment-only packages (absl and orbax come with optax and flax themselves).\n'
          'for mod in ("ml_collections", "tensorflow_datasets", "clu", "grain", "tensorflow", '
          '"matplotlib", "sentencepiece"):\n'
          '    sys.modules[mod] = None\n'
          'import nmsparse, jax.numpy as jnp\n'
          'print(int(nmsparse.nm_mask(jnp.arange(8.0), 1, 4).sum()))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '2'
