"""Adapters on ordinary Flax models: every adapter equals an independent params-tree reference.

The reference builds the effective weights in this file from ``nm_mask`` and the
formulas of SPEC.md §2 (W~ = m W; (m + (1 - m) a) W) and derives gradients on its
own: for STE-like recipes the gradient wrt W is the gradient wrt W~ evaluated at
W~ (plus lambda (1 - m) W for SR-STE, times m0 for one-shot); for MDGF
``decay_scaled`` it is plain autodiff of (m + (1 - m) a) W with m held constant.
"""

from __future__ import annotations

import pathlib
import re
import runpy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nmsparse
from nmsparse import flax_adapters as fa
from nmsparse.rules import NMSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 20
EMBED, HEADS, HIDDEN = 16, 2, 32


# ----------------------------------------------------------------------------- models, written the ordinary way


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name='attn')(nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(HIDDEN, name='fc1')(nn.LayerNorm()(x)))
    return x + nn.Dense(EMBED, name='fc2')(h)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return Block()(x), None


class TinyModel(nn.Module):
  """Dense in, one block, two blocks under ``nn.scan`` (kernels get a leading layer axis), DenseGeneral out."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(EMBED, name='embed')(x)
    x = Block(name='block')(x)
    stack = nn.scan(ScanBlock, variable_axes={'params': 0}, split_rngs={'params': True}, length=2)
    x, _ = stack(name='stack')(x, None)
    return nn.DenseGeneral((2, 3), name='head')(x)


class NNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, EMBED, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=EMBED, decode=False, rngs=rngs)
    self.bn = nnx.BatchNorm(EMBED, rngs=rngs)
    self.fc1 = nnx.Linear(EMBED, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, 6, rngs=rngs)

  def __call__(self, x):
    x = self.bn(x + self.attn(self.embed(x)))
    return self.fc2(nnx.gelu(self.fc1(x)))


# Rules for the sparsifier (regexes) and the expected spec per path (written out, for the reference).
LINEN_RULES = [
    (r'block/attn/(query|key|value)/kernel', NMSpec(2, 4, (-3,))),
    (r'block/attn/out/kernel', NMSpec(1, 4, (-3, -2))),
    (r'block/fc1/kernel', NMSpec(2, 4)),
    (r'block/fc2/kernel', NMSpec(1, 8)),
    (r'stack/.*/attn/(query|key|value)/kernel', NMSpec(1, 4, (-3,))),
    (r'stack/.*/attn/out/kernel', NMSpec(2, 8, (-3, -2))),
    (r'stack/.*/fc1/kernel', NMSpec(1, 2)),
    (r'stack/.*/fc2/kernel', NMSpec(1, 4)),
    (r'head/kernel', NMSpec(1, 4, (-3,))),
]
LINEN_EXPECTED = {  # path: (n, m, axes, shape)
    'block/attn/query/kernel': (2, 4, (-3,), (16, 2, 8)),
    'block/attn/key/kernel': (2, 4, (-3,), (16, 2, 8)),
    'block/attn/value/kernel': (2, 4, (-3,), (16, 2, 8)),
    'block/attn/out/kernel': (1, 4, (-3, -2), (2, 8, 16)),
    'block/fc1/kernel': (2, 4, (-2,), (16, 32)),
    'block/fc2/kernel': (1, 8, (-2,), (32, 16)),
    'stack/Block_0/attn/query/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/key/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/value/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/out/kernel': (2, 8, (-3, -2), (2, 2, 8, 16)),
    'stack/Block_0/fc1/kernel': (1, 2, (-2,), (2, 16, 32)),
    'stack/Block_0/fc2/kernel': (1, 4, (-2,), (2, 32, 16)),
    'head/kernel': (1, 4, (-3,), (16, 2, 3)),
}
NNX_RULES = [
    (r'attn/(query|key|value)/kernel', NMSpec(2, 4, (-3,))),
    (r'attn/out/kernel', NMSpec(1, 4, (-3, -2))),
    (r'fc1/kernel', NMSpec(2, 4)),
    (r'fc2/kernel', NMSpec(1, 8)),
]
NNX_EXPECTED = {
    'attn/query/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/key/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/value/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/out/kernel': (1, 4, (-3, -2), (2, 8, 16)),
    'fc1/kernel': (2, 4, (-2,), (16, 32)),
    'fc2/kernel': (1, 8, (-2,), (32, 6)),
}

# name: (config overrides, step, forward/backward of the reference)
RECIPES = {
    'ste': (dict(name='ste'), 5),
    'srste': (dict(name='srste', srste_lambda=0.5), 5),
    # linear decay a(t) = 1 - 0.125 t with t counted from dense_end = 2: a(6) = 0.5 (exact in f32).
    'mdgf_decay_scaled': (dict(name='mdgf', mdgf_backward='decay_scaled', dense_steps=2,
                               **{'decay.kind': 'linear', 'decay.rate': 0.125}), 6),
    'mdgf_straight_through': (dict(name='mdgf', mdgf_backward='straight_through', dense_steps=2,
                                   **{'decay.kind': 'linear', 'decay.rate': 0.125}), 6),
    'oneshot': (dict(name='oneshot', dense_steps=2), 5),
}
A_MDGF, LAMBDA = 0.5, 0.5


def config(recipe: str):
  overrides = dict(RECIPES[recipe][0])
  return nmsparse.recipe_config(overrides.pop('name'), **overrides)


# ----------------------------------------------------------------------------- helpers (independent of the library)


def name_of(path) -> str:
  """'/'-joined path; an NNX Variable's trailing ``.value`` attribute is dropped."""
  names = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path]
  if isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == 'value':
    names = names[:-1]
  return '/'.join(map(str, names))


def on_sparse(fn, expected, tree, *others):
  """``fn(spec, leaf, *other_leaves)`` on the expected-sparse leaves; other leaves unchanged."""
  def leaf(path, w, *o):
    name = name_of(path)
    return fn(expected[name], w, *o) if name in expected else w
  return jax.tree_util.tree_map_with_path(leaf, tree, *others)


def ref_masks(expected, params):
  return on_sparse(lambda s, w: nmsparse.nm_mask(w, s[0], s[1], s[2]), expected, params)


def group_counts(w, n, m, axes):
  """Nonzeros per N:M group: contraction axes moved last (row-major), split into groups of m."""
  axes = sorted(a % w.ndim for a in axes)
  rest = [a for a in range(w.ndim) if a not in axes]
  w = np.transpose(np.asarray(w), rest + axes)
  return (w.reshape(w.shape[:len(rest)] + (-1, m)) != 0).sum(-1)


def reference(recipe, loss_fn, expected, params, masks):
  """Loss and gradient of the recipe from SPEC.md §2, derived in this file."""
  fl = lambda m, w: m.astype(w.dtype)
  if recipe == 'mdgf_decay_scaled':
    eff = lambda p: on_sparse(lambda s, w, m: (fl(m, w) + (1 - fl(m, w)) * A_MDGF) * w, expected, p, masks)
    return jax.value_and_grad(lambda p: loss_fn(eff(p)))(params)
  if recipe == 'mdgf_straight_through':
    w_eff = on_sparse(lambda s, w, m: (fl(m, w) + (1 - fl(m, w)) * A_MDGF) * w, expected, params, masks)
  else:
    w_eff = on_sparse(lambda s, w, m: fl(m, w) * w, expected, params, masks)
  loss, g = jax.value_and_grad(loss_fn)(w_eff)  # g = dL/dW~ at W~.
  if recipe == 'srste':
    g = on_sparse(lambda s, g_, w, m: g_ + LAMBDA * (1 - fl(m, w)) * w, expected, g, params, masks)
  if recipe == 'oneshot':
    g = on_sparse(lambda s, g_, m: fl(m, g_) * g_, expected, g, masks)
  return loss, g


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [name_of(p) for p, _ in la] == [name_of(p) for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name_of(p))


def mse(out, y):
  return jnp.mean((out - y) ** 2)


# ----------------------------------------------------------------------------- cases: one per adapter

X = jax.random.normal(jax.random.key(0), (2, 4, 8))
Y_LINEN = jax.random.normal(jax.random.key(1), (2, 4, 2, 3))
Y_NNX = jax.random.normal(jax.random.key(1), (2, 4, 6))


class Case:
  """An adapter under test: params, the plain model's loss, and the loss through the adapter."""

  def __init__(self, kind: str, recipe: str):
    self.kind, self.recipe = kind, recipe
    if kind == 'nnx':
      model = NNXModel(nnx.Rngs(0))
      self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
      self.sp = fa.nnx_sparsifier(config(recipe), NNX_RULES, model, TOTAL, log=False)
      self.expected = NNX_EXPECTED
      apply = fa.nnx_apply_fn(self.graphdef, self.sp)
      self.plain = lambda p: nnx.merge(self.graphdef, p, self.rest, copy=True)(X)
      self.sparse = lambda p, st, step: apply(p, self.rest, st, step, X)[0]
      self.y = Y_NNX
      return
    model = TinyModel()
    self.params = model.init(jax.random.key(2), X)['params']
    self.sp = nmsparse.make_sparsifier(config(recipe), LINEN_RULES, self.params, TOTAL, log=False)
    self.expected = LINEN_EXPECTED
    self.plain = lambda p: model.apply({'params': p}, X)
    self.y = Y_LINEN
    if kind == 'linen_tree':
      apply = fa.sparse_apply_fn(model.apply, self.sp)
      self.sparse = lambda p, st, step: apply({'params': p}, st, step, X)
    else:
      smodel = fa.sparsify_module(model, self.sp)
      assert_trees_equal(smodel.init(jax.random.key(2), X)['params'], self.params)
      self.sparse = lambda p, st, step: smodel.apply({'params': p}, X, nm_state=st, nm_step=step)

  def state_and_params(self):
    """Sparsity state at the test step, the params then, and the masks the reference uses."""
    sp, p0 = self.sp, self.params
    step = RECIPES[self.recipe][1]
    if self.recipe != 'oneshot':
      st = sp.update(p0, sp.init(p0), step)
      return st, p0, step, ref_masks(self.expected, p0)
    st = sp.update(p0, sp.init(p0), 2)  # The one mask: the weights at the first sparse step.
    noise = jax.tree.map(lambda w: jax.random.normal(jax.random.key(3), w.shape, w.dtype), p0)
    p1 = jax.tree.map(lambda w, e: w + 0.5 * e, p0, noise)  # Trained on: the current mask differs.
    st = sp.update(p1, st, step)
    return st, p1, step, ref_masks(self.expected, p0)


ADAPTERS = ('linen_tree', 'linen_module', 'nnx')


@pytest.mark.parametrize('recipe', list(RECIPES))
@pytest.mark.parametrize('kind', ADAPTERS)
def test_loss_and_grads_match_reference(kind, recipe):
  case = Case(kind, recipe)
  st, params, step, masks = case.state_and_params()
  if recipe == 'oneshot':  # The stored mask is the old one, not the mask of the current weights.
    current = ref_masks(case.expected, params)
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(current)))
  got = jax.jit(jax.value_and_grad(lambda p: mse(case.sparse(p, st, step), case.y)))(params)
  want = jax.jit(lambda p: reference(recipe, lambda q: mse(case.plain(q), case.y), case.expected, p, masks))(params)
  np.testing.assert_array_equal(got[0], want[0])
  assert_trees_equal(got[1], want[1])


@pytest.mark.parametrize('recipe', ['ste', 'srste', 'oneshot'])
@pytest.mark.parametrize('kind', ADAPTERS)
def test_pruned_weights_never_reach_the_forward(kind, recipe):
  """Pruned weights changed (shrunk for STE, huge sentinels for one-shot's frozen mask): output unchanged."""
  case = Case(kind, recipe)
  st, params, step, masks = case.state_and_params()
  if recipe == 'oneshot':
    perturb = lambda s, w, m: jnp.where(m, w, 1e4 * jnp.sign(w))
  else:  # |u w| < |w| keeps the recomputed mask the same.
    perturb = lambda s, w, m: jnp.where(m, w, w * jax.random.uniform(jax.random.key(4), w.shape, w.dtype, -0.9, 0.9))
  poisoned = on_sparse(perturb, case.expected, params, masks)
  hard = on_sparse(lambda s, w, m: jnp.where(m, w, 0), case.expected, params, masks)
  out = jax.jit(case.sparse)(poisoned, st, step)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, jax.jit(case.plain)(hard))
  np.testing.assert_array_equal(out, jax.jit(case.sparse)(params, st, step))


@pytest.mark.parametrize('kind', ADAPTERS)
def test_each_layer_keeps_its_own_nm(kind):
  """Every kernel (scanned ones per layer, with negative axes) has exactly its own N per group of M."""
  case = Case(kind, 'ste')
  st, params, step, _ = case.state_and_params()
  eff = case.sp.apply(params, st, step)
  seen = {}
  for path, w in jax.tree_util.tree_leaves_with_path(eff):
    name = name_of(path)
    if name in case.expected:
      n, m, axes, shape = case.expected[name]
      assert w.shape == shape, name
      counts = group_counts(w, n, m, axes)
      assert counts.size == w.size // m and np.all(counts == n), (name, np.unique(counts))
      seen[name] = (n, m)
    else:
      assert np.count_nonzero(np.asarray(w) == 0) == 0, f'{name} should stay dense'
  assert set(seen) == set(case.expected)
  assert len(set(seen.values())) >= 4  # Different layers, different N:M.


def test_linen_module_layers_read_sparse_kernels():
  """What each (unscanned) Dense / DenseGeneral reads inside ``sparsify_module`` is the masked kernel."""
  case = Case('linen_module', 'ste')
  st, params, step, masks = case.state_and_params()
  smodel = fa.sparsify_module(TinyModel(), case.sp)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == '__call__':
      kernel = context.module.variables['params']['kernel']
      if not isinstance(kernel, jax.core.Tracer):  # Scanned layers are seen as tracers: skipped here.
        seen['/'.join(context.module.path) + '/kernel'] = kernel
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    smodel.apply({'params': params}, X, nm_state=st, nm_step=step)
  flat = {name_of(p): (w, m) for (p, w), (_, m) in zip(jax.tree_util.tree_leaves_with_path(params),
                                                        jax.tree_util.tree_leaves_with_path(masks))}
  sparse_seen = [k for k in seen if k in LINEN_EXPECTED]
  assert len(sparse_seen) == 7 and 'embed/kernel' in seen
  for name, kernel in seen.items():
    w, m = flat[name]
    want = jnp.where(m, w, 0) if name in LINEN_EXPECTED else w
    np.testing.assert_array_equal(kernel, want, err_msg=name)


def test_linen_module_api():
  case = Case('linen_module', 'mdgf_decay_scaled')
  st, params, step, _ = case.state_and_params()
  want = case.sparse(params, st, step)
  from_class = fa.sparsify_module(TinyModel, case.sp)()
  np.testing.assert_array_equal(from_class.apply({'params': params}, X, nm_state=st, nm_step=step), want)
  with pytest.raises(ValueError, match='nm_step'):
    from_class.apply({'params': params}, X)
  with pytest.raises(TypeError):
    fa.sparsify_module(lambda x: x, case.sp)


def test_linen_module_nested_and_collections_pass_through():
  """Wrapping a submodule keeps its params path; ``sp`` is built on that module's own params."""

  class Parent(nn.Module):
    sp: object = None

    @nn.compact
    def __call__(self, x, st=None, step=None):
      x = nn.BatchNorm(use_running_average=False)(nn.Dense(8, name='pre')(x))
      fc = nn.Dense(4, name='fc')
      return fa.sparsify_module(fc, self.sp)(x, nm_state=st, nm_step=step) if self.sp else fc(x)

  variables = Parent().init(jax.random.key(0), X)
  sp = nmsparse.make_sparsifier(nmsparse.recipe_config('ste'), [('kernel', NMSpec(1, 4))],
                                variables['params']['fc'], TOTAL, log=False)
  assert jax.tree.structure(Parent(sp).init(jax.random.key(0), X)) == jax.tree.structure(variables)
  st = sp.init(variables['params']['fc'])
  out, upd = Parent(sp).apply(variables, X, st, 3, mutable=['batch_stats'])
  p = dict(variables['params'])
  kernel = p['fc']['kernel']
  p['fc'] = {**p['fc'], 'kernel': jnp.where(nmsparse.nm_mask(kernel, 1, 4), kernel, 0)}
  ref, ref_upd = Parent().apply({**variables, 'params': p}, X, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, ref)
  assert_trees_equal(upd, ref_upd)


def test_sparse_apply_fn_needs_params():
  case = Case('linen_tree', 'ste')
  apply = fa.sparse_apply_fn(TinyModel().apply, case.sp)
  with pytest.raises(ValueError, match='params'):
    apply({'batch_stats': {}}, {}, 0, X)


# ----------------------------------------------------------------------------- NNX


def test_nnx_sparsifier_paths_and_abstract_model():
  abstract = nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0)))
  sp_abs = fa.nnx_sparsifier(config('oneshot'), NNX_RULES, abstract, TOTAL, log=False)
  model = NNXModel(nnx.Rngs(0))
  sp = fa.nnx_sparsifier(config('oneshot'), NNX_RULES, model, TOTAL, log=False)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  assert set(sp.init(params)['masks']) == set(NNX_EXPECTED)  # 'attn/value/kernel': module named value.
  assert jax.tree.structure(sp.init(params)) == jax.tree.structure(sp_abs.init(params))
  assert_trees_equal(sp.apply(params, sp.init(params), 5), sp_abs.apply(params, sp_abs.init(params), 5))


def test_nnx_train_step_and_nnx_call():
  """A full jitted step with ``nnx.split`` / ``jax.grad`` over the params state; ``nnx_call`` agrees."""
  import optax
  model = NNXModel(nnx.Rngs(0))
  sp = fa.nnx_sparsifier(config('mdgf_decay_scaled'), NNX_RULES, model, TOTAL, log=False)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  apply = fa.nnx_apply_fn(graphdef, sp)
  tx = optax.chain(sp.scale_by_adam(), optax.scale(-1e-2))

  @jax.jit
  def train_step(params, rest, opt_state, sparsity, step):
    sparsity = sp.update(params, sparsity, step)

    def loss_fn(p):
      out, new_rest = apply(p, rest, sparsity, step, X)
      return mse(out, Y_NNX), new_rest

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, sparsity, loss, grads

  sparsity, opt_state = sp.init(params), tx.init(params)
  first = train_step(params, rest, opt_state, sparsity, 6)

  @nnx.jit
  def via_call(model):
    return nnx.value_and_grad(lambda m: mse(fa.nnx_call(m, sp, sparsity, 6, X), Y_NNX))(model)

  loss, grads = via_call(model)
  np.testing.assert_array_equal(loss, first[4])
  assert_trees_equal(grads, first[5])
  assert_trees_equal(nnx.state(model, nnx.BatchStat), nnx.state(first[1], nnx.BatchStat))
  assert not np.allclose(nnx.state(model, nnx.BatchStat)['bn']['mean'][...], 0)  # Written back.
  losses = []
  state = first[:4]
  for step in range(6, 12):
    *state, loss, _ = train_step(*state[:3], state[3], step)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- quickstart


def test_quickstart_example(capsys):
  runpy.run_path(str(ROOT / 'examples' / 'quickstart.py'), run_name='__main__')
  out = capsys.readouterr().out
  assert "['75.0%', '75.0%']" in out


def test_readme_quickstart(capsys):
  readme = ROOT / 'README.md'
  text = readme.read_text() if readme.exists() else ''
  match = re.search(r'^## Quickstart\s*$.*?^```python\n(.*?)^```', text, re.S | re.M)
  if not match:
    pytest.skip('README.md has no "## Quickstart" section with a ```python block yet.')
  exec(compile(match.group(1), 'README.md:Quickstart', 'exec'), {'__name__': '__main__'})
  assert 'loss' in capsys.readouterr().out
