"""Mixup (Zhang et al., 2018) on whole batches: each example is blended with the batch reversed.

One ``lam ~ Beta(alpha, alpha)`` per batch. The batch keeps its int ``'label'``
(that of the unreversed example) and gains ``'soft_label'``: float32 ``[B, num_classes]``
targets that sum to 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mixup(batch: dict[str, Any], rng: np.random.Generator, *, alpha: float,
          num_classes: int) -> dict[str, Any]:
  """Mixup with a numpy generator (for the input pipeline)."""
  if alpha <= 0:
    raise ValueError(f'mixup alpha must be > 0, got {alpha}.')
  lam = np.float32(rng.beta(alpha, alpha))
  image, label = batch['image'], np.asarray(batch['label'])
  one_hot = np.eye(num_classes, dtype=np.float32)[label]
  return {**batch,
          'image': (lam * image + (1 - lam) * image[::-1]).astype(image.dtype),
          'soft_label': lam * one_hot + (1 - lam) * one_hot[::-1]}


def mixup_jax(key: jax.Array, batch: dict[str, Any], *, alpha: float, num_classes: int) -> dict[str, Any]:
  """The same with a jax key (for use inside a jitted step)."""
  if alpha <= 0:
    raise ValueError(f'mixup alpha must be > 0, got {alpha}.')
  lam = jax.random.beta(key, alpha, alpha)
  image = batch['image']
  one_hot = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
  return {**batch,
          'image': (lam * image + (1 - lam) * image[::-1]).astype(image.dtype),
          'soft_label': lam * one_hot + (1 - lam) * one_hot[::-1]}
