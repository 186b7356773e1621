"""Image classification (ViT, SwinV2): softmax or sigmoid cross-entropy, top-1 accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import models
from experiments.data import pipeline
from experiments.tasks import Task


def build_model(config: ml_collections.ConfigDict):
  m = config.model
  kwargs = dict(m.get('kwargs', {}) or {})
  for key in ('dtype', 'param_dtype'):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  if m.name == 'vit':
    return models.make_vit(m.variant, m.num_classes, **kwargs)
  if m.name == 'swinv2':
    return models.make_swinv2(m.variant, m.num_classes, img_size=config.data.image_size,
                              in_chans=m.channels, **kwargs)
  raise ValueError(f'Unknown model.name {m.name!r} for classification; known: vit, swinv2.')


def make_input(config, *, split, train, global_batch_size, seed, process_index=0, process_count=1):
  return pipeline.make_input(config.data, split=split, train=train, global_batch_size=global_batch_size,
                             seed=seed, process_index=process_index, process_count=process_count)


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
  s, c = config.data.image_size, config.model.channels
  return {'image': np.zeros((batch_size, s, s, c), np.float32),
          'label': np.zeros((batch_size,), np.int32)}


def init(model, rng, batch):
  return model.init({'params': rng}, batch['image'], train=False)['params']


def loss_fn(model, params, batch, rng, train: bool, config: ml_collections.ConfigDict):
  """Mean cross-entropy over the (masked) batch; sums of loss and correct predictions for metrics."""
  logits = model.apply({'params': params}, batch['image'], train=train, rngs={'dropout': rng})
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  target = batch['soft_label'] if 'soft_label' in batch else jax.nn.one_hot(batch['label'], num_classes)
  if config.loss == 'sigmoid_xent':
    per_ex = optax.sigmoid_binary_cross_entropy(logits, target).sum(-1)
  elif config.loss == 'softmax_xent':
    per_ex = optax.softmax_cross_entropy(logits, target)
  else:
    raise ValueError(f'config.loss={config.loss!r}; choose softmax_xent or sigmoid_xent.')
  weight = batch.get('mask', jnp.ones(per_ex.shape, jnp.float32)).astype(jnp.float32)
  count = weight.sum()
  hard_label = jnp.argmax(target, -1)
  correct = (jnp.argmax(logits, -1) == hard_label).astype(jnp.float32)
  mean_loss = (per_ex * weight).sum() / jnp.maximum(count, 1.0)
  return mean_loss, {'loss': (per_ex * weight).sum(), 'accuracy': (correct * weight).sum()}, count


TASK = Task(name='classification', build_model=build_model, make_input=make_input,
            dummy_batch=dummy_batch, init=init, loss_fn=loss_fn, eval_metric='accuracy')
