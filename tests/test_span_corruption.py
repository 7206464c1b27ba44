"""Tests for sparse_scaling.data.span_corruption: T5's noise mask, sentinels and the inputs."""
import re

import gin
import numpy as np
import pytest

from sparse_scaling import data
from sparse_scaling.data import lm
from sparse_scaling.data import span_corruption as sc

VOCAB_SIZE = 512  # 412 SentencePiece pieces + 100 sentinels.
EXTRA_IDS = sc.EXTRA_IDS
BATCH_SIZE = 4
INPUTS_LEN = 64
TARGETS_LEN = 32


@pytest.fixture(scope='module')
def sc_inputs(cache_dir):
  return data.embedded_span_corruption_inputs(
      batch_size=BATCH_SIZE, inputs_len=INPUTS_LEN, targets_len=TARGETS_LEN,
      vocab_size=VOCAB_SIZE, cache_dir=cache_dir)


def _n_spans(mask):
  return int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))


def _reconstruct(inputs, targets):
  return sc.uncorrupt(inputs, targets, VOCAB_SIZE)


@pytest.mark.parametrize('length', [2, 3, 10, 100, 568, 1001])
@pytest.mark.parametrize('noise_density, mean_span', [(0.15, 3.0), (0.5, 2.0), (0.3, 8.0)])
def test_noise_mask_has_exact_noise_tokens_and_spans(length, noise_density, mean_span):
  n_noise = min(max(round(length * noise_density), 1), length - 1)
  n_spans = max(round(n_noise / mean_span), 1)
  assert sc.noise_counts(length, noise_density, mean_span) == (n_noise, n_spans)
  for seed in range(5):
    mask = sc.random_spans_noise_mask(length, np.random.default_rng(seed), noise_density,
                                      mean_span)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == n_noise and _n_spans(mask) == n_spans
    assert not mask[0] and mask[-1]


def test_paper_setting_on_568_tokens_gives_85_noise_tokens_in_28_spans():
  assert sc.noise_counts(568) == (85, 28)
  assert sc.corrupted_lengths(568) == (512, 114)


def test_noise_mask_segmentation_is_random_and_repeats_per_seed():
  masks = [sc.random_spans_noise_mask(100, np.random.default_rng(seed)) for seed in range(20)]
  again = sc.random_spans_noise_mask(100, np.random.default_rng(0))
  np.testing.assert_array_equal(again, masks[0])
  assert len({mask.tobytes() for mask in masks}) == 20
  span_lengths = {len(run) for mask in masks
                  for run in ''.join('x' if m else ' ' for m in mask).split()}
  assert len(span_lengths) > 3  # the segmentation varies, not fixed-length spans


@pytest.mark.parametrize('length', [2, 7, 50, 568])
def test_inputs_and_targets_reconstruct_the_window(length):
  rng = np.random.default_rng(length)
  tokens = rng.integers(3, VOCAB_SIZE - EXTRA_IDS, size=length)
  inputs, targets = sc.span_corrupt(tokens, rng, VOCAB_SIZE)
  assert inputs.dtype == targets.dtype == np.int32
  assert (len(inputs), len(targets)) == sc.corrupted_lengths(length)
  assert inputs[-1] == targets[-1] == data.EOS_ID
  _, n_spans = sc.noise_counts(length)
  sentinels = VOCAB_SIZE - 1 - np.arange(n_spans)  # from the top of the vocabulary, in order
  np.testing.assert_array_equal(inputs[inputs >= VOCAB_SIZE - EXTRA_IDS], sentinels)
  np.testing.assert_array_equal(targets[targets >= VOCAB_SIZE - EXTRA_IDS], sentinels)
  assert targets[0] == VOCAB_SIZE - 1 and inputs[-2] == VOCAB_SIZE - n_spans
  np.testing.assert_array_equal(_reconstruct(inputs, targets), tokens)
  np.testing.assert_array_equal(_reconstruct(np.append(inputs, [0, 0]), targets), tokens)


def test_raw_length_matches_t5_random_spans_helper_and_respects_targets_len():
  assert sc.raw_length(512, 114) == sc.raw_length(512, 256) == 568  # T5: 512 -> 568, 114
  length = sc.raw_length(512, 50)
  assert sc.corrupted_lengths(length)[1] <= 50 < sc.corrupted_lengths(length + 1)[1]
  for inputs_len, targets_len in [(64, 32), (128, 64), (15, 4)]:
    length = sc.raw_length(inputs_len, targets_len)
    n_inputs, n_targets = sc.corrupted_lengths(length)
    assert n_inputs <= inputs_len and n_targets <= targets_len
    assert not all(n <= limit for n, limit in zip(sc.corrupted_lengths(length + 1),
                                                  (inputs_len, targets_len)))


@pytest.mark.parametrize('call, name', [
    (lambda: sc.raw_length(2, 1), 'inputs_len'),
    (lambda: sc.random_spans_noise_mask(10, np.random.default_rng(0), noise_density=1.0),
     'noise_density'),
    (lambda: sc.random_spans_noise_mask(10, np.random.default_rng(0),
                                        mean_noise_span_length=0.5), 'mean_noise_span_length'),
    (lambda: sc.random_spans_noise_mask(1, np.random.default_rng(0)), 'length'),
    (lambda: sc.random_spans_noise_mask(3, np.random.default_rng(0), 0.5, 1.0), 'noise_density'),
    (lambda: sc.span_corrupt(np.array([5, 6, 7, 511]), np.random.default_rng(0), 512),
     'vocab_size'),
    (lambda: sc.check_sentinels(2048, 100), 'extra_ids'),
])
def test_bad_arguments_raise_one_line_errors_naming_them(call, name):
  with pytest.raises(ValueError, match=re.escape(name)) as error:
    call()
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('stream_name', ['train_stream', 'eval_stream'])
def test_batches_have_encoder_decoder_shapes_dtypes_and_weights(sc_inputs, stream_name):
  n_inputs, n_targets = sc.corrupted_lengths(sc.raw_length(INPUTS_LEN, TARGETS_LEN))
  stream = getattr(sc_inputs, stream_name)(1)
  for inputs, targets, weights in [next(stream) for _ in range(3)]:
    assert inputs.shape == (BATCH_SIZE, INPUTS_LEN) and inputs.dtype == np.int32
    assert targets.shape == weights.shape == (BATCH_SIZE, TARGETS_LEN)
    assert targets.dtype == np.int32 and weights.dtype == np.float32
    assert 0 <= min(inputs.min(), targets.min()) and max(inputs.max(), targets.max()) < VOCAB_SIZE
    np.testing.assert_array_equal(inputs[:, n_inputs - 1], data.EOS_ID)
    np.testing.assert_array_equal(inputs[:, n_inputs:], 0)
    np.testing.assert_array_equal(targets[:, n_targets - 1], data.EOS_ID)
    np.testing.assert_array_equal(
        weights, np.broadcast_to(np.arange(TARGETS_LEN) < n_targets, weights.shape))
    np.testing.assert_array_equal(weights, targets != 0)


def test_eval_batches_reconstruct_the_validation_text_in_order(sc_inputs, cache_dir):
  length = sc.raw_length(INPUTS_LEN, TARGETS_LEN)
  tokens = lm.split_tokens('validation', VOCAB_SIZE - EXTRA_IDS, cache_dir)
  first, second = next(sc_inputs.eval_stream(1)), next(sc_inputs.eval_stream(1))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  windows = [_reconstruct(x, y) for x, y in zip(first[0], first[1])]
  np.testing.assert_array_equal(np.concatenate(windows), tokens[:BATCH_SIZE * length])
  sp = data.embedded_vocab(VOCAB_SIZE - EXTRA_IDS, cache_dir)
  assert data.shakespeare_texts('validation')[0].startswith(sp.decode(windows[0].tolist()))


def test_train_batches_are_windows_of_the_train_split_and_repeat_per_seed(sc_inputs, cache_dir):
  length = sc.raw_length(INPUTS_LEN, TARGETS_LEN)
  tokens = lm.split_tokens('train', VOCAB_SIZE - EXTRA_IDS, cache_dir)
  all_windows = np.lib.stride_tricks.sliding_window_view(tokens, length)
  first, second = next(sc_inputs.train_stream(1)), next(sc_inputs.train_stream(1))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  for inputs, targets in zip(first[0], first[1]):
    window = _reconstruct(inputs, targets)
    assert len(window) == length
    candidates = np.flatnonzero(tokens[:len(all_windows)] == window[0])
    assert any(np.array_equal(all_windows[i], window) for i in candidates)
  other_seed = data.embedded_span_corruption_inputs(
      batch_size=BATCH_SIZE, inputs_len=INPUTS_LEN, targets_len=TARGETS_LEN,
      vocab_size=VOCAB_SIZE, seed=1, cache_dir=cache_dir)
  assert not np.array_equal(next(other_seed.train_stream(1))[0], first[0])


def test_too_few_extra_ids_raise_at_construction():
  with pytest.raises(ValueError, match='extra_ids=2 '):
    data.embedded_span_corruption_inputs(inputs_len=512, targets_len=256, extra_ids=2)


def test_span_corruption_inputs_are_gin_configurable(cache_dir):
  gin.parse_config([
      'test_sc/sparse_scaling.data.embedded_span_corruption_inputs.batch_size = 2',
      'test_sc/sparse_scaling.data.embedded_span_corruption_inputs.inputs_len = 32'])
  with gin.config_scope('test_sc'):
    inputs = data.embedded_span_corruption_inputs(
        targets_len=16, vocab_size=VOCAB_SIZE, cache_dir=cache_dir)
  batch = next(inputs.train_stream(1))
  assert batch[0].shape == (2, 32) and batch[1].shape == (2, 16)
