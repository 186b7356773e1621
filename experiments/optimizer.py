"""The optimizer from config: clip, Adam's preconditioner (the recipe's), AdamW decay, schedule."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax

import nmsparse


def duration_steps(config: ml_collections.ConfigDict, prefix: str, steps_per_epoch: int,
                   batch_size: int, default: int | None = None) -> int | None:
  """``{prefix}_steps``, else ``{prefix}_examples``, else ``{prefix}_epochs``, as steps.

  The first one set wins (so ``--config.total_steps=100`` overrides a config's
  epochs from the command line); the choice is logged.
  """
  for kind, to_steps in (('steps', lambda v: int(v)),
                         ('examples', lambda v: int(round(v / batch_size))),
                         ('epochs', lambda v: int(round(v * steps_per_epoch)))):
    value = config.get(f'{prefix}_{kind}')
    if value is not None:
      steps = to_steps(value)
      if steps < 0:
        raise ValueError(f'{prefix}_{kind} = {value} gives a negative number of steps.')
      logging.info('%s: %d steps (from %s_%s = %s)', prefix, steps, prefix, kind, value)
      return steps
  return default


def learning_rate(config: ml_collections.ConfigDict, batch_size: int, total_steps: int,
                  warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to ``lr`` (square-root scaled by ``batch / base_batch`` if set), then cosine or constant."""
  lr = config.lr
  if config.base_batch:
    lr = lr * (batch_size / config.base_batch) ** 0.5
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1))
  if config.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup_steps, 1)),
                                 optax.constant_schedule(lr)], [warmup_steps])
  if config.schedule == 'rsqrt':  # T5: lr / sqrt(max(step, warmup)), i.e. constant through the warm-up.
    return lambda step: lr * jnp.sqrt(max(warmup_steps, 1) / jnp.maximum(step, max(warmup_steps, 1)))
  raise ValueError(f'optimizer.schedule={config.schedule!r}; choose "cosine", "constant" or "rsqrt".')


def make_optimizer(config: ml_collections.ConfigDict, sp: nmsparse.Sparsifier, *, batch_size: int,
                   total_steps: int, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW whose second-moment preconditioner comes from the recipe (``sp.scale_by_adam``: STEP's for STEP).

  ``name='adafactor'`` is T5X's optimizer (factored second moments, decay rate 0.8,
  update clipping 1.0, updates scaled by the parameter scale); STEP, whose masks are
  learned from Adam's second moment, refuses it.
  """
  if config.name not in ('adamw', 'adafactor'):
    raise ValueError(f'optimizer.name={config.name!r}; choose "adamw" or "adafactor".')
  warmup = duration_steps(config, 'warmup', steps_per_epoch, batch_size, default=0)
  schedule = learning_rate(config, batch_size, total_steps, warmup)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # Kernels only.
  if config.name == 'adafactor':
    if sp.recipe.name == 'step':
      raise ValueError('The STEP recipe preconditions with Adam\'s second moment: use optimizer.name="adamw".')
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip) if config.clip else optax.identity(),
        optax.adafactor(learning_rate=schedule, decay_rate=config.get('decay_rate', 0.8),
                        clipping_threshold=1.0, multiply_by_parameter_scale=True,
                        weight_decay_rate=config.wd or None, weight_decay_mask=decay_mask),
    )
    logging.info('optimizer: Adafactor peak lr %.3g, warm-up %d steps, %s over %d steps',
                 schedule(warmup), warmup, config.schedule, total_steps)
    return tx, schedule
  tx = optax.chain(
      optax.clip_by_global_norm(config.clip) if config.clip else optax.identity(),
      sp.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.wd, mask=decay_mask) if config.wd else optax.identity(),
      optax.scale_by_learning_rate(schedule),
  )
  logging.info('optimizer: AdamW peak lr %.3g, warm-up %d steps, %s over %d steps', schedule(warmup),
               warmup, config.schedule, total_steps)
  return tx, schedule
