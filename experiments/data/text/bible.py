"""King James Bible (KJV) and World English Bible (WEB) verses from Debian packages, aligned by reference.

Sources (both public domain):
  * KJV: ``apt-get install -y bible-kjv``; ``bible -f 'Gen1:1-Rev22:21'`` prints one verse a line,
    ``Ge1:1 In the beginning ...``.
  * WEB: ``apt-get install -y sword-text-web diatheke``;
    ``diatheke -b engWEB2015eb -f plaintext -k 'Gen 1:1-Rev 22:21'`` prints one verse a line as OSIS
    markup, ``Genesis 1:1: <w savlm=...>In</w> ...``. A line can start with a stale heading (a Psalm
    title of the last psalm seen, ``<lg>``/``<l>`` tags) before its reference; the last verse carries
    the appended glossary; the Apocrypha are included (and dropped by the alignment).

The raw exports are cached as ``kjv.txt`` / ``web.txt`` in a cache folder so that builders and tests
do not rerun the command lines (the WEB export takes about 15 s). Parsing, cleaning and alignment
work on strings, so they are testable on small hand-written inputs.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from collections.abc import Iterable

# (book, chapter, verse), book being a canonical id from BOOKS.
Ref = tuple[str, int, int]

# Canonical id, KJV abbreviation (bible-kjv), WEB name (diatheke engWEB2015eb): the 66 books in order.
BOOKS: tuple[tuple[str, str, str], ...] = (
    ('Gen', 'Ge', 'Genesis'), ('Exod', 'Exo', 'Exodus'), ('Lev', 'Lev', 'Leviticus'),
    ('Num', 'Num', 'Numbers'), ('Deut', 'Deu', 'Deuteronomy'), ('Josh', 'Josh', 'Joshua'),
    ('Judg', 'Jdgs', 'Judges'), ('Ruth', 'Ruth', 'Ruth'), ('1Sam', '1Sm', 'I Samuel'),
    ('2Sam', '2Sm', 'II Samuel'), ('1Kgs', '1Ki', 'I Kings'), ('2Kgs', '2Ki', 'II Kings'),
    ('1Chr', '1Chr', 'I Chronicles'), ('2Chr', '2Chr', 'II Chronicles'), ('Ezra', 'Ezra', 'Ezra'),
    ('Neh', 'Neh', 'Nehemiah'), ('Esth', 'Est', 'Esther'), ('Job', 'Job', 'Job'),
    ('Ps', 'Psa', 'Psalms'), ('Prov', 'Prv', 'Proverbs'), ('Eccl', 'Eccl', 'Ecclesiastes'),
    ('Song', 'SSol', 'Song of Solomon'), ('Isa', 'Isa', 'Isaiah'), ('Jer', 'Jer', 'Jeremiah'),
    ('Lam', 'Lam', 'Lamentations'), ('Ezek', 'Eze', 'Ezekiel'), ('Dan', 'Dan', 'Daniel'),
    ('Hos', 'Hos', 'Hosea'), ('Joel', 'Joel', 'Joel'), ('Amos', 'Amos', 'Amos'),
    ('Obad', 'Obad', 'Obadiah'), ('Jonah', 'Jonah', 'Jonah'), ('Mic', 'Mic', 'Micah'),
    ('Nah', 'Nahum', 'Nahum'), ('Hab', 'Hab', 'Habakkuk'), ('Zeph', 'Zep', 'Zephaniah'),
    ('Hag', 'Hag', 'Haggai'), ('Zech', 'Zec', 'Zechariah'), ('Mal', 'Mal', 'Malachi'),
    ('Matt', 'Mat', 'Matthew'), ('Mark', 'Mark', 'Mark'), ('Luke', 'Luke', 'Luke'),
    ('John', 'John', 'John'), ('Acts', 'Acts', 'Acts'), ('Rom', 'Rom', 'Romans'),
    ('1Cor', '1Cor', 'I Corinthians'), ('2Cor', '2Cor', 'II Corinthians'), ('Gal', 'Gal', 'Galatians'),
    ('Eph', 'Eph', 'Ephesians'), ('Phil', 'Phi', 'Philippians'), ('Col', 'Col', 'Colossians'),
    ('1Thess', '1Th', 'I Thessalonians'), ('2Thess', '2Th', 'II Thessalonians'),
    ('1Tim', '1Tim', 'I Timothy'), ('2Tim', '2Tim', 'II Timothy'), ('Titus', 'Titus', 'Titus'),
    ('Phlm', 'Phmn', 'Philemon'), ('Heb', 'Heb', 'Hebrews'), ('Jas', 'Jas', 'James'),
    ('1Pet', '1Pet', 'I Peter'), ('2Pet', '2Pet', 'II Peter'), ('1John', '1Jn', 'I John'),
    ('2John', '2Jn', 'II John'), ('3John', '3Jn', 'III John'), ('Jude', 'Jude', 'Jude'),
    ('Rev', 'Rev', 'Revelation of John'),
)
BOOK_INDEX = {book: i for i, (book, _, _) in enumerate(BOOKS)}
_FROM_KJV = {abbrev: book for book, abbrev, _ in BOOKS}
_FROM_WEB = {name: book for book, _, name in BOOKS}

KJV_FILE, WEB_FILE = 'kjv.txt', 'web.txt'
WEB_MODULE = 'engWEB2015eb'
KJV_COMMAND = ('bible', '-f', 'Gen1:1-Rev22:21')
WEB_COMMAND = ('diatheke', '-b', WEB_MODULE, '-f', 'plaintext', '-k', 'Gen 1:1-Rev 22:21')
KJV_HOW_TO_GET = 'Install the King James Bible with `apt-get install -y bible-kjv` (as root).'
WEB_HOW_TO_GET = 'Install the World English Bible with `apt-get install -y sword-text-web diatheke` (as root).'

# KJV: ``Ge1:1 text`` at the start of a line.
_KJV_REF = re.compile(r'([1-3]?[A-Za-z]+)(\d+):(\d+)(?: |$)')
# WEB: ``I Samuel 3:4: text``, at the start of a line or right after a tag (a heading prefix).
_WEB_REF = re.compile(r'(?:^|(?<=>))\s*((?:I{1,3}V? |IV )?[A-Z][A-Za-z]*(?: (?:of )?[A-Z(][A-Za-z)]*)*) '
                      r'(\d+):(\d+): ')
# Everything from the end of a book (or the glossary/introduction after Revelation) on is not verse text.
_END_OF_TEXT = re.compile(r'<div\b[^>]*\btype="(?:book|glossary|introduction)"[^>]*>')
# Elements whose text is a heading, not part of the verse.
_HEADINGS = re.compile(r'<(title|speaker|note)\b[^>]*>.*?</\1\s*>', re.DOTALL)
# Inline markup: dropped without a space (a word's tags); any other tag separates words.
_INLINE_TAGS = re.compile(r'</?(?:w|q|name|seg|hi|transChange|foreign|divineName)\b[^>]*>')
_ANY_TAG = re.compile(r'<[^>]*>')


def ref_string(ref: Ref) -> str:
  """``('Gen', 1, 1)`` -> ``'Gen 1:1'``."""
  book, chapter, verse = ref
  return f'{book} {chapter}:{verse}'


def _parse_lines(text: str, pattern: re.Pattern[str]) -> dict[tuple[str, int, int], str]:
  """Verses keyed by (book name as printed, chapter, verse): a reference starts a verse; a line
  without one continues the previous verse; text before the reference on its line is dropped."""
  verses: dict[tuple[str, int, int], list[str]] = {}
  current: list[str] | None = None
  for line in text.splitlines():
    match = pattern.search(line) if pattern is _WEB_REF else pattern.match(line)
    if match is None:
      if current is not None:
        current.append(line)
      continue
    key = (match.group(1), int(match.group(2)), int(match.group(3)))
    current = verses.setdefault(key, [])
    current.append(line[match.end():])
  return {key: '\n'.join(parts) for key, parts in verses.items()}


def _normalise_space(text: str) -> str:
  text = re.sub(r'\s+', ' ', text).strip()
  text = re.sub(r' ([,.;:!?])', r'\1', text)
  return re.sub(r'([,.;:!?]) ([”’])', r'\1\2', text)  # A closing quote after punctuation.


def clean_kjv_verse(raw: str) -> str:
  return _normalise_space(html.unescape(_ANY_TAG.sub(' ', raw)))


def clean_web_verse(raw: str) -> str:
  """Plain text of one WEB verse: no markup, headings, or text after the end of the book."""
  text = _END_OF_TEXT.split(raw, maxsplit=1)[0]
  text = _HEADINGS.sub(' ', text)
  # The module often omits the space between words in adjacent elements (``God</w><w ...>created``,
  # ``born</q><q ...><w ...>Son``, ``east,<w ...>they``): an end tag right before a start tag, or a letter or
  # punctuation mark right before a word or quotation element, separates words.
  text = re.sub(r'(</[^>]+>)(?=<[^/])', r'\1 ', text)
  text = re.sub(r'(?<=[\w,.;:!?])(?=<[wq]\b)', ' ', text)
  text = _INLINE_TAGS.sub('', text)
  text = _ANY_TAG.sub(' ', text)
  return _normalise_space(html.unescape(text))


def parse_kjv(text: str) -> dict[Ref, str]:
  """``bible -f`` output -> {(book, chapter, verse): clean text}; unknown books are dropped."""
  out = {}
  for (abbrev, chapter, verse), raw in _parse_lines(text, _KJV_REF).items():
    if abbrev in _FROM_KJV:
      out[(_FROM_KJV[abbrev], chapter, verse)] = clean_kjv_verse(raw)
  return out


def parse_web(text: str) -> dict[Ref, str]:
  """``diatheke -f plaintext`` output -> {(book, chapter, verse): clean text}; the Apocrypha are dropped."""
  out = {}
  for (name, chapter, verse), raw in _parse_lines(text, _WEB_REF).items():
    if name in _FROM_WEB:
      out[(_FROM_WEB[name], chapter, verse)] = clean_web_verse(raw)
  return out


def sort_key(ref: Ref) -> tuple[int, int, int]:
  book, chapter, verse = ref
  return BOOK_INDEX[book], chapter, verse


def align(kjv: dict[Ref, str], web: dict[Ref, str]) -> list[tuple[Ref, str, str]]:
  """(ref, kjv, web) for every reference both sides have with non-empty text, in canonical order."""
  refs = sorted((ref for ref in kjv.keys() & web.keys() if kjv[ref] and web[ref]), key=sort_key)
  return [(ref, kjv[ref], web[ref]) for ref in refs]


def _export(command: Iterable[str], path: str, how_to_get: str, min_chars: int) -> str:
  command = tuple(command)
  if shutil.which(command[0]) is None:
    raise FileNotFoundError(f'`{command[0]}` not found. {how_to_get}')
  result = subprocess.run(command, check=False, capture_output=True, text=True, encoding='utf-8')
  if result.returncode != 0 or len(result.stdout) < min_chars:
    raise FileNotFoundError(
        f'`{" ".join(command)}` printed {len(result.stdout)} characters (exit {result.returncode}; '
        f'stderr: {result.stderr.strip()[:200]!r}); the text is missing. {how_to_get}')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(result.stdout)
  os.replace(tmp, path)  # Atomic: concurrent exporters never see half a file.
  return result.stdout


def raw_texts(cache_dir: str | os.PathLike) -> tuple[str, str]:
  """The raw KJV and WEB exports, from ``cache_dir`` or (once, then cached there) from the command lines."""
  cache_dir = os.fspath(cache_dir)
  texts = []
  for name, command, how_to_get in ((KJV_FILE, KJV_COMMAND, KJV_HOW_TO_GET),
                                    (WEB_FILE, WEB_COMMAND, WEB_HOW_TO_GET)):
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        texts.append(f.read())
    else:
      texts.append(_export(command, path, how_to_get, min_chars=1_000_000))
  return texts[0], texts[1]


def load_pairs(cache_dir: str | os.PathLike) -> list[tuple[Ref, str, str]]:
  """The aligned KJV/WEB verse pairs (about 31,092), exporting the texts into ``cache_dir`` if needed."""
  kjv_text, web_text = raw_texts(cache_dir)
  return align(parse_kjv(kjv_text), parse_web(web_text))


def packages_installed() -> bool:
  return shutil.which('bible') is not None and shutil.which('diatheke') is not None
