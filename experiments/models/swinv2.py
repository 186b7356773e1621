"""Swin Transformer V2 (Liu et al. 2022) in Flax Linen, with parameter paths that fit ``nmsparse.preset``.

SwinV2 against Swin (V1): residual post-norm (``x = x + LN(attn(x))``, ``x = x + LN(mlp(x))``), scaled
cosine attention (``cos(q, k) * exp(min(tau, log 100))`` with a learnable per-head ``tau`` initialised
to ``log 10``) and a log-spaced continuous relative position bias (a 2-layer MLP, hidden 512 with ReLU,
over ``sign(d) * log2(1 + |d|) / log2(8)`` where ``d`` is the relative offset scaled to ``[-8, 8]``,
then ``16 * sigmoid``). Patch merging concatenates 2x2 neighbours and reduces ``4C -> 2C`` (no bias)
before its LayerNorm. Windows are shifted (cyclically, with the attention mask) on every other block;
a stage whose resolution is at most the window uses one window of that resolution and no shift.

Parameter tree (``i`` the stage, ``j`` the block; ``downsample`` from the second stage on)::

    patch_embed/{kernel (p, p, in_chans, C), bias}      patch_norm/{scale, bias}
    stage_{i}/downsample/reduction/kernel (4C_{i-1}, C_i)  stage_{i}/downsample/norm/{scale, bias}
    stage_{i}/block_{j}/
        attn/query/{kernel (C, heads, head_dim), bias}   N:M by preset 'mlp_qkv'
        attn/key/kernel  (C, heads, head_dim)            (no key bias, as in SwinV2)
        attn/value/{kernel (C, heads, head_dim), bias}
        attn/logit_scale (heads,)
        attn/cpb_mlp/fc1/{kernel (2, 512), bias}   attn/cpb_mlp/fc2/kernel (512, heads)
        attn/proj/{kernel (C, C), bias}                  never sparsified by a preset
        norm1, norm2                                     {scale, bias}, zero-initialised
        MlpBlock_0/Dense_0/{kernel (C, 4C), bias}        N:M by presets 'mlp' and 'mlp_qkv'
        MlpBlock_0/Dense_1/{kernel (4C, C), bias}
    norm/{scale, bias}    head/{kernel (C_last, num_classes), bias}

Q, K and V have the layout of Flax's ``MultiHeadDotProductAttention`` (contraction axis -3), so the
default axes of ``nmsparse.preset`` fit both ViT and SwinV2; N:M groups along ``C`` exactly as a
``(C, C)`` kernel grouped along axis -2 would. ``preset('all')`` raises on SwinV2 (its output-projection
rule matches nothing: the projection is named ``proj``, outside the paper's sparsified set).

The parameter count equals timm's (``q_bias``/``v_bias``, ``logit_scale``, ``cpb_mlp`` weights; the
relative-coordinate table, position index and attention masks are constants, not parameters).

    model = make_swinv2('T', num_classes=1000)                   # swinv2_tiny_window8_256
    params = model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)['params']
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Published SwinV2 sizes (Liu et al. 2022; the timm names in comments). 'mu' is a CPU-sized model for
# 28x28x1 Fashion-MNIST: patch 2 gives 14x14 tokens, then 7x7 (one 7x7 window, no shift).
VARIANTS: dict[str, dict[str, Any]] = {
    'mu': dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, patch_size=2,
               img_size=28, in_chans=1),
    # swinv2_tiny_window8_256
    'T': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8,
              patch_size=4, img_size=256, in_chans=3),
    # swinv2_small_window8_256
    'S': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=8,
              patch_size=4, img_size=256, in_chans=3),
    # swinv2_base_window8_256
    'B': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=8,
              patch_size=4, img_size=256, in_chans=3),
    # swinv2_base_window16_256
    'B-w16': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=16,
                  patch_size=4, img_size=256, in_chans=3),
}

MASK_VALUE = -100.0  # Added to the logits of token pairs that the shifted-window mask separates.
LN_EPS = 1e-5  # PyTorch's LayerNorm default, used by SwinV2.


def swinv2_config(variant: str) -> dict[str, Any]:
  """The fields of a registered variant, e.g. ``swinv2_config('T')['depths'] == (2, 2, 6, 2)``."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown SwinV2 variant {variant!r}; choose one of {list(VARIANTS)}.')
  return dict(VARIANTS[variant])


def make_swinv2(variant: str, num_classes: int, img_size: Optional[int] = None,
                in_chans: Optional[int] = None, **overrides: Any) -> 'SwinV2':
  """A ``SwinV2`` of a registered variant; ``img_size``/``in_chans`` default to the variant's own."""
  cfg = swinv2_config(variant)
  if img_size is not None:
    cfg['img_size'] = img_size
  if in_chans is not None:
    cfg['in_chans'] = in_chans
  return SwinV2(num_classes=num_classes, **{**cfg, **overrides})


# ----------------------------------------------------------------------------- static geometry


def stage_windows(grid: int, num_stages: int, window_size: int) -> list[tuple[int, int, int]]:
  """``[(resolution, window, shift)]`` per stage for a square ``grid`` of patch tokens.

  Each stage after the first halves the resolution. A stage whose resolution is at most
  ``window_size`` uses a single window covering it and no shift; otherwise the resolution must be a
  multiple of the window and shifted blocks move by ``window // 2``.
  """
  out, res = [], grid
  for i in range(num_stages):
    if i:
      if res % 2:
        raise ValueError(f'Stage {i} merges 2x2 patches of a {res}x{res} map: the resolution must '
                         'be even. Change img_size, patch_size or the number of stages.')
      res //= 2
    if res <= window_size:
      out.append((res, res, 0))
    elif res % window_size:
      raise ValueError(f'Stage {i} has a {res}x{res} token map, which is not divisible by the '
                       f'window size {window_size}. Change img_size, patch_size or window_size.')
    else:
      out.append((res, window_size, window_size // 2))
  return out


def relative_coords_table(window: int, pretrained_window: int = 0) -> np.ndarray:
  """The log-spaced input of the position-bias MLP: ``(2w - 1, 2w - 1, 2)`` float32 (dy, dx).

  Offsets ``d in [-(w-1), w-1]`` are divided by ``w - 1`` (by ``pretrained_window - 1`` if that is
  positive), scaled to ``[-8, 8]`` and mapped to ``sign(d) * log2(1 + |d|) / log2(8)``.
  """
  d = np.arange(-(window - 1), window, dtype=np.float64)
  table = np.stack(np.meshgrid(d, d, indexing='ij'), axis=-1)
  norm = (pretrained_window if pretrained_window > 0 else window) - 1
  table = table / max(norm, 1) * 8.0
  table = np.sign(table) * np.log2(1.0 + np.abs(table)) / np.log2(8.0)
  return table.astype(np.float32)


def relative_position_index(window: int) -> np.ndarray:
  """``(w*w, w*w)`` int32: for query token ``p`` and key token ``q`` (row-major in the window), the
  row-major index of the offset ``pos(p) - pos(q)`` in the flattened ``relative_coords_table``."""
  yy, xx = np.meshgrid(np.arange(window), np.arange(window), indexing='ij')
  pos = np.stack([yy.ravel(), xx.ravel()], axis=-1)  # (N, 2)
  rel = pos[:, None, :] - pos[None, :, :] + (window - 1)  # (N, N, 2), in [0, 2w - 2]
  return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int32)


def window_partition(x, window: int):
  """``(B, H, W, C) -> (B, nW, window**2, C)``: windows row-major over the map, tokens row-major within."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x, window: int, h: int, w: int):
  """Inverse of ``window_partition``: ``(B, nW, window**2, C) -> (B, h, w, C)``."""
  b, _, _, c = x.shape
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Optional[np.ndarray]:
  """``(nW, window**2, window**2)`` float32: 0 where two tokens of a window may attend,
  ``MASK_VALUE`` where the cyclic shift brought them together from different regions; ``None``
  without a shift.

  After rolling the map by ``-shift``, the last ``shift`` rows (columns) wrapped around from the top
  (left). Along each axis, the region id is 0 before the last window, 1 in the last window before
  the wrapped strip, 2 in the wrapped strip; tokens attend only within the same (row, column) region.
  """
  if not shift:
    return None
  if not 0 < shift < window:
    raise ValueError(f'shift {shift} must lie in (0, window={window}).')

  def region(n):
    r = np.zeros(n, np.int32)
    r[n - window:n - shift] = 1
    r[n - shift:] = 2
    return r

  ids = region(h)[:, None] * 3 + region(w)[None, :]  # (H, W)
  ids = window_partition(ids[None, :, :, None], window)[0, :, :, 0]  # (nW, N)
  return np.where(ids[:, :, None] == ids[:, None, :], 0.0, MASK_VALUE).astype(np.float32)


# ----------------------------------------------------------------------------- modules


def _dense_init():
  return nn.initializers.truncated_normal(stddev=0.02)


class ContinuousPositionBias(nn.Module):
  """Log-spaced continuous relative position bias: ``(heads, w*w, w*w)``, ``16 * sigmoid(MLP(coords))``."""

  num_heads: int
  window_size: int
  pretrained_window_size: int = 0
  hidden: int = 512
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    kw = dict(kernel_init=_dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    table = jnp.asarray(relative_coords_table(self.window_size, self.pretrained_window_size))
    y = nn.relu(nn.Dense(self.hidden, name='fc1', **kw)(table.astype(self.dtype)))
    y = nn.Dense(self.num_heads, use_bias=False, name='fc2', **kw)(y)  # (2w-1, 2w-1, heads)
    y = y.reshape(-1, self.num_heads).astype(jnp.float32)
    bias = y[relative_position_index(self.window_size)]  # (N, N, heads)
    return 16.0 * jax.nn.sigmoid(jnp.transpose(bias, (2, 0, 1)))


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(|x|, eps)`` along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class WindowAttention(nn.Module):
  """Scaled cosine multi-head attention within windows, with the continuous position bias.

  Input ``(B, nW, N, C)`` (``N = window**2`` tokens per window) and an optional constant mask
  ``(nW, N, N)`` added to the logits. Logits and softmax are computed in float32.
  """

  num_heads: int
  window_size: int
  pretrained_window_size: int = 0
  cpb_hidden: int = 512
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[np.ndarray], deterministic: bool) -> jax.Array:
    b, nw, n, c = x.shape
    h = self.num_heads
    if c % h:
      raise ValueError(f'Channels {c} are not divisible by num_heads {h}.')
    kw = dict(kernel_init=_dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    proj_in = lambda name, bias: nn.DenseGeneral((h, c // h), use_bias=bias, name=name, **kw)
    q = proj_in('query', True)(x)  # (B, nW, N, heads, head_dim)
    k = proj_in('key', False)(x)
    v = proj_in('value', True)(x)

    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', _l2_normalize(q), _l2_normalize(k))
    tau = self.param('logit_scale', nn.initializers.constant(math.log(10.0)), (h,), self.param_dtype)
    scale = jnp.exp(jnp.minimum(tau.astype(jnp.float32), math.log(1.0 / 0.01)))
    logits = logits * scale[:, None, None]
    logits = logits + ContinuousPositionBias(
        h, self.window_size, self.pretrained_window_size, self.cpb_hidden, name='cpb_mlp',
        dtype=self.dtype, param_dtype=self.param_dtype)()
    if mask is not None:
      logits = logits + jnp.asarray(mask)[None, :, None]
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)

    y = jnp.einsum('bwhqk,bwkhd->bwqhd', attn, v).reshape(b, nw, n, c)
    y = nn.Dense(c, name='proj', **kw)(y)
    return nn.Dropout(self.dropout)(y, deterministic)


class MlpBlock(nn.Module):
  """Dense -> GELU (exact) -> dropout -> Dense -> dropout."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    kw = dict(kernel_init=_dense_init(), dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, **kw)(x), approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(width, **kw)(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class SwinV2Block(nn.Module):
  """(Shifted-)window attention and MLP, each with residual post-norm and stochastic depth."""

  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: float = 4.0
  pretrained_window_size: int = 0
  cpb_hidden: int = 512
  dropout: float = 0.0
  drop_path: float = 0.0
  postnorm_zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    _, h, w, c = x.shape
    ws, s = self.window_size, self.shift_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    zero = nn.initializers.zeros
    norm = lambda name: nn.LayerNorm(
        epsilon=LN_EPS, name=name,
        **(dict(scale_init=zero, bias_init=zero) if self.postnorm_zero_init else {}), **kw)
    # Per-example stochastic depth: one Bernoulli draw per image, broadcast over H, W, C.
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic)

    y = jnp.roll(x, (-s, -s), axis=(1, 2)) if s else x
    y = WindowAttention(self.num_heads, ws, self.pretrained_window_size, self.cpb_hidden,
                        self.dropout, name='attn', **kw)(
                            window_partition(y, ws), shifted_window_mask(h, w, ws, s), deterministic)
    y = window_reverse(y, ws, h, w)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    x = x + drop_path(norm('norm1')(y))
    y = MlpBlock(int(c * self.mlp_ratio), self.dropout, name='MlpBlock_0', **kw)(x, deterministic)
    return x + drop_path(norm('norm2')(y))


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), ``4C -> out`` without bias, LN."""

  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.out_dim, use_bias=False, kernel_init=_dense_init(), name='reduction', **kw)(x)
    return nn.LayerNorm(epsilon=LN_EPS, name='norm', **kw)(x)


class SwinV2Stage(nn.Module):
  """Patch merging (if ``downsample``), then ``len(drop_paths)`` blocks; odd blocks shift if ``shift``."""

  dim: int
  num_heads: int
  window_size: int
  shift_size: int
  drop_paths: Sequence[float]
  downsample: bool = False
  mlp_ratio: float = 4.0
  pretrained_window_size: int = 0
  cpb_hidden: int = 512
  dropout: float = 0.0
  postnorm_zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = PatchMerging(self.dim, name='downsample', **kw)(x)
    block = SwinV2Block
    if self.remat:
      block = nn.remat(block, static_argnums=(2,))  # Argument 2 (self is 0) is `deterministic`.
    for j, rate in enumerate(self.drop_paths):
      x = block(self.num_heads, self.window_size, self.shift_size if j % 2 else 0, self.mlp_ratio,
                self.pretrained_window_size, self.cpb_hidden, self.dropout, rate,
                self.postnorm_zero_init, name=f'block_{j}', **kw)(x, deterministic)
    return x


class SwinV2(nn.Module):
  """Swin Transformer V2 classifier over NHWC float images; ``__call__`` returns float32 logits.

  ``img_size`` / ``in_chans`` (if set) are checked against the input. ``window_size`` applies to every
  stage (clamped to the stage resolution); ``pretrained_window_sizes`` (per stage, 0 = own window)
  rescales the position-bias coordinates when fine-tuning at a larger window, as SwinV2 does.
  ``drop_path`` is the largest stochastic-depth rate, rising linearly over the blocks from 0.
  ``postnorm_zero_init`` zero-initialises the residual post-norms (the SwinV2 code does), so every
  block starts as the identity. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
  """

  num_classes: int
  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  patch_size: int = 4
  img_size: Optional[int] = None
  in_chans: Optional[int] = None
  mlp_ratio: float = 4.0
  pretrained_window_sizes: Optional[Sequence[int]] = None
  cpb_hidden: int = 512
  dropout: float = 0.0
  drop_path: float = 0.0
  postnorm_zero_init: bool = True
  head_zeroinit: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    depths, heads = tuple(self.depths), tuple(self.num_heads)
    if len(depths) != len(heads) or not depths:
      raise ValueError(f'depths {depths} and num_heads {heads} must be non-empty and equally long.')
    pws = tuple(self.pretrained_window_sizes or (0,) * len(depths))
    if len(pws) != len(depths):
      raise ValueError(f'pretrained_window_sizes {pws} needs one entry per stage ({len(depths)}).')
    _, h, w, ch = x.shape
    if h != w:
      raise ValueError(f'SwinV2 here takes square images, got {h}x{w}.')
    if self.img_size is not None and h != self.img_size:
      raise ValueError(f'Image size {h}x{w} does not match img_size={self.img_size}.')
    if self.in_chans is not None and ch != self.in_chans:
      raise ValueError(f'Input has {ch} channels but in_chans={self.in_chans}.')
    p = self.patch_size
    if h % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch size {p}.')
    plan = stage_windows(h // p, len(depths), self.window_size)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    deterministic = not train

    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', name='patch_embed', **kw)(
        x.astype(self.dtype))
    x = nn.LayerNorm(epsilon=LN_EPS, name='patch_norm', **kw)(x)

    rates = np.linspace(0.0, self.drop_path, sum(depths)).tolist()
    start = 0
    for i, (depth, nh, (_, ws, shift)) in enumerate(zip(depths, heads, plan)):
      x = SwinV2Stage(self.embed_dim * 2 ** i, nh, ws, shift, tuple(rates[start:start + depth]),
                      downsample=i > 0, mlp_ratio=self.mlp_ratio, pretrained_window_size=pws[i],
                      cpb_hidden=self.cpb_hidden, dropout=self.dropout,
                      postnorm_zero_init=self.postnorm_zero_init, remat=self.remat,
                      name=f'stage_{i}', **kw)(x, deterministic)
      start += depth

    x = nn.LayerNorm(epsilon=LN_EPS, name='norm', **kw)(x)
    x = x.mean(axis=(1, 2))
    head_init = nn.initializers.zeros if self.head_zeroinit else _dense_init()
    x = nn.Dense(self.num_classes, kernel_init=head_init, name='head', **kw)(x)
    return x.astype(jnp.float32)
