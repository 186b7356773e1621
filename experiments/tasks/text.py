"""T5 tasks: span-corruption pretraining and sequence-to-sequence fine-tuning (BLEU, exact match).

Both train with token cross-entropy on the targets (padding weighted 0) plus T5's
z-loss ``config.z_loss * log(Z)^2``; metrics are loss, token accuracy and perplexity.
``seq2seq`` also decodes the eval split greedily (a jitted ``lax.while_loop``) and
scores the text against the references with sacrebleu's corpus BLEU and exact match.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import models
from experiments import train as train_lib
from experiments import state as state_lib
from experiments.data.text import pipeline
from experiments.tasks import Task

# Every T5 kernel is 2-D (in, out): N:M groups along axis -2 for MLP, q/k/v and o alike.
PRESET_KWARGS = dict(mlp_axes=(-2,), qkv_axes=(-2,), out_axes=(-2,))


def build_model(config: ml_collections.ConfigDict):
  m = config.model
  if m.name != 't5':
    raise ValueError(f'model.name={m.name!r}; the text tasks train t5.')
  kwargs = dict(m.get('kwargs', {}) or {})
  for key in ('dtype', 'param_dtype'):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return models.make_t5(m.variant, vocab_size=m.vocab_size, dropout_rate=m.dropout_rate, **kwargs)


def make_input(config, *, split, train, global_batch_size, seed, process_index=0, process_count=1):
  return pipeline.make_input(config.data, split=split, train=train, global_batch_size=global_batch_size,
                             seed=seed, process_index=process_index, process_count=process_count,
                             model_vocab_size=config.model.vocab_size)


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict:
  inputs_length, targets_length = pipeline.lengths(config.data)
  return {'inputs': np.zeros((batch_size, inputs_length), np.int32),
          'targets': np.zeros((batch_size, targets_length), np.int32)}


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder inputs: BOS (0) then the targets without their last token."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


def init(model, rng, batch):
  return model.init({'params': rng}, batch['inputs'], shift_right(batch['targets']), train=False)['params']


def loss_fn(model, params, batch, rng, train: bool, config: ml_collections.ConfigDict):
  """Mean token cross-entropy (+ z-loss) over real target tokens; sums of loss and correct tokens."""
  targets = batch['targets']
  real = targets > 0
  logits = model.apply({'params': params}, batch['inputs'], shift_right(targets), train=train,
                       decoder_target_mask=real, rngs={'dropout': rng}).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  xent = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weight = real.astype(jnp.float32)
  if 'mask' in batch:
    weight = weight * batch['mask'][:, None].astype(jnp.float32)
  count = weight.sum()
  z_loss = config.get('z_loss', 0.0) * jnp.square(log_z)
  mean_loss = ((xent + z_loss) * weight).sum() / jnp.maximum(count, 1.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return mean_loss, {'loss': (xent * weight).sum(), 'accuracy': (correct * weight).sum()}, count


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
  """Perplexity from the mean token cross-entropy."""
  if 'loss' in metrics:
    return {**metrics, 'perplexity': math.exp(min(metrics['loss'], 50.0))}
  return metrics


def decode_metrics(s, params, eval_input, *, num_samples: int = 3) -> dict[str, float]:
  """Greedy-decodes the eval split with ``params``; corpus BLEU (sacrebleu) and exact match in %."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sharding = state_lib.batch_sharding(s.mesh)
  max_len = eval_input.targets_length
  hyps, refs = [], []
  for batch in train_lib.eval_batches(s, eval_input):
    tokens = models.greedy_decode(s.model, params, state_lib.global_batch(
        {'inputs': batch['inputs']}, sharding)['inputs'], max_len=max_len)
    local = {'mask': batch['mask'], 'index': batch['index']}
    if jax.process_count() > 1:
      tokens = multihost_utils.process_allgather(tokens, tiled=True)
      local = multihost_utils.process_allgather(local, tiled=True)
    else:
      tokens = jax.device_get(tokens)
    for row, keep, index in zip(np.asarray(tokens), np.asarray(local['mask']), np.asarray(local['index'])):
      if keep:
        hyps.append(eval_input.decode(row))
        refs.append(eval_input.reference(index))
  if not hyps:
    return {}
  bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
  exact = 100.0 * float(np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs)]))
  for h, r in list(zip(hyps, refs))[:num_samples]:
    logging.info('decoded: %r\n    reference: %r', h, r)
  return {'bleu': bleu, 'exact_match': exact}


SPAN_CORRUPTION = Task(name='span_corruption', build_model=build_model, make_input=make_input,
                       dummy_batch=dummy_batch, init=init, loss_fn=loss_fn, preset_kwargs=PRESET_KWARGS,
                       eval_metric='accuracy', count_unit='tokens', derived_metrics=derived_metrics)
SEQ2SEQ = Task(name='seq2seq', build_model=build_model, make_input=make_input, dummy_batch=dummy_batch,
               init=init, loss_fn=loss_fn, preset_kwargs=PRESET_KWARGS, eval_metric='bleu', count_unit='tokens',
               derived_metrics=derived_metrics, decode_metrics=decode_metrics)
