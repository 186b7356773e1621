"""Grain input pipelines for T5: span corruption over monolingual text, and seq2seq over text pairs.

The same design as the image pipeline (``experiments.data.pipeline``): a tfds
array_record source read by index, every random draw keyed by the example's position
in the global stream, so an iterator's whole state is its step and a resumed run
reads exactly what an uninterrupted one would.

* ``objective='span_corruption'`` (``nm_english_text`` offline; ``c4/en`` by name at
  scale): each example's text is tokenized, a random window of the raw length whose
  corrupted inputs fit ``inputs_length`` is cut from it (T5: 568 raw tokens for 512
  inputs and 114 targets), and span-corrupted with 15 % noise in spans of mean 3.
  One document a row, no packing: the model has no segment ids.
* ``objective='seq2seq'`` (``nm_bible_pairs``: KJV -> WEB): ``source_prefix + source``
  -> ``target``, each tokenized, truncated and ended with EOS. Eval batches carry the
  example ``index`` so that decoded outputs can be scored against ``reference(index)``.

Batches: ``{'inputs': int32[B, inputs_length], 'targets': int32[B, targets_length]}``
(padded with 0), eval adds a boolean ``'mask'`` (True once per real example) and
``'index'``. The vocabulary is a SentencePiece model with T5's ids; sentinels sit above
it (``vocab_pieces + num_extra_ids`` ids in all, which the model's vocabulary must hold).
Offline datasets are built, and the vocabulary trained, on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import grain
import ml_collections
import numpy as np
import sentencepiece as spm

from experiments.data import defaults
from experiments.data import pipeline as image_pipeline
from experiments.data.text import builders
from experiments.data.text import span_corruption as sc
from experiments.data.text import vocab as vocab_lib

Batch = dict[str, np.ndarray]
OFFLINE = (builders.TEXT_NAME, builders.PAIRS_NAME)
OBJECTIVES = ('span_corruption', 'seq2seq')
EOS_ID, PAD_ID = sc.EOS_ID, sc.PAD_ID


default_config = defaults.text


def _resolve(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
  cfg = image_pipeline.over_defaults(config, default_config(), 'text data')
  if cfg['objective'] not in OBJECTIVES:
    raise ValueError(f"data.objective={cfg['objective']!r}; choose one of {OBJECTIVES}.")
  if cfg['inputs_length'] < 4:
    raise ValueError(f"data.inputs_length={cfg['inputs_length']} is too short; use at least 4.")
  return cfg


def data_dir_of(data_dir: str | None) -> str:
  """The tfds data_dir: the given one, else TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def lengths(config: ml_collections.ConfigDict | dict[str, Any]) -> tuple[int, int]:
  """(inputs_length, targets_length) of the batches; for span corruption targets follow from inputs."""
  cfg = _resolve(config)
  if cfg['targets_length']:
    return cfg['inputs_length'], cfg['targets_length']
  if cfg['objective'] == 'span_corruption':
    return cfg['inputs_length'], sc.tokens_length_for(
        cfg['inputs_length'], cfg['noise_density'], cfg['mean_span_length'])[1]
  return cfg['inputs_length'], cfg['inputs_length']


def load_vocab(config: ml_collections.ConfigDict | dict[str, Any]) -> spm.SentencePieceProcessor:
  """The SentencePiece model of ``config``; for offline data, builds the data and trains it if missing."""
  cfg = _resolve(config)
  data_dir = data_dir_of(cfg['data_dir'])
  path = cfg['vocab']
  if path is None:
    if cfg['name'] not in OFFLINE:
      raise ValueError(f"data.vocab is not set for {cfg['name']!r}: name a SentencePiece model with "
                       "T5's ids (pad 0, eos 1, unk 2), e.g. the public T5 one "
                       '(cc_all.32000/sentencepiece.model) copied next to the data.')
    path = vocab_lib.default_model_path(data_dir)
    if not os.path.isfile(path):
      builders.prepare(data_dir, cfg['source_dir'], names=(builders.TEXT_NAME,))
      vocab_lib.train_vocab(vocab_lib.training_texts(data_dir), path, vocab_size=cfg['vocab_pieces'])
  return vocab_lib.load_vocab(path)


def padded_vocab_size(config: ml_collections.ConfigDict | dict[str, Any], pieces: int) -> int:
  """Ids the model needs: the vocabulary's pieces and the sentinels, rounded up to a multiple of 128."""
  return int(math.ceil((pieces + _resolve(config)['num_extra_ids']) / 128) * 128)


def open_source(name: str, *, split: str, data_dir: str, source_dir: str | None):
  """A random-access source of ``name``'s ``split``; offline datasets are built on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name in OFFLINE:
    builders.prepare(data_dir, source_dir, names=(name,))
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError,
          AssertionError, ValueError) as e:
    raise FileNotFoundError(
        f'Dataset {name!r} (split {split!r}) is not prepared in array_record format under {data_dir}. '
        'Prepare it on a machine with network access and TensorFlow (`tfds build '
        f'{name} --file_format=array_record --data_dir=DIR`), copy it here and set '
        'config.data.data_dir.') from e


@dataclasses.dataclass(frozen=True)
class TextInput:
  """A text split ready to iterate (the interface of ``experiments.data.pipeline.Input``)."""
  num_examples: int
  steps_per_epoch: int
  global_batch_size: int
  per_host_batch_size: int
  inputs_length: int
  targets_length: int
  vocab: spm.SentencePieceProcessor = dataclasses.field(repr=False)
  source: Any = dataclasses.field(repr=False)
  target_key: str = dataclasses.field(repr=False)
  make_dataset: Any = dataclasses.field(repr=False)
  fingerprint: dict[str, Any] = dataclasses.field(repr=False)

  def iterator(self, start_step: int = 0) -> image_pipeline.InputIterator:
    return image_pipeline.InputIterator(self.make_dataset, start_step, self.fingerprint)

  def reference(self, index: int) -> str:
    """The target text of example ``index`` (seq2seq), the reference for BLEU and exact match."""
    return _text(self.source[int(index)][self.target_key])

  def decode(self, ids: np.ndarray) -> str:
    """Token ids (up to the first EOS) as text."""
    ids = [int(t) for t in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self.vocab.decode([t for t in ids if t != PAD_ID and t < self.vocab.get_piece_size()])


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _read(source, indices) -> list[dict[str, Any]]:
  return image_pipeline._read(source, np.asarray(indices))  # pylint: disable=protected-access


def _span_example(text: str, rng: np.random.Generator, *, vocab, raw_length: int, total_ids: int,
                  cfg: dict[str, Any], lengths_: tuple[int, int]) -> dict[str, np.ndarray]:
  ids = vocab.encode(text)
  if len(ids) < 2:  # Nothing to corrupt: an all-padding row, weight 0 in the loss.
    return {'inputs': np.zeros(lengths_[0], np.int32), 'targets': np.zeros(lengths_[1], np.int32)}
  if len(ids) > raw_length:
    start = int(rng.integers(0, len(ids) - raw_length + 1))
    ids = ids[start:start + raw_length]
  ex = sc.span_corrupt(ids, total_ids, rng, cfg['noise_density'], cfg['mean_span_length'],
                       cfg['num_extra_ids'])
  return {'inputs': sc.pad_or_truncate(ex['inputs'], lengths_[0]),
          'targets': sc.pad_or_truncate(ex['targets'], lengths_[1])}


def _pair_example(example: dict[str, Any], *, vocab, cfg: dict[str, Any],
                  lengths_: tuple[int, int]) -> dict[str, np.ndarray]:
  out = {}
  for key, text, length in (('inputs', cfg['source_prefix'] + _text(example[cfg['source_key']]), lengths_[0]),
                            ('targets', _text(example[cfg['target_key']]), lengths_[1])):
    ids = vocab.encode(text)[:length - 1] + [EOS_ID]
    out[key] = sc.pad_or_truncate(ids, length)
  return out


def _example_fn(cfg, vocab, lengths_):
  if cfg['objective'] == 'seq2seq':
    return lambda example, rng: _pair_example(example, vocab=vocab, cfg=cfg, lengths_=lengths_)
  raw_length, _ = sc.tokens_length_for(lengths_[0], cfg['noise_density'], cfg['mean_span_length'])
  total_ids = vocab.get_piece_size() + cfg['num_extra_ids']
  return lambda example, rng: _span_example(
      _text(example[cfg['text_key']]), rng, vocab=vocab, raw_length=raw_length, total_ids=total_ids,
      cfg=cfg, lengths_=lengths_)


def _train_batch(positions_and_indices, *, source, example_fn, seed: int) -> Batch:
  positions, indices = positions_and_indices
  examples = [example_fn(ex, np.random.default_rng((seed, 0, int(p))))
              for p, ex in zip(positions, _read(source, indices))]
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _eval_batch(positions: np.ndarray, *, source, example_fn, num_examples: int, seed: int) -> Batch:
  indices = positions % num_examples
  examples = [example_fn(ex, np.random.default_rng((seed, 2, int(i))))
              for i, ex in zip(indices, _read(source, indices))]
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  return {**batch, 'mask': positions < num_examples, 'index': indices.astype(np.int32)}


def make_input(config: ml_collections.ConfigDict | dict[str, Any], *, split: str, global_batch_size: int,
               train: bool, seed: int, process_index: int = 0, process_count: int = 1,
               model_vocab_size: int | None = None) -> TextInput:
  """The input of ``split`` for host ``process_index`` of ``process_count``.

  ``model_vocab_size``, if given, is checked to hold the vocabulary and its sentinels.
  """
  cfg = _resolve(config)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be positive and divisible by '
                     f'process_count {process_count}.')
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}.')
  data_dir = data_dir_of(cfg['data_dir'])
  vocab = load_vocab(cfg)
  needed = vocab.get_piece_size() + cfg['num_extra_ids']
  if model_vocab_size is not None and model_vocab_size < needed:
    raise ValueError(f'model.vocab_size={model_vocab_size} cannot hold the {vocab.get_piece_size()} '
                     f"pieces of the vocabulary and its {cfg['num_extra_ids']} sentinels; set "
                     f'model.vocab_size to at least {needed} (e.g. {padded_vocab_size(cfg, vocab.get_piece_size())}).')
  source = open_source(cfg['name'], split=split, data_dir=data_dir, source_dir=cfg['source_dir'])
  num_examples = len(source)
  lengths_ = lengths(cfg)
  example_fn = _example_fn(cfg, vocab, lengths_)
  per_host = global_batch_size // process_count
  if train:
    if num_examples < global_batch_size:
      raise ValueError(f'{split} has {num_examples} examples, fewer than one global batch ({global_batch_size}).')
    steps_per_epoch = num_examples // global_batch_size
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat()
    ds = ds.map_with_index(image_pipeline._with_position).batch(per_host, drop_remainder=True)  # pylint: disable=protected-access
    ds = ds.map(functools.partial(_train_batch, source=source, example_fn=example_fn, seed=seed))
  else:
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    ds = grain.MapDataset.range(steps_per_epoch * global_batch_size).batch(per_host)
    ds = ds.map(functools.partial(_eval_batch, source=source, example_fn=example_fn,
                                  num_examples=num_examples, seed=seed))
  ds = ds.slice(slice(process_index, None, process_count))
  read_options = grain.ReadOptions(num_threads=cfg['num_threads'], prefetch_buffer_size=cfg['prefetch_batches'])

  def make_dataset(start_step: int) -> grain.IterDataset:
    return ds.slice(slice(start_step, None)).to_iter_dataset(read_options)

  fingerprint = dict(name=cfg['name'], objective=cfg['objective'], split=split, train=train, seed=seed,
                     num_examples=num_examples, global_batch_size=global_batch_size,
                     lengths=list(lengths_), vocab_pieces=vocab.get_piece_size())
  return TextInput(num_examples=num_examples, steps_per_epoch=steps_per_epoch,
                   global_batch_size=global_batch_size, per_host_batch_size=per_host,
                   inputs_length=lengths_[0], targets_length=lengths_[1], vocab=vocab, source=source,
                   target_key=cfg['target_key'], make_dataset=make_dataset, fingerprint=fingerprint)
