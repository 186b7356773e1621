"""SwinV2: parameter counts of every variant, window geometry, shifted-window mask, continuous
position bias, cosine attention, sparsity presets, remat and bf16."""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmsparse
from experiments.models import swinv2
from experiments.models.swinv2 import VARIANTS, make_swinv2, swinv2_config
from nmsparse import rules as rules_lib

# Published parameter counts at 256px, 1000 classes (timm's swinv2_*_256 models, Liu et al. 2022).
# timm reports them in millions to two decimals: T 28.35M, S 49.73M, B 87.92M, B-w16 87.92M. The unit
# counts below come from the per-component formula `hand_count` (which matches timm's parameter set:
# q_bias and v_bias but no k_bias, a per-head logit_scale, cpb_mlp fc1 with bias and fc2 without,
# reduction without bias; coordinate tables, position indices and masks are buffers, not parameters);
# T's unit count 28,347,154 is also recorded independently as the SwinV2-T count. Every value is
# checked against the published 2-decimal figure too.
PUBLISHED = {  # variant -> (exact count, published millions)
    'T': (28_347_154, 28.35),
    'S': (49_728_418, 49.73),
    'B': (87_918_816, 87.92),
    'B-w16': (87_918_816, 87.92),  # The window size changes no parameter shape.
}
# Small variants with no published count: variant -> (image HxWxC, classes).
SMALL = {
    'mu': ((28, 28, 1), 10),
}
# A small 3-stage configuration on 64x64x3: 16x16 tokens (window 4, shifted), 8x8, 4x4 (one window).
SMALL_RGB = dict(img_size=64, in_chans=3, patch_size=4, window_size=4, depths=(2, 2, 2),
                 num_heads=(2, 4, 8))


def hand_count(embed_dim, depths, num_heads, patch, channels, classes, mlp_ratio=4, cpb=512) -> int:
  """Parameter count written out per component."""
  n = patch * patch * channels * embed_dim + embed_dim  # patch_embed conv
  n += 2 * embed_dim  # patch_norm
  for i, (depth, h) in enumerate(zip(depths, num_heads)):
    c = embed_dim * 2 ** i
    if i:
      n += 4 * (c // 2) * c + 2 * c  # reduction (no bias) + its LayerNorm
    q, k, v = c * c + c, c * c, c * c + c
    cpb_mlp = 2 * cpb + cpb + cpb * h
    proj = c * c + c
    mlp = c * mlp_ratio * c + mlp_ratio * c + mlp_ratio * c * c + c
    norms = 2 * 2 * c
    n += depth * (q + k + v + h + cpb_mlp + proj + mlp + norms)
  c = embed_dim * 2 ** (len(depths) - 1)
  return n + 2 * c + c * classes + classes


def abstract_params(model, shape):
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)['params']
  return jax.eval_shape(init)


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def paths(tree) -> set:
  return {n for n, _ in rules_lib.named_leaves(tree)}


def random_params(module, *args, seed=0, scale=0.1, **kwargs):
  """Normal(0, scale) values for every parameter of ``module.init(key, *args, **kwargs)``: no init
  program to compile."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, a.dtype), shapes)


def test_every_registered_variant_is_tested():
  assert set(PUBLISHED) | set(SMALL) == set(VARIANTS)


@pytest.mark.parametrize('variant', sorted(PUBLISHED))
def test_published_parameter_counts(variant):
  want, millions = PUBLISHED[variant]
  c = swinv2_config(variant)
  assert abs(want - millions * 1e6) < 0.005e6
  assert hand_count(c['embed_dim'], c['depths'], c['num_heads'], 4, 3, 1000) == want
  assert count(abstract_params(make_swinv2(variant, 1000), (256, 256, 3))) == want


@pytest.mark.parametrize('variant', sorted(SMALL))
def test_small_parameter_counts(variant):
  (h, _, ch), classes = SMALL[variant]
  c = swinv2_config(variant)
  got = count(abstract_params(make_swinv2(variant, classes), (h, h, ch)))
  assert got == hand_count(c['embed_dim'], c['depths'], c['num_heads'], c['patch_size'], ch, classes)
  rgb = make_swinv2(variant, 10, **SMALL_RGB)
  assert count(abstract_params(rgb, (64, 64, 3))) == hand_count(
      c['embed_dim'], (2, 2, 2), (2, 4, 8), 4, 3, 10)


def test_configs_and_stage_windows():
  assert swinv2_config('B-w16') == dict(swinv2_config('B'), window_size=16)
  model = make_swinv2('T', 5, img_size=192, drop_path=0.2)
  assert (model.img_size, model.in_chans, model.drop_path, model.window_size) == (192, 3, 0.2, 8)
  with pytest.raises(ValueError, match='Unknown SwinV2 variant'):
    make_swinv2('t', 10)
  plan = swinv2.stage_windows
  assert plan(14, 2, 7) == [(14, 7, 3), (7, 7, 0)]  # 'mu' on 28x28: the 7x7 stage is one window.
  assert plan(64, 4, 8) == [(64, 8, 4), (32, 8, 4), (16, 8, 4), (8, 8, 0)]  # T, S, B at 256px
  assert plan(64, 4, 16) == [(64, 16, 8), (32, 16, 8), (16, 16, 0), (8, 8, 0)]  # B-w16
  assert plan(16, 3, 4) == [(16, 4, 2), (8, 4, 2), (4, 4, 0)]  # SMALL_RGB
  with pytest.raises(ValueError, match='not divisible by the window'):
    plan(56, 4, 8)  # 224px with window 8: the 28x28 stage does not tile.
  with pytest.raises(ValueError, match='must be even'):
    plan(14, 3, 7)


# ----------------------------------------------------------------------------- shifted windows


def _no_wrap_allowed(h, w, ws, s):
  """Independent geometry: after rolling by -s, two tokens of a window may attend iff their original
  positions differ by the same offset as their rolled positions (no wrap-around between them)."""
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  orig = np.stack([(ii + s) % h, (jj + s) % w], -1)  # original position of each rolled position
  out = []
  for wi in range(h // ws):
    for wj in range(w // ws):
      rolled = np.stack([ii, jj], -1)[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(-1, 2)
      o = orig[wi * ws:(wi + 1) * ws, wj * ws:(wj + 1) * ws].reshape(-1, 2)
      out.append(np.all(o[:, None] - o[None] == rolled[:, None] - rolled[None], -1))
  return np.stack(out)


def _region_ids(h, w, ws, s):
  """Hand-built region ids per window: 3 bands per axis at the boundaries h-ws and h-s."""
  band = lambda n: np.digitize(np.arange(n), [n - ws, n - s])
  ids = band(h)[:, None] * 10 + band(w)[None, :]
  return np.stack([ids[a:a + ws, b:b + ws].ravel()
                   for a in range(0, h, ws) for b in range(0, w, ws)])


@pytest.mark.parametrize('h,w,ws,s', [(8, 8, 4, 2), (14, 14, 7, 3), (12, 8, 4, 1), (16, 16, 8, 4)])
def test_shifted_window_mask(h, w, ws, s):
  mask = swinv2.shifted_window_mask(h, w, ws, s)
  n = ws * ws
  assert mask.shape == ((h // ws) * (w // ws), n, n) and mask.dtype == np.float32
  assert set(np.unique(mask)) == {0.0, swinv2.MASK_VALUE}
  ids = _region_ids(h, w, ws, s)
  np.testing.assert_array_equal(mask == 0, ids[:, :, None] == ids[:, None, :])
  np.testing.assert_array_equal(mask == 0, _no_wrap_allowed(h, w, ws, s))
  # Windows away from the wrapped last row/column of windows are not masked at all.
  assert np.all(mask[0] == 0)
  assert swinv2.shifted_window_mask(h, w, ws, 0) is None


def test_window_partition_roundtrip():
  x = np.arange(2 * 8 * 12 * 3).reshape(2, 8, 12, 3)
  win = swinv2.window_partition(x, 4)
  assert win.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(win[1, 4].reshape(4, 4, 3), x[1, 4:8, 4:8])  # window (1, 1)
  np.testing.assert_array_equal(swinv2.window_reverse(win, 4, 8, 12), x)


def test_block_init_is_identity():
  """SwinV2 zero-initialises the residual post-norms: at init every block is the identity."""
  block = swinv2.SwinV2Block(num_heads=2, window_size=4, shift_size=2, cpb_hidden=16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 8)), jnp.float32)
  params = jax.jit(block.init, static_argnums=2)(jax.random.key(0, impl='rbg'), x, True)['params']
  for norm in ('norm1', 'norm2'):
    np.testing.assert_array_equal(params[norm]['scale'], 0.0)
    np.testing.assert_array_equal(params[norm]['bias'], 0.0)
  attn = params['attn']
  np.testing.assert_allclose(attn['logit_scale'], math.log(10.0), rtol=1e-6)
  np.testing.assert_array_equal(attn['query']['bias'], 0.0)
  assert 'bias' not in attn['key'] and 'bias' not in attn['cpb_mlp']['fc2']
  np.testing.assert_array_equal(jax.jit(block.apply, static_argnums=2)({'params': params}, x, True), x)


@pytest.mark.parametrize('shift', [0, 2])
def test_block_mixes_only_allowed_tokens(shift):
  """End to end through roll, partition, mask, reverse: perturbing one token changes exactly the
  tokens allowed to attend to it (the MLP and the post-norms act per token)."""
  h, ws = 8, 4
  block = swinv2.SwinV2Block(num_heads=2, window_size=ws, shift_size=shift, cpb_hidden=16,
                             postnorm_zero_init=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, h, h, 8)), jnp.float32)
  params = random_params(block, x, True)
  # Temperature 1 and a flat position bias: every allowed pair gets a sizeable attention weight.
  attn = dict(params['attn'], logit_scale=jnp.zeros(2))
  attn['cpb_mlp'] = dict(attn['cpb_mlp'], fc2={'kernel': jnp.zeros((16, 2))})
  params = dict(params, attn=attn)
  f = jax.jit(lambda x: block.apply({'params': params}, x, True))
  base = f(x)
  allowed = _no_wrap_allowed(h, h, ws, shift)  # indexed in rolled coordinates
  for u in [(0, 0), (3, 3), (7, 1), (5, 6)]:
    changed = np.abs(np.asarray(f(x.at[0, u[0], u[1]].add(1.0)) - base)).max(-1)[0] > 1e-6
    ru = ((u[0] - shift) % h, (u[1] - shift) % h)  # u's rolled position, its window and slot
    win, slot = (ru[0] // ws) * (h // ws) + ru[1] // ws, (ru[0] % ws) * ws + ru[1] % ws
    want = np.zeros((h, h), bool)
    for t in np.flatnonzero(allowed[win, slot]):
      r = ((ru[0] // ws) * ws + t // ws, (ru[1] // ws) * ws + t % ws)
      want[(r[0] + shift) % h, (r[1] + shift) % h] = True
    np.testing.assert_array_equal(changed, want, err_msg=f'token {u}')
    if shift and u == (0, 0):  # Wrapped to the bottom-right corner: sees only its 2x2 neighbours.
      assert set(zip(*np.nonzero(changed))) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    if not shift:  # Plain windows: the whole 4x4 window of u.
      assert changed.sum() == ws * ws and changed[u[0] // ws * ws, u[1] // ws * ws]


def test_drop_path_is_per_example():
  block = swinv2.SwinV2Block(num_heads=2, window_size=4, drop_path=0.5, cpb_hidden=16,
                             postnorm_zero_init=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4, 4, 8)), jnp.float32)
  params = {'params': random_params(block, x, True)}
  f = jax.jit(lambda key: block.apply(params, x, False, rngs={'dropout': key}))
  out = np.asarray(f(jax.random.key(1, impl='rbg')))
  untouched = np.all(out == np.asarray(x), axis=(1, 2, 3))  # both residual branches dropped
  assert 0 < untouched.sum() < 32
  ev = jax.jit(block.apply, static_argnums=2)(params, x, True)
  assert not np.any(np.all(np.asarray(ev) == np.asarray(x), axis=(1, 2, 3)))
  assert not np.allclose(out, f(jax.random.key(2, impl='rbg')))


# ----------------------------------------------------------------------------- position bias


@pytest.mark.parametrize('ws,pretrained', [(7, 0), (8, 0), (16, 0), (16, 8), (1, 0)])
def test_relative_coords_table(ws, pretrained):
  table = swinv2.relative_coords_table(ws, pretrained)
  assert table.shape == (2 * ws - 1, 2 * ws - 1, 2) and table.dtype == np.float32
  norm = max((pretrained or ws) - 1, 1)
  for a in range(2 * ws - 1):
    for b in range(2 * ws - 1):
      for axis, d in enumerate((a - (ws - 1), b - (ws - 1))):
        t = 8.0 * d / norm
        want = math.copysign(math.log2(1 + abs(t)) / 3.0, t) if t else 0.0
        assert table[a, b, axis] == pytest.approx(want, abs=1e-6)
  if ws > 1 and not pretrained:  # The largest offset maps to log2(9) / log2(8).
    assert table[-1, -1, 0] == pytest.approx(math.log2(9) / 3)
    assert table[0, ws - 1, 0] == pytest.approx(-math.log2(9) / 3) and table[0, ws - 1, 1] == 0


@pytest.mark.parametrize('ws', [1, 3, 7])
def test_relative_position_index(ws):
  idx = swinv2.relative_position_index(ws)
  assert idx.shape == (ws * ws, ws * ws)
  for p in range(ws * ws):
    for q in range(ws * ws):
      dy, dx = p // ws - q // ws, p % ws - q % ws
      assert idx[p, q] == (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)


def test_continuous_position_bias_module():
  ws, heads = 3, 2
  cpb = swinv2.ContinuousPositionBias(heads, ws, hidden=8)
  params = jax.jit(cpb.init)(jax.random.key(1, impl='rbg'))['params']
  assert set(params) == {'fc1', 'fc2'} and set(params['fc2']) == {'kernel'}
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.5, params)
  bias = np.asarray(jax.jit(cpb.apply)({'params': params}))
  assert bias.shape == (heads, ws * ws, ws * ws)
  w1, b1, w2 = (np.asarray(params['fc1']['kernel']), np.asarray(params['fc1']['bias']),
                np.asarray(params['fc2']['kernel']))
  for p in range(ws * ws):
    for q in range(ws * ws):
      d = np.array([p // ws - q // ws, p % ws - q % ws], np.float64) / (ws - 1) * 8
      coords = np.sign(d) * np.log2(1 + np.abs(d)) / 3
      want = 16 / (1 + np.exp(-(np.maximum(coords @ w1 + b1, 0) @ w2)))
      np.testing.assert_allclose(bias[:, p, q], want, rtol=1e-5)
  assert np.all((bias > 0) & (bias < 16))


def test_cosine_attention_scale_and_clamp():
  attn = swinv2.WindowAttention(num_heads=2, window_size=2, cpb_hidden=8)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 4, 8)), jnp.float32)
  params = random_params(attn, x, None, True)
  assert 'bias' not in params['key'] and 'bias' in params['query'] and 'bias' in params['value']
  f = jax.jit(lambda p: attn.apply({'params': p}, x, None, True))
  ref = f(params)
  # Cosine attention ignores the norms of q and k: scaling the query projection changes nothing.
  q3 = {**params, 'query': jax.tree.map(lambda a: 3.0 * a, params['query'])}
  np.testing.assert_allclose(f(q3), ref, rtol=1e-4, atol=1e-5)
  # The temperature is clamped at log(1 / 0.01) = log(100).
  hot = lambda t: {**params, 'logit_scale': jnp.full((2,), t)}
  np.testing.assert_allclose(f(hot(math.log(100.0))), f(hot(9.0)), rtol=1e-6)
  assert not np.allclose(f(hot(math.log(50.0))), f(hot(math.log(100.0))))


def test_patch_merging_order_and_norm():
  merge = swinv2.PatchMerging(out_dim=8)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 6, 2)), jnp.float32)
  params = jax.jit(merge.init)(jax.random.key(0, impl='rbg'), x)['params']
  assert set(params) == {'reduction', 'norm'} and set(params['reduction']) == {'kernel'}
  params = {**params, 'reduction': {'kernel': jnp.eye(8)}}
  out = np.asarray(jax.jit(merge.apply)({'params': params}, x))
  xs = np.asarray(x)[0]
  cat = np.concatenate([xs[0::2, 0::2], xs[1::2, 0::2], xs[0::2, 1::2], xs[1::2, 1::2]], -1)
  want = (cat - cat.mean(-1, keepdims=True)) / np.sqrt(cat.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-5)  # Norm after the reduction.


# ----------------------------------------------------------------------------- sparsity presets


def _picked(params, preset):
  specs = nmsparse.resolve(nmsparse.preset(preset, 1, 8), params, log=False)
  flat, _ = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: x is None or isinstance(x, nmsparse.NMSpec))
  return {rules_lib.path_str(p) for p, s in flat if s is not None}


def test_presets_pick_exactly_mlp_and_qkv_kernels():
  params = abstract_params(make_swinv2('mu', 10), (28, 28, 1))
  names = paths(params)
  blocks = [f'stage_{i}/block_{j}' for i in range(2) for j in range(2)]
  mlp = {f'{b}/MlpBlock_0/{d}/kernel' for b in blocks for d in ('Dense_0', 'Dense_1')}
  qkv = {f'{b}/attn/{t}/kernel' for b in blocks for t in ('query', 'key', 'value')}
  for never in ('patch_embed/kernel', 'stage_1/downsample/reduction/kernel', 'head/kernel',
                'stage_0/block_1/attn/proj/kernel', 'stage_0/block_1/attn/cpb_mlp/fc1/kernel',
                'stage_0/block_1/attn/cpb_mlp/fc2/kernel'):
    assert never in names, never
  assert mlp | qkv <= names
  assert _picked(params, 'mlp') == mlp
  assert _picked(params, 'mlp_qkv') == mlp | qkv
  # The position-bias MLP's path contains 'mlp' but no segment starts with it.
  assert not re.fullmatch(rules_lib._MLP, 'stage_0/block_0/attn/cpb_mlp/fc1/kernel')
  assert re.fullmatch(rules_lib._MLP, 'stage_0/block_0/MlpBlock_0/Dense_1/kernel')
  # The paper keeps the output projection dense; 'all' would need an `out` layer and says so.
  with pytest.raises(ValueError, match='matched no parameter'):
    nmsparse.resolve(nmsparse.preset('all', 1, 8), params, log=False)
  # The default preset axes fit: N:M groups run along the input channels of Q, K, V.
  specs = nmsparse.resolve(nmsparse.preset('mlp_qkv', 2, 4), params, log=False)
  q = specs['stage_1']['block_0']['attn']['query']['kernel']
  assert params['stage_1']['block_0']['attn']['query']['kernel'].shape == (64, 4, 16)
  assert nmsparse.check_nm((64, 4, 16), q.n, q.m, q.axes) == (0,)


# ----------------------------------------------------------------------------- forward passes


def _images(*shape):
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, *shape)), jnp.float32)


@pytest.mark.parametrize('overrides,shape', [({}, (28, 28, 1)), (SMALL_RGB, (64, 64, 3))])
def test_forward_shapes(overrides, shape):
  model = make_swinv2('mu', 10, drop_path=0.1, dropout=0.1, **overrides)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rngs = {'dropout': jax.random.key(0)}
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=rngs), variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  names = paths(variables['params'])
  last = len(overrides.get('depths', (2, 2))) - 1
  assert f'stage_{last}/downsample/norm/scale' in names and 'stage_0/downsample/norm/scale' not in names


_logits = jax.jit(lambda model, params, x: model.apply({'params': params}, x, train=False),
                  static_argnums=0)


@pytest.fixture(scope='module')
def mu():
  """'mu' on 28x28x1 with random parameters (non-zero post-norms: every block acts)."""
  model = make_swinv2('mu', 10)
  x = _images(28, 28, 1)
  return model, random_params(model, x, train=False), x


def test_forward_values(mu):
  model, params, x = mu
  logits = _logits(model, params, x)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits)) and np.any(logits != 0)
  assert not np.allclose(logits[0], logits[1])


def test_remat_same_loss_and_grads():
  # Numerics on one shifted block (the mask is a constant inside the rematerialised function) ...
  fields = dict(num_heads=2, window_size=4, shift_size=2, cpb_hidden=16)
  block = swinv2.SwinV2Block(**fields)
  remat_block = nn.remat(swinv2.SwinV2Block, static_argnums=(2,))(**fields)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 8, 8)), jnp.float32)
  params = random_params(block, x, True)

  def loss(p, module):
    return jnp.mean(jnp.sin(module.apply({'params': p}, x, True)))

  grads = lambda module: jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, module)
  (l0, g0), (l1, g1) = grads(block), grads(remat_block)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)
  for leaf in ('logit_scale', 'cpb_mlp'):  # The SwinV2-specific parameters are trained.
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0['attn'][leaf])) > 0
  # ... and the model wraps each of its blocks, and nothing else, in a checkpoint.
  for remat in (False, True):
    model = make_swinv2('mu', 10, remat=remat)
    shapes = abstract_params(model, (28, 28, 1))
    jaxpr = jax.make_jaxpr(lambda p: model.apply({'params': p}, _images(28, 28, 1), train=False))(shapes)
    names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert names.count('remat2') == (sum(VARIANTS['mu']['depths']) if remat else 0)


def test_bf16_compute(mu):
  model, params, x = mu
  ref = _logits(model, params, x)
  bf16 = model.clone(dtype=jnp.bfloat16)
  out = _logits(bf16, params, x)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))
  half = bf16.clone(param_dtype=jnp.bfloat16)
  shapes = abstract_params(half, (28, 28, 1))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(shapes))
  logits = jax.eval_shape(lambda p: half.apply({'params': p}, x, train=False), shapes)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='does not match img_size'):
    abstract_params(make_swinv2('mu', 10), (32, 32, 1))
  with pytest.raises(ValueError, match='in_chans'):
    abstract_params(make_swinv2('mu', 10), (28, 28, 3))
  with pytest.raises(ValueError, match='not divisible by patch'):
    abstract_params(make_swinv2('mu', 10, img_size=29), (29, 29, 1))
  with pytest.raises(ValueError, match='not divisible by the window'):
    abstract_params(make_swinv2('T', 10, img_size=224), (224, 224, 3))
  with pytest.raises(ValueError, match='num_heads'):
    abstract_params(make_swinv2('mu', 10, num_heads=(3, 4)), (28, 28, 1))
  with pytest.raises(ValueError, match='equally long'):
    abstract_params(make_swinv2('mu', 10, num_heads=(2,)), (28, 28, 1))
