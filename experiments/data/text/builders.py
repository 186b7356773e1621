"""Project tfds builders (array_record, no TensorFlow) for the offline text data.

* ``nm_bible_pairs``: KJV -> WEB verse pairs (``source``, ``target``, ``ref``), split
  train/validation/test 98/1/1 % by a hash of the verse reference (stable across rebuilds).
* ``nm_english_text``: monolingual English for span-corruption pretraining, ``text`` only: KJV and WEB
  verses grouped, within a chapter, into paragraphs of about 512-1000 characters. ``train`` uses only
  verses of the pairs' train split, ``validation`` only verses of its validation and test splits, so
  pretraining never sees held-out translation targets.

Build both (after ``apt-get install -y bible-kjv sword-text-web diatheke``) with
``python -m experiments.data.text.builders --data_dir=DIR`` or ``prepare(DIR)``; read with
``tfds.data_source('nm_bible_pairs', split='train', data_dir=DIR)``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence

import tensorflow_datasets as tfds

from experiments.data.defaults import PAIRS_NAME, TEXT_NAME
from experiments.data.text import bible

SOURCE_SUBDIR = 'bible_raw'  # Under data_dir: the cached raw exports (kjv.txt, web.txt).
PAIR_SPLITS = {'train': 98, 'validation': 1, 'test': 1}  # Percent.
MIN_PARAGRAPH_CHARS, MAX_PARAGRAPH_CHARS = 512, 1000
HOW_TO_GET = (f'{bible.KJV_HOW_TO_GET} {bible.WEB_HOW_TO_GET} Then run '
              '`python -m experiments.data.text.builders --data_dir=DATA_DIR`.')


def split_of(ref: bible.Ref) -> str:
  """The pairs split of a verse: a deterministic hash of its reference string, bucketed by PAIR_SPLITS."""
  bucket = int.from_bytes(hashlib.sha256(bible.ref_string(ref).encode()).digest()[:8], 'little') % 100
  for split, percent in PAIR_SPLITS.items():
    if bucket < percent:
      return split
    bucket -= percent
  raise AssertionError('PAIR_SPLITS must sum to 100.')


def paragraphs(verses: Sequence[tuple[bible.Ref, str]], min_chars: int = MIN_PARAGRAPH_CHARS,
               max_chars: int = MAX_PARAGRAPH_CHARS) -> list[str]:
  """Consecutive verses (in order) joined with spaces into paragraphs, never across a chapter.

  A paragraph closes once it has ``min_chars`` characters, or before a verse that would take it past
  ``max_chars``; a chapter's short tail becomes a paragraph of its own.
  """
  out: list[str] = []
  current: list[str] = []
  size, chapter = 0, None
  for ref, text in verses:
    if not text:
      continue
    if current and (ref[:2] != chapter or size + 1 + len(text) > max_chars):
      out.append(' '.join(current))
      current, size = [], 0
    chapter = ref[:2]
    current.append(text)
    size += len(text) + (1 if size else 0)
    if size >= min_chars:
      out.append(' '.join(current))
      current, size = [], 0
  if current:
    out.append(' '.join(current))
  return out


def _download_config() -> tfds.download.DownloadConfig:
  return tfds.download.DownloadConfig(try_download_gcs=False,  # No network, never a hosted copy.
                                      compute_stats=tfds.download.ComputeStatsMode.SKIP)


class _BibleBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared: reads the aligned pairs from the raw exports in ``source_dir``."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self._source_dir = None if source_dir is None else os.fspath(source_dir)
    super().__init__(**kwargs)

  def _pairs(self) -> list[tuple[bible.Ref, str, str]]:
    if self._source_dir is None:
      raise ValueError(f'{self.name}: pass source_dir= (the folder of kjv.txt/web.txt) to build it.')
    return bible.load_pairs(self._source_dir)


class NmBiblePairs(_BibleBuilder):
  """King James Bible -> World English Bible, verse by verse (both public domain)."""

  name = PAIRS_NAME
  RELEASE_NOTES = {'1.0.0': 'KJV (Debian bible-kjv) aligned with WEB (Debian sword-text-web).'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Archaic (KJV) to modern (WEB) English, aligned by book, chapter and verse.',
        features=tfds.features.FeaturesDict({
            'source': tfds.features.Text(),
            'target': tfds.features.Text(),
            'ref': tfds.features.Text(),
        }),
        supervised_keys=('source', 'target'),
        homepage='https://ebible.org/web/',
        disable_shuffling=True,  # Canonical order; the input pipeline shuffles.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    pairs = self._pairs()
    return {split: self._generate_examples(pairs, split) for split in PAIR_SPLITS}

  def _generate_examples(self, pairs, split: str) -> Iterator[tuple[str, dict[str, str]]]:
    for ref, kjv, web in pairs:
      if split_of(ref) == split:
        key = bible.ref_string(ref)
        yield key, {'source': kjv, 'target': web, 'ref': key}


class NmEnglishText(_BibleBuilder):
  """KJV and WEB as paragraphs of English for self-supervised pretraining."""

  name = TEXT_NAME
  RELEASE_NOTES = {'1.0.0': 'KJV + WEB verses grouped into ~512-1000 character paragraphs.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='English paragraphs (KJV and WEB) of about 512-1000 characters.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://ebible.org/web/',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = self._pairs()
    return {'train': self._generate_examples(pairs, lambda s: s == 'train'),
            'validation': self._generate_examples(pairs, lambda s: s != 'train')}

  def _generate_examples(self, pairs, keep: Callable[[str], bool]) -> Iterator[tuple[int, dict[str, str]]]:
    kept = [(ref, kjv, web) for ref, kjv, web in pairs if keep(split_of(ref))]
    texts = (paragraphs([(ref, kjv) for ref, kjv, _ in kept])
             + paragraphs([(ref, web) for ref, _, web in kept]))
    for i, text in enumerate(texts):
      yield i, {'text': text}


BUILDERS = {PAIRS_NAME: NmBiblePairs, TEXT_NAME: NmEnglishText}


def default_source_dir(data_dir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(data_dir), SOURCE_SUBDIR)


def prepare(data_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
            names: Sequence[str] = (PAIRS_NAME, TEXT_NAME)) -> dict[str, tfds.core.DatasetBuilder]:
  """Builds the named datasets into ``data_dir`` unless there already; returns their builders.

  ``source_dir`` holds (or receives) the raw ``kjv.txt``/``web.txt`` exports; default
  ``DATA_DIR/bible_raw``. Missing Debian packages raise FileNotFoundError with the apt-get command.
  """
  data_dir = os.fspath(data_dir)
  source_dir = default_source_dir(data_dir) if source_dir is None else os.fspath(source_dir)
  out = {}
  for name in names:
    cls = BUILDERS[name]
    builder = cls(data_dir=data_dir, source_dir=source_dir)
    if not builder.is_prepared():
      try:
        bible.raw_texts(source_dir)  # Fails fast, naming the packages, before tfds starts writing.
      except FileNotFoundError as e:
        raise FileNotFoundError(f'{name}: {e} {HOW_TO_GET}') from e
      try:
        builder.download_and_prepare(download_config=_download_config())
      except FileExistsError:  # Another process finished the same build first: use it.
        builder = cls(data_dir=data_dir, source_dir=source_dir)
        if not builder.is_prepared():
          raise
    out[name] = builder
  return out


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  for name, builder in prepare(flags.FLAGS.data_dir, flags.FLAGS.source_dir).items():
    sizes = {split: len(tfds.data_source(name, split=split, data_dir=flags.FLAGS.data_dir, download=False))
             for split in builder.info.splits}
    print(f'{name} prepared in {builder.data_dir}: {sizes}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('data_dir', None, 'tfds data_dir to build into.', required=True)
  flags.DEFINE_string('source_dir', None, 'Folder of the raw kjv.txt/web.txt exports (default DATA_DIR/bible_raw).')
  app.run(main)
