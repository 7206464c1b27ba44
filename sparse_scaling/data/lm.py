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
from trax.data import inputs as trax_inputs

from sparse_scaling.data import corpus
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
  def make_stream(split, starts_fn):
    def stream(n_devices):
      if batch_size % n_devices:
        raise ValueError(
            f'batch_size={batch_size} is not divisible by n_devices={n_devices}')
      tokens = _split_tokens(split, vocab_size, cache_dir)
      return _windows(tokens, starts_fn(len(tokens)), seq_len)
    return stream

  def train_starts(n_tokens):
    rng = np.random.default_rng(seed)
    while True:
      yield rng.integers(0, n_tokens - seq_len + 1, size=batch_size)  # [batch_size]

  def eval_starts(n_tokens):
    n_windows = n_tokens // seq_len
    for step in itertools.count():
      first = step * batch_size
      yield seq_len * (np.arange(first, first + batch_size) % n_windows)  # [batch_size]

  return trax_inputs.Inputs(make_stream('train', train_starts),
                            make_stream('validation', eval_starts))


@functools.lru_cache(maxsize=None)
def _split_tokens(split, vocab_size, cache_dir):
  """Returns one split as a 1-D int32 token stream, `EOS_ID` after each work."""
  sp = embedded_vocab(vocab_size, cache_dir)
  ids = sp.encode(corpus.shakespeare_texts(split))
  return np.concatenate([np.array(work + [vocab_lib.EOS_ID], np.int32) for work in ids])


def _windows(tokens, starts, seq_len):
  """Yields `(batch, batch, weights)` for each array of window starts in `starts`."""
  offsets = np.arange(seq_len)
  for batch_starts in starts:
    batch = tokens[batch_starts[:, None] + offsets]  # [batch_size, seq_len]
    yield batch, batch, np.ones(batch.shape, np.float32)
