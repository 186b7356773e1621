"""One grain input pipeline for the offline default (``nm_fashion_mnist``) and CIFAR-10/ImageNet at scale.

``tfds.data_source`` gives random access over array_record; grain shuffles,
maps and batches lazily by index. The pipeline is defined on the *global*
stream: the examples of global step ``s`` are positions ``[s * G, (s + 1) * G)``
of the shuffled, repeated dataset, and host ``i`` of ``n`` takes the ``i``-th
contiguous slice of ``G / n``. So a global batch does not depend on the number
of hosts, every per-example random draw is keyed by the global position, and an
iterator's whole state is its step: resuming at step ``s`` (even on another
number of hosts) yields exactly what an uninterrupted run yields from ``s``.
Mixup is the one exception to host-count independence: it mixes within a host's batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np
from array_record.python import array_record_data_source

from experiments.data import defaults
from experiments.data import mixup as mixup_lib
from experiments.data import preprocess
from experiments.data import sources

Batch = dict[str, np.ndarray]


default_config = defaults.image


def over_defaults(config: ml_collections.ConfigDict | dict[str, Any], defaults: ml_collections.ConfigDict,
                  what: str = 'data') -> dict[str, Any]:
  """``config`` over ``defaults`` as a dict; an unknown field (a typo) raises."""
  fields = defaults.to_dict()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ValueError(f'Unknown {what} config fields {unknown}; known: {sorted(fields)}.')
  return {**fields, **given}


def _resolve(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  return over_defaults(config, default_config())


class InputIterator:
  """Iterator over batches whose state is its step: ``get_state``/``set_state`` are JSON-serialisable."""

  def __init__(self, make: Callable[[int], grain.IterDataset], start_step: int, fingerprint: dict[str, Any]):
    self._make, self._fingerprint = make, fingerprint
    self._restart(start_step)

  def _restart(self, step: int) -> None:
    if step < 0:
      raise ValueError(f'start step must be >= 0, got {step}.')
    self._step = step
    self._iterator = iter(self._make(step))

  def __iter__(self) -> InputIterator:
    return self

  def __next__(self) -> Batch:
    batch = next(self._iterator)
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    """The number of batches consumed, counting from step 0 of the stream."""
    return self._step

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state['step']``; the stream it came from must match this one."""
    mismatched = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if mismatched:
      raise ValueError(f'Iterator state is from another input stream: (saved, this) = {mismatched}.')
    self._restart(int(state['step']))


@dataclasses.dataclass(frozen=True)
class Input:
  """A split ready to iterate; ``iterator(start_step)`` makes a fresh iterator at any step.

  Training iterators are infinite; eval iterators make one pass of
  ``steps_per_epoch`` batches whose boolean ``'mask'`` is True exactly once for each example.
  """
  num_examples: int  # In the whole split, over all hosts.
  steps_per_epoch: int  # Train: full global batches per epoch; eval: batches of the padded pass.
  global_batch_size: int
  per_host_batch_size: int
  num_classes: int
  image_shape: tuple[int, int, int]
  make_dataset: Callable[[int], grain.IterDataset] = dataclasses.field(repr=False)
  fingerprint: dict[str, Any] = dataclasses.field(repr=False)

  def iterator(self, start_step: int = 0) -> InputIterator:
    return InputIterator(self.make_dataset, start_step, self.fingerprint)


def _example_rng(seed: int, position: int, stream: int = 0) -> np.random.Generator:
  """The generator of the example at ``position`` of the global stream (``stream`` 1: mixup)."""
  return np.random.default_rng((seed, stream, position))


def _read(source, indices: np.ndarray) -> list[dict[str, Any]]:
  """Examples ``indices`` of ``source``.

  A tfds source over array_record files is read in one batched call (3-4x faster
  than one call per example); any other source, such as the stand-in of
  ``tfds.testing.mock_data`` (whose batched read is broken), example by example.
  """
  indices = [int(i) for i in indices]
  if isinstance(getattr(source, 'data_source', None), array_record_data_source.ArrayRecordDataSource):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _with_position(position: int, index: int) -> tuple[int, int]:
  return position, index


def _stack(examples: list[dict[str, np.ndarray]]) -> Batch:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _train_batch(positions_and_indices: tuple[np.ndarray, np.ndarray], *, source,
                 example_fn: preprocess.ExamplePreprocess, seed: int) -> Batch:
  positions, indices = positions_and_indices
  examples = _read(source, indices)
  return _stack([example_fn(ex, _example_rng(seed, int(p)) if example_fn.uses_rng else None)
                 for p, ex in zip(positions, examples)])


def _eval_batch(positions: np.ndarray, *, source, example_fn: preprocess.ExamplePreprocess,
                num_examples: int) -> Batch:
  """Positions past the split repeat real examples with ``mask=False``."""
  batch = _stack([example_fn(ex, None) for ex in _read(source, positions % num_examples)])
  return {**batch, 'mask': positions < num_examples}


def _mixup(index: int, batch: Batch, *, seed: int, alpha: float, num_classes: int) -> Batch:
  return mixup_lib.mixup(batch, _example_rng(seed, index, stream=1), alpha=alpha, num_classes=num_classes)


def make_input(config: ml_collections.ConfigDict | dict[str, Any], *, split: str, global_batch_size: int,
               train: bool, seed: int, process_index: int = 0, process_count: int = 1) -> Input:
  """The input of ``split`` for host ``process_index`` of ``process_count``.

  Batches are ``{'image': float32 [B, S, S, C], 'label': int32 [B]}`` with
  ``B = global_batch_size / process_count``; eval adds ``'mask'``; train with
  mixup adds ``'soft_label'``. ``seed`` fixes the order and the augmentation.
  """
  cfg = _resolve(config)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be positive and divisible by '
                     f'process_count {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}.')
  spec = sources.spec(cfg['name'])
  image_size = cfg['image_size'] or spec.image_size
  if image_size is None:
    raise ValueError(f"{cfg['name']} images vary in size: set config.data.image_size.")
  source = sources.open_source(
      cfg['name'], split=split, data_dir=cfg['data_dir'], source_dir=cfg['source_dir'])
  num_examples = len(source)
  example_fn = preprocess.ExamplePreprocess(
      train=train, image_size=image_size, channels=spec.channels, crop=cfg['crop'], flip=cfg['flip'],
      randaugment_layers=cfg['randaugment_layers'], randaugment_magnitude=cfg['randaugment_magnitude'],
      normalize=cfg['normalize'])
  per_host = global_batch_size // process_count

  if train:
    if num_examples < global_batch_size:
      raise ValueError(
          f'{split} has {num_examples} examples, fewer than one global batch ({global_batch_size}).')
    steps_per_epoch = num_examples // global_batch_size
    # Example indices in a new order each epoch, paired with their position in the stream.
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
    ds = ds.map_with_index(_with_position).batch(per_host, drop_remainder=True)
    ds = ds.map(functools.partial(_train_batch, source=source, example_fn=example_fn, seed=seed))
    if cfg['mixup_alpha'] > 0:
      ds = ds.map_with_index(functools.partial(
          _mixup, seed=seed, alpha=cfg['mixup_alpha'], num_classes=spec.num_classes))
  else:
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    ds = grain.MapDataset.range(steps_per_epoch * global_batch_size).batch(per_host)
    ds = ds.map(functools.partial(
        _eval_batch, source=source, example_fn=example_fn, num_examples=num_examples))
  # Per-host batch k is the (k % n)-th slice of global step k // n: host i takes i, i + n, ...
  ds = ds.slice(slice(process_index, None, process_count))
  read_options = grain.ReadOptions(
      num_threads=cfg['num_threads'], prefetch_buffer_size=cfg['prefetch_batches'])

  def make_dataset(start_step: int) -> grain.IterDataset:
    return ds.slice(slice(start_step, None)).to_iter_dataset(read_options)

  # What fixes the examples of each step; a saved state must match it to be restored.
  fingerprint = dict(name=cfg['name'], split=split, train=train, seed=seed, num_examples=num_examples,
                     global_batch_size=global_batch_size)
  return Input(num_examples=num_examples, steps_per_epoch=steps_per_epoch,
               global_batch_size=global_batch_size, per_host_batch_size=per_host,
               num_classes=spec.num_classes, image_shape=(image_size, image_size, spec.channels),
               make_dataset=make_dataset, fingerprint=fingerprint)
