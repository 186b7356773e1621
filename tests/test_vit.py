"""ViT: parameter counts of every variant, big_vision paths, sparsity rules, scan/remat/dropout/bf16."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmsparse
from experiments.models import VARIANTS, ViT, make_vit, vit_config
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
  # Original ViT layout (posemb row for the class token) reproduces the published count ...
  assert count(abstract_params(make_vit(variant, 1000, cls_posemb=True), (224, 224, 3))) == want
  # ... big_vision's layout has no such row; checked scanned, which must not change the count.
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
  names = {n for n, _ in rules_lib.named_leaves(abstract_params(make_vit('mu/4', 10), (28, 28, 1)))}
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


@pytest.mark.parametrize('variant', sorted(SMALL))
@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize('pool_type', ['tok', 'gap'])
def test_forward_shapes(variant, shape, pool_type):
  model = make_vit(variant, 10, pool_type=pool_type, head_zeroinit=False)
  x = jax.random.normal(jax.random.key(1), (2, *shape))
  params = model.init(jax.random.key(0), x, train=False)['params']
  assert ('cls' in params) == (pool_type == 'tok')
  logits = model.apply({'params': params}, x, train=False)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_head_zeroinit_rep_size_and_sincos():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  model = make_vit('mu/4', 10)
  variables = model.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=False), 0.0)

  params = abstract_params(make_vit('mu/4', 10, rep_size=True), (28, 28, 1))
  assert params['pre_logits']['kernel'].shape == (64, 64) and params['head']['kernel'].shape == (64, 10)
  params = abstract_params(make_vit('mu/4', 10, rep_size=32), (28, 28, 1))
  assert params['head']['kernel'].shape == (32, 10)

  for cls_posemb in (False, True):
    sincos = make_vit('mu/4', 10, posemb='sincos2d', cls_posemb=cls_posemb, head_zeroinit=False)
    v = sincos.init(jax.random.key(0), x, train=False)
    assert 'pos_embedding' not in v['params']
    assert sincos.apply(v, x, train=False).shape == (2, 10)


def test_bad_inputs_raise():
  x = jnp.zeros((1, 30, 30, 1))
  with pytest.raises(ValueError, match='not divisible by patch'):
    make_vit('mu/4', 10).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='num_heads'):
    make_vit('mu/4', 10, num_heads=5).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  with pytest.raises(ValueError, match='pool_type'):
    make_vit('mu/4', 10, pool_type='map').init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                                train=False)


def _stack_blocks(params, depth):
  """Unscanned params -> the scanned layout (leading depth axis on each block leaf)."""
  enc = dict(params['Transformer'])
  blocks = [enc.pop(f'encoderblock_{i}') for i in range(depth)]
  enc['encoderblock'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'Transformer': enc}


def test_scan_matches_unscanned():
  depth = VARIANTS['mu']['depth']
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  plain = make_vit('mu/4', 10, head_zeroinit=False)
  scanned = make_vit('mu/4', 10, head_zeroinit=False, scan=True)
  params = plain.init(jax.random.key(0), x, train=False)['params']
  shapes = abstract_params(scanned, (28, 28, 1))
  assert count(shapes) == count(params)
  blk = shapes['Transformer']['encoderblock']
  assert blk['MlpBlock_0']['Dense_0']['kernel'].shape == (depth, 64, 256)
  assert blk['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (depth, 64, 4, 16)
  stacked = _stack_blocks(params, depth)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, shapes)
  np.testing.assert_allclose(scanned.apply({'params': stacked}, x, train=False),
                             plain.apply({'params': params}, x, train=False), atol=1e-5)


def test_dropout_needs_rng_and_is_off_at_eval():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  model = make_vit('mu/4', 10, dropout=0.5, head_zeroinit=False)
  v = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(Exception, match='dropout'):
    model.apply(v, x, train=True)
  eval_out = model.apply(v, x, train=False)
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, eval_out) and not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(v, x, train=False), eval_out)
  # Scanned blocks draw a different dropout mask per layer but still run.
  scanned = make_vit('mu/4', 10, dropout=0.5, scan=True, head_zeroinit=False)
  vs = scanned.init(jax.random.key(0), x, train=False)
  assert scanned.apply(vs, x, train=True, rngs={'dropout': jax.random.key(2)}).shape == (2, 10)


@pytest.mark.parametrize('scan', [False, True])
def test_remat_same_loss_and_grads(scan):
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  y = jnp.array([3, 7])
  base = make_vit('mu/4', 10, scan=scan, dropout=0.1, head_zeroinit=False)
  params = base.init(jax.random.key(0), x, train=False)['params']

  def loss(model, p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(4)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  l0, g0 = jax.value_and_grad(lambda p: loss(base, p))(params)
  l1, g1 = jax.value_and_grad(lambda p: loss(base.clone(remat=True), p))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def test_bf16_compute():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  f32 = make_vit('tiny/4', 10, head_zeroinit=False)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = f32.init(jax.random.key(0), x, train=False)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.init(
      jax.random.key(0), x, train=False)))
  out = jax.jit(lambda p: bf16.apply({'params': p}, x, train=False))(params)
  ref = f32.apply({'params': params}, x, train=False)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))
  half = make_vit('mu/4', 10, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  v = half.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(v))
  assert half.apply(v, x, train=False).shape == (2, 10)
