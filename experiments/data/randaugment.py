"""RandAugment (Cubuk et al., 2019) in numpy on uint8 ``[H, W, C]`` images (C = 1 or 3).

``num_layers`` ops are drawn uniformly (with replacement) from the 14 of the paper
and each is applied at strength ``magnitude / 10`` (10 is the paper's maximum;
larger values extrapolate, clipped to valid ranges). Symmetric ops get a random sign.
All randomness comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FILL = 128  # Grey for the pixels that geometric ops bring in from outside the image.
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45  # Fraction of the image side.
MAX_ENHANCE = 0.9  # Colour/contrast/brightness/sharpness factors span 1 +- 0.9.

Op = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _sign(rng: np.random.Generator) -> float:
  return 1.0 if rng.random() < 0.5 else -1.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  """``degenerate + factor * (image - degenerate)``: 0 gives ``degenerate``, 1 the image."""
  image = image.astype(np.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


def _grey(image: np.ndarray) -> np.ndarray:
  """Luma ``[H, W, 1]`` float32 (ITU-R 601); a 1-channel image is its own luma."""
  if image.shape[-1] == 1:
    return image.astype(np.float32)
  return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Nearest-neighbour warp: output pixel ``p`` (x, y about the centre) reads ``matrix @ [p, 1]``."""
  h, w = image.shape[:2]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  coords = np.stack([xs.ravel() - cx, ys.ravel() - cy, np.ones(h * w, np.float32)])
  sx, sy = matrix @ coords
  sx, sy = np.rint(sx + cx).astype(np.int64), np.rint(sy + cy).astype(np.int64)
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  out = np.full((h * w, image.shape[-1]), FILL, np.uint8)
  out[inside] = image[sy[inside], sx[inside]]
  return out.reshape(image.shape)


def identity(image, level, rng):
  del level, rng
  return image


def autocontrast(image, level, rng):
  """Stretches each channel to span 0..255."""
  del level, rng
  lo = image.min(axis=(0, 1), keepdims=True).astype(np.float32)
  hi = image.max(axis=(0, 1), keepdims=True).astype(np.float32)
  scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1.0), 1.0)
  offset = np.where(hi > lo, lo, 0.0)
  return _to_uint8((image - offset) * scale)


def equalize(image, level, rng):
  """Histogram equalisation of each channel."""
  del level, rng
  out = np.empty_like(image)
  for c in range(image.shape[-1]):
    channel = image[..., c]
    hist = np.bincount(channel.ravel(), minlength=256)
    # Spread all pixels but those of the brightest occupied level evenly over 0..255.
    step = (hist.sum() - hist[np.flatnonzero(hist)[-1]]) // 255
    if step == 0:
      out[..., c] = channel
      continue
    lut = (np.concatenate([[0], np.cumsum(hist)[:-1]]) + step // 2) // step
    out[..., c] = np.clip(lut, 0, 255).astype(np.uint8)[channel]
  return out


def rotate(image, level, rng):
  theta = np.deg2rad(_sign(rng) * MAX_ROTATE_DEGREES * level)
  c, s = np.cos(theta), np.sin(theta)
  return _affine(image, np.array([[c, s, 0], [-s, c, 0]], np.float32))


def solarize(image, level, rng):
  """Inverts the pixels at or above a threshold that falls from 256 as ``level`` grows."""
  del rng
  threshold = int(np.clip(256 - 256 * level, 0, 256))
  return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def posterize(image, level, rng):
  """Keeps the top ``8 - 4 * level`` bits of each pixel."""
  del rng
  bits = int(np.clip(8 - round(4 * level), 0, 8))
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return image & mask


def _factor(level: float, rng: np.random.Generator) -> float:
  return max(0.0, 1.0 + _sign(rng) * MAX_ENHANCE * level)


def color(image, level, rng):
  return _blend(_grey(image), image, _factor(level, rng))


def contrast(image, level, rng):
  return _blend(_grey(image).mean(), image, _factor(level, rng))


def brightness(image, level, rng):
  return _blend(np.zeros((), np.float32), image, _factor(level, rng))


def sharpness(image, level, rng):
  """Blends with a 3x3 smoothing of the interior (kernel 1 around a centre of 5, over 13)."""
  factor = _factor(level, rng)
  x = image.astype(np.float32)
  smooth = x.copy()
  if min(image.shape[:2]) >= 3:
    h, w = image.shape[:2]
    total = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    smooth[1:-1, 1:-1] = (total + 4 * x[1:-1, 1:-1]) / 13
  return _blend(np.rint(smooth), image, factor)


def shear_x(image, level, rng):
  return _affine(image, np.array([[1, _sign(rng) * MAX_SHEAR * level, 0], [0, 1, 0]], np.float32))


def shear_y(image, level, rng):
  return _affine(image, np.array([[1, 0, 0], [_sign(rng) * MAX_SHEAR * level, 1, 0]], np.float32))


def translate_x(image, level, rng):
  shift = _sign(rng) * MAX_TRANSLATE * level * image.shape[1]
  return _affine(image, np.array([[1, 0, shift], [0, 1, 0]], np.float32))


def translate_y(image, level, rng):
  shift = _sign(rng) * MAX_TRANSLATE * level * image.shape[0]
  return _affine(image, np.array([[1, 0, 0], [0, 1, shift]], np.float32))


OPS: dict[str, Op] = {
    'identity': identity, 'autocontrast': autocontrast, 'equalize': equalize, 'rotate': rotate,
    'solarize': solarize, 'color': color, 'posterize': posterize, 'contrast': contrast,
    'brightness': brightness, 'sharpness': sharpness, 'shear_x': shear_x, 'shear_y': shear_y,
    'translate_x': translate_x, 'translate_y': translate_y,
}


def randaugment(image: np.ndarray, rng: np.random.Generator, *, num_layers: int,
                magnitude: float) -> np.ndarray:
  """``num_layers`` random ops of strength ``magnitude`` (0..10, up to 30) on a uint8 ``[H, W, C]`` image."""
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f'randaugment needs a uint8 [H, W, C] image, got {image.dtype} {image.shape}.')
  if not 0 <= magnitude <= 30:
    raise ValueError(f'randaugment magnitude must be in [0, 30], got {magnitude}.')
  ops = list(OPS.values())
  for i in rng.integers(len(ops), size=num_layers):
    image = ops[i](image, magnitude / 10, rng)
  return image
