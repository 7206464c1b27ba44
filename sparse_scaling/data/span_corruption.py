"""T5-style span corruption, the paper's C4 objective, in numpy; and its embedded-corpus inputs.

docs/paper.md §5: the encoder-decoder is pretrained on span corruption with noise density
0.15 and mean noise span length 3 (trax's `c4_trax_data.gin`). This is a re-implementation of
T5's `random_spans_noise_mask` and `noise_span_to_unique_sentinel` (Raffel et al., 2020,
`t5.data.preprocessors`), without the `t5` package:

  * a window of `length` tokens gets exactly `round(length * noise_density)` noise tokens
    (at least 1, at most `length - 1`) in exactly `round(noise / mean_noise_span_length)` spans
    (at least 1); noise and non-noise lengths are each a uniformly random composition into that
    many positive parts, and the window alternates non-noise, noise, ..., ending with noise.
  * the inputs keep the non-noise tokens and replace span `k` (from 1) by the sentinel
    `vocab_size - k`, the targets are the noise spans each preceded by its sentinel, and both end
    in `EOS_ID`:

      tokens  a b c d e f g h        inputs   a b S1 e f g S2 EOS
      noise       c d       h        targets  S1 c d S2 h EOS      (S1 = vocab_size - 1)

Sentinels come from the top of the vocabulary as in T5 and trax, so the SentencePiece model has
`vocab_size - extra_ids` pieces and text never collides with a sentinel (T5 adds 100 extra ids
to its 32,000 pieces; trax's `c4_trax_data.gin` lets them overlap the top pieces instead).

The window length is chosen so that inputs and targets always fit (`raw_length`, T5's
`random_spans_helper`): every example has the same lengths, nothing is truncated, and only the
tail of a short side is padding. Windows are cut from the token stream of a corpus, documents
joined by `EOS_ID` (see `pipeline.packed_windows`).
"""
import functools

import gin
import numpy as np

from sparse_scaling.data import lm
from sparse_scaling.data import pipeline
from sparse_scaling.data import vocab as vocab_lib

NOISE_DENSITY = 0.15  # Paper §5; c4_trax_data.gin.
MEAN_NOISE_SPAN_LENGTH = 3.0  # Paper §5; c4_trax_data.gin.
EXTRA_IDS = 100  # Sentinel ids above the SentencePiece pieces (T5's `DEFAULT_EXTRA_IDS`).


def noise_counts(length, noise_density=NOISE_DENSITY,
                 mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Returns `(n_noise_tokens, n_noise_spans)` of a `length`-token window, as T5 computes them."""
  n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  n_spans = max(int(round(n_noise / mean_noise_span_length)), 1)
  return n_noise, n_spans


def corrupted_lengths(length, noise_density=NOISE_DENSITY,
                      mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Returns the lengths `(inputs, targets)`, EOS included, of a corrupted `length`-token window."""
  n_noise, n_spans = noise_counts(length, noise_density, mean_noise_span_length)
  return length - n_noise + n_spans + 1, n_noise + n_spans + 1


def raw_length(inputs_len, targets_len, noise_density=NOISE_DENSITY,
               mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Returns the longest window whose corrupted inputs and targets fit the two lengths.

  T5's `random_spans_helper` sizes the window from `inputs_len` alone (512 -> 568 tokens, with
  114 targets); here `targets_len` bounds it too, so a short `targets_len` shortens the window.

  Raises:
    ValueError: if no window of at least 2 tokens fits.
  """
  fits = [length for length in range(2, inputs_len + targets_len)
          if all(n <= limit for n, limit in zip(
              corrupted_lengths(length, noise_density, mean_noise_span_length),
              (inputs_len, targets_len)))]
  if not fits:
    raise ValueError(f'inputs_len={inputs_len} and targets_len={targets_len} fit no window')
  return fits[-1]


def random_spans_noise_mask(length, rng, noise_density=NOISE_DENSITY,
                            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Returns T5's random span noise mask of a window.

  Args:
    length: tokens in the window, at least 2.
    rng: a `numpy.random.Generator`.
    noise_density: fraction of tokens that are noise, in (0, 1).
    mean_noise_span_length: mean tokens per noise span, at least 1.

  Returns:
    A bool array `[length]`, True on the noise tokens; False at 0 and True at the end.
  """
  _check_noise_args(length, noise_density, mean_noise_span_length)
  n_noise, n_spans = noise_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(n_noise, n_spans, rng)  # [n_spans]
  nonnoise_lengths = _random_segmentation(length - n_noise, n_spans, rng)  # [n_spans]
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * n_spans]
  span_starts = np.zeros(length, bool)
  span_starts[np.cumsum(interleaved)[:-1]] = True
  return np.cumsum(span_starts) % 2 == 1  # odd spans are noise


def _random_segmentation(n_items, n_segments, rng):
  """Returns `[n_segments]` positive lengths summing to `n_items`, uniform over compositions."""
  if n_segments > n_items:
    raise ValueError(f'noise_density leaves {n_items} tokens for {n_segments} spans')
  cuts = np.sort(rng.choice(np.arange(1, n_items), n_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_corrupt(tokens, rng, vocab_size, noise_density=NOISE_DENSITY,
                 mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Corrupts one token window as T5 does.

  Args:
    tokens: int array `[length]`, ids below the sentinels, `length >= 2`.
    rng: a `numpy.random.Generator` drawing the noise mask.
    vocab_size: the model's vocabulary; sentinels are `vocab_size - 1`, `vocab_size - 2`, ...
    noise_density: fraction of tokens that are noise.
    mean_noise_span_length: mean tokens per noise span.

  Returns:
    `(inputs, targets)`, int32 arrays of the lengths `corrupted_lengths(length)`, each ending in
    `EOS_ID`; see the module docstring.

  Raises:
    ValueError: if a token id reaches the sentinels.
  """
  tokens = np.asarray(tokens, np.int32)
  mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  _, n_spans = noise_counts(len(tokens), noise_density, mean_noise_span_length)
  if tokens.max() >= vocab_size - n_spans:
    raise ValueError(f'token id {tokens.max()} reaches the sentinels of vocab_size={vocab_size}')
  return _spans_to_sentinels(tokens, mask, vocab_size), _spans_to_sentinels(
      tokens, ~mask, vocab_size)


def _spans_to_sentinels(tokens, mask, vocab_size):
  """Replaces each span of masked tokens by one sentinel (the k-th: vocab_size - k); adds EOS."""
  previous = np.concatenate([[False], mask[:-1]])
  first = mask & ~previous
  out = np.where(first, vocab_size - np.cumsum(first), tokens)[~(mask & previous)]
  return np.append(out, vocab_lib.EOS_ID).astype(np.int32)


def uncorrupt(inputs, targets, vocab_size, extra_ids=EXTRA_IDS):
  """Inverts `span_corrupt`: puts each noise span of the targets back at its sentinel.

  Args:
    inputs: int array as `span_corrupt` returns it, optionally right-padded with `PAD_ID`.
    targets: the same for the targets.
    vocab_size: the model's vocabulary.
    extra_ids: ids at the top of the vocabulary that are sentinels.

  Returns:
    The original window, an int32 array.
  """
  inputs, targets = (np.trim_zeros(np.asarray(x), 'b')[:-1] for x in (inputs, targets))
  first_sentinel = vocab_size - extra_ids
  starts = np.flatnonzero(targets >= first_sentinel)  # where each span's sentinel is
  ends = np.append(starts[1:], len(targets))
  spans = {int(targets[start]): targets[start + 1:end] for start, end in zip(starts, ends)}
  return np.concatenate(
      [spans[int(t)] if t >= first_sentinel else [t] for t in inputs]).astype(np.int32)


def span_corruption_batches(windows, rng, batch_size, inputs_len, targets_len, vocab_size,
                            noise_density=NOISE_DENSITY,
                            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Yields encoder-decoder batches of corrupted windows.

  Args:
    windows: iterable of int arrays `[raw_length(inputs_len, targets_len, ...)]`.
    rng: a `numpy.random.Generator` for the noise masks.
    batch_size: examples per batch.
    inputs_len: padded length of the inputs.
    targets_len: padded length of the targets.
    vocab_size: the model's vocabulary (sentinels at its top).
    noise_density: fraction of tokens that are noise.
    mean_noise_span_length: mean tokens per noise span.

  Yields:
    `(inputs [batch_size, inputs_len], targets [batch_size, targets_len],
    weights [batch_size, targets_len])`: int32 ids padded with 0, float32 weights 1 on target
    tokens (EOS included) and 0 on padding.
  """
  corrupt = functools.partial(span_corrupt, rng=rng, vocab_size=vocab_size,
                              noise_density=noise_density,
                              mean_noise_span_length=mean_noise_span_length)
  for group in pipeline.groups(map(corrupt, windows), batch_size):
    yield pipeline.pair_batch([x for x, _ in group], [y for _, y in group], inputs_len,
                              targets_len)


def check_sentinels(length, extra_ids, noise_density=NOISE_DENSITY,
                    mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Raises `ValueError` unless `extra_ids` covers the noise spans of a `length`-token window."""
  _check_noise_args(length, noise_density, mean_noise_span_length)
  _, n_spans = noise_counts(length, noise_density, mean_noise_span_length)
  if n_spans > extra_ids:
    raise ValueError(f'extra_ids={extra_ids} is fewer than the {n_spans} noise spans of a '
                     f'{length}-token window')


def _check_noise_args(length, noise_density, mean_noise_span_length):
  if not 0 < noise_density < 1:
    raise ValueError(f'noise_density must be in (0, 1), got {noise_density}')
  if mean_noise_span_length < 1:
    raise ValueError(f'mean_noise_span_length must be >= 1, got {mean_noise_span_length}')
  if length < 2:
    raise ValueError(f'span corruption needs a window of >= 2 tokens, got length={length}')


@gin.configurable(module='sparse_scaling.data')
def embedded_span_corruption_inputs(batch_size=8, inputs_len=128, targets_len=64,
                                    vocab_size=lm.VOCAB_SIZE, noise_density=NOISE_DENSITY,
                                    mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH, seed=0,
                                    cache_dir=None, extra_ids=EXTRA_IDS):
  """Returns trax `Inputs` for span corruption on the embedded corpus (encoder-decoder).

  Windows of `raw_length(inputs_len, targets_len)` tokens are cut from `lm.split_tokens` as in
  `embedded_lm_inputs`: at seeded random offsets of the train split, and consecutively through
  the validation split (cycled). Each window is corrupted with its own noise mask.

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    inputs_len: padded length of the encoder inputs (512 in the paper).
    targets_len: padded length of the decoder targets (256 in the paper's trax config).
    vocab_size: the model's vocabulary: `vocab_size - extra_ids` SentencePiece pieces, then the
      sentinels.
    noise_density: fraction of each window that is noise.
    mean_noise_span_length: mean tokens per noise span.
    seed: seed of the train offsets and noise masks (eval uses a fixed mask seed).
    cache_dir: where the vocabulary is cached; see `vocab.load_or_train_vocab`.
    extra_ids: sentinel ids reserved at the top of the vocabulary.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs [batch_size, inputs_len],
    targets [batch_size, targets_len], weights [batch_size, targets_len])`: int32 ids padded
    with 0 and ending in `EOS_ID`; float32 weights 1 on target tokens incl. EOS, 0 on padding.
  """
  length = raw_length(inputs_len, targets_len, noise_density, mean_noise_span_length)
  check_sentinels(length, extra_ids, noise_density, mean_noise_span_length)

  def batches(split, starts_fn, noise_seed):
    tokens = lm.split_tokens(split, vocab_size - extra_ids, cache_dir)
    rows = (row for batch in lm.windows(tokens, starts_fn(len(tokens), length, batch_size),
                                        length)
            for row in batch)
    return span_corruption_batches(rows, np.random.default_rng(noise_seed), batch_size,
                                   inputs_len, targets_len, vocab_size, noise_density,
                                   mean_noise_span_length)

  return pipeline.make_inputs(
      batch_size,
      lambda: batches('train', functools.partial(lm.random_starts, seed=seed), (seed, 1)),
      lambda: batches('validation', lm.consecutive_starts, 0))
