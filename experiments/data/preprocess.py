"""Per-example preprocessing on numpy: decode, crop/resize, flip, RandAugment, normalise.

Images stay uint8 ``[H, W, C]`` until ``normalize`` turns them into float32.
Random steps take an ``np.random.Generator`` that the pipeline seeds per example.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from experiments.data import randaugment as randaugment_lib

CROPS = ('resize', 'inception', 'pad')
NORMALIZATIONS = ('minus_one_one', 'imagenet')
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CENTER_CROP_FRACTION = 0.875  # Eval 'inception': resize the short side to size / 0.875, crop the centre.
PAD = 4  # 'pad' crop: zero-pad by 4 and crop back at a random offset (CIFAR style).

def decode(image: Any, channels: int) -> np.ndarray:
  """A uint8 ``[H, W, channels]`` array from a decoded array or encoded (PNG/JPEG) bytes."""
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(image)) as pil:
      image = np.asarray(pil.convert('L' if channels == 1 else 'RGB'))
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != channels:
    raise ValueError(f'Expected a uint8 image with {channels} channels, got {image.dtype} {image.shape}.')
  return image


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased) resize of a uint8 ``[H, W, C]`` image; a no-op at the same size."""
  if image.shape[:2] == (height, width):
    return image
  if image.shape[-1] == 1:
    return np.asarray(Image.fromarray(image[..., 0]).resize((width, height), Image.BILINEAR))[..., None]
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int, fraction: float = CENTER_CROP_FRACTION) -> np.ndarray:
  """Resizes the short side to ``size / fraction`` and takes the central ``size`` x ``size``."""
  h, w = image.shape[:2]
  scale = size / fraction / min(h, w)
  image = resize(image, max(size, round(h * scale)), max(size, round(w * scale)))
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def inception_crop(image: np.ndarray, size: int, rng: np.random.Generator, *,
                   area: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> np.ndarray:
  """A random crop of ``area`` of the image and aspect ``ratio`` (log-uniform), resized to ``size``.

  After ``tries`` failed draws (crop larger than the image) it falls back to ``center_crop``.
  """
  h, w = image.shape[:2]
  for _ in range(tries):
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch, cw = round(math.sqrt(target / aspect)), round(math.sqrt(target * aspect))
    if 0 < ch <= h and 0 < cw <= w:
      top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
      return resize(image[top:top + ch, left:left + cw], size, size)
  return center_crop(image, size, fraction=1.0)


def pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int = PAD) -> np.ndarray:
  """Zero-pads by ``pad`` on each side and crops back to the original size at a random offset."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(2 * pad + 1, size=2)
  return padded[top:top + h, left:left + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
  """float32: ``'minus_one_one'`` maps 0..255 to [-1, 1]; ``'imagenet'`` subtracts mean, divides by std."""
  x = image.astype(np.float32)
  if mode == 'minus_one_one':
    return x / 127.5 - 1.0
  if mode == 'imagenet':
    if image.shape[-1] != 3:
      raise ValueError(f"normalize='imagenet' needs RGB images, got {image.shape[-1]} channels.")
    return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  raise ValueError(f'Unknown normalize {mode!r}; known: {NORMALIZATIONS}.')


@dataclasses.dataclass(frozen=True)
class ExamplePreprocess:
  """``self(example, rng) -> {'image': float32 [S, S, C], 'label': int32}`` for one tfds example.

  ``crop``: ``'resize'`` resizes to ``image_size`` (no-op at the native size);
  ``'inception'`` takes a random-resized crop in training and a central crop in eval;
  ``'pad'`` resizes, then pads and random-crops in training. Flip and RandAugment
  apply in training only. ``rng`` may be None when ``uses_rng`` is False.
  """
  train: bool
  image_size: int
  channels: int
  crop: str = 'resize'
  flip: bool = False
  randaugment_layers: int = 0
  randaugment_magnitude: float = 10.0
  normalize: str = 'minus_one_one'

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f'Unknown crop {self.crop!r}; known: {CROPS}.')
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f'Unknown normalize {self.normalize!r}; known: {NORMALIZATIONS}.')

  @property
  def uses_rng(self) -> bool:
    return self.train and (self.crop != 'resize' or self.flip or self.randaugment_layers > 0)

  def __call__(self, example: dict[str, Any],
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    image = decode(example['image'], self.channels)
    if self.crop == 'inception':
      if self.train:
        image = inception_crop(image, self.image_size, rng)
      else:
        image = center_crop(image, self.image_size)
    else:
      image = resize(image, self.image_size, self.image_size)
      if self.train and self.crop == 'pad':
        image = pad_crop(image, rng)
    if self.train and self.flip:
      image = random_flip(image, rng)
    if self.train and self.randaugment_layers:
      image = randaugment_lib.randaugment(
          image, rng, num_layers=self.randaugment_layers, magnitude=self.randaugment_magnitude)
    return {'image': normalize(image, self.normalize), 'label': np.int32(example['label'])}
