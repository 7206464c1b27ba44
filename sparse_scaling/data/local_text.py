"""Offline text corpora for larger runs: a directory of text files, or a JSONL file.

  * a directory: each `*.txt` or `*.txt.gz` file below it (recursively) is one document.
  * a JSONL file (`*.jsonl` or `*.jsonl.gz`): one JSON object per line; the string field
    `text_field` is the document, or `document_field` and `summary_field` make a pair.

Bytes that are not UTF-8 are replaced by U+FFFD and counted in the log (`corpus.read_text`).
A `.gz` file that does not decompress, and a JSONL line that is not JSON or lacks the field,
raise a one-line `ValueError` naming the file (and line). Documents that are blank, hold a NUL
character (binary files) or have a line over `corpus.MAX_LINE_CHARS` characters are skipped,
and the count by reason is logged with an example of each; a corpus with none left raises a
one-line `ValueError`.

Train and validation are split by hash: a file by its path relative to the directory, a record
by its document text; it is validation when `sha256 % 100 < VALIDATION_PERCENT`. The split never
changes as files are added, and exact duplicate records always land on the same side.

The documents are read once per process into memory. The vocabulary is the model at `spm_path`
or one trained on the lines of up to `VOCAB_SAMPLE_DOCS` train documents (and summaries) and
cached under a hash of that sample. Batch formats are those of `pipeline.py`: LM batches of
packed documents, and (document, summary) pairs for the encoder-decoder.
"""
import functools
import hashlib
import json
import pathlib
import re

from absl import logging
import gin

from sparse_scaling.data import corpus
from sparse_scaling.data import lm
from sparse_scaling.data import pipeline

VALIDATION_PERCENT = 10
VOCAB_SAMPLE_DOCS = 10_000
TEXT_SUFFIXES = ('.txt', '.txt.gz')
JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz')


def split_of(key):
  """Returns 'validation' for `VALIDATION_PERCENT`% of keys (by sha256), else 'train'."""
  bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') % 100
  return 'validation' if bucket < VALIDATION_PERCENT else 'train'


def documents(path, split, fields=('text',)):
  """Returns the documents of one split of a local corpus.

  Args:
    path: a directory of text files or a JSONL file (see the module docstring).
    split: 'train' or 'validation'.
    fields: JSONL fields of each record, the document first; ignored for a directory.

  Returns:
    A list of str for a directory or one field; else a list of tuples of str, one per record.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the corpus is empty, a record lacks a field, or the split is empty.
  """
  records = _records(str(path), tuple(fields))
  docs = [record if len(record) > 1 else record[0]
          for key, record in records if split_of(key) == split]
  if not docs:
    raise ValueError(f'path={str(path)!r} has no {split} documents ({len(records)} in all, '
                     f'{VALIDATION_PERCENT}% go to validation by hash); add documents')
  return docs


@functools.lru_cache(maxsize=None)
def _records(path, fields):
  """Returns `(split key, record tuple)` for each non-blank document of a corpus, in order."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'path={str(path)!r} does not exist')
  if path.is_dir():
    files = _text_files(path)
    keys = [file.relative_to(path).as_posix() for file in files]
    records = [(corpus.read_text(file)[0],) for file in files]
  elif path.name.endswith(JSONL_SUFFIXES):
    records = _jsonl_records(path, fields)
    keys = [record[0] for record in records]
  else:
    raise ValueError(f'path={str(path)!r} is neither a directory nor a {JSONL_SUFFIXES} file')
  kept, skipped = [], {}  # skipped: {why: [keys]}
  for key, record in zip(keys, records):
    why = corpus.unusable(record[0])
    if why:
      skipped.setdefault(why, []).append(key)
    else:
      kept.append((key, record))
  counts = '; '.join(f'{len(examples)} {why}, e.g. {examples[0]!r}'
                     for why, examples in skipped.items())
  if not kept:
    raise ValueError(f'path={str(path)!r} holds no usable documents ({_FORMATS}'
                     f'{"; skipped: " + counts if counts else ""})')
  if skipped:
    logging.warning('%s: skipped %d of %d documents: %s', path, len(records) - len(kept),
                    len(records), counts)
  return kept


_FORMATS = f'{"/".join(TEXT_SUFFIXES)} files or {"/".join(JSONL_SUFFIXES)} records'


def _text_files(directory):
  """Returns the text files below a directory, sorted."""
  return sorted(p for p in directory.rglob('*') if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def _jsonl_records(path, fields):
  """Returns one tuple of the `fields` (str) per non-blank line of a JSONL file."""
  text, _ = corpus.read_text(path)
  records = []
  for line_number, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}:{line_number} is not JSON ({error})') from None
    missing = [field for field in fields if not isinstance(record.get(field), str)]
    if missing:
      raise ValueError(f'{path}:{line_number} lacks string field {missing[0]!r}')
    records.append(tuple(record[field] for field in fields))
  return records


def _vocab(path, fields, n_pieces, cache_dir, spm_path):
  """Returns the model at `spm_path`, else one trained on a sample of the train split."""
  train = documents(str(path), 'train', fields)
  texts = [text for doc in train for text in ((doc,) if isinstance(doc, str) else doc)]
  prefix = re.sub(r'[^0-9A-Za-z.]+', '_', f'local_{pathlib.Path(path).name}')
  return pipeline.sample_vocab(prefix, texts, n_pieces, cache_dir, spm_path, VOCAB_SAMPLE_DOCS)


@gin.configurable(module='sparse_scaling.data')
def local_text_lm_inputs(path, batch_size=8, seq_len=128, vocab_size=lm.VOCAB_SIZE,
                         text_field='text', seed=0, cache_dir=None, spm_path=None):
  """Returns trax `Inputs` for language modeling on a local corpus.

  Args:
    path: a directory of `.txt`/`.txt.gz` files or a `.jsonl`/`.jsonl.gz` file.
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    seq_len: tokens per example.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    text_field: the JSONL field holding each document.
    seed: seed of the train shuffling (documents are reshuffled each epoch).
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    spm_path: a SentencePiece model to use instead of training one.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs, targets, weights)`, each
    `[batch_size, seq_len]`: `inputs is targets` (int32 ids of packed documents, `EOS_ID` after
    each) and float32 ones. Eval reads the validation documents in order.

  Raises:
    FileNotFoundError, ValueError: see `documents`.
  """
  path, fields = str(path), (text_field,)
  splits = {split: documents(path, split, fields) for split in ('train', 'validation')}

  def batches(split, seed):
    sp = _vocab(path, fields, vocab_size, cache_dir, spm_path)
    docs = pipeline.encode(sp, pipeline.epochs(splits[split], seed))
    yield from pipeline.lm_batches(pipeline.packed_windows(docs, seq_len), batch_size)

  return pipeline.make_inputs(batch_size, lambda: batches('train', seed),
                              lambda: batches('validation', None))


@gin.configurable(module='sparse_scaling.data')
def local_text_summarization_inputs(path, batch_size=8, inputs_len=512, targets_len=128,
                                    vocab_size=lm.VOCAB_SIZE, document_field='document',
                                    summary_field='summary', seed=0, cache_dir=None,
                                    spm_path=None):
  """Returns trax `Inputs` of document -> summary pairs from a JSONL file, for the encoder-decoder.

  Args:
    path: a `.jsonl`/`.jsonl.gz` file whose records have both fields.
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    inputs_len: padded document length; longer documents keep their first `inputs_len - 1`
      tokens.
    targets_len: padded summary length; longer summaries keep their first `targets_len - 1`.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    document_field: the JSONL field of the document (the split is by its hash).
    summary_field: the JSONL field of the summary.
    seed: seed of the train shuffling.
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    spm_path: a SentencePiece model to use instead of training one.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs [batch_size, inputs_len],
    targets [batch_size, targets_len], weights [batch_size, targets_len])`: int32 ids padded with
    0, each side ending in `EOS_ID`; float32 weights 1 on summary tokens incl. EOS, 0 on padding.

  Raises:
    FileNotFoundError, ValueError: see `documents`; ValueError if `path` is a directory.
  """
  path, fields = str(path), (document_field, summary_field)
  if pathlib.Path(path).is_dir():
    raise ValueError(f'path={path!r} is a directory; summaries need a JSONL file')
  splits = {split: documents(path, split, fields) for split in ('train', 'validation')}

  def batches(split, seed):
    sp = _vocab(path, fields, vocab_size, cache_dir, spm_path)
    pairs = ((sp.encode(document), sp.encode(summary))
             for document, summary in pipeline.epochs(splits[split], seed))
    yield from pipeline.pair_batches(pairs, batch_size, inputs_len, targets_len)

  return pipeline.make_inputs(batch_size, lambda: batches('train', seed),
                              lambda: batches('validation', None))
