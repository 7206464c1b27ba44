"""Shared pieces of the input pipelines: vocabulary choice, packing, padding, batching, `Inputs`.

Every input function of this package yields one of two batch formats, both int32 token ids
padded with `PAD_ID` (0) and float32 weights:

  * language modeling, `lm_batches`: `(inputs, targets, weights)`, each `[batch, seq_len]`, with
    `inputs is targets` and all-ones weights (trax's LMs shift right internally). Documents are
    concatenated with `EOS_ID` after each and cut into consecutive windows (`packed_windows`),
    so no position is padding.
  * encoder-decoder, `pair_batches` and `span_corruption.span_corruption_batches`:
    `(inputs [batch, inputs_len], targets [batch, targets_len], weights [batch, targets_len])`;
    each sequence ends in `EOS_ID`, and weights are 1 on target tokens (EOS included) and 0 on
    padding. SentencePiece never emits `PAD_ID`, so `weights == (targets != PAD_ID)`.

Train streams are infinite and reshuffled each epoch from a seed; eval streams cycle through the
validation split in a fixed order, so every eval stream yields the same batches.
"""
import hashlib
import itertools

import numpy as np
import sentencepiece as spm
from trax.data import inputs as trax_inputs

from sparse_scaling.data import vocab as vocab_lib


def make_inputs(batch_size, train_batches, eval_batches):
  """Returns trax `Inputs` whose streams are `train_batches()` and `eval_batches()`.

  Args:
    batch_size: examples per batch, over all devices; a stream raises `ValueError` unless it is
      divisible by the stream's `n_devices`.
    train_batches: called without arguments each time a train stream is made; returns an
      iterator of batches.
    eval_batches: the same for eval streams.
  """
  def stream_fn(batches_fn):
    def stream(n_devices):
      if batch_size % n_devices:
        raise ValueError(
            f'batch_size={batch_size} is not divisible by n_devices={n_devices}')
      return batches_fn()
    return stream
  return trax_inputs.Inputs(stream_fn(train_batches), stream_fn(eval_batches))


def vocab_for(corpus_name, texts_fn, n_pieces, cache_dir=None, spm_path=None):
  """Returns a SentencePiece model: the one at `spm_path`, else one trained on `texts_fn()`.

  Args:
    corpus_name: cache key of the trained model (see `vocab.load_or_train_vocab`).
    texts_fn: called only when a model must be trained; returns an iterable of documents. Each
      of their lines is one training sentence (SentencePiece skips sentences over 4192 bytes, and
      C4 or arXiv documents are far longer).
    n_pieces: size of a trained model; the most pieces a model at `spm_path` may have.
    cache_dir: see `vocab.load_or_train_vocab`.
    spm_path: a `.model` file with `PAD_ID` 0 and `EOS_ID` 1 (T5's models qualify), or None.

  Raises:
    ValueError: if the model at `spm_path` is too big or has other special ids.
  """
  if spm_path is None:
    return vocab_lib.load_or_train_vocab(
        corpus_name, lambda: _lines(texts_fn()), n_pieces, cache_dir)
  sp = spm.SentencePieceProcessor(model_file=str(spm_path))
  if sp.get_piece_size() > n_pieces:
    raise ValueError(f'spm_path={spm_path!r} has {sp.get_piece_size()} pieces, more than the '
                     f'{n_pieces} that vocab_size leaves for text')
  if (sp.pad_id(), sp.eos_id()) != (vocab_lib.PAD_ID, vocab_lib.EOS_ID):
    raise ValueError(f'spm_path={spm_path!r} has pad/eos ids {sp.pad_id()}/{sp.eos_id()}, '
                     f'not {vocab_lib.PAD_ID}/{vocab_lib.EOS_ID}')
  return sp


def sample_vocab(prefix, texts, n_pieces, cache_dir=None, spm_path=None, n_docs=10_000):
  """Returns `vocab_for` a sample of `texts`: at most `n_docs` of them, evenly spaced.

  The cache key is `prefix` plus a hash of the sample, so other texts never load a stale model.
  """
  sample = texts[::max(1, len(texts) // n_docs)][:n_docs]
  digest = hashlib.sha256('\0'.join(sample).encode()).hexdigest()[:12]
  return vocab_for(f'{prefix}_{digest}', lambda: sample, n_pieces, cache_dir, spm_path)


def _lines(texts):
  """Yields the non-blank lines of each text."""
  for text in texts:
    yield from (line for line in text.split('\n') if line.strip())


def epochs(items, seed=None):
  """Yields the items of a sequence forever: in order, or reshuffled each epoch if `seed` is set."""
  rng = None if seed is None else np.random.default_rng(seed)
  while True:
    order = range(len(items)) if rng is None else rng.permutation(len(items))
    for i in order:
      yield items[i]


def encode(sp, texts):
  """Yields each text's token ids as an int32 array."""
  for text in texts:
    yield np.array(sp.encode(text), np.int32)


def packed_windows(token_docs, length):
  """Concatenates 1-D token arrays, `EOS_ID` after each, and yields consecutive `[length]` windows.

  A document's tail continues in the next window; the last partial window is dropped.
  """
  eos = np.array([vocab_lib.EOS_ID], np.int32)
  buffer = np.zeros(0, np.int32)
  for doc in token_docs:
    buffer = np.concatenate([buffer, doc, eos])
    n_windows = len(buffer) // length
    for i in range(n_windows):
      yield buffer[i * length:(i + 1) * length]
    buffer = buffer[n_windows * length:]


def groups(iterable, n):
  """Yields lists of `n` consecutive items; a last incomplete list is dropped."""
  iterator = iter(iterable)
  while len(group := list(itertools.islice(iterator, n))) == n:
    yield group


def lm_batches(windows, batch_size):
  """Yields LM batches `(x, x, ones)` of shape `[batch_size, seq_len]` from `[seq_len]` windows."""
  for group in groups(windows, batch_size):
    batch = np.stack(group)  # [batch_size, seq_len]
    yield batch, batch, np.ones(batch.shape, np.float32)


def pad_rows(rows, length):
  """Stacks 1-D token arrays into `[len(rows), length]` int32, padded with `PAD_ID` on the right.

  Raises:
    ValueError: if a row is longer than `length` (nothing is truncated here).
  """
  out = np.full((len(rows), length), vocab_lib.PAD_ID, np.int32)
  for i, row in enumerate(rows):
    if len(row) > length:
      raise ValueError(f'a row of {len(row)} tokens does not fit length={length}')
    out[i, :len(row)] = row
  return out


def with_eos(ids, max_len):
  """Returns the first `max_len - 1` ids followed by `EOS_ID` (at most `max_len` ids)."""
  return np.append(np.asarray(ids[:max_len - 1], np.int32), np.int32(vocab_lib.EOS_ID))


def pair_batches(token_pairs, batch_size, inputs_len, targets_len):
  """Yields encoder-decoder batches from `(input_ids, target_ids)` pairs.

  Each side is truncated to `len - 1` tokens, ended with `EOS_ID` and padded.

  Yields:
    `(inputs [batch_size, inputs_len], targets [batch_size, targets_len],
    weights [batch_size, targets_len])` as described in the module docstring.
  """
  for group in groups(token_pairs, batch_size):
    yield pair_batch([with_eos(x, inputs_len) for x, _ in group],
                     [with_eos(y, targets_len) for _, y in group], inputs_len, targets_len)


def pair_batch(inputs_rows, targets_rows, inputs_len, targets_len):
  """Pads finished (EOS-ended) rows into one encoder-decoder batch `(inputs, targets, weights)`."""
  targets = pad_rows(targets_rows, targets_len)
  return (pad_rows(inputs_rows, inputs_len), targets,
          (targets != vocab_lib.PAD_ID).astype(np.float32))
