"""T5 in the T5.1.1 style, Flax Linen: an encoder-decoder with 2-D kernels so N:M groups run along axis -2.

T5.1.1 details: RMSNorm (a scale, no bias, no mean subtraction), gated-GELU MLP,
relative position biases (32 buckets, max distance 128; bidirectional in the
encoder, causal in the decoder; one table per stack shared by its layers), no
biases anywhere, no 1/sqrt(d_kv) in attention (folded into the query init), a
token embedding shared by encoder and decoder, an untied output head, pre-norm
residual blocks and final norms. Padding id 0 is masked in every attention.

Parameter tree (``L`` = layer index; every kernel is ``(in, out)``, so axis -2
is the contraction axis)::

    token_embedder/embedding                         (vocab, d_model)
    encoder/relpos_bias/rel_embedding                (heads, num_buckets)
    encoder/layers_L/pre_attention_layer_norm/scale  (d_model,)
    encoder/layers_L/self_attention/{q,k,v}/kernel   (d_model, heads * d_kv)
    encoder/layers_L/self_attention/o/kernel         (heads * d_kv, d_model)
    encoder/layers_L/pre_mlp_layer_norm/scale        (d_model,)
    encoder/layers_L/mlp/{wi_0,wi_1}/kernel          (d_model, d_ff)
    encoder/layers_L/mlp/wo/kernel                   (d_ff, d_model)
    encoder/encoder_norm/scale
    decoder/relpos_bias/rel_embedding
    decoder/layers_L/pre_self_attention_layer_norm, self_attention/{q,k,v,o}
    decoder/layers_L/pre_cross_attention_layer_norm, encoder_decoder_attention/{q,k,v,o}
    decoder/layers_L/pre_mlp_layer_norm, mlp/{wi_0,wi_1,wo}
    decoder/decoder_norm/scale
    decoder/logits_dense/kernel                      (d_model, vocab)

Usage::

    model = make_t5('tiny', vocab_size=128)
    params = model.init(jax.random.key(0), enc, dec, train=False)['params']
    logits = model.apply({'params': params}, enc, dec, train=True, rngs={'dropout': key})
    tokens = greedy_decode(model, params, enc, max_len=16)
    rules = t5_rules('all', 1, 8)          # MLP + attention q, k, v, o of every block
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nmsparse import rules as rules_lib

Dtype = Any

# name -> architecture. small/base/large are the T5.1.1 checkpoints (vocab 32128 by
# default in make_t5); note that T5.1.1 small has 6 heads (6 * 64 = 384 < d_model),
# which is what its published parameter count needs. 'tiny' and 'mini' are CPU-sized models.
VARIANTS: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=64, d_ff=128, num_heads=4, d_kv=16, num_encoder_layers=2,
                 num_decoder_layers=2),
    'mini': dict(d_model=128, d_ff=512, num_heads=4, d_kv=32, num_encoder_layers=3,
                 num_decoder_layers=3),
    'small': dict(d_model=512, d_ff=1024, num_heads=6, d_kv=64, num_encoder_layers=8,
                  num_decoder_layers=8),
    'base': dict(d_model=768, d_ff=2048, num_heads=12, d_kv=64, num_encoder_layers=12,
                 num_decoder_layers=12),
    'large': dict(d_model=1024, d_ff=2816, num_heads=16, d_kv=64, num_encoder_layers=24,
                  num_decoder_layers=24),
}
T5_VOCAB_SIZE = 32128  # The T5 SentencePiece vocabulary (32000) padded to a multiple of 128.

PAD_ID = 0

# Masked attention logits (float32): exp underflows to exactly 0, and a fully masked row stays finite.
_NEG_INF = -1e10


def t5_config(variant: str) -> dict[str, int]:
  """``'base'`` -> ``dict(d_model=768, d_ff=2048, num_heads=12, d_kv=64, ...)``."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown T5 variant {variant!r}; choose one of {list(VARIANTS)}.')
  return dict(VARIANTS[variant])


def make_t5(variant: str, vocab_size: int = T5_VOCAB_SIZE, **overrides: Any) -> 'T5':
  """A ``T5`` of a registered variant; ``overrides`` set any other ``T5`` field."""
  return T5(vocab_size=vocab_size, **{**t5_config(variant), **overrides})


def t5_rules(preset: str, n: int, m: int) -> list[tuple[str, rules_lib.Spec]]:
  """Sparsity rules for T5's 2-D kernels, N:M along axis -2 (the contraction axis).

  ``'mlp'``: ``wi_0``, ``wi_1``, ``wo`` of every encoder and decoder block;
  ``'mlp_qkv'``: plus ``q``, ``k``, ``v`` of self- and cross-attention; ``'all'``:
  plus the attention output ``o``. Embeddings, relative position tables, norms
  and the output head never match.
  """
  return rules_lib.preset(preset, n, m, mlp_axes=(-2,), qkv_axes=(-2,), out_axes=(-2,))


# ----------------------------------------------------------------------------- relative positions


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucket of ``key_position - query_position`` (integer NumPy array in, same shape out).

  Distances below ``max_exact`` (half the buckets available to a direction) get
  a bucket each; larger ones share logarithmically wider buckets up to
  ``max_distance``, and everything farther falls in the last bucket. Bidirectional:
  the first half of the buckets is for keys at or before the query, the second
  half for keys after it. Causal: keys after the query all map to bucket 0.
  Computed in float64 with a float32-epsilon nudge, so that distances on a bucket
  edge (16, 32, 64 with the defaults) land in the upper bucket as in T5.
  """
  rel = np.asarray(relative_position, dtype=np.int64)
  back = -rel  # How far the key lies before the query.
  if bidirectional:
    if num_buckets % 2:
      raise ValueError(f'Bidirectional relative positions need an even num_buckets, got {num_buckets}.')
    num_buckets //= 2
    offset = np.where(back < 0, num_buckets, 0)
    dist = np.abs(back)
  else:
    offset = np.zeros_like(back)
    dist = np.maximum(back, 0)
  max_exact = num_buckets // 2
  if max_exact < 1 or max_distance <= max_exact:
    raise ValueError(f'Need num_buckets >= {4 if bidirectional else 2} and max_distance > '
                     f'{max_exact}; got num_buckets={num_buckets * (1 + bidirectional)}, '
                     f'max_distance={max_distance}.')
  ratio = np.maximum(dist, 1) / max_exact + np.finfo(np.float32).eps
  log_part = np.log(ratio) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
  far = np.minimum(max_exact + log_part.astype(np.int64), num_buckets - 1)
  return offset + np.where(dist < max_exact, dist, far)


class RelativePositionBias(nn.Module):
  """A learned scalar per (head, bucket); returns the ``(1, heads, q_len, k_len)`` attention bias."""

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    table = self.param('rel_embedding', nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
                       (self.num_heads, self.num_buckets), self.param_dtype)
    return jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=1)[None].astype(self.dtype)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
  """``x / rms(x) * scale``, computed in float32; no bias and no mean subtraction."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


def _dense(features: int, name: str, init, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, kernel_init=init, dtype=dtype,
                  param_dtype=param_dtype, name=name)


class MlpBlock(nn.Module):
  """Gated GELU: ``wo(dropout(gelu(wi_0 x) * wi_1 x))``."""

  d_ff: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    dense = lambda f, name: _dense(f, name, init, self.dtype, self.param_dtype)
    h = nn.gelu(dense(self.d_ff, 'wi_0')(x), approximate=True) * dense(self.d_ff, 'wi_1')(x)
    h = nn.Dropout(self.dropout_rate)(h, deterministic)
    return dense(x.shape[-1], 'wo')(h)


class MultiHeadAttention(nn.Module):
  """Attention with 2-D ``q, k, v, o`` kernels and no logit scaling (the query init carries it).

  ``mask``: boolean, broadcastable to ``(batch, heads, q_len, k_len)``, True = may attend.
  ``bias``: added to the logits (the relative position bias). Softmax runs in float32.
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, mask: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None, *, deterministic: bool) -> jax.Array:
    h, dk = self.num_heads, self.d_kv
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
    # std (d_model * d_kv)^-1/2: the 1/sqrt(d_kv) of scaled dot-product attention, moved into the init.
    q_init = nn.initializers.variance_scaling(1.0 / dk, 'fan_in', 'normal')
    dense = lambda f, name, i: _dense(f, name, i, self.dtype, self.param_dtype)
    split = lambda t: t.reshape(*t.shape[:-1], h, dk)
    q = split(dense(h * dk, 'q', q_init)(x_q))
    k = split(dense(h * dk, 'k', init)(x_kv))
    v = split(dense(h * dk, 'v', init)(x_kv))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = out.reshape(*out.shape[:-2], h * dk)
    return dense(x_q.shape[-1], 'o', init)(out)


def _pad_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
  """``(batch, 1, q_len, k_len)``: True where both the query and the key are real tokens."""
  return q_valid[:, None, :, None] & k_valid[:, None, None, :]


class EncoderLayer(nn.Module):
  d_ff: int
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, bias, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    y = RMSNorm(name='pre_attention_layer_norm', **kw)(x)
    y = MultiHeadAttention(self.num_heads, self.d_kv, self.dropout_rate, name='self_attention',
                           **kw)(y, y, mask, bias, deterministic=deterministic)
    x = x + drop(y)
    y = RMSNorm(name='pre_mlp_layer_norm', **kw)(x)
    y = MlpBlock(self.d_ff, self.dropout_rate, name='mlp', **kw)(y, deterministic)
    return x + drop(y)


class DecoderLayer(nn.Module):
  d_ff: int
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, bias, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    attn = lambda name: MultiHeadAttention(self.num_heads, self.d_kv, self.dropout_rate,
                                           name=name, **kw)
    y = RMSNorm(name='pre_self_attention_layer_norm', **kw)(x)
    y = attn('self_attention')(y, y, self_mask, bias, deterministic=deterministic)
    x = x + drop(y)
    y = RMSNorm(name='pre_cross_attention_layer_norm', **kw)(x)
    y = attn('encoder_decoder_attention')(y, encoded, cross_mask, deterministic=deterministic)
    x = x + drop(y)
    y = RMSNorm(name='pre_mlp_layer_norm', **kw)(x)
    y = MlpBlock(self.d_ff, self.dropout_rate, name='mlp', **kw)(y, deterministic)
    return x + drop(y)


class Encoder(nn.Module):
  """Embed -> dropout -> layers (one bidirectional relative position bias for all) -> norm -> dropout."""

  embedder: nn.Module
  num_layers: int
  d_ff: int
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    length = tokens.shape[-1]
    valid = tokens != PAD_ID
    mask = _pad_mask(valid, valid)
    bias = RelativePositionBias(self.num_heads, True, self.num_buckets, self.max_distance,
                                name='relpos_bias', **kw)(length, length)
    x = drop(self.embedder(tokens).astype(self.dtype))
    for i in range(self.num_layers):
      x = EncoderLayer(self.d_ff, self.num_heads, self.d_kv, self.dropout_rate,
                       name=f'layers_{i}', **kw)(x, mask, bias, deterministic)
    return drop(RMSNorm(name='encoder_norm', **kw)(x))


class Decoder(nn.Module):
  """Embed -> dropout -> layers (causal relative position bias, cross-attention) -> norm -> head."""

  embedder: nn.Module
  vocab_size: int
  num_layers: int
  d_ff: int
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, encoded: jax.Array, encoder_tokens: jax.Array, tokens: jax.Array,
               target_mask: Optional[jax.Array], deterministic: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    length = tokens.shape[-1]
    # Decoder inputs start with BOS = PAD = 0, so their padding comes from the targets, if given.
    q_valid = (jnp.ones(tokens.shape, bool) if target_mask is None
               else jnp.asarray(target_mask).astype(bool))
    causal = jnp.tril(jnp.ones((length, length), bool))
    self_mask = _pad_mask(q_valid, q_valid) & causal
    cross_mask = _pad_mask(q_valid, encoder_tokens != PAD_ID)
    bias = RelativePositionBias(self.num_heads, False, self.num_buckets, self.max_distance,
                                name='relpos_bias', **kw)(length, length)
    x = drop(self.embedder(tokens).astype(self.dtype))
    encoded = encoded.astype(self.dtype)
    for i in range(self.num_layers):
      x = DecoderLayer(self.d_ff, self.num_heads, self.d_kv, self.dropout_rate,
                       name=f'layers_{i}', **kw)(x, encoded, self_mask, cross_mask, bias,
                                                 deterministic)
    x = drop(RMSNorm(name='decoder_norm', **kw)(x))
    # Untied head (T5.1.1): no rescaling of the logits.
    logits = _dense(self.vocab_size, 'logits_dense',
                    nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'),
                    self.dtype, self.param_dtype)(x)
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------- model


class T5(nn.Module):
  """T5.1.1 encoder-decoder over int token ids (pad 0); returns float32 logits ``(batch, dec_len, vocab)``.

  ``decoder_input_tokens`` are the targets shifted right with BOS = 0 in front;
  ``decoder_target_mask`` (optional, ``(batch, dec_len)``, e.g. ``targets > 0``)
  masks decoder padding, which the inputs cannot show because BOS is also 0.
  Without it the decoder self-attention is only causal, which leaves the logits
  at real positions of right-padded targets unchanged.
  ``dropout_rate`` applies after the embedding, to attention weights, inside the
  MLP, to every residual branch and after the final norms (T5.1.1 pre-trained
  with 0.0; 0.1 is the fine-tuning default). ``dtype`` is the compute dtype,
  ``param_dtype`` the storage dtype.
  """

  vocab_size: int
  d_model: int
  d_ff: int
  num_heads: int
  d_kv: int
  num_encoder_layers: int
  num_decoder_layers: int
  dropout_rate: float = 0.1
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stack = dict(d_ff=self.d_ff, num_heads=self.num_heads, d_kv=self.d_kv,
                 dropout_rate=self.dropout_rate, num_buckets=self.relative_attention_num_buckets,
                 max_distance=self.relative_attention_max_distance, **kw)
    self.token_embedder = nn.Embed(self.vocab_size, self.d_model,
                                   embedding_init=nn.initializers.normal(stddev=1.0), **kw)
    self.encoder = Encoder(self.token_embedder, self.num_encoder_layers, **stack)
    self.decoder = Decoder(self.token_embedder, self.vocab_size, self.num_decoder_layers, **stack)

  def encode(self, encoder_input_tokens: jax.Array, *, train: bool) -> jax.Array:
    """``(batch, enc_len)`` ids -> ``(batch, enc_len, d_model)`` encodings (in ``dtype``)."""
    _check_tokens('encoder_input_tokens', encoder_input_tokens)
    return self.encoder(encoder_input_tokens, not train)

  def decode(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
             decoder_input_tokens: jax.Array, *, train: bool,
             decoder_target_mask: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits from encodings; ``encoder_input_tokens`` give the cross-attention padding."""
    _check_tokens('decoder_input_tokens', decoder_input_tokens)
    if encoded.shape[:2] != encoder_input_tokens.shape:
      raise ValueError(f'encoded {encoded.shape} does not match encoder_input_tokens '
                       f'{encoder_input_tokens.shape}.')
    if decoder_target_mask is not None and decoder_target_mask.shape != decoder_input_tokens.shape:
      raise ValueError(f'decoder_target_mask {decoder_target_mask.shape} does not match '
                       f'decoder_input_tokens {decoder_input_tokens.shape}.')
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_mask,
                        not train)

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
               train: bool, decoder_target_mask: Optional[jax.Array] = None) -> jax.Array:
    encoded = self.encode(encoder_input_tokens, train=train)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, train=train,
                       decoder_target_mask=decoder_target_mask)


def _check_tokens(name: str, tokens: jax.Array) -> None:
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{name} must be integer ids of shape (batch, length); got '
                     f'{tokens.dtype} {tokens.shape}.')


# ----------------------------------------------------------------------------- decoding


def greedy_decode(model: T5, params: Any, encoder_tokens: jax.Array, max_len: int,
                  bos_id: int = 0, eos_id: int = 1) -> jax.Array:
  """Greedy decoding, jitted: ``(batch, max_len)`` int32 tokens, 0 after each row's EOS.

  Encodes once, then a ``lax.while_loop`` over positions reruns the decoder on
  the whole padded prefix ``[bos, y_0, ..., y_{i-1}, 0, ...]`` (no cache: the
  causal mask makes the padding invisible) and takes the argmax at position
  ``i``. The EOS itself is kept; the loop stops once every row has emitted it.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}.')
  return _greedy_decode(model, params, jnp.asarray(encoder_tokens), int(max_len),
                        jnp.asarray(bos_id, jnp.int32), jnp.asarray(eos_id, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy_decode(model: T5, params: Any, encoder_tokens: jax.Array, max_len: int,
                   bos_id: jax.Array, eos_id: jax.Array) -> jax.Array:
  variables = {'params': params}
  encoded = model.apply(variables, encoder_tokens, train=False, method=T5.encode)
  batch = encoder_tokens.shape[0]
  out = jnp.zeros((batch, max_len), jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(carry):
    i, _, done = carry
    return (i < max_len) & ~jnp.all(done)

  def body(carry):
    i, out, done = carry
    dec_in = jnp.concatenate([jnp.full((batch, 1), bos_id, jnp.int32), out[:, :-1]], axis=1)
    logits = model.apply(variables, encoded, encoder_tokens, dec_in, train=False,
                         method=T5.decode)
    step_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    token = jnp.where(done, PAD_ID, jnp.argmax(step_logits, axis=-1).astype(jnp.int32))
    out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
    return i + 1, out, done | (token == eos_id)

  _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), out, done))
  return out


def count_params(params: Any) -> int:
  """Number of scalars in a params pytree (arrays or ``jax.ShapeDtypeStruct`` s)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
