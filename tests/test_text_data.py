"""Offline text data: Bible parsing/cleaning/alignment, tfds builders, SentencePiece vocab, span corruption."""

import os
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.data.text import bible
from experiments.data.text import builders
from experiments.data.text import span_corruption as sc
from experiments.data.text import vocab

W = '<w savlm="strong:H{0:04d}">{1}</w>'


def web_words(text: str) -> str:
  """``text`` in the WEB module's markup: each word in a <w> element, some adjacent with no space."""
  words = text.split(' ')
  out = ''
  for i, word in enumerate(words):
    core = word.rstrip(',.;:!?')
    out += W.format(i, core) + word[len(core):]
    if i + 1 < len(words):
      out += '' if i % 5 == 2 and word == core else ' '  # The module drops some spaces between words.
  return out


# ---------------------------------------------------------------------------------------- parsing


KJV_SNIPPET = """\
Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void;
and darkness was upon the face of the deep.
Psa3:1 LORD, how are they increased that trouble me!
Psa3:2 Many there be which say of my soul,
Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.
Tob1:1 Not a KJV book.
"""

WEB_SNIPPET = (
    'Genesis 1:1: ' + W.format(430, 'In') + ' ' + W.format(853, 'the') + ' '
    + W.format(7225, 'beginning') + ', ' + W.format(430, 'God') + W.format(1254, 'created')
    + ' the heavens and the earth.\n'
    'Genesis 1:2: The earth was formless and empty. <div eID="gen25" type="x-p"/>\n'
    '<title canonical="true" type="psalm">A Psalm by David, when he fled from Absalom his son.</title> '
    '<lg sID="gen7860"/> <l level="1" sID="gen7861"/>Psalms 3:1: Yahweh, how my adversaries have '
    'increased!<l eID="gen7861" level="1"/> <l level="2" sID="gen7862"/>Many are those who rise up '
    'against me.<l eID="gen7862" level="2"/>\n'
    '<title canonical="true" type="psalm">A Psalm by David.</title> <lg sID="gen7860"/>'
    'Esther (Greek) 1:1: Not in the KJV.\n'
    '<title canonical="true" type="psalm">A Psalm by David.</title> <l level="1" sID="gen1"/>'
    'Song of Solomon 1:5: <lg eID="gen1"/> <speaker>Beloved</speaker> <lg sID="gen2"/>'
    '<q marker="">“I am dark, but lovely.”</q>\n'
    'I Samuel 3:4: Yahweh called Samuel.\n'
    'Revelation of John 22:21: The grace of the Lord Jesus Christ be with all the saints. Amen.  '
    '<chapter eID="Rev.22"/><div eID="gen35836" type="x-p"/> '
    '<div canonical="true" eID="gen35575" osisID="Rev" type="book"/> <div sID="gen35837" '
    'type="glossary"/> <list><item><seg type="keyword">Yahweh</seg> is God’s proper name.</item></list>\n'
    '(engWEB2015eb)\n')


def test_parse_kjv_continuation_lines_and_unknown_books():
  verses = bible.parse_kjv(KJV_SNIPPET)
  assert verses[('Gen', 1, 1)] == 'In the beginning God created the heaven and the earth.'
  assert verses[('Gen', 1, 2)] == ('And the earth was without form, and void; '
                                   'and darkness was upon the face of the deep.')
  assert verses[('Ps', 3, 1)].startswith('LORD, how')
  assert ('Rev', 22, 21) in verses
  assert len(verses) == 5  # Tobit is not in BOOKS.


def test_parse_web_strips_markup_titles_speakers_and_glossary():
  verses = bible.parse_web(WEB_SNIPPET)
  assert verses[('Gen', 1, 1)] == 'In the beginning, God created the heavens and the earth.'
  assert verses[('Gen', 1, 2)] == 'The earth was formless and empty.'
  assert verses[('Ps', 3, 1)] == 'Yahweh, how my adversaries have increased! Many are those who rise up against me.'
  assert verses[('Song', 1, 5)] == '“I am dark, but lovely.”'  # No speaker heading.
  assert verses[('1Sam', 3, 4)] == 'Yahweh called Samuel.'
  assert verses[('Rev', 22, 21)] == 'The grace of the Lord Jesus Christ be with all the saints. Amen.'
  assert len(verses) == 6  # Esther (Greek) is not in BOOKS.
  assert not any('<' in v or 'Psalm' in v or 'glossary' in v.lower() for v in verses.values())


def test_clean_web_verse_joins_adjacent_words():
  assert bible.clean_web_verse(web_words('God created the heavens and the earth, in the beginning.')) == (
      'God created the heavens and the earth, in the beginning.')
  assert bible.clean_web_verse('a &amp; b <lb type="x-p"/> c ,') == 'a & b c,'
  # Spaces the module drops around quotation elements and after punctuation.
  assert bible.clean_web_verse(
      '<w s="1">his</w> <w s="2">only</w> born</q><q marker=""><w s="3">Son</w>, <w s="4">east</w>,'
      '<w s="5">they</w>') == 'his only born Son, east, they'
  assert bible.clean_web_verse(
      '<q marker="">“I am the Omega,</q><q marker="">”</q><w s="6">says</w> the Lord God,<q marker="">“who is.”</q>'
      '<div eID="gen35580" type="x-p"/>') == '“I am the Omega,” says the Lord God, “who is.”'


def test_align_by_reference_skips_missing_and_empty_verses():
  kjv = {('Gen', 1, 1): 'k1', ('Gen', 1, 2): 'k2', ('Matt', 17, 21): 'k3', ('Exod', 1, 1): 'k4'}
  web = {('Gen', 1, 1): 'w1', ('Gen', 1, 2): 'w2', ('Matt', 17, 21): '', ('3John', 1, 15): 'w5',
         ('Exod', 1, 1): 'w4'}
  assert bible.align(kjv, web) == [(('Gen', 1, 1), 'k1', 'w1'), (('Gen', 1, 2), 'k2', 'w2'),
                                   (('Exod', 1, 1), 'k4', 'w4')]
  pairs = bible.align(bible.parse_kjv(KJV_SNIPPET), bible.parse_web(WEB_SNIPPET))
  assert [bible.ref_string(ref) for ref, _, _ in pairs] == ['Gen 1:1', 'Gen 1:2', 'Ps 3:1', 'Rev 22:21']


def test_raw_texts_uses_the_cache_and_names_apt_get_when_missing(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))  # No `bible`, no `diatheke`.
  with pytest.raises(FileNotFoundError, match='apt-get install -y bible-kjv'):
    bible.raw_texts(tmp_path)
  (tmp_path / bible.KJV_FILE).write_text(KJV_SNIPPET, encoding='utf-8')
  with pytest.raises(FileNotFoundError, match='apt-get install -y sword-text-web diatheke'):
    bible.raw_texts(tmp_path)
  (tmp_path / bible.WEB_FILE).write_text(WEB_SNIPPET, encoding='utf-8')
  assert bible.raw_texts(tmp_path) == (KJV_SNIPPET, WEB_SNIPPET)
  assert len(bible.load_pairs(tmp_path)) == 4


# ---------------------------------------------------------------------------------------- builders


def write_synthetic_source(folder, chapters: int = 20, verses: int = 40) -> list[tuple]:
  """Raw kjv.txt/web.txt in the command lines' formats; returns the expected aligned pairs."""
  rng = np.random.default_rng(0)
  words = 'light dark waters earth heaven spirit void deep form day night said made good'.split()
  kjv_lines, web_lines, expected = [], [], []
  for c in range(1, chapters + 1):
    book, abbrev, name = bible.BOOKS[c % 3]
    for v in range(1, verses + 1):
      k = ' '.join(rng.choice(words, rng.integers(5, 30))) + '.'
      w = ' '.join(rng.choice(words, rng.integers(5, 30))) + '.'
      kjv_lines.append(f'{abbrev}{c}:{v} {k}')
      prefix = '<title canonical="true" type="psalm">A Psalm.</title> <lg sID="x"/>' if v % 4 == 0 else ''
      web_lines.append(f'{prefix}{name} {c}:{v}: {web_words(w)}')
      expected.append(((book, c, v), k, w))
  web_lines.append(f'{bible.BOOKS[1][2]} 99:1: only in the WEB.')
  (folder / bible.KJV_FILE).write_text('\n'.join(kjv_lines) + '\n', encoding='utf-8')
  (folder / bible.WEB_FILE).write_text('\n'.join(web_lines) + '\n', encoding='utf-8')
  return sorted(expected, key=lambda p: bible.sort_key(p[0]))


@pytest.fixture(scope='module')
def synthetic_text(tmp_path_factory):
  source_dir = tmp_path_factory.mktemp('bible_raw')
  expected = write_synthetic_source(source_dir)
  data_dir = tmp_path_factory.mktemp('text_data')
  built = builders.prepare(data_dir, source_dir=source_dir)
  return str(data_dir), expected, built


def test_split_of_is_deterministic_and_roughly_98_1_1():
  refs = [('Gen', c, v) for c in range(1, 101) for v in range(1, 101)]
  splits = [builders.split_of(ref) for ref in refs]
  assert splits == [builders.split_of(ref) for ref in refs]
  counts = {s: splits.count(s) for s in builders.PAIR_SPLITS}
  assert 9700 < counts['train'] < 9900 and 50 < counts['validation'] < 150 and 50 < counts['test'] < 150


def test_paragraphs_stay_in_a_chapter_and_near_the_target_length():
  verses = [(('Gen', c, v), 'x' * 90) for c in (1, 2) for v in range(1, 21)]
  paras = builders.paragraphs(verses, min_chars=300, max_chars=400)
  assert ' '.join(paras).replace(' ', '') == 'x' * 90 * 40
  assert all(len(p) <= 400 for p in paras)
  assert [len(p) for p in paras] == [363] * 5 * 2  # 4 verses each: 5 per chapter, none across.


def test_builders_on_a_synthetic_source(synthetic_text):
  data_dir, expected, built = synthetic_text
  assert set(built) == {builders.PAIRS_NAME, builders.TEXT_NAME}
  seen = {}
  for split in builders.PAIR_SPLITS:
    source = tfds.data_source(builders.PAIRS_NAME, split=split, data_dir=data_dir, download=False)
    for i in range(len(source)):
      ex = source[i]
      ref = ex['ref'].decode()
      assert builders.split_of(next(r for r, _, _ in expected if bible.ref_string(r) == ref)) == split
      seen[ref] = (ex['source'].decode(), ex['target'].decode())
  assert seen == {bible.ref_string(r): (k, w) for r, k, w in expected}  # Every pair exactly once.
  text = {split: [tfds.data_source(builders.TEXT_NAME, split=split, data_dir=data_dir, download=False)[i]
                  ['text'].decode() for i in range(len(tfds.data_source(
                      builders.TEXT_NAME, split=split, data_dir=data_dir, download=False)))]
          for split in ('train', 'validation')}
  train_chars = sum(len(k) + len(w) for r, k, w in expected if builders.split_of(r) == 'train')
  assert abs(sum(len(t) for t in text['train']) - train_chars) < 2 * len(expected)  # Plus joining spaces.
  assert max(len(t) for t in text['train']) <= builders.MAX_PARAGRAPH_CHARS
  assert np.median([len(t) for t in text['train']]) >= builders.MIN_PARAGRAPH_CHARS
  # Prepared: a second prepare reuses the build, even without the source.
  again = builders.prepare(data_dir, source_dir=os.path.join(data_dir, 'nowhere'))
  assert all(b.is_prepared() for b in again.values())


def test_prepare_without_packages_fails_fast_with_apt_get(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='apt-get install -y bible-kjv'):
    builders.prepare(tmp_path)
  assert not os.path.exists(tmp_path / builders.PAIRS_NAME / '1.0.0' / 'dataset_info.json')


# ---------------------------------------------------------------------------------------- vocab


def test_training_texts_of_an_unprepared_dir_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{builders.TEXT_NAME} is not prepared in {tmp_path}') as e:
    vocab.training_texts(tmp_path)
  assert builders.HOW_TO_GET in str(e.value)


def test_vocab_follows_t5_ids(tmp_path):
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghij'), rng.integers(2, 7))) for _ in range(300)]
  corpus = [' '.join(rng.choice(words, 40)) for _ in range(400)]
  path = vocab.train_vocab(corpus, tmp_path / 'v' / 'spm.model', vocab_size=200)
  sp = vocab.load_vocab(path)
  assert sp.get_piece_size() == 200
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.id_to_piece([0, 1, 2]) == ['<pad>', '</s>', '<unk>']
  ids = sp.encode(corpus[0])
  assert min(ids) > 2 and sp.decode(ids) == corpus[0]
  with pytest.raises(FileNotFoundError, match='experiments.data.text.vocab'):
    vocab.load_vocab(tmp_path / 'missing.model')


# ---------------------------------------------------------------------------------------- span corruption

VOCAB = 1100  # 1000 ordinary ids + 100 sentinels.


def reconstruct(inputs: np.ndarray, targets: np.ndarray, vocab_size: int) -> np.ndarray:
  """Independent inverse: substitute each sentinel of the inputs by the target tokens that follow it."""
  assert inputs[-1] == sc.EOS_ID and targets[-1] == sc.EOS_ID
  is_sentinel = lambda t: t >= vocab_size - sc.NUM_EXTRA_IDS
  fills, key = {}, None
  for t in targets[:-1].tolist():
    if is_sentinel(t):
      key = t
      fills[key] = []
    else:
      fills[key].append(t)
  out = []
  for t in inputs[:-1].tolist():
    out.extend(fills.pop(t) if is_sentinel(t) else [t])
  assert not fills  # Every span was used once.
  return np.array(out)


@pytest.mark.parametrize('length', [2, 3, 10, 57, 114, 568])
def test_span_corruption_reconstructs(length):
  tokens = np.random.default_rng(length).integers(3, 1000, length)
  for seed in range(5):
    out = sc.span_corrupt(tokens, VOCAB, seed)
    np.testing.assert_array_equal(reconstruct(out['inputs'], out['targets'], VOCAB), tokens)
    assert (out['inputs'].size, out['targets'].size) == sc.corrupted_lengths(length)
    sentinels = out['inputs'][out['inputs'] >= VOCAB - sc.NUM_EXTRA_IDS]
    np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(sentinels.size))  # From the top, in order.


def test_span_corruption_noise_statistics_and_determinism():
  tokens = np.arange(3, 503)
  a, b = sc.span_corrupt(tokens, VOCAB, 7), sc.span_corrupt(tokens, VOCAB, 7)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a['inputs'], sc.span_corrupt(tokens, VOCAB, 8)['inputs'])
  rng = np.random.default_rng(0)
  masks = [sc.noise_mask(500, rng) for _ in range(200)]
  assert abs(np.mean(masks) - 0.15) < 0.005
  spans = [sc.noise_spans(500, rng) for _ in range(200)]
  lengths = [end - start for s in spans for start, end in s]
  assert abs(np.mean(lengths) - 3.0) < 0.1
  assert all(s[0][0] > 0 and s[-1][1] == 500 for s in spans)  # Starts kept, ends in noise (as T5).
  with pytest.raises(ValueError, match='sentinels'):
    sc.span_corrupt([5, VOCAB - 1], VOCAB, 0)


def test_tokens_length_for_matches_t5():
  assert sc.tokens_length_for(512) == (568, 114)  # T5's span-corruption lengths for 512 inputs.
  n, targets_length = sc.tokens_length_for(128)
  assert sc.corrupted_lengths(n)[0] <= 128 < sc.corrupted_lengths(n + 1)[0]


def test_pad_and_pack():
  examples = [{'inputs': np.arange(1, 6), 'targets': np.arange(1, 3)},
              {'inputs': np.arange(1, 4), 'targets': np.arange(1, 5)},
              {'inputs': np.arange(1, 9), 'targets': np.arange(1, 2)}]
  padded = sc.pad_batch(examples, {'inputs': 6, 'targets': 3})
  np.testing.assert_array_equal(padded['inputs'][2], [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(padded['targets'][0], [1, 2, 0])
  packed = sc.pack(examples, {'inputs': 8, 'targets': 6})
  np.testing.assert_array_equal(packed['inputs'], [[1, 2, 3, 4, 5, 1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
  np.testing.assert_array_equal(packed['inputs_segment_ids'], [[1] * 5 + [2] * 3, [1] * 8])
  np.testing.assert_array_equal(packed['inputs_positions'], [[0, 1, 2, 3, 4, 0, 1, 2], list(range(8))])
  np.testing.assert_array_equal(packed['targets'], [[1, 2, 1, 2, 3, 4], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(packed['targets_segment_ids'], [[1, 1, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0]])
  assert all(v.dtype == np.int32 for v in packed.values())


# ---------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not bible.packages_installed(), reason='needs apt-get install -y bible-kjv sword-text-web diatheke')
def test_real_kjv_web_alignment():
  cache = os.path.join(tempfile.gettempdir(), f'nmsparse-test-bible-{os.getuid()}')  # Exports once (~15 s).
  pairs = bible.load_pairs(cache)
  assert 31_000 <= len(pairs) <= 31_102
  by_ref = {ref: (k, w) for ref, k, w in pairs}
  assert by_ref[('Gen', 1, 1)] == ('In the beginning God created the heaven and the earth.',
                                   'In the beginning, God created the heavens and the earth.')
  assert by_ref[('Rev', 22, 21)][1] == 'The grace of the Lord Jesus Christ be with all the saints. Amen.'
  assert by_ref[('Ps', 3, 1)][1].startswith('Yahweh, how my adversaries')
  assert not any('<' in w or '>' in w for _, _, w in pairs)
  assert max(len(w) for _, _, w in pairs) < 1000  # No glossary or heading run-ons.
