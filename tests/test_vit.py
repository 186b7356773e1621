"""ViT: parameter counts of every variant, big_vision paths, sparsity rules, scan, remat, bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors

import nmsparse
from experiments.models import VARIANTS, ViT, make_vit, vit_config
from experiments.models.vit import posemb_sincos2d
from nmsparse import rules as rules_lib

# Published counts at 224px, 1000 classes, 'tok' pooling, learned posemb with a class-token row,
# no representation layer (Dosovitskiy et al. 2021; Steiner et al. 2022; the timm model cards).
PUBLISHED = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'L/16': 304_326_632,
    'H/14': 632_045_800,
}
# Small variants with no published count: (variant, image HxWxC, classes).
SMALL = {
    'mu/4': ((28, 28, 1), 10),
    'tiny/4': ((32, 32, 3), 10),
}


def hand_count(width: int, depth: int, mlp_dim: int, patch: int, image: int, channels: int,
               classes: int, cls_posemb: bool) -> int:
  """Parameter count written out per component (square image, 'tok' pooling, learned posemb)."""
  n = (image // patch) ** 2
  embed = patch * patch * channels * width + width
  cls = width
  posemb = (n + cls_posemb) * width
  block = 2 * 2 * width + 4 * (width * width + width) + 2 * width * mlp_dim + mlp_dim + width
  final_ln = 2 * width
  head = width * classes + classes
  return embed + cls + posemb + depth * block + final_ln + head


def abstract_params(model: ViT, shape: tuple[int, ...]):
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)['params']
  return jax.eval_shape(init)


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_every_registered_variant_is_tested():
  tested = {v.split('/')[0] for v in (*PUBLISHED, *SMALL)}
  assert tested == set(VARIANTS)


@pytest.mark.parametrize('variant', sorted(PUBLISHED))
def test_published_parameter_counts(variant):
  c = vit_config(variant)
  want = PUBLISHED[variant]
  by_hand = hand_count(c['width'], c['depth'], c['mlp_dim'], c['patch_size'], 224, 3, 1000, True)
  assert by_hand == want
  # Counted with scanned blocks (fast to trace); scanning keeps the count, see test_scan_*.
  # The original ViT layout (a posemb row for the class token) reproduces the published count ...
  assert count(abstract_params(make_vit(variant, 1000, cls_posemb=True, scan=True),
                               (224, 224, 3))) == want
  # ... big_vision's layout has no such row.
  bv = abstract_params(make_vit(variant, 1000, scan=True), (224, 224, 3))
  assert count(bv) == want - c['width']
  assert bv['pos_embedding'].shape == (1, (224 // c['patch_size']) ** 2, c['width'])


@pytest.mark.parametrize('variant', sorted(SMALL))
@pytest.mark.parametrize('cls_posemb', [False, True])
def test_small_parameter_counts(variant, cls_posemb):
  (h, _, ch), classes = SMALL[variant]
  c = vit_config(variant)
  got = count(abstract_params(make_vit(variant, classes, cls_posemb=cls_posemb), (h, h, ch)))
  assert got == hand_count(c['width'], c['depth'], c['mlp_dim'], c['patch_size'], h, ch, classes,
                           cls_posemb)


def test_vit_config_parsing():
  assert vit_config('B/32') == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=32)
  assert make_vit('S/8', 5, dropout=0.1).dropout == 0.1
  for bad in ('B', 'B16', 'X/16', 'B/0', 'B/x', 'b/16'):
    with pytest.raises(ValueError, match='Unknown ViT variant'):
      vit_config(bad)


def test_big_vision_parameter_paths():
  params = abstract_params(make_vit('mu/4', 10), (28, 28, 1))
  names = {n for n, _ in rules_lib.named_leaves(params)}
  b = 'Transformer/encoderblock_3'
  for path in ('embedding/kernel', 'cls', 'pos_embedding', 'head/kernel',
               'Transformer/encoder_norm/scale', f'{b}/LayerNorm_0/scale', f'{b}/LayerNorm_1/bias',
               f'{b}/MultiHeadDotProductAttention_0/query/kernel',
               f'{b}/MultiHeadDotProductAttention_0/out/kernel',
               f'{b}/MlpBlock_0/Dense_0/kernel', f'{b}/MlpBlock_0/Dense_1/bias'):
    assert path in names, path
  assert 'Transformer/encoderblock_4/LayerNorm_0/scale' not in names


@pytest.mark.parametrize('scan', [False, True])
def test_mlp_qkv_preset_picks_exactly_mlp_and_qkv_kernels(scan):
  depth = VARIANTS['mu']['depth']
  params = abstract_params(make_vit('mu/4', 10, scan=scan), (28, 28, 1))
  specs = nmsparse.resolve(nmsparse.preset('mlp_qkv', 1, 8), params, log=False)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: x is None or isinstance(x, nmsparse.NMSpec))
  picked = {rules_lib.path_str(p) for p, s in flat if s is not None}
  blocks = ['Transformer/encoderblock'] if scan else [
      f'Transformer/encoderblock_{i}' for i in range(depth)]
  want = {f'{b}/{leaf}/kernel' for b in blocks for leaf in (
      'MlpBlock_0/Dense_0', 'MlpBlock_0/Dense_1', 'MultiHeadDotProductAttention_0/query',
      'MultiHeadDotProductAttention_0/key', 'MultiHeadDotProductAttention_0/value')}
  assert picked == want


def _images(*shape: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32)


@pytest.fixture(scope='module')
def mu_init():
  """mu/4 on 28x28x1, initialised once: random init compiles slowly on CPU."""
  model = make_vit('mu/4', 10)
  x = _images(28, 28, 1)
  return model, model.init(jax.random.key(0), x, train=False)['params'], x


@pytest.fixture(scope='module')
def mu(mu_init):
  """``mu_init`` with a random head, so that logits depend on the whole network."""
  model, params, x = mu_init
  kernel = np.random.default_rng(1).normal(size=params['head']['kernel'].shape) * 0.1
  params = {**params, 'head': {**params['head'], 'kernel': jnp.asarray(kernel, jnp.float32)}}
  return model, params, x


@pytest.mark.parametrize('variant,shape,pool_type', [
    ('mu/4', (28, 28, 1), 'tok'), ('mu/4', (32, 32, 3), 'tok'), ('mu/4', (28, 28, 1), 'gap'),
    ('tiny/4', (28, 28, 1), 'tok'), ('tiny/4', (32, 32, 3), 'tok'), ('tiny/4', (32, 32, 3), 'gap'),
])
def test_forward_shapes(variant, shape, pool_type):
  model = make_vit(variant, 10, pool_type=pool_type)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert ('cls' in variables['params']) == (pool_type == 'tok')
  rngs = {'dropout': jax.random.key(0)}
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_init_and_forward(mu_init, mu):
  model, params, x = mu_init
  assert count(params) == count(abstract_params(model, (28, 28, 1)))
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)  # head_zeroinit
  np.testing.assert_array_equal(model.apply({'params': params}, x, train=False), 0.0)
  model, params, x = mu
  logits = model.apply({'params': params}, x, train=False)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits)) and np.any(logits != 0)


def test_rep_size_and_sincos():
  shape = (28, 28, 1)
  params = abstract_params(make_vit('mu/4', 10, rep_size=True), shape)
  assert params['pre_logits']['kernel'].shape == (64, 64)
  assert params['head']['kernel'].shape == (64, 10)
  params = abstract_params(make_vit('mu/4', 10, rep_size=32), shape)
  assert params['head']['kernel'].shape == (32, 10)
  for cls_posemb in (False, True):
    params = abstract_params(make_vit('mu/4', 10, posemb='sincos2d', cls_posemb=cls_posemb), shape)
    assert 'pos_embedding' not in params and 'cls' in params
  pe = np.asarray(posemb_sincos2d(7, 7, 64))
  assert pe.shape == (1, 49, 64) and np.abs(pe).max() <= 1.0
  assert len(np.unique(pe.round(5), axis=1)[0]) == 49  # Every position is distinct.


def test_bad_inputs_raise():
  init = lambda model, shape: abstract_params(model, shape)
  with pytest.raises(ValueError, match='not divisible by patch'):
    init(make_vit('mu/4', 10), (30, 30, 1))
  with pytest.raises(ValueError, match='num_heads'):
    init(make_vit('mu/4', 10, num_heads=5), (28, 28, 1))
  with pytest.raises(ValueError, match='pool_type'):
    init(make_vit('mu/4', 10, pool_type='map'), (28, 28, 1))
  with pytest.raises(ValueError, match='posemb'):
    init(make_vit('mu/4', 10, posemb='none'), (28, 28, 1))


def _stack_blocks(params, depth: int):
  """Unscanned params -> the scanned layout (leading depth axis on each block leaf)."""
  enc = dict(params['Transformer'])
  blocks = [enc.pop(f'encoderblock_{i}') for i in range(depth)]
  enc['encoderblock'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'Transformer': enc}


def test_scan_matches_unscanned(mu):
  # At scale: scanning moves parameters into stacks without changing the count.
  b16 = [count(abstract_params(make_vit('B/16', 1000, scan=s), (224, 224, 3)))
         for s in (False, True)]
  assert b16[0] == b16[1]
  model, params, x = mu
  depth = VARIANTS['mu']['depth']
  scanned = model.clone(scan=True)
  shapes = abstract_params(scanned, (28, 28, 1))
  assert count(shapes) == count(params)
  blk = shapes['Transformer']['encoderblock']
  assert blk['MlpBlock_0']['Dense_0']['kernel'].shape == (depth, 64, 256)
  assert blk['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (depth, 64, 4, 16)
  assert blk['MultiHeadDotProductAttention_0']['out']['kernel'].shape == (depth, 4, 16, 64)
  stacked = _stack_blocks(params, depth)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
  np.testing.assert_allclose(scanned.apply({'params': stacked}, x, train=False),
                             model.apply({'params': params}, x, train=False), rtol=1e-5, atol=1e-5)


def test_dropout_needs_rng_and_is_off_at_eval(mu):
  model, params, x = mu
  model = model.clone(dropout=0.5)
  v = {'params': params}
  with pytest.raises(flax_errors.InvalidRngError, match='dropout'):
    model.apply(v, x, train=True)
  eval_out = model.apply(v, x, train=False)
  np.testing.assert_allclose(eval_out, mu[0].apply(v, x, train=False), rtol=1e-6)
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, eval_out) and not np.allclose(a, b)
  # Scanned blocks split the dropout rng per layer. (An 'rbg' key: threefry inside a compiled
  # scan body takes seconds to compile on CPU.)
  scanned = model.clone(scan=True)
  vs = {'params': _stack_blocks(params, VARIANTS['mu']['depth'])}
  s = scanned.apply(vs, x, train=True, rngs={'dropout': jax.random.key(2, impl='rbg')})
  assert np.all(np.isfinite(s)) and not np.allclose(s, eval_out)


def test_remat_same_loss_and_grads(mu):
  model, params, x = mu
  depth = 2  # Two blocks are enough and keep the compile time down.
  model = model.clone(depth=depth)
  params = {**params, 'Transformer': {k: v for k, v in params['Transformer'].items()
                                      if k in ('encoder_norm', 'encoderblock_0', 'encoderblock_1')}}
  y = jnp.array([3, 7])

  def loss(p, model):
    logits = model.apply({'params': p}, x, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  grads = lambda model, p: jax.jit(jax.value_and_grad(loss), static_argnums=1)(p, model)
  l0, g0 = grads(model, params)
  l1, g1 = grads(model.clone(remat=True, scan=True), _stack_blocks(params, depth))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               g1, _stack_blocks(g0, depth))
  # Unscanned remat: dropout draws the same masks as without it.
  drop = model.clone(dropout=0.3)
  rngs = {'dropout': jax.random.key(5)}
  np.testing.assert_allclose(
      drop.clone(remat=True).apply({'params': params}, x, train=True, rngs=rngs),
      drop.apply({'params': params}, x, train=True, rngs=rngs), rtol=1e-5, atol=1e-6)


def test_bf16_compute(mu):
  model, params, x = mu
  ref = model.apply({'params': params}, x, train=False)
  bf16 = model.clone(dtype=jnp.bfloat16)
  out = jax.jit(lambda p: bf16.apply({'params': p}, x, train=False))(params)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
  shapes = abstract_params(bf16, (28, 28, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  # bf16 storage too: parameters and every activation in bf16, logits still float32.
  half = bf16.clone(param_dtype=jnp.bfloat16)
  half_shapes = abstract_params(half, (28, 28, 1))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(half_shapes))
  logits = jax.eval_shape(lambda p: half.apply({'params': p}, x, train=False), half_shapes)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
