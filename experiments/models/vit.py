"""Vision Transformer (ViT) in Flax Linen with big_vision's parameter tree, so its checkpoints load.

Parameter tree (``scan=False``; with ``scan=True`` the blocks become one
``Transformer/encoderblock`` whose leaves carry a leading ``depth`` axis)::

    embedding/{kernel (p, p, C, width), bias}
    cls                                      (1, 1, width)        pool_type='tok' only
    pos_embedding                            (1, N, width)        posemb='learn' only
    Transformer/encoderblock_{i}/
        LayerNorm_0, LayerNorm_1             {scale, bias}
        MultiHeadDotProductAttention_0/{query,key,value}/kernel  (width, heads, head_dim)
        MultiHeadDotProductAttention_0/out/kernel                (heads, head_dim, width)
        MlpBlock_0/Dense_0/kernel (width, mlp_dim), MlpBlock_0/Dense_1/kernel (mlp_dim, width)
    Transformer/encoder_norm
    pre_logits                               rep_size only
    head/{kernel (width or rep_size, num_classes), bias}

As in big_vision, the position embedding covers the ``N`` patches and is added
before the class token is prepended. ``cls_posemb=True`` gives the original ViT
(and timm) layout instead: ``N + 1`` rows added after the class token, which is
the layout behind the published parameter counts (ViT-B/16: 86,567,656).

    model = make_vit('S/16', num_classes=1000)
    params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)['params']
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
"""

from __future__ import annotations

from typing import Any, Literal, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# name -> (width, depth, mlp_dim, num_heads). Published sizes from Dosovitskiy et al.
# (2021) and Steiner et al. (2022); 'mu' and 'tiny' are small CPU-sized models.
VARIANTS: dict[str, dict[str, int]] = {
    'mu': dict(width=64, depth=4, mlp_dim=256, num_heads=4),
    'tiny': dict(width=128, depth=6, mlp_dim=512, num_heads=4),
    'Ti': dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'B': dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'H': dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}


def vit_config(variant: str) -> dict[str, int]:
  """``'B/16'`` -> ``dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)``."""
  name, sep, patch = variant.partition('/')
  if not sep or name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f'Unknown ViT variant {variant!r}: write "<size>/<patch>" with size in '
                     f'{list(VARIANTS)} and a positive integer patch size, e.g. "B/16".')
  return dict(VARIANTS[name], patch_size=int(patch))


def make_vit(variant: str, num_classes: int, **overrides: Any) -> 'ViT':
  """A ``ViT`` of a registered variant; ``overrides`` set any other ``ViT`` field."""
  return ViT(num_classes=num_classes, **{**vit_config(variant), **overrides})


def posemb_sincos2d(h: int, w: int, width: int, temperature: float = 10_000.,
                    dtype: Dtype = jnp.float32) -> jax.Array:
  """Fixed 2-D sine-cosine position embedding, shape ``(1, h * w, width)``."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width divisible by 4, got {width}.')
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / quarter)
  y, x = np.mgrid[:h, :w]
  y = y.reshape(-1, 1) * omega
  x = x.reshape(-1, 1) * omega
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe[None], dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    dense = lambda features: nn.Dense(
        features, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
        param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim)(x))
    x = nn.Dropout(self.dropout)(x, deterministic)
    return dense(width)(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block; returns ``(x, None)`` so that it can be ``nn.scan``-ned."""

  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(**kw)(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, kernel_init=nn.initializers.xavier_uniform(), **kw)(
            y, y, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = nn.LayerNorm(**kw)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, **kw)(y, deterministic)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    return x, None


class Encoder(nn.Module):
  """``depth`` blocks (``encoderblock_{i}``, or one scanned ``encoderblock``), then LayerNorm."""

  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    block = Encoder1DBlock
    if self.remat:
      # Argument 2 (counting self as 0) is `deterministic`, a Python bool.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,))
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=nn.broadcast, length=self.depth)
      x, _ = stack(name='encoderblock', **kw)(x, deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(name=f'encoderblock_{i}', **kw)(x, deterministic)
    return nn.LayerNorm(name='encoder_norm', dtype=self.dtype, param_dtype=self.param_dtype)(x)


class ViT(nn.Module):
  """Vision Transformer classifier over NHWC float images; ``__call__`` returns float32 logits.

  ``pool_type``: ``'tok'`` (class token) or ``'gap'`` (mean over patch tokens).
  ``rep_size``: ``False``, ``True`` (= width) or an int: a tanh ``pre_logits`` layer.
  ``posemb``: ``'learn'`` or ``'sincos2d'`` (fixed, no parameter).
  ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype.
  """

  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  posemb: Literal['learn', 'sincos2d'] = 'learn'
  cls_posemb: bool = False
  rep_size: Union[int, bool] = False
  pool_type: Literal['tok', 'gap'] = 'tok'
  dropout: float = 0.0
  head_zeroinit: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.pool_type not in ('tok', 'gap'):
      raise ValueError(f"Unknown pool_type {self.pool_type!r}; use 'tok' or 'gap'.")
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}.')
    b, h, w, _ = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'Image size {h}x{w} is not divisible by patch size {p}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', name='embedding', **kw)(
        x.astype(self.dtype))
    gh, gw = h // p, w // p
    x = x.reshape(b, gh * gw, self.width)

    use_cls = self.pool_type == 'tok'
    n_pos = gh * gw + (use_cls and self.cls_posemb)
    if self.posemb == 'learn':
      pe = self.param('pos_embedding', nn.initializers.normal(stddev=self.width ** -0.5),
                      (1, n_pos, self.width), self.param_dtype)
    elif self.posemb == 'sincos2d':
      pe = posemb_sincos2d(gh, gw, self.width)
      if n_pos > gh * gw:  # The class token's row is zero.
        pe = jnp.pad(pe, ((0, 0), (1, 0), (0, 0)))
    else:
      raise ValueError(f"Unknown posemb {self.posemb!r}; use 'learn' or 'sincos2d'.")
    pe = pe.astype(self.dtype)

    if not self.cls_posemb:
      x = x + pe
    if use_cls:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
      cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    if self.cls_posemb:
      x = x + pe
    x = nn.Dropout(self.dropout)(x, not train)

    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, remat=self.remat,
                scan=self.scan, name='Transformer', **kw)(x, not train)
    x = x[:, 0] if use_cls else x.mean(axis=1)

    if self.rep_size:
      rep = self.width if self.rep_size is True else int(self.rep_size)
      x = nn.tanh(nn.Dense(rep, name='pre_logits', **kw)(x))
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    x = nn.Dense(self.num_classes, kernel_init=head_init, name='head', **kw)(x)
    return x.astype(jnp.float32)
