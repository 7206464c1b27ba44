"""Language-model inputs for trax on the embedded corpus (`corpus.py`, tokenized by `vocab.py`).

Each split is tokenized once per process into one int32 stream, with `EOS_ID` after every
work. Train batches are windows at random offsets (seeded numpy RNG, so infinite and
reproducible); eval batches are the consecutive non-overlapping windows of the validation
split, in order, cycled forever, so every eval stream yields the same batches.

A batch is `(inputs, targets, weights)`, each of shape `(batch_size, seq_len)`, with
`inputs is targets` (int32 token ids) and `weights` all ones (float32): trax's `TransformerLM`
shifts its input right internally, so it predicts each token from the ones before it.
"""
import functools
import itertools

import gin
import numpy as np

from sparse_scaling.data import corpus
from sparse_scaling.data import pipeline
from sparse_scaling.data import vocab as vocab_lib

VOCAB_SIZE = 4096


@gin.configurable(module='sparse_scaling.data')
def embedded_vocab(vocab_size=VOCAB_SIZE, cache_dir=None):
  """Returns the SentencePiece model of the embedded corpus's train split (see `vocab.py`)."""
  return vocab_lib.load_or_train_vocab(
      'shakespeare_train', functools.partial(corpus.shakespeare_texts, 'train'),
      vocab_size, cache_dir)


@gin.configurable(module='sparse_scaling.data')
def embedded_lm_inputs(batch_size=8, seq_len=128, vocab_size=VOCAB_SIZE, seed=0,
                       cache_dir=None):
  """Returns trax `Inputs` for language modeling on the embedded corpus.

  Args:
    batch_size: examples per batch, over all devices; the streams raise `ValueError` unless
      it is divisible by their `n_devices`.
    seq_len: tokens per example.
    vocab_size: size of the SentencePiece vocabulary (the model's `vocab_size`).
    seed: seed of the train windows' offsets.
    cache_dir: where the vocabulary is cached; see `vocab.load_or_train_vocab`.

  Returns:
    A `trax.data.inputs.Inputs` whose train stream yields random windows of the train split
    and whose eval stream yields the validation split in order; both are infinite and yield
    `(inputs, targets, weights)`:

      * inputs, targets: the same int32 array of shape `(batch_size, seq_len)`, ids in
        `[0, vocab_size)`.
      * weights: float32 ones of shape `(batch_size, seq_len)`.
  """
  def batches(split, starts_fn):
    tokens = split_tokens(split, vocab_size, cache_dir)
    for batch in windows(tokens, starts_fn(len(tokens), seq_len, batch_size), seq_len):
      yield batch, batch, np.ones(batch.shape, np.float32)

  return pipeline.make_inputs(
      batch_size,
      lambda: batches('train', functools.partial(random_starts, seed=seed)),
      lambda: batches('validation', consecutive_starts))


@functools.lru_cache(maxsize=None)
def split_tokens(split, vocab_size, cache_dir=None):
  """Returns one split as a 1-D int32 token stream, `EOS_ID` after each work.

  Computed once per process and arguments; `vocab_size` and `cache_dir` select the vocabulary
  (`embedded_vocab`). Shared by `embedded_lm_inputs` and the span corruption inputs.
  """
  sp = embedded_vocab(vocab_size, cache_dir)
  ids = sp.encode(corpus.shakespeare_texts(split))
  return np.concatenate([np.array(work + [vocab_lib.EOS_ID], np.int32) for work in ids])


def random_starts(n_tokens, length, batch_size, seed):
  """Yields, forever, `[batch_size]` random offsets of `length`-token windows of `n_tokens`."""
  rng = np.random.default_rng(seed)
  while True:
    yield rng.integers(0, n_tokens - length + 1, size=batch_size)  # [batch_size]


def consecutive_starts(n_tokens, length, batch_size):
  """Yields, forever, the offsets of consecutive non-overlapping windows, `batch_size` at a time.

  After the last whole window it starts again from 0.
  """
  n_windows = n_tokens // length
  for step in itertools.count():
    first = step * batch_size
    yield length * (np.arange(first, first + batch_size) % n_windows)  # [batch_size]


def windows(tokens, starts, length):
  """Yields `tokens[start:start + length]` stacked to `[batch_size, length]` per array of starts."""
  offsets = np.arange(length)
  for batch_starts in starts:
    yield tokens[batch_starts[:, None] + offsets]  # [batch_size, length]
