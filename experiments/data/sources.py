"""The datasets the pipeline knows, and random-access sources over their prepared array_record files.

Every source comes from ``tfds.data_source(..., download=False)``: nothing is ever
downloaded, and a dataset that is not prepared fails at once with how to prepare it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from experiments.data import fashion_mnist


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know of a dataset before reading it."""
  num_classes: int
  image_size: int | None  # Native square size; None when images vary in size.
  channels: int
  train_split: str
  eval_split: str


SPECS = {
    fashion_mnist.NAME: DatasetSpec(10, 28, 1, 'train', 'test'),
    'mnist': DatasetSpec(10, 28, 1, 'train', 'test'),
    'cifar10': DatasetSpec(10, 32, 3, 'train', 'test'),
    'imagenet2012': DatasetSpec(1000, None, 3, 'train', 'validation'),
}

_HOW_TO_PREPARE = (
    'Prepare it in array_record format on a machine with network access and TensorFlow: '
    '`python -m experiments.data.prepare --dataset={name} --data_dir=DIR` (imagenet2012 also needs '
    'the ILSVRC2012 tars in DIR/downloads/manual), then copy DIR/{name} next to this run and set '
    'config.data.data_dir.')


def spec(name: str) -> DatasetSpec:
  """The spec of dataset ``name``; unknown names raise listing the known ones."""
  if name not in SPECS:
    raise ValueError(f'Unknown dataset {name!r}; known: {sorted(SPECS)}.')
  return SPECS[name]


def open_source(name: str, *, split: str, data_dir: str | os.PathLike | None,
                source_dir: str | os.PathLike | None = None) -> Sequence[dict[str, Any]]:
  """A random-access source of ``name``'s ``split`` (a tfds split string) under ``data_dir``.

  ``nm_fashion_mnist`` is built into ``data_dir`` on first use from the idx files
  in ``source_dir`` (default: the Debian package's folder).
  """
  spec(name)
  if name == fashion_mnist.NAME:
    fashion_mnist.prepare(data_dir, source_dir or fashion_mnist.DEFAULT_SOURCE_DIR)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError,
          AssertionError) as e:
    where = data_dir or 'the default tfds data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)'
    raise FileNotFoundError(
        f'Dataset {name!r} (split {split!r}) is not prepared in array_record format under {where}. '
        + _HOW_TO_PREPARE.format(name=name)) from e
