r"""Prepares a dataset in array_record format for ``experiments.data.pipeline``.

Offline (the default data):
  apt-get install -y dataset-fashion-mnist
  python -m experiments.data.prepare --dataset=fashion_mnist --data_dir=$HOME/tensorflow_datasets

Offline English for T5 (KJV and WEB; builds nm_bible_pairs and nm_english_text, then trains the
8k-piece SentencePiece vocabulary into DATA_DIR/nm_text_vocab/spm.model):
  apt-get install -y bible-kjv sword-text-web diatheke
  python -m experiments.data.prepare --dataset=text --data_dir=$HOME/tensorflow_datasets

At scale (``cifar10``, ``mnist``, ``imagenet2012``), on a machine with network
access and TensorFlow; copy ``DATA_DIR/NAME`` to the training machines after:
  python -m experiments.data.prepare --dataset=cifar10 --data_dir=DATA_DIR
imagenet2012 needs the ILSVRC2012 tars in ``DATA_DIR/downloads/manual`` first.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags

from experiments.data import fashion_mnist

ALIASES = {'fashion_mnist': fashion_mnist.NAME}
TEXT = ('text', 'nm_bible_pairs', 'nm_english_text')

_DATASET = flags.DEFINE_enum(
    'dataset', 'fashion_mnist',
    ['fashion_mnist', fashion_mnist.NAME, *TEXT, 'mnist', 'cifar10', 'imagenet2012', 'c4'],
    'Dataset to prepare; fashion_mnist is the offline project builder nm_fashion_mnist; text builds '
    'the offline KJV/WEB datasets and their SentencePiece vocabulary.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir to write into (default: TFDS_DATA_DIR or '
                                '~/tensorflow_datasets).')
_SOURCE_DIR = flags.DEFINE_string('source_dir', None,
                                  'Folder of the Fashion-MNIST idx files (default: the Debian package\'s) '
                                  'or of the raw kjv.txt/web.txt exports (default: DATA_DIR/bible_raw).')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 8000, 'SentencePiece pieces (text only).')


def prepare_public(name: str, data_dir: str | None) -> None:
  """Downloads and prepares a tfds catalogue dataset as array_record (needs network and TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name == 'c4':
    name = 'c4/en:3.1.0'
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  print(f'{name} prepared in {builder.data_dir}.')


def prepare_text(data_dir: str | None, source_dir: str | None, vocab_size: int) -> None:
  """Builds both offline text datasets and trains their vocabulary (unless already there)."""
  import os  # pylint: disable=g-import-not-at-top
  from experiments.data.text import builders  # pylint: disable=g-import-not-at-top
  from experiments.data.text import pipeline as text_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = text_pipeline.data_dir_of(data_dir)
  for name, builder in builders.prepare(data_dir, source_dir).items():
    splits = ', '.join(f'{s} {info.num_examples}' for s, info in builder.info.splits.items())
    print(f'{name} prepared in {builder.data_dir} ({splits}).')
  cfg = text_pipeline.default_config(data_dir=data_dir, source_dir=source_dir, vocab_pieces=vocab_size)
  vocab = text_pipeline.load_vocab(cfg)  # Trains it on first use.
  path = os.path.join(data_dir, 'nm_text_vocab', 'spm.model')
  print(f'SentencePiece vocabulary: {vocab.get_piece_size()} pieces in {path}.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name = ALIASES.get(_DATASET.value, _DATASET.value)
  if name in TEXT:
    prepare_text(_DATA_DIR.value, _SOURCE_DIR.value, _VOCAB_SIZE.value)
  elif name == fashion_mnist.NAME:
    builder = fashion_mnist.prepare(_DATA_DIR.value, _SOURCE_DIR.value or fashion_mnist.DEFAULT_SOURCE_DIR)
    splits = ', '.join(f'{s} {info.num_examples}' for s, info in builder.info.splits.items())
    print(f'{name} prepared in {builder.data_dir} ({splits}).')
  else:
    prepare_public(name, _DATA_DIR.value)


if __name__ == '__main__':
  app.run(main)
