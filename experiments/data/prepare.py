r"""Prepares a dataset in array_record format for ``experiments.data.pipeline``.

Offline (the default data):
  apt-get install -y dataset-fashion-mnist
  python -m experiments.data.prepare --dataset=fashion_mnist --data_dir=$HOME/tensorflow_datasets

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

_DATASET = flags.DEFINE_enum(
    'dataset', 'fashion_mnist', ['fashion_mnist', fashion_mnist.NAME, 'mnist', 'cifar10', 'imagenet2012'],
    'Dataset to prepare; fashion_mnist is the offline project builder nm_fashion_mnist.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir to write into (default: TFDS_DATA_DIR or '
                                '~/tensorflow_datasets).')
_SOURCE_DIR = flags.DEFINE_string('source_dir', fashion_mnist.DEFAULT_SOURCE_DIR,
                                  'Folder of the Fashion-MNIST idx files (fashion_mnist only).')


def prepare_public(name: str, data_dir: str | None) -> None:
  """Downloads and prepares a tfds catalogue dataset as array_record (needs network and TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  print(f'{name} prepared in {builder.data_dir}.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name = ALIASES.get(_DATASET.value, _DATASET.value)
  if name == fashion_mnist.NAME:
    builder = fashion_mnist.prepare(_DATA_DIR.value, _SOURCE_DIR.value)
    splits = ', '.join(f'{s} {info.num_examples}' for s, info in builder.info.splits.items())
    print(f'{name} prepared in {builder.data_dir} ({splits}).')
  else:
    prepare_public(name, _DATA_DIR.value)


if __name__ == '__main__':
  app.run(main)
