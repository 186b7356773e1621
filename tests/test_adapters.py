"""Adapters on ordinary Flax models: every adapter equals an independent params-tree reference.

The reference builds the effective weights in this file from ``nm_mask`` and the
formulas of docs/method.md §2 (W~ = m W; (m + (1 - m) a) W) and derives gradients on its
own: for STE-like recipes the gradient wrt W is the gradient wrt W~ evaluated at
W~ (plus lambda (1 - m) W for SR-STE, times m0 for one-shot); for MDGF
``decay_scaled`` it is plain autodiff of (m + (1 - m) a) W with m held constant.
"""

from __future__ import annotations

import functools
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
# XLA's backend optimizations double the compile time of these tiny models and do not matter here.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
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
  """Dense in, two blocks under ``nn.scan`` (kernels get a leading layer axis), DenseGeneral out."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(EMBED, name='embed')(x)
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
    h = self.embed(x)
    x = self.bn(h + self.attn(h))
    return self.fc2(nnx.gelu(self.fc1(x)))


# Rules for the sparsifier (regexes) and the expected spec per path (written out, for the reference).
LINEN_RULES = [
    (r'stack/.*/attn/(query|key|value)/kernel', NMSpec(1, 4, (-3,))),
    (r'stack/.*/attn/out/kernel', NMSpec(2, 8, (-3, -2))),
    (r'stack/.*/fc1/kernel', NMSpec(1, 2, (-2,))),
    (r'stack/.*/fc2/kernel', NMSpec(2, 4, (-2,))),
    (r'head/kernel', NMSpec(1, 8, (-3,))),
]
LINEN_EXPECTED = {  # path: (n, m, axes, shape)
    'stack/Block_0/attn/query/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/key/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/value/kernel': (1, 4, (-3,), (2, 16, 2, 8)),
    'stack/Block_0/attn/out/kernel': (2, 8, (-3, -2), (2, 2, 8, 16)),
    'stack/Block_0/fc1/kernel': (1, 2, (-2,), (2, 16, 32)),
    'stack/Block_0/fc2/kernel': (2, 4, (-2,), (2, 32, 16)),
    'head/kernel': (1, 8, (-3,), (16, 2, 3)),
}
BLOCK_RULES = [  # The block on its own (no layer axis): the same negative axes.
    (r'attn/(query|key|value)/kernel', NMSpec(2, 4, (-3,))),
    (r'attn/out/kernel', NMSpec(1, 4, (-3, -2))),
    (r'fc1/kernel', NMSpec(2, 4)),
    (r'fc2/kernel', NMSpec(1, 8)),
]
BLOCK_EXPECTED = {
    'attn/query/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/key/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/value/kernel': (2, 4, (-3,), (16, 2, 8)),
    'attn/out/kernel': (1, 4, (-3, -2), (2, 8, 16)),
    'fc1/kernel': (2, 4, (-2,), (16, 32)),
    'fc2/kernel': (1, 8, (-2,), (32, 16)),
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

# name: (recipe_config overrides, the step at which the test runs)
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


@functools.cache
def _masks_fn(expected: tuple):
  return jit(lambda p: on_sparse(lambda s, w: nmsparse.nm_mask(w, s[0], s[1], s[2]), dict(expected), p))


def ref_masks(expected, params):
  """N:M keep-masks of the expected-sparse leaves (other leaves: the params themselves)."""
  return _masks_fn(tuple(expected.items()))(params)


def group_counts(w, n, m, axes):
  """Nonzeros per N:M group: contraction axes moved last (row-major), split into groups of m."""
  axes = sorted(a % w.ndim for a in axes)
  rest = [a for a in range(w.ndim) if a not in axes]
  w = np.transpose(np.asarray(w), rest + axes)
  return (w.reshape(w.shape[:len(rest)] + (-1, m)) != 0).sum(-1)


def _fl(m, w):
  return m.astype(w.dtype)


@functools.cache
def _to_effective(expected: tuple, decayed: bool):
  """W~ = m W, or (m + (1 - m) a) W for MDGF."""
  if decayed:
    leaf = lambda s, w, m: (_fl(m, w) + (1 - _fl(m, w)) * A_MDGF) * w
  else:
    leaf = lambda s, w, m: _fl(m, w) * w
  return lambda p, masks: on_sparse(leaf, dict(expected), p, masks)


@functools.cache
def _reference_parts(recipe: str, expected: tuple):
  """Jitted (W -> W~, (dL/dW~, W, m) -> dL/dW) of a recipe; the model's part runs in between."""
  to_eff = _to_effective(expected, recipe.startswith('mdgf'))
  exp = dict(expected)

  def backward(g, params, masks):
    if recipe == 'mdgf_decay_scaled':  # Plain autodiff of (m + (1 - m) a) W, m held constant.
      return jax.vjp(lambda p: to_eff(p, masks), params)[1](g)[0]
    if recipe == 'srste':
      return on_sparse(lambda s, g_, w, m: g_ + LAMBDA * (1 - _fl(m, w)) * w, exp, g, params, masks)
    if recipe == 'oneshot':
      return on_sparse(lambda s, g_, m: _fl(m, g_) * g_, exp, g, masks)
    return g  # STE, MDGF straight through: dL/dW~ at W~.

  return jit(to_eff), jit(backward)


def reference(recipe, plain_vg, expected, params, masks):
  """Loss, output and gradient of the recipe from docs/method.md §2, derived in this file.

  ``plain_vg(p) -> ((loss, out), dL/dp)`` is the plain model (no nmsparse); the
  chain rule splits the gradient into the model's part at W~ and the recipe's.
  """
  to_eff, backward = _reference_parts(recipe, tuple(expected.items()))
  (loss, out), g = plain_vg(to_eff(params, masks))
  return loss, out, backward(g, params, masks)


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [name_of(p) for p, _ in la] == [name_of(p) for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name_of(p))


def mse(out, y):
  return jnp.mean((out - y) ** 2)


def random_like(tree, seed, scale=0.3):
  """Random params from NumPy: no compilation for init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


# ----------------------------------------------------------------------------- cases: one per adapter

X = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
Y = {'linen': np.random.default_rng(1).standard_normal((2, 4, 2, 3)).astype(np.float32),
     'nnx': np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)}


@functools.cache
def nnx_parts():
  """``nnx.split(NNXModel, nnx.Param, ...)`` with random params; initialized without compiling."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0))), nnx.Param, ...)
  rest = jax.tree_util.tree_map_with_path(
      lambda p, s: (jnp.ones if name_of(p).endswith('var') else jnp.zeros)(s.shape, s.dtype), rest)
  return graphdef, random_like(params, seed=2), rest


@functools.cache
def plain_model(family: str):
  """(params, jitted ``p -> ((loss, out), grad)`` of the plain model); shared by tests."""
  if family == 'nnx':
    graphdef, params, rest = nnx_parts()
    forward = lambda p: nnx.merge(graphdef, p, rest, copy=True)(X)
  else:
    model = TinyModel()
    params = random_like(jax.eval_shape(model.init, jax.random.key(0), X)['params'], seed=2)
    forward = lambda p: model.apply({'params': p}, X)
  loss = lambda p: (mse(forward(p), Y[family]), forward(p))
  return params, jit(jax.value_and_grad(loss, has_aux=True))


class Case:
  """An adapter under test: ``sparse(params, state, step)`` is the model's output through the adapter."""

  def __init__(self, kind: str, recipe: str):
    self.kind, self.recipe = kind, recipe
    family = 'nnx' if kind == 'nnx' else 'linen'
    self.y = Y[family]
    self.params, self.plain_vg = plain_model(family)
    if kind == 'nnx':
      graphdef, _, rest = nnx_parts()
      self.sp = fa.nnx_sparsifier(config(recipe), NNX_RULES, nnx.merge(graphdef, self.params, rest), TOTAL,
                                  log=False)
      self.expected = NNX_EXPECTED
      apply = fa.nnx_apply_fn(graphdef, self.sp)
      self.sparse = lambda p, st, step: apply(p, rest, st, step, X)[0]
      return
    self.sp = nmsparse.make_sparsifier(config(recipe), LINEN_RULES, self.params, TOTAL, log=False)
    self.expected = LINEN_EXPECTED
    if kind == 'linen_tree':
      apply = fa.sparse_apply_fn(TinyModel().apply, self.sp)
      self.sparse = lambda p, st, step: apply({'params': p}, st, step, X)
    else:
      smodel = fa.sparsify_module(TinyModel(), self.sp)
      self.sparse = lambda p, st, step: smodel.apply({'params': p}, X, nm_state=st, nm_step=step)

  def state_and_params(self):
    """Sparsity state at the test step, the params then, and the masks the reference uses."""
    sp, p0 = self.sp, self.params
    step = RECIPES[self.recipe][1]
    if self.recipe != 'oneshot':
      return sp.update(p0, sp.init(p0), step), p0, step, ref_masks(self.expected, p0)
    update = jax.jit(sp.update)
    st = update(p0, jax.jit(sp.init)(p0), 2)  # The one mask: the weights at the first sparse step.
    p1 = jax.tree.map(lambda w, e: w + e, p0, random_like(p0, seed=3))  # Trained on: masks differ.
    return update(p1, st, step), p1, step, ref_masks(self.expected, p0)


ADAPTERS = ('linen_tree', 'linen_module', 'nnx')


@pytest.mark.parametrize('recipe', list(RECIPES))
@pytest.mark.parametrize('kind', ADAPTERS)
def test_adapter_matches_reference(kind, recipe):
  """Loss and gradients equal the reference exactly; for hard recipes pruned weights never reach the forward."""
  case = Case(kind, recipe)
  st, params, step, masks = case.state_and_params()
  if recipe == 'oneshot':  # The stored mask is the old one, not the mask of the current weights.
    current = ref_masks(case.expected, params)
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(current)))
  sparse_vg = jit(jax.value_and_grad(
      lambda p: (mse(out := case.sparse(p, st, step), case.y), out), has_aux=True))
  (loss, out), grads = sparse_vg(params)
  want_loss, want_out, want_grads = reference(recipe, case.plain_vg, case.expected, params, masks)
  np.testing.assert_array_equal(loss, want_loss)
  np.testing.assert_array_equal(out, want_out)
  assert_trees_equal(grads, want_grads)
  if recipe.startswith('mdgf'):  # MDGF lets a(t) W through by design.
    return
  # Pruned weights changed (shrunk, so an STE mask stays; huge sentinels for one-shot's frozen mask).
  if recipe == 'oneshot':
    poison = lambda s, w, m: np.where(m, w, 1e4 * np.sign(w))
  else:
    poison = lambda s, w, m: np.where(m, w, w * np.random.default_rng(4).uniform(-0.9, 0.9, w.shape))
  poisoned = on_sparse(lambda s, w, m: jnp.asarray(poison(s, np.asarray(w), np.asarray(m)), w.dtype),
                       case.expected, params, masks)
  (_, poisoned_out), _ = sparse_vg(poisoned)
  assert np.all(np.isfinite(poisoned_out))
  np.testing.assert_array_equal(poisoned_out, want_out)  # = the plain model on m * W.


@pytest.mark.parametrize('kind', ['linen_tree', 'nnx'])
def test_each_layer_keeps_its_own_nm(kind):
  """Every kernel (scanned ones per layer, with negative axes) has exactly its own N per group of M."""
  case = Case(kind, 'ste')
  st, params, step, _ = case.state_and_params()
  eff = jit(case.sp.apply)(params, st, step)
  dense = {name_of(p): w for p, w in jax.tree_util.tree_leaves_with_path(params)}
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
      np.testing.assert_array_equal(w, dense[name], err_msg=f'{name} should stay dense')
  assert set(seen) == set(case.expected)
  assert len(set(seen.values())) >= 3  # Different layers, different N:M.


def test_linen_module_layers_read_sparse_kernels():
  """What each Dense / DenseGeneral (MHA's Q, K, V, out) reads inside ``sparsify_module`` is the masked kernel."""
  x = np.random.default_rng(7).standard_normal((2, 4, EMBED)).astype(np.float32)
  params = random_like(jax.eval_shape(Block().init, jax.random.key(0), x)['params'], seed=5)
  sp = nmsparse.make_sparsifier(config('ste'), BLOCK_RULES, params, TOTAL, log=False)
  masks = ref_masks(BLOCK_EXPECTED, params)
  smodel = fa.sparsify_module(Block, sp)()

  @jit
  def kernels_read(params):
    seen = {}

    def spy(next_fun, args, kwargs, context):
      if isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == '__call__':
        seen['/'.join(context.module.path) + '/kernel'] = context.module.variables['params']['kernel']
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      smodel.apply({'params': params}, x, nm_state={}, nm_step=3)
    return seen

  seen = kernels_read(params)
  assert set(seen) == set(BLOCK_EXPECTED)
  flat = {name_of(p): (w, m) for (p, w), (_, m) in zip(jax.tree_util.tree_leaves_with_path(params),
                                                        jax.tree_util.tree_leaves_with_path(masks))}
  for name, kernel in seen.items():
    w, m = flat[name]
    np.testing.assert_array_equal(kernel, jnp.where(m, w, 0), err_msg=name)
    n, mm, axes, _ = BLOCK_EXPECTED[name]
    assert np.all(group_counts(kernel, n, mm, axes) == n), name


def test_linen_module_api():
  case = Case('linen_module', 'mdgf_decay_scaled')
  st, params, step, _ = case.state_and_params()
  from_class = fa.sparsify_module(TinyModel, case.sp)()
  assert jax.tree.structure(jax.eval_shape(from_class.init, jax.random.key(0), X)['params']) == \
      jax.tree.structure(params)  # init works and gives the plain model's params tree.
  both = jit(lambda p: (from_class.apply({'params': p}, X, nm_state=st, nm_step=step), case.sparse(p, st, step)))
  np.testing.assert_array_equal(*both(params))
  with pytest.raises(ValueError, match='nm_step'):
    jax.eval_shape(lambda p: from_class.apply({'params': p}, X), params)
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

  variables = random_like(jax.eval_shape(Parent().init, jax.random.key(0), X), seed=6)
  sp = nmsparse.make_sparsifier(nmsparse.recipe_config('ste'), [('kernel', NMSpec(1, 4))],
                                variables['params']['fc'], TOTAL, log=False)
  assert jax.tree.structure(jax.eval_shape(Parent(sp).init, jax.random.key(0), X)) == \
      jax.tree.structure(variables)
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
  """Rules match NNX paths (``.value`` dropped; a submodule named ``value`` still matches)."""
  abstract = nnx.eval_shape(lambda: NNXModel(nnx.Rngs(0)))
  sp_abs = fa.nnx_sparsifier(config('oneshot'), NNX_RULES, abstract, TOTAL, log=False)
  graphdef, params, rest = nnx_parts()
  sp = fa.nnx_sparsifier(config('oneshot'), NNX_RULES, nnx.merge(graphdef, params, rest), TOTAL, log=False)
  assert sp.specs == sp_abs.specs
  specs = {name_of(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      sp.specs, is_leaf=lambda x: x is None or isinstance(x, NMSpec)) if s is not None}
  assert specs == {k: NMSpec(n, m, axes) for k, (n, m, axes, _) in NNX_EXPECTED.items()}
  masks = jax.eval_shape(sp.init, params)['masks']
  assert {k: v.shape for k, v in masks.items()} == {k: v[3] for k, v in NNX_EXPECTED.items()}


def test_nnx_train_step_and_nnx_call():
  """A full jitted step with ``nnx.split`` / ``jax.grad`` over the params state; ``nnx_call`` agrees."""
  import optax
  graphdef, params, rest = nnx_parts()
  sp = fa.nnx_sparsifier(config('mdgf_decay_scaled'), NNX_RULES, nnx.merge(graphdef, params, rest), TOTAL,
                         log=False)
  apply = fa.nnx_apply_fn(graphdef, sp)
  tx = optax.chain(sp.scale_by_adam(), optax.scale(-1e-2))

  @jit
  def train_step(params, rest, opt_state, sparsity, step):
    sparsity = sp.update(params, sparsity, step)

    def loss_fn(p):
      out, new_rest = apply(p, rest, sparsity, step, X)
      return mse(out, Y['nnx']), new_rest

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, sparsity, loss, grads

  sparsity, opt_state = sp.init(params), tx.init(params)
  first = train_step(params, rest, opt_state, sparsity, 6)

  @jit
  def via_call(params, rest):  # What nnx.jit does: split outside, merge inside.
    model = nnx.merge(graphdef, params, rest)
    loss, grads = nnx.value_and_grad(lambda m: mse(fa.nnx_call(m, sp, sparsity, 6, X), Y['nnx']))(model)
    return loss, grads, nnx.state(model, nnx.BatchStat)

  loss, grads, stats = via_call(params, rest)
  np.testing.assert_array_equal(loss, first[4])
  assert_trees_equal(grads, first[5])
  assert_trees_equal(stats, nnx.state(first[1], nnx.BatchStat))
  assert not np.allclose(stats['bn']['mean'][...], 0)  # nnx_call wrote the batch statistics back.
  params, rest, opt_state, sparsity, _, _ = first
  losses = [float(first[4])]
  for step in range(7, 10):
    params, rest, opt_state, sparsity, loss, _ = train_step(params, rest, opt_state, sparsity, step)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- quickstart


def readme_quickstart():
  """The first ```python block of README.md's "## Quickstart..." section (None if it has none)."""
  readme = ROOT / 'README.md'
  text = readme.read_text() if readme.exists() else ''
  match = re.search(r'^## Quickstart\b[^\n]*\n(?:(?!^## ).)*?^```python\n(.*?)^```', text, re.S | re.M)
  return match.group(1) if match else None


def test_quickstart_example(capsys):
  code = (ROOT / 'examples' / 'quickstart.py').read_text()
  block = readme_quickstart()
  if block and block.strip() in code:
    pytest.skip('examples/quickstart.py is the README quickstart: test_readme_quickstart runs it.')
  runpy.run_path(str(ROOT / 'examples' / 'quickstart.py'), run_name='__main__')
  assert "['75.0%', '75.0%']" in capsys.readouterr().out


def test_readme_quickstart(capsys):
  block = readme_quickstart()
  if block is None:
    pytest.skip('README.md has no ```python block under a "## Quickstart" heading yet.')
  exec(compile(block, 'README.md:Quickstart', 'exec'), {'__name__': '__main__'})
  assert 'loss' in capsys.readouterr().out
