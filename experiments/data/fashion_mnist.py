"""Fashion-MNIST as a project tfds builder (``nm_fashion_mnist``), built offline from idx files.

The idx files come from the Debian package ``dataset-fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``). They differ by a gzip header
from the ones tfds registers, so tfds's own ``fashion_mnist`` cannot use them.
The builder writes array_record with ``Tensor``/``ClassLabel`` features only, so
it needs no TensorFlow, and ``tfds.data_source`` reads it with random access.
Build it with ``python -m experiments.data.prepare --dataset=fashion_mnist --data_dir=DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import idx

NAME = 'nm_fashion_mnist'
DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
HOW_TO_GET = (
    'Install the idx files with `apt-get install -y dataset-fashion-mnist` (as root; they land in '
    f'{DEFAULT_SOURCE_DIR}), or `apt-get download dataset-fashion-mnist && '
    'dpkg -x dataset-fashion-mnist_*.deb DIR` '
    'and pass --source_dir=DIR/usr/share/datasets/fashion-mnist; then run '
    '`python -m experiments.data.prepare --dataset=fashion_mnist --data_dir=DATA_DIR`.')


def source_path(source_dir: str | os.PathLike, stem: str) -> str:
  """The idx file ``stem`` in ``source_dir``, gzipped (``stem.gz``) or not."""
  for name in (stem + '.gz', stem):
    path = os.path.join(source_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f'Fashion-MNIST idx file {stem}[.gz] not found in {source_dir}. {HOW_TO_GET}')


def missing_files(source_dir: str | os.PathLike) -> list[str]:
  """The idx files (of the four) that ``source_dir`` lacks."""
  stems = [stem for pair in FILES.values() for stem in pair]
  return [stem + '[.gz]' for stem in stems
          if not any(os.path.isfile(os.path.join(source_dir, stem + ext)) for ext in ('.gz', ''))]


def load_split(source_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images ``uint8[N, 28, 28, 1]`` and labels ``uint8[N]`` of ``split`` from the idx files."""
  image_file, label_file = (source_path(source_dir, stem) for stem in FILES[split])
  images, labels = idx.read_idx(image_file), idx.read_idx(label_file)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
    raise idx.IdxFormatError(
        f'{image_file}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}.')
  if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise idx.IdxFormatError(
        f'{label_file}: expected uint8 labels of shape ({images.shape[0]},) to match {image_file}, '
        f'got {labels.dtype} {labels.shape}.')
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise idx.IdxFormatError(
        f'{label_file}: label {labels.max()} is not a class in 0..{len(CLASS_NAMES) - 1}.')
  return images[..., None], labels


class NmFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando, MIT licence) read from local idx files."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Fashion-MNIST from the idx files of Debian dataset-fashion-mnist.'}

  def __init__(self, *, source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self._source_dir = os.fspath(source_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST: 28x28 grey images of 10 kinds of clothing.',
        features=tfds.features.FeaturesDict({
            # Raw bytes: 10x faster to write than an int64 list, and read back by numpy alone.
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding='bytes'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        disable_shuffling=True,  # Keep the idx order; the input pipeline shuffles.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in FILES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    images, labels = load_split(self._source_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}


def prepare(data_dir: str | os.PathLike | None,
            source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR) -> NmFashionMnist:
  """Builds ``nm_fashion_mnist`` into ``data_dir`` unless it is there already (5-15 s).

  Safe when several hosts build into one ``data_dir`` at once: the first finished build is used.
  """
  builder = NmFashionMnist(data_dir=data_dir, source_dir=source_dir)
  if builder.is_prepared():
    return builder
  missing = missing_files(source_dir)
  if missing:
    raise FileNotFoundError(f'Fashion-MNIST idx files {missing} not found in {source_dir}. {HOW_TO_GET}')
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False,  # No network; and never look for a hosted copy.
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    ))
  except FileExistsError:
    # Another process (another host of this job) finished the same build first: use its build.
    builder = NmFashionMnist(data_dir=data_dir, source_dir=source_dir)
    if not builder.is_prepared():
      raise
  return builder
