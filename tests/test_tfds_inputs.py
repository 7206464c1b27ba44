"""Tests for the TFDS pipelines: sparse_scaling.data.{tfds_source,c4,arxiv}.

No data is downloaded: `tfds.testing.mock_data(policy=MockPolicy.USE_CODE)` fakes examples from
the builders' code, which tfds 4.9.10 ships (it does not ship their metadata files, which the
default policy would otherwise look for). `as_dataset_fn` supplies known texts where a test
checks token content.
"""
import contextlib
import re

import gin
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_scaling import data
from sparse_scaling.data import c4
from sparse_scaling.data import span_corruption as sc
from sparse_scaling.data import tfds_source

VOCAB_SIZE = 512
BATCH_SIZE = 2
SEQ_LEN = 32
MISSING_DIR = '/nonexistent/tensorflow_datasets'


@contextlib.contextmanager
def _mock_tfds(examples):
  """Mocks `tfds.load` to serve `examples[split]`, a dict from feature name to list of str."""
  def as_dataset(self, split, **unused_kwargs):
    del self
    return tf.data.Dataset.from_tensor_slices(
        {key: tf.constant(values) for key, values in examples[split].items()})
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_dataset_fn=as_dataset):
    yield


def _paragraphs(text, n):
  return [p for p in text.split('\n\n') if p.strip()][:n]


@pytest.fixture(scope='module')
def c4_docs():
  hamlet, macbeth = data.shakespeare_texts('validation')[:2]
  return {'train': {'text': _paragraphs(hamlet, 300)},
          'validation': {'text': _paragraphs(macbeth, 100)}}


@pytest.fixture(scope='module')
def spm_path(cache_dir):
  data.embedded_vocab(VOCAB_SIZE, cache_dir)
  [path] = cache_dir.glob(f'shakespeare_train_{VOCAB_SIZE}_*.model')
  return path


def _packed(sp, docs):
  return np.concatenate([np.array(sp.encode(doc) + [data.EOS_ID], np.int32) for doc in docs])


def test_missing_data_error_says_what_to_build_and_where_in_one_line():
  with pytest.raises(FileNotFoundError) as error:
    tfds_source.load_split('c4/en:3.1.0', 'train', MISSING_DIR)
  message = str(error.value)
  assert '\n' not in message
  for part in ['c4/en:3.1.0', f'data_dir={MISSING_DIR}', 'tfds build c4/en:3.1.0',
               'download_and_prepare', f'{MISSING_DIR}/c4/en/3.1.0']:
    assert part in message


@pytest.mark.parametrize('make_inputs, name', [
    (lambda: data.c4_lm_inputs(data_dir=MISSING_DIR), 'c4/en:3.1.0'),
    (lambda: data.c4_span_corruption_inputs(data_dir=MISSING_DIR, version='2.3.0'),
     'c4/en:2.3.0'),
    (lambda: data.arxiv_summarization_inputs(data_dir=MISSING_DIR),
     'scientific_papers/arxiv:1.1.1'),
])
def test_input_functions_raise_missing_data_error_at_construction(make_inputs, name):
  with pytest.raises(FileNotFoundError, match=re.escape(f'tfds build {name} ')):
    make_inputs()


def test_default_data_dir_is_named_in_the_error(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert f'data_dir={tmp_path} ' in tfds_source.missing_data_message('c4/en:3.1.0')


def test_c4_lm_batches_pack_documents_with_eos(c4_docs, cache_dir):
  with _mock_tfds(c4_docs):
    inputs = data.c4_lm_inputs(batch_size=BATCH_SIZE, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE,
                               data_dir=MISSING_DIR, cache_dir=cache_dir)
    train = [next(inputs.train_stream(1)) for _ in range(2)]
    evals = [next(inputs.eval_stream(1)) for _ in range(2)]
    other_seed = data.c4_lm_inputs(batch_size=BATCH_SIZE, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE,
                                   data_dir=MISSING_DIR, cache_dir=cache_dir, seed=1)
    other_train = next(other_seed.train_stream(1))
    sp = tfds_source.vocab('c4/en:3.1.0', ('text',), VOCAB_SIZE, cache_dir=cache_dir,
                           n_examples=c4.VOCAB_SAMPLE_DOCS)
  for x, y, weights in train + evals:
    assert x.shape == y.shape == weights.shape == (BATCH_SIZE, SEQ_LEN)
    assert x.dtype == np.int32 and weights.dtype == np.float32 and x is y
    assert 0 <= x.min() and x.max() < VOCAB_SIZE
    np.testing.assert_array_equal(weights, 1.0)
  np.testing.assert_array_equal(train[0][0], train[1][0])  # train repeats per seed
  assert not np.array_equal(other_train[0], train[0][0])
  np.testing.assert_array_equal(evals[0][0], evals[1][0])
  expected = _packed(sp, c4_docs['validation']['text'])[:BATCH_SIZE * SEQ_LEN]
  np.testing.assert_array_equal(evals[0][0].reshape(-1), expected)  # validation, in order
  assert sp.get_piece_size() == VOCAB_SIZE


def test_c4_span_corruption_batches_reconstruct_validation_text(c4_docs, cache_dir):
  inputs_len, targets_len = 48, 16
  with _mock_tfds(c4_docs):
    inputs = data.c4_span_corruption_inputs(
        batch_size=BATCH_SIZE, inputs_len=inputs_len, targets_len=targets_len,
        vocab_size=VOCAB_SIZE, data_dir=MISSING_DIR, cache_dir=cache_dir)
    x, y, weights = next(inputs.eval_stream(1))
    train_x, train_y, _ = next(inputs.train_stream(1))
    sp = tfds_source.vocab('c4/en:3.1.0', ('text',), VOCAB_SIZE - sc.EXTRA_IDS,
                           cache_dir=cache_dir, n_examples=c4.VOCAB_SAMPLE_DOCS)
  length = sc.raw_length(inputs_len, targets_len)
  n_inputs, n_targets = sc.corrupted_lengths(length)
  assert x.shape == train_x.shape == (BATCH_SIZE, inputs_len)
  assert y.shape == weights.shape == train_y.shape == (BATCH_SIZE, targets_len)
  np.testing.assert_array_equal(x[:, n_inputs - 1], data.EOS_ID)
  np.testing.assert_array_equal(y[:, n_targets - 1], data.EOS_ID)
  np.testing.assert_array_equal(weights.sum(axis=1), n_targets)
  np.testing.assert_array_equal(weights, y != 0)
  packed = _packed(sp, c4_docs['validation']['text'])
  windows = [sc.uncorrupt(inputs, targets, VOCAB_SIZE) for inputs, targets in zip(x, y)]
  np.testing.assert_array_equal(np.concatenate(windows), packed[:BATCH_SIZE * length])


def test_arxiv_pairs_are_truncated_ended_with_eos_and_padded(spm_path, cache_dir):
  inputs_len, targets_len = 64, 24
  hamlet = data.shakespeare_texts('validation')[0]
  articles, abstracts = _paragraphs(hamlet[:20000], 8), ['Short.', 'A ghost. ' * 40] * 4
  split = {'article': articles, 'abstract': abstracts, 'section_names': [''] * 8}
  with _mock_tfds({'train': split, 'validation': split}):
    inputs = data.arxiv_summarization_inputs(
        batch_size=BATCH_SIZE, inputs_len=inputs_len, targets_len=targets_len,
        vocab_size=VOCAB_SIZE, data_dir=MISSING_DIR, spm_path=spm_path, cache_dir=cache_dir)
    stream = inputs.eval_stream(1)
    batches = [next(stream) for _ in range(2)]
  sp = data.embedded_vocab(VOCAB_SIZE, cache_dir)
  rows = [(x, y, w) for batch in batches for x, y, w in zip(*batch)]
  for (x, y, weights), article, abstract in zip(rows, articles, abstracts):
    assert x.shape == (inputs_len,) and y.shape == weights.shape == (targets_len,)
    assert x.dtype == y.dtype == np.int32 and weights.dtype == np.float32
    for row, text, length in [(x, article, inputs_len), (y, abstract, targets_len)]:
      ids = sp.encode(text)[:length - 1] + [data.EOS_ID]
      np.testing.assert_array_equal(row, ids + [0] * (length - len(ids)))
    np.testing.assert_array_equal(weights, y != 0)
    assert weights.sum() == min(len(sp.encode(abstract)) + 1, targets_len)
  assert any(len(sp.encode(a)) >= inputs_len for a in articles)  # truncation was exercised
  assert rows[0][2].sum() < targets_len == rows[1][2].sum()  # padded and full abstracts


def test_arxiv_runs_on_tfds_random_mock_examples(spm_path, cache_dir):
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    inputs = data.arxiv_summarization_inputs(
        batch_size=BATCH_SIZE, inputs_len=32, targets_len=8, vocab_size=VOCAB_SIZE,
        data_dir=MISSING_DIR, spm_path=spm_path, cache_dir=cache_dir)
    x, y, weights = next(inputs.train_stream(1))
  assert x.shape == (BATCH_SIZE, 32) and y.shape == weights.shape == (BATCH_SIZE, 8)
  assert (x == data.EOS_ID).any(axis=1).all() and (y == data.EOS_ID).any(axis=1).all()


def test_spm_path_with_more_pieces_than_vocab_size_raises(spm_path, c4_docs):
  with _mock_tfds(c4_docs), pytest.raises(ValueError, match='spm_path='):
    data.c4_lm_inputs(vocab_size=VOCAB_SIZE - 1, data_dir=MISSING_DIR, spm_path=spm_path)


@pytest.mark.parametrize(
    'name', ['c4_lm_inputs', 'c4_span_corruption_inputs', 'arxiv_summarization_inputs'])
def test_input_functions_are_registered_with_gin(name):
  gin.parse_config([f'gin_check/sparse_scaling.data.{name}.batch_size = 4'])  # raises if unknown
