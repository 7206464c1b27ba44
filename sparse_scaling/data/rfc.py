"""The IETF RFCs of Debian's `doc-rfc` package: an LM stream and document -> abstract pairs.

The RFCs stand in for C4 (technical English, 63 M words) and for arXiv (long document ->
abstract). `doc-rfc` is in Debian's non-free component and is not needed by any test; install it
with `INSTALL_HINT` (530 MB). It holds `RFC_DIR/<category>/rfcNNNN.txt.gz` (Debian leaves files
under 4 kB uncompressed, so `.txt` is read too) and, for most RFCs, the RFC Editor's metadata
`rfcNNNN.json` beside it, e.g. `{"doc_id": "RFC0791", "title": ..., "abstract": "...",
"obsoletes": ["RFC0760"], "obsoleted_by": [], ...}` (the abstract may hold HTML such as `<p>`).
The IETF Trust licence allows verbatim copying only: never commit the text.

  * Text (`clean_text`): pagination is stripped: footer lines ending in `[Page N]`, form feeds and
    the running header line after each; the blank lines left are collapsed.
  * Split (`split_of`): by RFC number, so revisions do not leak. RFCs linked by `obsoletes` /
    `obsoleted_by` (a text and its revisions) form a group, and a group is validation when its
    smallest number ends in 0 (about 10%), otherwise train.
  * Pairs (`summarization_rfcs`): the input is the cleaned text without its own Abstract section
    (an `Abstract` heading at column 0 and the indented paragraphs under it); the target is the
    JSON abstract with HTML removed and whitespace collapsed. RFCs are skipped when the JSON is
    missing, its abstract is empty, or the abstract's first `COPY_PROBE_CHARS` characters occur
    verbatim in the input (copied from the body, or an Abstract section not recognized).

Unusable files are skipped, each with a log line naming it and the count so far: a text that
does not decompress or that `corpus.unusable` rejects (blank, binary, a line over
`corpus.MAX_LINE_CHARS` characters), and a `rfcNNNN.json` that is not a JSON object (the RFC is
kept, as one without metadata). A stream whose RFCs are all unusable raises a one-line
`ValueError`.

The index (file names and JSON) is read once per process; texts are read as the streams go.
Batch formats are those of `pipeline.py`.
"""
import functools
import html
import json
import pathlib
import re
from typing import NamedTuple

from absl import logging
import gin

from sparse_scaling.data import arxiv
from sparse_scaling.data import corpus
from sparse_scaling.data import pipeline

RFC_DIR = '/usr/share/doc/RFC'
INSTALL_HINT = ("enable Debian's non-free component and install doc-rfc (docs/troubleshooting.md): sed -i "
                "'s/^Components: main$/Components: main non-free/' "
                '/etc/apt/sources.list.d/debian.sources && apt-get update && '
                'apt-get install doc-rfc')
# Keys of the RFC Editor's rfcNNNN.json.
ID_KEY = 'doc_id'  # 'RFC0791'
ABSTRACT_KEY = 'abstract'
REVISION_KEYS = ('obsoletes', 'obsoleted_by')  # lists of ids like 'RFC0760'
COPY_PROBE_CHARS = 100
VOCAB_SAMPLE_DOCS = 2000
VOCAB_SIZE = 32000  # As the paper's C4 and arXiv vocabularies.
SEQ_LEN = 512

_FILE = re.compile(r'rfc(\d+)\.(txt|json)(\.gz)?')
_RFC_ID = re.compile(r'RFC0*(\d+)')
_FOOTER = re.compile(r'^[^\n]*\[page \d+\][ \t]*$', re.I | re.M)
_ABSTRACT = re.compile(r'^abstract[ \t]*:?[ \t]*\n(?:[ \t]*\n|[ \t]+\S[^\n]*\n)*', re.I | re.M)


class Rfc(NamedTuple):
  """One RFC of the index."""
  number: int
  path: pathlib.Path  # rfcNNNN.txt(.gz)
  meta: dict  # Its rfcNNNN.json, or {} if there is none.


@functools.lru_cache(maxsize=None)
def rfc_index(root=RFC_DIR):
  """Returns the RFCs under `root`, one `Rfc` per number, sorted by number.

  Raises:
    FileNotFoundError: if `root` holds no `rfcNNNN.txt(.gz)`; the message says how to install.
  """
  texts, metas = {}, {}
  for path in sorted(pathlib.Path(root).rglob('rfc*')):
    match = _FILE.fullmatch(path.name)
    if match and path.is_file():
      (texts if match[2] == 'txt' else metas).setdefault(int(match[1]), path)
  if not texts:
    raise FileNotFoundError(f'no RFCs (rfcNNNN.txt.gz) under {root}; {INSTALL_HINT}')
  return tuple(Rfc(number, path, _read_meta(metas.get(number), number))
               for number, path in sorted(texts.items()))


def _read_meta(path, number):
  """Returns the JSON metadata of RFC `number`, or {} if absent, unusable or about another RFC."""
  if path is None:
    return {}
  try:
    meta = json.loads(corpus.read_text(path)[0])
  except ValueError as error:  # not JSON, or a .gz that does not decompress
    meta = error
  if not isinstance(meta, dict):
    _skip(path, f'not a JSON object: {" ".join(str(meta).split())[:80]}')
    return {}
  if _rfc_number(meta.get(ID_KEY, f'RFC{number}')) != number:
    logging.warning('%s: %s is %r; ignored', path, ID_KEY, meta.get(ID_KEY))
    return {}
  return meta


def _rfc_number(rfc_id):
  match = _RFC_ID.fullmatch(str(rfc_id).strip().upper())
  return int(match[1]) if match else None


def split_of(number, root=RFC_DIR):
  """Returns 'validation' or 'train' for RFC `number`: see the module docstring."""
  return 'validation' if _group_min(root)[number] % 10 == 0 else 'train'


@functools.lru_cache(maxsize=None)
def _group_min(root):
  """Maps each RFC number to the smallest number linked to it by `REVISION_KEYS`."""
  parent = {rfc.number: rfc.number for rfc in rfc_index(root)}

  def find(n):
    while parent[n] != n:
      parent[n] = parent[parent[n]]
      n = parent[n]
    return n

  for rfc in rfc_index(root):
    for key in REVISION_KEYS:
      for other in map(_rfc_number, rfc.meta.get(key) or []):
        if other in parent:
          a, b = find(rfc.number), find(other)
          parent[max(a, b)] = min(a, b)
  return {n: find(n) for n in parent}


def clean_text(text):
  """Strips pagination: `[Page N]` footers, form feeds and the header line after each."""
  pages = text.replace('\r\n', '\n').split('\f')
  text = '\n'.join(pages[:1] + [_drop_first_line(page) for page in pages[1:]])
  text = re.sub(r'[ \t]+$', '', _FOOTER.sub('', text), flags=re.M)
  return re.sub(r'\n{3,}', '\n\n', text).strip('\n') + '\n'


def _drop_first_line(page):
  """Drops a page's leading blank lines and its first non-blank line (the running header)."""
  lines = page.split('\n')
  first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
  return '\n'.join(lines[first + 1:])


def remove_abstract_section(text):
  """Removes the first `Abstract` heading at column 0 and the indented lines under it."""
  return _ABSTRACT.sub('', text, count=1)


def clean_abstract(abstract):
  """Returns a JSON abstract without HTML tags or entities, whitespace collapsed to spaces."""
  return ' '.join(html.unescape(re.sub(r'<[^>]+>', ' ', abstract or '')).split())


def read_rfc(rfc):
  """Returns the cleaned text of an `Rfc`.

  Raises:
    ValueError: its `.gz` does not decompress.
  """
  return clean_text(corpus.read_text(rfc.path)[0])


_skipped = {}  # path -> why, for the files skipped so far in this process


def _skip(path, why):
  if str(path) not in _skipped:
    _skipped[str(path)] = why
    logging.warning('%s: skipped (%s); %d RFC files skipped so far', path, why, len(_skipped))


def usable_text(rfc):
  """Returns the cleaned text of an `Rfc`, or None (logged) if it is unusable (module doc).

  A file skipped once is not read again in this process.
  """
  if str(rfc.path) in _skipped:
    return None
  try:
    text = corpus.read_text(rfc.path)[0]
  except (OSError, ValueError) as error:
    _skip(rfc.path, ' '.join(str(error).split()))
    return None
  why = corpus.unusable(text) or corpus.unusable(text := clean_text(text))  # cheap check first
  if why:
    _skip(rfc.path, why)
    return None
  return text


def _usable_texts(rfcs, n, split, root):
  """Yields `usable_text` of each `Rfc` of an endless iterator, skipping unusable ones.

  Raises:
    ValueError: `n` (the split's size) RFCs in a row were unusable.
  """
  skipped_in_a_row = 0
  for rfc in rfcs:
    text = usable_text(rfc)
    if text is None:
      skipped_in_a_row += 1
      if skipped_in_a_row >= n:
        raise ValueError(f'root={root!r}: none of the {n} {split} RFCs is usable (see the '
                         'skipped files in the log)')
      continue
    skipped_in_a_row = 0
    yield text


def summarization_pair(rfc):
  """Returns `(document, abstract)` for an `Rfc`, or None if it is skipped (module docstring)."""
  abstract = clean_abstract(rfc.meta.get(ABSTRACT_KEY))
  text = usable_text(rfc) if abstract else None
  if text is None:
    return None
  document = remove_abstract_section(text)
  if abstract[:COPY_PROBE_CHARS] in ' '.join(document.split()):
    return None
  return document, abstract


def documents(split, root=RFC_DIR):
  """Returns the `Rfc`s of a split, sorted by number."""
  return [rfc for rfc in rfc_index(root) if split_of(rfc.number, root) == split]


@functools.lru_cache(maxsize=None)
def summarization_rfcs(split, root=RFC_DIR):
  """Returns the `Rfc`s of a split that give a summarization pair (reads each text once).

  Raises:
    ValueError: if none does.
  """
  rfcs = [rfc for rfc in documents(split, root) if rfc.meta and summarization_pair(rfc)]
  if not rfcs:
    raise ValueError(f'root={root!r} has no {split} RFC with a usable {ABSTRACT_KEY!r}')
  logging.info('%s: %d %s summarization pairs', root, len(rfcs), split)
  return rfcs


@functools.lru_cache(maxsize=None)
def vocab(root=RFC_DIR, n_pieces=VOCAB_SIZE, cache_dir=None, spm_path=None):
  """Returns the model at `spm_path`, else one trained on a sample of the train RFCs."""
  train = documents('train', root)
  sample = train[::max(1, len(train) // VOCAB_SAMPLE_DOCS)]
  texts = [text for text in map(usable_text, sample) if text is not None]
  return pipeline.sample_vocab('rfc', texts, n_pieces, cache_dir, spm_path, VOCAB_SAMPLE_DOCS)


@gin.configurable(module='sparse_scaling.data')
def rfc_lm_inputs(batch_size=8, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, root=RFC_DIR, seed=0,
                  cache_dir=None, spm_path=None):
  """Returns trax `Inputs` for language modeling on the RFCs.

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    seq_len: tokens per example.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    root: the `doc-rfc` directory.
    seed: seed of the train shuffling (RFCs are reshuffled each epoch).
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    spm_path: a SentencePiece model to use instead of training one.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs, targets, weights)`, each
    `[batch_size, seq_len]`: `inputs is targets` (int32 ids of packed cleaned RFCs, `EOS_ID`
    after each) and float32 ones. Eval reads the validation RFCs by number.

  Raises:
    FileNotFoundError: if `root` holds no RFCs.
  """
  root = str(root)
  splits = {split: documents(split, root) for split in ('train', 'validation')}

  def batches(split, seed):
    sp = vocab(root, vocab_size, cache_dir, spm_path)
    texts = _usable_texts(pipeline.epochs(splits[split], seed), len(splits[split]), split, root)
    yield from pipeline.lm_batches(
        pipeline.packed_windows(pipeline.encode(sp, texts), seq_len), batch_size)

  return pipeline.make_inputs(batch_size, lambda: batches('train', seed),
                              lambda: batches('validation', None))


@gin.configurable(module='sparse_scaling.data')
def rfc_summarization_inputs(batch_size=8, inputs_len=arxiv.INPUTS_LEN,
                             targets_len=arxiv.TARGETS_LEN, vocab_size=VOCAB_SIZE, root=RFC_DIR,
                             seed=0, cache_dir=None, spm_path=None):
  """Returns trax `Inputs` of RFC -> abstract pairs for the encoder-decoder (arXiv's stand-in).

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    inputs_len: padded document length (arXiv's 15,360 by default); longer documents keep their
      first `inputs_len - 1` tokens.
    targets_len: padded abstract length (1,024); longer abstracts keep their first
      `targets_len - 1` tokens.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    root: the `doc-rfc` directory.
    seed: seed of the train shuffling.
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    spm_path: a SentencePiece model to use instead of training one.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs [batch_size, inputs_len],
    targets [batch_size, targets_len], weights [batch_size, targets_len])`: int32 ids padded with
    0, each side ending in `EOS_ID`; float32 weights 1 on abstract tokens incl. EOS, 0 on
    padding.

  Raises:
    FileNotFoundError: if `root` holds no RFCs.
    ValueError: if a split has no usable pair.
  """
  root = str(root)
  splits = {split: summarization_rfcs(split, root) for split in ('train', 'validation')}

  def batches(split, seed):
    sp = vocab(root, vocab_size, cache_dir, spm_path)
    pairs = map(summarization_pair, pipeline.epochs(splits[split], seed))
    yield from pipeline.pair_batches(
        ((sp.encode(document), sp.encode(abstract)) for document, abstract in pairs),
        batch_size, inputs_len, targets_len)

  return pipeline.make_inputs(batch_size, lambda: batches('train', seed),
                              lambda: batches('validation', None))
