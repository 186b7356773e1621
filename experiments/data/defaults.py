"""The data fields of a config and their defaults: plain data, importable by configs.

Kept apart from the pipelines so that a config file pulls in none of grain, tfds or Orbax.
"""

from __future__ import annotations

from typing import Any

import ml_collections

TEXT_NAME = 'nm_english_text'  # The offline English paragraphs (experiments/data/text/builders.py).
PAIRS_NAME = 'nm_bible_pairs'  # The offline KJV -> WEB verse pairs.
NUM_EXTRA_IDS = 100  # T5's sentinel ids above the vocabulary.

_str = lambda: ml_collections.FieldReference(None, field_type=str)
_int = lambda: ml_collections.FieldReference(None, field_type=int)


def image(**overrides: Any) -> ml_collections.ConfigDict:
  """The image data fields that ``pipeline.make_input`` reads (default: the offline Fashion-MNIST)."""
  config = ml_collections.ConfigDict(dict(
      name='nm_fashion_mnist',  # Or 'mnist', 'cifar10', 'imagenet2012'.
      data_dir=_str(),  # tfds data_dir; None: TFDS_DATA_DIR or ~/tensorflow_datasets.
      source_dir=_str(),  # Folder of the nm_fashion_mnist idx files; None: the Debian package's.
      image_size=_int(),  # None: the dataset's native size.
      crop='resize',  # 'resize' | 'inception' | 'pad' (see preprocess.ExamplePreprocess).
      flip=False,
      randaugment_layers=0,  # 0: no RandAugment.
      randaugment_magnitude=10.0,
      mixup_alpha=0.0,  # 0: no mixup; else train batches gain 'soft_label'.
      normalize='minus_one_one',  # Or 'imagenet'.
      num_threads=4,  # Threads that each build whole batches.
      prefetch_batches=4,
  ))
  config.update(overrides)
  return config


def text(**overrides: Any) -> ml_collections.ConfigDict:
  """The text data fields that ``text.pipeline.make_input`` reads (default: offline span corruption)."""
  config = ml_collections.ConfigDict(dict(
      name=TEXT_NAME,  # Or PAIRS_NAME, 'c4/en:3.1.0' (prepared as array_record).
      objective='span_corruption',  # Or 'seq2seq'.
      data_dir=_str(),  # None: TFDS_DATA_DIR or ~/tensorflow_datasets.
      source_dir=_str(),  # Raw KJV/WEB exports (offline data).
      vocab=_str(),  # SentencePiece model; None: DATA_DIR/nm_text_vocab/spm.model, trained on first use.
      vocab_pieces=8000,  # Size of the vocabulary trained on first use.
      num_extra_ids=NUM_EXTRA_IDS,  # Sentinel ids above the vocabulary.
      inputs_length=128,
      targets_length=_int(),  # None: from inputs_length.
      noise_density=0.15,
      mean_span_length=3.0,
      text_key='text',
      source_key='source',
      target_key='target',
      source_prefix='',  # Prepended to every seq2seq source, e.g. 'modernize: '.
      num_threads=4,
      prefetch_batches=4,
  ))
  config.update(overrides)
  return config
