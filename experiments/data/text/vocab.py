r"""A SentencePiece unigram vocabulary with T5's conventions, trained offline on the prepared English text.

T5 ids: pad=0, eos=1, unk=2, no bos; span-corruption sentinels are taken from the top of the vocabulary
(see ``span_corruption``). The public T5 vocabulary is fetched from a bucket, so offline the project
trains its own (8k pieces on the ~8 M characters of KJV + WEB in a few seconds):

  python -m experiments.data.text.vocab --data_dir=DATA_DIR --vocab_size=8000

reads the ``train`` split of ``nm_english_text`` (KJV + WEB paragraphs, no held-out verse) and writes ``DATA_DIR/nm_text_vocab/spm.model``; ``load_vocab(path)`` opens it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VOCAB_SUBDIR, MODEL_FILE = 'nm_text_vocab', 'spm.model'


def default_model_path(data_dir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(data_dir), VOCAB_SUBDIR, MODEL_FILE)


def train_vocab(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int = 8000,
                character_coverage: float = 1.0, seed_sentencepiece_size: int = 1_000_000,
                max_sentence_length: int = 8192) -> str:
  """Trains a unigram model on ``texts`` (one sentence/paragraph each) and writes it to ``model_path``."""
  model_path = os.fspath(model_path)
  os.makedirs(os.path.dirname(model_path) or '.', exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(t for t in texts if t),
      model_writer=model,
      model_type='unigram',
      vocab_size=vocab_size,
      character_coverage=character_coverage,
      seed_sentencepiece_size=seed_sentencepiece_size,
      max_sentence_length=max_sentence_length,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>',
      input_sentence_size=0, shuffle_input_sentence=False,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  tmp = f'{model_path}.tmp.{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  return model_path


def load_vocab(path: str | os.PathLike) -> spm.SentencePieceProcessor:
  """The SentencePiece model at ``path`` (checked to follow T5's pad/eos/unk ids)."""
  path = os.fspath(path)
  if '://' in path:  # gs://... and other remote paths, through etils (a tfds dependency).
    from etils import epath  # pylint: disable=g-import-not-at-top
    remote = epath.Path(path)
    if not remote.exists():
      raise FileNotFoundError(f'No SentencePiece model at {path}.')
    sp = spm.SentencePieceProcessor(model_proto=remote.read_bytes())
  elif not os.path.isfile(path):
    raise FileNotFoundError(f'No SentencePiece model at {path}; train one with '
                            '`python -m experiments.data.text.vocab --data_dir=DATA_DIR`.')
  else:
    sp = spm.SentencePieceProcessor(model_file=path)
  got = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
  if got != (PAD_ID, EOS_ID, UNK_ID, -1):
    raise ValueError(f'{path}: (pad, eos, unk, bos) ids are {got}, not T5\'s (0, 1, 2, -1).')
  return sp


def training_texts(data_dir: str | os.PathLike) -> list[str]:
  """The train split of nm_english_text (must be prepared) as strings."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from experiments.data.text import builders  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(builders.TEXT_NAME, split='train', data_dir=os.fspath(data_dir), download=False)
  except KeyError as e:  # tfds: "splits is empty": the dataset was never prepared in data_dir.
    raise FileNotFoundError(f'{builders.TEXT_NAME} is not prepared in {data_dir} ({e}). '
                            f'{builders.HOW_TO_GET}') from e
  return [source[i]['text'].decode('utf-8') for i in range(len(source))]


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  data_dir = flags.FLAGS.data_dir
  path = flags.FLAGS.output or default_model_path(data_dir)
  texts = training_texts(data_dir)
  train_vocab(texts, path, vocab_size=flags.FLAGS.vocab_size)
  sp = load_vocab(path)
  print(f'Trained a {sp.get_piece_size()}-piece vocabulary on {len(texts)} paragraphs: {path}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('data_dir', None, 'tfds data_dir where nm_english_text is prepared.', required=True)
  flags.DEFINE_integer('vocab_size', 8000, 'Number of pieces (including pad/eos/unk).')
  flags.DEFINE_string('output', None, 'Model path (default DATA_DIR/nm_text_vocab/spm.model).')
  app.run(main)
