"""Recipes end to end on a params tree: forward, gradients, state, schedules, errors.

Expected values come from NumPy re-derivations of the recipe table (docs/method.md §2
in the project's shared notes; the table in nmsparse/recipes.py's docstring) written
here, never from the code under test.
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


def primitives(fn, *args):
  """Names of every primitive in the jaxpr of ``fn(*args)``, sub-jaxprs included (a per-platform
  choice, ``lax.platform_dependent``, is named ``platform_cond``, apart from a runtime ``cond``)."""
  out = set()

  def subs(value):
    if hasattr(value, 'eqns'):
      yield value
    elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):  # A ClosedJaxpr.
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subs(v)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == 'cond' and eqn.params.get('branches_platforms'):
        name = 'platform_cond'  # lax.platform_dependent: lowering keeps one branch, no runtime branch.
      out.add(name)
      for value in eqn.params.values():
        for sub in subs(value):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


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
  # Regression (reference bug 1, docs/method.md §5): the bias of a sparse layer is kept, untouched,
  # with its gradient.
  np.testing.assert_array_equal(eff['fc1']['bias'], params['fc1']['bias'])
  np.testing.assert_array_equal(grads['fc1']['bias'], COEF['fc1']['bias'])


def test_dense_recipe_is_identity():
  sp = sparsifier('dense')
  params = make_params()
  assert sp.apply(params, sp.init(params), 50) is params
  assert sp.apply(params, sp.init(params), TOTAL) is params
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


@pytest.mark.parametrize('finetune_mask', ['per_step', 'frozen'])
def test_hard_finetune_follows_finetune_mask(finetune_mask):
  """Regression (issue 11, item 2): ``hard``'s fine-tune is what ``finetune_mask`` says.

  per_step: the mask of the current weights, recomputed every step, gradient straight
  through (STE). frozen: the mask taken at the fine-tune's first step, gradient m * g.
  """
  sp = sparsifier('hard', refresh_every=1000, finetune_frac=0.3, finetune_mask=finetune_mask)
  p0, p1, p2 = make_params(0), make_params(1), make_params(2)
  state = sp.update(p0, sp.init(p0), 0)    # The periodic mask, from p0 (never retaken).
  state = sp.update(p1, state, 70)         # First fine-tune step: the weights are p1.
  w = [np.asarray(p['fc1']['kernel']) for p in (p0, p1, p2)]
  masks = [np_mask(x, 1, 4) for x in w]
  assert not (np.array_equal(masks[0], masks[1]) or np.array_equal(masks[1], masks[2]) or
              np.array_equal(masks[0], masks[2]))
  eff = sp.apply(p2, state, 75)['fc1']['kernel']       # Later fine-tune step: weights p2.
  grad = grads_at(sp, p2, 75, state)['fc1']['kernel']
  c = COEF['fc1']['kernel']
  if finetune_mask == 'per_step':
    mk, want_grad = masks[2], c                        # This step's weights; straight through.
  else:
    mk = masks[1]                                      # Taken at step 70; hard gradient.
    want_grad = np.where(mk, c, 0.0)
  np.testing.assert_allclose(eff, np.where(mk, w[2], 0.0), rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_oneshot_mask_is_frozen_at_the_first_sparse_step():
  sp = sparsifier('oneshot', dense_steps=10)
  p0 = make_params(0)
  p1 = make_params(1)
  state = sp.update(p0, sp.init(p1), 10)  # Mask taken from the weights of step 10.
  for step in (11, 50, 99, TOTAL):
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


def nz_per_group(kernel, m):
  k, o = kernel.shape
  return (np.asarray(kernel) != 0).reshape(k // m, m, o).sum(1)


@pytest.mark.parametrize('kind,pats', [
    ('stepwise', [(3, 4), (2, 4), (1, 4)]),     # 1:4 -> 3:4, 2:4, 1:4 (docs/method.md §2: M-1, M/2, ..., N)
    ('densify', [(1, 32), (1, 16), (1, 8), (1, 4)]),  # N : M 2^j, j = 3..0
])
def test_sdgf_stages_move_every_layer(kind, pats):
  """Regression (reference bugs 4 and 8, docs/method.md §5): every sparse layer follows the schedule of the step,
  and a fresh sparsifier at a mid-interval step (a resumed run) is in that interval's stage."""
  params = {'q': {'kernel': jax.random.normal(jax.random.key(3), (64, 8))},
            'mlp': {'kernel': jax.random.normal(jax.random.key(4), (64, 8))}}
  rules = [(r'q/kernel', NMSpec(1, 4)), (r'mlp/kernel', NMSpec(1, 4))]
  cfg = nmsparse.recipe_config('sdgf', dense_steps=20, **{'structure.kind': kind})
  sp = nmsparse.make_sparsifier(cfg, rules, params, 100, log=False)
  k = len(pats)
  starts = [20 + (i * 80) // k for i in range(k)]  # K equal intervals of the 80 sparse steps.
  for i, (n, m) in enumerate(pats):
    for step in (starts[i], starts[i] + 5):
      eff = sp.apply(params, {}, step)
      for layer in ('q', 'mlp'):
        nz = nz_per_group(eff[layer]['kernel'], m)
        assert (nz == n).all(), (kind, i, layer, nz.max())
      assert int(sp.info(step)['stage']) == i
      assert float(sp.info(step)['density']) == pytest.approx(n / m)


def test_sdgf_layers_with_different_nm_run_their_own_stages():
  """Regression (issue 11, item 3): a 2:4 layer beside a 1:16 layer reaches 2:4 at its own
  second interval (K = log2(4/2) + 1 = 2), not on the 1:16 layer's five-stage clock."""
  params = {'a': {'kernel': jax.random.normal(jax.random.key(5), (64, 8))},
            'b': {'kernel': jax.random.normal(jax.random.key(6), (64, 8))}}
  rules = [(r'a/kernel', NMSpec(2, 4)), (r'b/kernel', NMSpec(1, 16))]
  sp = nmsparse.make_sparsifier(nmsparse.recipe_config('sdgf', dense_steps=20, finetune_steps=20),
                                rules, params, 120, log=False)
  # Sparse phase: steps 20..99 (80 steps). 2:4: 3:4 on [20, 60), 2:4 on [60, 100).
  # 1:16: 15:16, 8:16, 4:16, 2:16, 1:16 on [20, 36), [36, 52), [52, 68), [68, 84), [84, 100).
  want_a = {20: 3, 59: 3, 60: 2, 99: 2, 100: 2, 120: 2}
  want_b = {20: 15, 35: 15, 36: 8, 52: 4, 60: 4, 68: 2, 84: 1, 99: 1, 100: 1, 120: 1}
  for step in sorted(set(want_a) | set(want_b)):
    eff = sp.apply(params, {}, step)
    if step in want_a:
      assert (nz_per_group(eff['a']['kernel'], 4) == want_a[step]).all(), step
    if step in want_b:
      assert (nz_per_group(eff['b']['kernel'], 16) == want_b[step]).all(), step
  info = sp.info(60)
  assert (int(info['stage/2:4']), int(info['stage/1:16'])) == (1, 2)
  assert 'stage' not in info


def test_sdgf_geometric_not_divisible_is_a_clear_error():
  params = {'fc': {'kernel': jax.ShapeDtypeStruct((16, 8), jnp.float32)}}
  cfg = nmsparse.recipe_config('sdgf', **{'structure.kind': 'geometric'})
  with pytest.raises(ValueError, match=r"geometric.*fc/kernel.*\(16, 8\).*M=32"):
    nmsparse.make_sparsifier(cfg, [(r'fc/kernel', NMSpec(1, 4))], params, 100, log=False)


def test_mdgf_sdgf_combined_moves_both():
  sp = sparsifier('mdgf_sdgf', **{'decay.kind': 'linear', 'decay.rate': 0.02})
  # fc1 1:4 (3 stages: 3:4, 2:4, 1:4 from steps 0, 33, 66); fc2 2:4 (3:4, 2:4 from 0, 50).
  info = {s: sp.info(s) for s in (0, 10, 40, 80)}
  assert [int(info[s]['stage/1:4']) for s in (0, 40, 80)] == [0, 1, 2]
  assert [int(info[s]['stage/2:4']) for s in (0, 40, 80)] == [0, 0, 1]
  assert [float(info[s]['decay']) for s in (0, 10, 40)] == pytest.approx([1.0, 0.8, 0.2])


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


def test_step_info_logs_autoswitch():
  """With every gradient 1, v_t = 1 - b2^t, so Z_t = |v_t - v_(t-1)| = (1 - b2) b2^(t-1) for every
  entry (mean and geometric mean alike); the switch fires at update t_max + 1 = 4."""
  sp = sparsifier('step', **{'step.t_min_steps': 0, 'step.t_max_steps': 3, 'step.threshold': 0.0})
  params = make_params()
  tx = optax.chain(sp.scale_by_adam(b2=0.9), optax.scale(-0.1))
  opt = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  info = sp.info(0, opt)
  assert math.isnan(float(info['autoswitch_z'])) and math.isnan(float(info['autoswitch_zbar']))
  assert int(info['switch_step']) == -1
  for _ in range(2):
    opt = tx.update(ones, opt, params)[1]
  info = sp.info(2, opt)
  z1, z2 = 0.1, 0.1 * 0.9
  assert float(info['autoswitch_z']) == pytest.approx(z2, rel=1e-4)
  assert float(info['autoswitch_zbar']) == pytest.approx((z1 + z2) / 2, rel=1e-4)
  assert int(info['switch_step']) == -1 and int(info['phase']) == 0
  for _ in range(2):
    opt = tx.update(ones, opt, params)[1]
  info = sp.info(4, opt)
  assert int(info['switch_step']) == 4 and int(info['phase']) == 1
  assert 'autoswitch_z' not in sparsifier('ste').info(0)


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
  """Every phase through one op with phase-selected scalars: no cond or switch in apply.

  Dense phase (step 10): w and dL/dw = C exactly. Later steps: the forward and
  gradient of the recipe (or of the STE fine-tune), from NumPy with the reference mask.
  """
  sp = sparsifier(name, **kw)
  params = make_params()
  state = sp.init(params)
  opt = None
  if name == 'step':
    tx = optax.chain(sp.scale_by_adam(), optax.scale(-0.1))
    opt = tx.init(params)
  prims = primitives(lambda p, st, o, s: sp.apply(p, st, s, o), params, state, opt, jnp.int32(5))
  assert 'cond' not in prims, prims
  assert 'custom_vjp_call' in prims or 'custom_vjp_call_jaxpr' in prims, prims  # The one flow op.
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


def test_primitives_sees_a_conditional():
  """The helper above can fail: it finds the cond of a lax.cond in a jaxpr."""
  assert 'cond' in primitives(lambda x: jax.lax.cond(x > 0, lambda: x, lambda: -x), 1.0)


# ----------------------------------------------------------------------------- info agrees with apply

def reference_layout(total, dense, finetune):
  """Phase boundaries by hand: fractions of the run, rounded half up."""
  d = math.floor(dense * total + 0.5)
  f = total - math.floor(finetune * total + 0.5)
  return d, f


LAYOUT_RECIPES = [
    ('dense', {}), ('oneshot', {}), ('hard', {'refresh_every': 3}), ('ste', {}), ('srste', {}),
    ('mdgf', {'decay.final': 0.05}), ('mdgf', {'decay.kind': 'linear', 'decay.duration': 0.5}),
    ('mdgf', {'decay.kind': 'stepwise', 'decay.levels': 4}), ('mdgf', {'finetune_mask': 'frozen'}),
    ('sdgf', {}), ('sdgf', {'sdgf_inner': 'mdgf'}), ('mdgf_sdgf', {}),
    ('step', {'step.t_min_steps': 0, 'step.t_max_steps': 6, 'step.threshold': 0.0}),
]


@pytest.mark.parametrize('warmup', [0.0, 0.2], ids=['no-warmup', 'warmup'])
@pytest.mark.parametrize('finetune', [0.0, 0.2], ids=['no-finetune', 'finetune'])
@pytest.mark.parametrize('name,kw', LAYOUT_RECIPES,
                         ids=[f'{n}-{"-".join(f"{v}" for v in kw.values())}' for n, kw in LAYOUT_RECIPES])
def test_info_agrees_with_apply_at_every_step(name, kw, warmup, finetune):
  """Regression (issue 11, item 1): at every step 0..total the phase, decay and density
  that ``info`` reports are what ``apply`` produces, and at step == total every recipe
  but dense gives the hard N:M model of its target pattern, whatever the phase layout.

  ``apply``'s output is read independently: each entry of ``W~ / W`` is 1 (kept) or
  the reported decay (pruned), the kept entries are the N largest of each group, and
  the measured kept fraction is the reported density.
  """
  total = 20
  if name == 'step' and warmup:
    pytest.skip('STEP finds its dense phase by AutoSwitch (no dense_frac).')
  params = {'a': {'kernel': jax.random.normal(jax.random.key(11), (16, 4))},
            'b': {'kernel': jax.random.normal(jax.random.key(12), (16, 2))}}
  rules = [(r'a/kernel', NMSpec(1, 4)), (r'b/kernel', NMSpec(2, 8))]  # Layers with different N:M.
  cfg = nmsparse.recipe_config(name, dense_frac=warmup, finetune_frac=finetune, **kw)
  sp = nmsparse.make_sparsifier(cfg, rules, params, total, log=False)
  d_end, f_start = reference_layout(total, warmup, finetune)
  opt, tx = None, None
  steps = jnp.arange(total + 1)
  opts = [None] * (total + 1)
  if name == 'step':  # Its phase lives in the optimizer state: advance it step by step.
    tx = optax.chain(sp.scale_by_adam(), optax.scale(0.0))
    opts = [tx.init(params)]
    for _ in range(total):
      opts.append(tx.update(params, opts[-1], params)[1])
  batched = None if name != 'step' else jax.tree.map(lambda *x: jnp.stack(x), *opts)
  state = sp.init(params)  # The weights never change, so every mask (re)taken is this one.
  effs = jax.jit(jax.vmap(lambda s, o: sp.apply(params, state, s, o)))(steps, batched)
  infos = jax.jit(jax.vmap(sp.info))(steps, batched)
  for step in range(total + 1):
    eff = jax.tree.map(lambda x: x[step], effs)
    rep = {k: float(v[step]) for k, v in infos.items()}
    want_phase = (3 if step >= total else 2 if step >= f_start else
                  (1 if bool(nmsparse.switched(opts[step])) else 0) if name == 'step' else
                  1 if step >= d_end else 0)
    if name == 'dense':
      want_phase = 0
    kept_total = 0.0
    for layer, (n, m) in (('a', (1, 4)), ('b', (2, 8))):
      w = np.asarray(params[layer]['kernel'])
      ratio = np.asarray(eff[layer]['kernel']) / w
      kept = np.isclose(ratio, 1.0, rtol=1e-6, atol=0)
      pruned = np.isclose(ratio, rep['decay'], rtol=1e-5, atol=1e-7)
      assert (kept | pruned).all(), (step, layer, rep, np.unique(ratio))
      if rep['decay'] < 1:
        nk = kept.reshape(16 // m, m, -1).sum(1)
        assert (nk == nk.flat[0]).all(), (step, layer)
        assert (kept == np_mask(w, int(nk.flat[0]), m)).all(), (step, layer)  # The N largest.
        kept_total += kept.sum()
      else:
        kept_total += kept.size
    if rep['decay'] < 1 or rep['phase'] == 0:  # With a = 1 (MDGF's first step) no mask is visible.
      assert kept_total / 96 == pytest.approx(rep['density']), (step, rep)
    assert rep['phase'] == want_phase, (step, rep)
    if step == total and name != 'dense':
      assert rep['decay'] == 0.0 and rep['density'] == pytest.approx((64 * 0.25 + 32 * 0.25) / 96)
      for layer, (n, m) in (('a', (1, 4)), ('b', (2, 8))):
        w = np.asarray(params[layer]['kernel'])
        np.testing.assert_array_equal(eff[layer]['kernel'], np.where(np_mask(w, n, m), w, 0.0))


def test_stored_masks_at_the_end_are_the_ones_trained_with():
  """oneshot at step == total: the mask frozen at its first sparse step, not the target of
  the final weights (the final pattern is the one the run trained with)."""
  sp = sparsifier('oneshot', dense_steps=10)
  p0, p1 = make_params(0), make_params(1)
  state = sp.update(p0, sp.init(p0), 10)
  eff = sp.apply(p1, state, TOTAL)
  mk = np_mask(p0['fc1']['kernel'], 1, 4)
  np.testing.assert_array_equal(eff['fc1']['kernel'], np.where(mk, p1['fc1']['kernel'], 0.0))


# ----------------------------------------------------------------------------- state and evaluation

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
  """Regression (reference bug 6, docs/method.md §5): no hidden retry at step 0 under gradient checkpointing."""
  sp = sparsifier('mdgf', **{'decay.kind': 'linear', 'decay.rate': 0.01})
  params = make_params()
  loss = lambda p, s: linear_loss(sp.apply(p, {}, s))
  g1 = jax.grad(loss)(params, 40)
  g2 = jax.jit(jax.grad(jax.checkpoint(loss)))(params, 40)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  e1 = jax.jit(jax.checkpoint(lambda p: sp.apply(p, {}, 40)))(params)
  w = np.asarray(params['fc1']['kernel'])
  np.testing.assert_allclose(e1['fc1']['kernel'], np.where(np_mask(w, 1, 4), w, 0.6 * w), rtol=1e-6)


def test_evaluation_uses_the_mask_and_decay_of_its_step():
  """Regression (reference bug 7, docs/method.md §5): a model rebuilt outside the loop at step s is
  the trained one."""
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


# ----------------------------------------------------------------------------- config

def test_decay_is_relative_to_the_sparse_phase():
  """Regression (issue 11, item 5): the same config means the same a(t) shape at any run
  length: a exponential decay reaches ``final`` at the last sparse step + 1, a linear
  one 0 after ``duration`` of the sparse phase."""
  for total in (20, 200, 2340):
    d_end, f_start = reference_layout(total, 0.1, 0.1)
    length = f_start - d_end
    exp = nmsparse.make_sparsifier(nmsparse.recipe_config('mdgf', dense_frac=0.1, finetune_frac=0.1,
                                                          **{'decay.final': 0.024}),
                                   RULES, make_params(), total, log=False)
    assert float(exp.info(d_end)['decay']) == 1.0
    assert float(exp.info(f_start - 1)['decay']) == pytest.approx(0.024 ** ((length - 1) / length), rel=1e-4)
    lin = nmsparse.make_sparsifier(nmsparse.recipe_config(
        'mdgf', dense_frac=0.1, finetune_frac=0.1, **{'decay.kind': 'linear', 'decay.duration': 0.5}),
        RULES, make_params(), total, log=False)
    half = math.floor(0.5 * length + 0.5)
    assert float(lin.info(d_end + half)['decay']) == pytest.approx(0.0, abs=1e-6)
    assert float(lin.info(d_end + half // 2)['decay']) == pytest.approx(1 - (half // 2) / half, abs=1e-6)


@pytest.mark.parametrize('bad,match', [
    (dict(name='sr-ste'), "Unknown recipe 'sr-ste'"),
    (dict(finetune_mask='freeze'), 'finetune_mask'),
    (dict(mdgf_backward='scaled'), 'mdgf_backward'),
    (dict(dense_frac=0.7, finetune_frac=0.5), 'exceed the run'),
    (dict(dense_frac=1.5), r'\[0, 1\]'),
    (dict(**{'decay.kind': 'cosinus'}), 'Unknown decay'),
    (dict(**{'decay.final': 1.5}), 'final'),
    (dict(name='step', dense_frac=0.1), 'AutoSwitch'),
])
def test_bad_recipe_configs_fail_clearly(bad, match):
  name = bad.pop('name', 'mdgf')
  with pytest.raises(ValueError, match=match):
    sparsifier(name, **bad)


def test_config_typos_and_wrong_types_fail():
  """Regression (reference bug 9, docs/method.md §5): values are typed and keys are checked."""
  with pytest.raises(KeyError, match='srste_lamda'):
    nmsparse.recipe_config('mdgf', srste_lamda=1e-3)
  with pytest.raises(KeyError, match='decay.rat'):
    nmsparse.recipe_config('mdgf', **{'decay.rat': 1e-3})
  with pytest.raises(TypeError, match='finetune_mask'):
    nmsparse.recipe_config('mdgf', finetune_mask=False)
  with pytest.raises(TypeError, match='refresh_every'):
    nmsparse.recipe_config('hard', refresh_every=True)
  with pytest.raises(ValueError, match="Unknown recipe 'mdgff'"):
    nmsparse.recipe_config('mdgff')
  with pytest.raises(KeyError, match='nope'):
    nmsparse.make_sparsifier({'name': 'ste', 'nope': 1}, RULES, make_params(), TOTAL, log=False)


def test_partial_plain_dict_config_takes_the_defaults():
  sp = nmsparse.make_sparsifier({'name': 'srste', 'finetune_frac': 0.2}, RULES, make_params(), TOTAL,
                                log=False)
  assert sp.recipe.name == 'srste' and sp.recipe.srste_lambda == LAM
  assert sp.phases.finetune_start == 80
  sp = nmsparse.make_sparsifier({'name': 'mdgf', 'decay': {'kind': 'linear'}}, RULES, make_params(),
                                TOTAL, log=False)
  assert sp.recipe.decay.kind == 'linear' and sp.recipe.decay.rate == pytest.approx(1 / TOTAL)
  # A config written before decay.duration was a fraction holds None there: the whole sparse phase.
  sp = nmsparse.make_sparsifier({'name': 'mdgf', 'dense_steps': 10, 'decay': {'kind': 'cosine', 'duration': None}},
                                RULES, make_params(), TOTAL, log=False)
  assert sp.recipe.decay.duration == TOTAL - 10


def test_configdict_config_works():
  ml_collections = pytest.importorskip('ml_collections')
  cfg = ml_collections.ConfigDict(nmsparse.recipe_config('srste', srste_lambda=1e-3))
  sp = nmsparse.make_sparsifier(cfg, RULES, make_params(), TOTAL, log=False)
  assert sp.recipe.srste_lambda == 1e-3


def test_library_imports_with_only_jax_flax_optax():
  """Regression (reference bug 11, docs/method.md §5): the package imports and runs with its core
  dependencies alone."""
  code = ('import sys\n'
          'for mod in ("ml_collections", "tensorflow_datasets", "clu", "grain", "tensorflow", '
          '"matplotlib", "sentencepiece"):\n'
          '    sys.modules[mod] = None\n'
          'import jax, nmsparse\n'
          'p = {"d": {"kernel": jax.numpy.arange(8.0).reshape(4, 2)}}\n'
          'sp = nmsparse.make_sparsifier(nmsparse.recipe_config("ste"), [("d/kernel", nmsparse.NMSpec(1, 4))], p, 10)\n'
          'print(int((sp.apply(p, sp.init(p), 5)["d"]["kernel"] != 0).sum()))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '2'
