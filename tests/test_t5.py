"""T5 (T5.1.1 style): parameter counts, masks, relative position buckets, greedy decoding, sparsity rules."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmsparse
from experiments.models import t5 as t5_lib
from experiments.models.t5 import (VARIANTS, T5, greedy_decode, make_t5, relative_position_bucket,
                                   t5_config, t5_rules)
from nmsparse import flax_adapters as fa
from nmsparse import rules as rules_lib

# Published T5.1.1 counts (vocab 32128, untied head): the T5X / Hugging Face checkpoints
# google/t5-v1_1-{small,base,large}.
PUBLISHED = {
    'small': 76_961_152,
    'base': 247_577_856,
    'large': 783_150_080,
}
SMALL = {'tiny': 100, 'mini': 300}  # Variants with no published count -> vocab used in the test.
V = 12  # Vocabulary of the tiny models below.


def hand_count(vocab: int, d_model: int, d_ff: int, num_heads: int, d_kv: int,
               num_encoder_layers: int, num_decoder_layers: int, num_buckets: int = 32) -> int:
  """Parameter count written out per component; there are no biases anywhere."""
  d, inner = d_model, num_heads * d_kv
  embedding = vocab * d                       # shared by encoder and decoder
  head = d * vocab                            # untied logits_dense
  attention = 3 * d * inner + inner * d       # q, k, v (d, h*dkv) and o (h*dkv, d)
  mlp = 2 * d * d_ff + d_ff * d               # wi_0, wi_1 (d, ff) and wo (ff, d)
  enc_layer = attention + mlp + 2 * d         # 2 RMSNorm scales
  dec_layer = 2 * attention + mlp + 3 * d     # self + cross attention, 3 RMSNorm scales
  relpos = 2 * num_buckets * num_heads        # one table per stack
  final_norms = 2 * d
  return (embedding + head + num_encoder_layers * enc_layer + num_decoder_layers * dec_layer
          + relpos + final_norms)


@functools.cache
def abstract_params(model: T5):
  tokens = jnp.ones((1, 4), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, train=False)['params'])


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def paths(tree) -> list[str]:
  return [p for p, _ in rules_lib.named_leaves(tree)]


# XLA's backend optimizations only slow down compiling these tiny models.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.cache
def jitted_apply(model: T5):
  return jit(model.apply, static_argnames=('train', 'method'))


def run(model, params, *args, method=None, **kw):
  """``model.apply`` (jitted; ``train=False`` unless given) as a NumPy array."""
  kw.setdefault('train', False)
  return np.asarray(jitted_apply(model)({'params': params}, *args, method=method, **kw))


def encode_and_decode(model: T5, enc, dec):
  """A ``method`` for ``apply``: encodings and logits in one compiled call."""
  encoded = model.encode(enc, train=False)
  return encoded, model.decode(encoded, enc, dec, train=False)


@pytest.fixture(scope='module')
def tiny():
  """A tiny model without dropout, its params and a batch with encoder padding."""
  model = make_t5('tiny', vocab_size=V, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, V, (6, 7))
  enc[1, 4:] = 0
  enc[3, 2:] = 0
  enc = jnp.asarray(enc, jnp.int32)
  dec = jnp.asarray(rng.integers(1, V, (6, 5)), jnp.int32).at[:, 0].set(0)
  return model, random_params(model, seed=1), enc, dec


def random_params(model: T5, seed: int):
  """Hand-set params with T5-like scales, drawn by NumPy (compiling ``model.init`` takes seconds)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = rules_lib.path_str(path)
    if name.endswith('/scale'):
      return 1 + 0.1 * rng.normal(size=x.shape).astype(np.float32)
    std = 1.0 if name.endswith('embedding') else x.shape[0] ** -0.5  # tables; kernels by fan-in
    return (std * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(model))


# ----------------------------------------------------------------------------- counts and shapes


def test_every_registered_variant_is_tested():
  assert set(PUBLISHED) | set(SMALL) == set(VARIANTS)


def test_formula_by_hand_for_small():
  # The formula's terms for T5.1.1 small, multiplied out by hand (d 512, ff 1024, 6 heads x 64, 8+8).
  embedding_and_head = 2 * 32128 * 512                 # 32,899,072
  enc_layer = 4 * 512 * 384 + 3 * 512 * 1024 + 2 * 512  # 786,432 + 1,572,864 + 1,024 = 2,360,320
  dec_layer = 8 * 512 * 384 + 3 * 512 * 1024 + 3 * 512  # 1,572,864 + 1,572,864 + 1,536 = 3,147,264
  assert (enc_layer, dec_layer) == (2_360_320, 3_147_264)
  total = embedding_and_head + 8 * enc_layer + 8 * dec_layer + 2 * 32 * 6 + 2 * 512
  assert total == 32_899_072 + 18_882_560 + 25_178_112 + 384 + 1_024 == PUBLISHED['small']


@pytest.mark.parametrize('variant', sorted(PUBLISHED))
def test_published_parameter_counts(variant):
  c = t5_config(variant)
  assert hand_count(32128, **c) == PUBLISHED[variant]
  assert count(abstract_params(make_t5(variant))) == PUBLISHED[variant]


def test_mini_parameter_count():
  assert count(abstract_params(make_t5('mini', vocab_size=SMALL['mini']))) == hand_count(
      SMALL['mini'], **t5_config('mini'))


def test_tiny_parameter_count_and_kernel_shapes():
  c = t5_config('tiny')
  params = abstract_params(make_t5('tiny', vocab_size=SMALL['tiny']))
  assert count(params) == hand_count(SMALL['tiny'], **c)
  d, ff, inner = c['d_model'], c['d_ff'], c['num_heads'] * c['d_kv']
  shapes = {p: tuple(x.shape) for p, x in rules_lib.named_leaves(params)}
  assert not [p for p in shapes if p.endswith('bias')]  # No biases anywhere.
  assert shapes['token_embedder/embedding'] == (SMALL['tiny'], d)
  assert shapes['decoder/logits_dense/kernel'] == (d, SMALL['tiny'])
  assert shapes['encoder/relpos_bias/rel_embedding'] == (c['num_heads'], 32)
  assert shapes['decoder/relpos_bias/rel_embedding'] == (c['num_heads'], 32)
  assert len([p for p in shapes if 'relpos_bias' in p]) == 2  # One table per stack.
  for stack, attns in (('encoder', ['self_attention']),
                       ('decoder', ['self_attention', 'encoder_decoder_attention'])):
    for i in range(2):
      pre = f'{stack}/layers_{i}'
      for a in attns:
        for name in 'qkv':
          assert shapes[f'{pre}/{a}/{name}/kernel'] == (d, inner)
        assert shapes[f'{pre}/{a}/o/kernel'] == (inner, d)
      assert shapes[f'{pre}/mlp/wi_0/kernel'] == shapes[f'{pre}/mlp/wi_1/kernel'] == (d, ff)
      assert shapes[f'{pre}/mlp/wo/kernel'] == (ff, d)
  assert shapes['encoder/encoder_norm/scale'] == shapes['decoder/decoder_norm/scale'] == (d,)


def test_variant_errors():
  with pytest.raises(ValueError, match='Unknown T5 variant'):
    make_t5('xl')


# ----------------------------------------------------------------------------- building blocks


def test_rmsnorm_matches_formula():
  x = jax.random.normal(jax.random.key(1), (3, 8)) * 3 + 1
  scale = jnp.linspace(0.5, 2.0, 8)
  y = t5_lib.RMSNorm().apply({'params': {'scale': scale}}, x)
  want = np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(y, want, rtol=1e-5)


def test_gated_gelu_mlp_matches_formula():
  rng = np.random.default_rng(1)
  x, w0, w1, wo = (rng.normal(size=s).astype(np.float32) for s in ((2, 8), (8, 16), (8, 16), (16, 8)))
  p = {'wi_0': {'kernel': w0}, 'wi_1': {'kernel': w1}, 'wo': {'kernel': wo}}
  y = t5_lib.MlpBlock(16).apply({'params': p}, x, True)
  h = x @ w0
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  np.testing.assert_allclose(y, (gelu * (x @ w1)) @ wo, rtol=1e-4, atol=1e-5)


def test_attention_has_no_logit_scaling():
  # Identity q, k, v, o kernels and one head of width 8: out = softmax(x x^T + bias) x, unscaled.
  x = np.random.default_rng(2).normal(size=(1, 5, 8)).astype(np.float32)
  eye = {'kernel': np.eye(8, dtype=np.float32)}
  bias = np.random.default_rng(3).normal(size=(1, 1, 5, 5)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None, None]
  y = t5_lib.MultiHeadAttention(1, 8).apply({'params': dict(q=eye, k=eye, v=eye, o=eye)}, x, x,
                                             mask, bias, deterministic=True)
  logits = np.where(mask, x[0] @ x[0].T + bias, -np.inf)[0, 0]
  w = np.exp(logits - logits.max(-1, keepdims=True))
  np.testing.assert_allclose(y[0], (w / w.sum(-1, keepdims=True)) @ x[0], rtol=1e-4, atol=1e-5)


def test_init_scales():
  # T5 init: q ~ N(0, 1 / (d_model * d_kv)), k, v, o ~ N(0, 1 / fan_in); so std(q) = std(k) / sqrt(d_kv).
  d, heads, d_kv = 64, 4, 16
  x = jnp.ones((1, 2, d))
  p = t5_lib.MultiHeadAttention(heads, d_kv).init(jax.random.key(0), x, x, deterministic=True)
  std = {k: float(np.std(v['kernel'])) for k, v in p['params'].items()}
  assert std['k'] == pytest.approx(d ** -0.5, rel=0.1)
  assert std['q'] == pytest.approx((d * d_kv) ** -0.5, rel=0.1)
  norm = t5_lib.RMSNorm().init(jax.random.key(0), x)['params']['scale']
  np.testing.assert_array_equal(norm, np.ones(d))


# ----------------------------------------------------------------------------- relative positions


def bucket_exact(rel: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128) -> int:
  """Independent re-derivation with integer arithmetic only.

  T5: keys up to ``exact`` = buckets/2 positions away get a bucket each; a distance
  ``n >= exact`` falls in bucket ``exact + j`` for the largest ``j`` with
  ``(n / exact) ** (buckets - exact) >= (max_distance / exact) ** j``, capped at the
  last bucket. Bidirectional splits the buckets in two halves (key at or before the
  query; key after it); causal sends every later key to bucket 0.
  """
  n = -rel  # distance of the key before the query
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      offset, n = num_buckets, -n
  n = max(n, 0)
  exact = num_buckets // 2
  if n < exact:
    return offset + n
  j, span = 0, num_buckets - exact
  while j + 1 <= span and n ** span * exact ** (j + 1) >= max_distance ** (j + 1) * exact ** span:
    j += 1
  return offset + min(exact + j, num_buckets - 1)


# (key - query) -> bucket, worked out by hand from the formula: for the bidirectional case
# 8 + floor(8 log(n/8) / log 16), e.g. n = 20: 8 + floor(2.64) = 10; causal 16 + floor(16 log(n/16) / log 8).
HAND_BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, -8: 8, -15: 9, -16: 10, -20: 10, -32: 12, -64: 14,
                      -127: 15, -128: 15, -1000: 15, 1: 17, 7: 23, 8: 24, 32: 28, 1000: 31}
HAND_CAUSAL = {5: 0, 100: 0, 1: 0, 0: 0, -1: 1, -15: 15, -16: 16, -32: 21, -50: 24, -64: 26,
               -100: 30, -127: 31, -128: 31, -1000: 31}


@pytest.mark.parametrize('bidirectional,hand', [(True, HAND_BIDIRECTIONAL), (False, HAND_CAUSAL)])
def test_relative_position_bucket_hand_checked(bidirectional, hand):
  rel = np.array(list(hand))
  got = relative_position_bucket(rel, bidirectional=bidirectional)
  assert dict(zip(hand, got.tolist())) == hand
  assert [bucket_exact(r, bidirectional) for r in hand] == list(hand.values())


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64), (8, 20)])
def test_relative_position_bucket_matches_rederivation(bidirectional, num_buckets, max_distance):
  rel = np.arange(-600, 601)
  got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                 max_distance=max_distance)
  want = [bucket_exact(int(r), bidirectional, num_buckets, max_distance) for r in rel]
  np.testing.assert_array_equal(got, want)
  assert got.min() == 0 and got.max() == num_buckets - 1


def test_relative_position_bias_reads_the_table_by_bucket():
  table = np.arange(2 * 32, dtype=np.float32).reshape(2, 32)
  for bidirectional in (True, False):
    bias = t5_lib.RelativePositionBias(2, bidirectional).apply(
        {'params': {'rel_embedding': table}}, 5, 7)
    assert bias.shape == (1, 2, 5, 7)
    for q in range(5):
      for k in range(7):
        assert bias[0, 1, q, k] == table[1, bucket_exact(k - q, bidirectional)]


# ----------------------------------------------------------------------------- model behaviour


def test_shapes_dtypes_and_dropout(tiny):
  model, params, enc, dec = tiny
  logits = jitted_apply(model)({'params': params}, enc, dec, train=False)
  assert logits.shape == (6, 5, V) and logits.dtype == jnp.float32
  encoded, decoded = jitted_apply(model)({'params': params}, enc, dec, method=encode_and_decode)
  assert encoded.shape == (6, 7, 64) and encoded.dtype == jnp.float32
  np.testing.assert_allclose(decoded, logits, atol=1e-6, rtol=1e-6)
  # bf16 compute still returns float32 logits, close to the float32 model.
  bf16 = jitted_apply(model.clone(dtype=jnp.bfloat16))({'params': params}, enc, dec, train=False)
  assert bf16.dtype == jnp.float32
  assert np.corrcoef(np.ravel(bf16), np.ravel(logits))[0, 1] > 0.99
  # Dropout (shown on the encoder, which compiles faster): active only with train=True, and then
  # it follows the rng.
  dropped = make_t5('tiny', vocab_size=V, dropout_rate=0.3)
  encode = lambda key: run(dropped, params, enc, train=True, rngs={'dropout': key}, method=T5.encode)
  a, b = encode(jax.random.key(1)), encode(jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, encode(jax.random.key(1)))
  np.testing.assert_allclose(run(dropped, params, enc, method=T5.encode), encoded, atol=1e-6,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='integer ids'):
    model.apply({'params': params}, enc.astype(jnp.float32), dec, train=False)


def test_decoder_is_causal(tiny):
  model, params, enc, dec = tiny
  base = run(model, params, enc, dec)
  rng = np.random.default_rng(5)
  length = dec.shape[1]
  for i in range(length - 1):
    changed = dec.at[:, i + 1:].set(jnp.asarray(rng.integers(1, V, (6, length - i - 1)), jnp.int32))
    out = run(model, params, enc, changed)
    np.testing.assert_allclose(out[:, :i + 1], base[:, :i + 1], atol=1e-5, rtol=1e-5)
    assert not np.allclose(out[:, i + 1], base[:, i + 1])  # Later positions do see the change.


def test_encoder_padding_is_invisible(tiny):
  model, params, enc, dec = tiny
  both = lambda e, d: jitted_apply(model)({'params': params}, e, d, method=encode_and_decode)
  base_enc, base_logits = both(enc, dec)
  real = np.asarray(enc) != 0
  # More padding at the end changes nothing at real positions, nor the decoder.
  padded_enc, padded_logits = both(jnp.pad(enc, ((0, 0), (0, 4))), dec)
  np.testing.assert_allclose(padded_enc[:, :7][real], base_enc[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(padded_logits, base_logits, atol=1e-5, rtol=1e-5)
  # A padded row equals the same row alone without its padding.
  alone_enc, alone_logits = both(enc[1:2, :4], dec[1:2])
  np.testing.assert_allclose(alone_enc[0], base_enc[1, :4], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(alone_logits[0], base_logits[1], atol=1e-5, rtol=1e-5)
  # Non-vacuous: a real token in place of padding changes the real positions.
  filled_enc, filled_logits = both(enc.at[1, 5].set(3), dec)
  assert not np.allclose(filled_enc[1, :4], base_enc[1, :4], atol=1e-3)
  assert not np.allclose(filled_logits[1], base_logits[1], atol=1e-3)


def test_decoder_target_mask(tiny):
  model, params, enc, dec = tiny
  full = jnp.concatenate([dec, jnp.zeros((6, 3), jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.ones((6, 5), bool), jnp.zeros((6, 3), bool)], axis=1)
  short = run(model, params, enc, dec)
  masked = run(model, params, enc, full, decoder_target_mask=mask)
  assert np.isfinite(masked).all()
  np.testing.assert_allclose(masked[:, :5], short, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(run(model, params, enc, full)[:, :5], short, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='decoder_target_mask'):
    run(model, params, enc, full, decoder_target_mask=mask[:, :5])


# ----------------------------------------------------------------------------- greedy decoding


def reference_greedy(model, params, enc, max_len, bos_id, eos_id):
  """Step by step with plain model calls on the prefix padded to max_len (see test_decoder_is_causal)."""
  batch = enc.shape[0]
  out = np.zeros((batch, max_len), np.int64)
  done = np.zeros(batch, bool)
  dec = np.zeros((batch, max_len), np.int32)  # [bos, y_0, ..., y_{i-1}, then padding]
  dec[:, 0] = bos_id
  for i in range(max_len):
    token = np.where(done, 0, run(model, params, enc, jnp.asarray(dec))[:, i].argmax(-1))
    out[:, i] = token
    done |= token == eos_id
    if i + 1 < max_len:
      dec[:, i + 1] = token
  return out


@pytest.mark.parametrize('eos_id', [1, 8])
def test_greedy_decode_matches_stepwise_argmax(tiny, eos_id):
  model, params, enc, _ = tiny
  max_len = 8
  got = np.asarray(greedy_decode(model, params, enc, max_len, bos_id=0, eos_id=eos_id))
  want = reference_greedy(model, params, enc, max_len, 0, eos_id)
  assert got.shape == (6, max_len) and got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  # Non-vacuous: some row ends early (then only padding follows) and some row never ends.
  first_eos = [list(r).index(eos_id) if eos_id in r else None for r in got]
  early = [(r, i) for r, i in enumerate(first_eos) if i is not None and i < max_len - 2]
  assert early and None in first_eos
  for r, i in early:
    assert (got[r, i + 1:] == 0).all()


def test_greedy_decode_errors(tiny):
  model, params, enc, _ = tiny
  with pytest.raises(ValueError, match='max_len'):
    greedy_decode(model, params, enc, 0)


# ----------------------------------------------------------------------------- sparsity rules


def expected_sparse(preset: str, num_encoder_layers: int, num_decoder_layers: int) -> set[str]:
  """Paths of the kernels a preset should sparsify, listed independently of the rules' regexes."""
  attention = {'mlp': '', 'mlp_qkv': 'qkv', 'all': 'qkvo'}[preset]
  out = set()
  for stack, n, attns in (('encoder', num_encoder_layers, ['self_attention']),
                          ('decoder', num_decoder_layers,
                           ['self_attention', 'encoder_decoder_attention'])):
    for i in range(n):
      layer = f'{stack}/layers_{i}'
      out |= {f'{layer}/mlp/{w}/kernel' for w in ('wi_0', 'wi_1', 'wo')}
      out |= {f'{layer}/{a}/{w}/kernel' for a in attns for w in attention}
  return out


@pytest.mark.parametrize('variant', ['tiny', 'large'])
@pytest.mark.parametrize('preset,per_enc,per_dec', [('mlp', 3, 3), ('mlp_qkv', 6, 9), ('all', 7, 11)])
def test_rules_match_exactly_the_expected_kernels(variant, preset, per_enc, per_dec):
  model = make_t5(variant, vocab_size=SMALL.get(variant, 32128))
  params = abstract_params(model)
  c = t5_config(variant)
  m = 16 if variant == 'tiny' else 128  # The contraction sizes of every matched kernel divide M.
  specs = rules_lib.resolve(t5_rules(preset, 1, m), params, log=False)
  sparse = {p: s for p, s in zip(paths(params), rules_lib.spec_leaves(specs)) if s is not None}
  want = expected_sparse(preset, c['num_encoder_layers'], c['num_decoder_layers'])
  assert set(sparse) == want
  assert len(sparse) == per_enc * c['num_encoder_layers'] + per_dec * c['num_decoder_layers']
  assert all(s.axes == (-2,) and (s.n, s.m) == (1, m) for s in sparse.values())
  assert not [p for p in sparse if 'embed' in p or 'logits_dense' in p or 'relpos' in p]


def test_rules_reject_unknown_preset():
  with pytest.raises(ValueError, match='preset'):
    t5_rules('qkv_only', 2, 4)


def test_sparse_forward_on_tiny(tiny):
  """With nmsparse's STE recipe the forward pass uses 2:4 kernels grouped along the input axis."""
  model, params, enc, dec = tiny
  sp = nmsparse.make_sparsifier(nmsparse.recipe_config('ste'), t5_rules('all', 2, 4), params, 10,
                                log=False)
  state, step = sp.init(params), jnp.asarray(5)
  effective = jit(sp.apply)(params, state, step)
  assert float(nmsparse.nm_valid_fraction(effective, sp.specs)) == 1.0
  for kernel in (effective['decoder']['layers_1']['mlp']['wo']['kernel'],
                 effective['encoder']['layers_0']['self_attention']['o']['kernel']):
    groups = np.asarray(kernel).reshape(-1, 4, kernel.shape[-1])  # runs of 4 along axis -2
    assert ((groups != 0).sum(1) == 2).all()
  for dense in (('token_embedder', 'embedding'), ('decoder', 'logits_dense', 'kernel')):
    np.testing.assert_array_equal(functools.reduce(dict.get, dense, effective),
                                  functools.reduce(dict.get, dense, params))
  apply = fa.sparse_apply_fn(model.apply, sp)
  logits = jit(lambda p: apply({'params': p}, state, step, enc, dec, train=False))(params)
  np.testing.assert_allclose(logits, run(model, effective, enc, dec), atol=1e-6, rtol=1e-6)
  assert not np.allclose(logits, run(model, params, enc, dec), atol=1e-3)
