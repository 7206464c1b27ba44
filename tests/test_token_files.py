"""Tests for sparse_scaling.data.token_files: tiny shards written from the embedded vocabulary."""
import json

import gin
import numpy as np
import pytest

from sparse_scaling import data
from sparse_scaling.data import make_token_files
from sparse_scaling.data import token_files

VOCAB_SIZE = 512
SEQ_LEN = 16
BATCH_SIZE = 4


@pytest.fixture(scope='module')
def sp(cache_dir):
  return data.embedded_vocab(VOCAB_SIZE, cache_dir)


@pytest.fixture(scope='module')
def docs():
  """30 train and 6 validation documents: paragraphs of Hamlet, distinct."""
  hamlet = data.shakespeare_texts('validation')[0]
  paragraphs = [p for p in hamlet.split('\n\n') if p.strip()]
  texts = ['\n\n'.join(paragraphs[i * 3:(i + 1) * 3]) for i in range(36)]
  return {'train': texts[:30], 'validation': texts[30:]}


@pytest.fixture(scope='module')
def token_dir(tmp_path_factory, sp, docs):
  """Train shards of at most 600 tokens (lazy documents), validation shards of at most 400."""
  path = tmp_path_factory.mktemp('tokens')
  splits = {'train': [lambda t=t: t for t in docs['train']], 'validation': docs['validation']}
  manifest = token_files.write_token_files(path, splits, sp, 'test', 'the first 30 are train',
                                           shard_tokens=600, validation_shard_tokens=400)
  return path, manifest


def test_shards_hold_every_document_once_in_the_seeded_order(sp, docs, token_dir):
  path, manifest = token_dir
  assert json.loads((path / 'manifest.json').read_text()) == manifest
  assert manifest['vocab']['pieces'] == VOCAB_SIZE and manifest['source'] == 'test'
  for split, texts in docs.items():
    shards = manifest['shards'][split]
    limit = 600 if split == 'train' else 400
    assert len(shards) > 1
    arrays = [np.load(path / shard['file']) for shard in shards]
    for array, shard in zip(arrays, shards):
      assert array.dtype == np.uint16 and len(array) == shard['tokens']
      assert len(array) <= limit or shard['documents'] == 1  # a long document stays whole
      assert array[-1] == data.EOS_ID  # shards end at a document boundary
    tokens = np.concatenate(arrays).astype(np.int64)
    assert manifest['tokens'][split] == len(tokens)
    assert manifest['documents'][split] == sum(s['documents'] for s in shards) == len(texts)
    ends = np.flatnonzero(tokens == data.EOS_ID)
    decoded = [sp.decode(piece.tolist()) for piece in np.split(tokens, ends + 1)[:-1]]
    order = np.random.default_rng(token_files.ORDER_SEED).permutation(len(texts))
    assert decoded == [texts[i] for i in order]


def test_max_tokens_stops_a_split_after_the_shard_that_reaches_it(sp, docs, tmp_path):
  manifest = token_files.write_token_files(tmp_path, docs, sp, 'test', '-', shard_tokens=600,
                                           validation_shard_tokens=400, max_tokens=700)
  assert [len(manifest['shards'][split]) for split in ('train', 'validation')] == [2, 2]
  assert 700 <= manifest['tokens']['train'] <= 1200


def _stream(inputs, kind, n):
  stream = inputs.train_stream(1) if kind == 'train' else inputs.eval_stream(1)
  return [next(stream) for _ in range(n)]


def test_train_windows_cover_an_epoch_once_in_a_seeded_order(token_dir):
  path, manifest = token_dir
  inputs = data.token_file_lm_inputs(path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, seed=3)
  tokens = token_files.load_tokens(path, 'train').astype(np.int32)
  n_windows = manifest['tokens']['train'] // SEQ_LEN
  n_batches = n_windows // BATCH_SIZE
  batches = _stream(inputs, 'train', n_batches)
  windows = [tuple(row) for x, y, w in batches for row in x]
  expected = {tuple(tokens[i * SEQ_LEN:(i + 1) * SEQ_LEN]) for i in range(n_windows)}
  assert len(set(windows)) == len(windows) and set(windows) <= expected  # no window twice
  x, y, w = batches[0]
  assert x is y and x.shape == (BATCH_SIZE, SEQ_LEN) and x.dtype == np.int32
  assert w.dtype == np.float32 and (w == 1).all()
  again = _stream(data.token_file_lm_inputs(path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, seed=3),
                  'train', 3)
  other = _stream(data.token_file_lm_inputs(path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, seed=4),
                  'train', 3)
  assert all((a[0] == b[0]).all() for a, b in zip(batches, again))
  assert not all((a[0] == b[0]).all() for a, b in zip(batches, other))


def test_window_starts_visit_every_window_once_per_epoch():
  starts = token_files.shuffled_window_starts(10 * 8 + 5, 8, 3, seed=0)
  first = np.concatenate([next(starts) for _ in range(20)])  # 60 starts: 6 epochs of 10
  for epoch in first.reshape(6, 10):
    assert sorted(epoch) == list(range(0, 80, 8))
  assert not (first[:10] == first[10:20]).all()


def test_eval_windows_are_the_validation_tokens_in_order(token_dir):
  path, _ = token_dir
  inputs = data.token_file_lm_inputs(path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE,
                                     validation_shards=1)
  tokens = token_files.load_tokens(path, 'validation', 1).astype(np.int32)
  first, second = _stream(inputs, 'eval', 2), _stream(inputs, 'eval', 2)
  n = BATCH_SIZE * SEQ_LEN
  assert (first[0][0].reshape(-1) == tokens[:n]).all()
  assert (first[1][0].reshape(-1) == tokens[n:2 * n]).all()
  assert all((a[0] == b[0]).all() for a, b in zip(first, second))
  cycled = _stream(data.token_file_lm_inputs(path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE,
                                             eval_windows=2 * BATCH_SIZE), 'eval', 4)
  for i in range(4):  # the first two batches, again and again
    assert (cycled[i][0] == first[i % 2][0]).all()


def test_fewer_train_shards_read_only_the_first(token_dir):
  path, manifest = token_dir
  first = manifest['shards']['train'][0]
  assert len(token_files.load_tokens(path, 'train', 1)) == first['tokens']
  assert (token_files.load_tokens(path, 'train', 1) ==
          np.load(path / first['file'])).all()


def test_gin_binds_the_inputs(token_dir):
  path, _ = token_dir
  gin.parse_config([
      f"sparse_scaling.data.token_file_lm_inputs.path = '{path}'",
      'sparse_scaling.data.token_file_lm_inputs.batch_size = 2',
      'sparse_scaling.data.token_file_lm_inputs.seq_len = 8',
      f'sparse_scaling.data.token_file_lm_inputs.vocab_size = {VOCAB_SIZE}',
      'sparse_scaling.data.token_file_lm_inputs.train_shards = 1'])
  x, _, _ = next(data.token_file_lm_inputs().train_stream(1))
  assert x.shape == (2, 8)


def _one_line_error(error_type, function, *words):
  with pytest.raises(error_type) as info:
    function()
  message = str(info.value).splitlines()[0]  # gin appends a line naming the configurable
  assert all(word in message for word in words), message


def test_bad_input_gives_one_line_errors(token_dir, tmp_path, sp):
  path, manifest = token_dir
  _one_line_error(FileNotFoundError, lambda: data.token_file_lm_inputs(tmp_path), 'path=',
                  'manifest.json')
  _one_line_error(ValueError, lambda: data.token_file_lm_inputs(path, vocab_size=1024),
                  'vocab_size=1024', f'{VOCAB_SIZE} pieces')
  n_train = len(manifest['shards']['train'])
  _one_line_error(ValueError, lambda: data.token_file_lm_inputs(
      path, vocab_size=VOCAB_SIZE, train_shards=n_train + 1), f'train_shards={n_train + 1}')
  _one_line_error(ValueError, lambda: data.token_file_lm_inputs(
      path, batch_size=64, seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, validation_shards=1),
                  'batch_size=64', 'validation')
  _one_line_error(ValueError, lambda: data.token_file_lm_inputs(
      path, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, eval_windows=10_000), 'eval_windows=10000')
  # A copy with its second train shard missing: one shard reads, two do not.
  partial = tmp_path / 'partial'
  partial.mkdir()
  for file in path.iterdir():
    if file.name != manifest['shards']['train'][1]['file']:
      (partial / file.name).write_bytes(file.read_bytes())
  data.token_file_lm_inputs(partial, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, train_shards=1)
  _one_line_error(FileNotFoundError, lambda: data.token_file_lm_inputs(
      partial, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE, train_shards=2), 'train_shards=2', 'missing')

  class Huge:
    def get_piece_size(self):
      return 70_000
  _one_line_error(ValueError, lambda: token_files.write_token_files(
      tmp_path / 'x', {}, Huge(), 'test', '-'), '70000 pieces', 'uint16')
  _one_line_error(ValueError, lambda: token_files.write_token_files(
      tmp_path / 'x', {}, sp, 'test', '-', shard_tokens=0), 'shard_tokens=0')


def test_embedded_source_splits_by_work_with_its_vocabulary(cache_dir, tmp_path):
  splits, sp, rule = make_token_files.SOURCES['embedded'](VOCAB_SIZE, cache_dir)
  assert splits['validation'] == data.shakespeare_texts('validation')
  assert sp.get_piece_size() == VOCAB_SIZE and 'hamlet' in rule
  manifest = token_files.write_token_files(
      tmp_path, {'train': splits['train'][:2], 'validation': splits['validation'][:1]}, sp,
      'embedded', rule)
  assert manifest['documents'] == {'train': 2, 'validation': 1}
  assert (token_files.load_tokens(tmp_path, 'validation').astype(np.int64).tolist() ==
          sp.encode(splits['validation'][0]) + [data.EOS_ID])
