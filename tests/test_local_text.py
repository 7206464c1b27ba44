"""Tests for sparse_scaling.data.local_text: text directories and JSONL files in tmp_path."""
import gzip
import json
import logging
import time

import gin
import numpy as np
import pytest

from sparse_scaling import data
from sparse_scaling.data import local_text

VOCAB_SIZE = 512
BATCH_SIZE = 2
SEQ_LEN = 32
N_FILES = 40


@pytest.fixture(scope='module')
def spm_path(cache_dir):
  data.embedded_vocab(VOCAB_SIZE, cache_dir)
  [path] = cache_dir.glob(f'shakespeare_train_{VOCAB_SIZE}_*.model')
  return path


@pytest.fixture(scope='module')
def paragraphs():
  hamlet = data.shakespeare_texts('validation')[0]
  return [p for p in hamlet.split('\n\n') if p.strip()]


@pytest.fixture(scope='module')
def text_dir(tmp_path_factory, paragraphs):
  """N_FILES documents: plain, gzipped and nested, plus files that must be skipped."""
  root = tmp_path_factory.mktemp('texts')
  (root / 'sub').mkdir()
  texts = {}
  for i in range(N_FILES):
    name = f'sub/doc{i:02d}.txt.gz' if i % 3 == 0 else f'doc{i:02d}.txt'
    texts[name] = '\n\n'.join(paragraphs[i * 20:(i + 1) * 20])
    content = texts[name].encode()
    (root / name).write_bytes(gzip.compress(content) if name.endswith('.gz') else content)
  (root / 'blank.txt').write_text('\n  \n')
  (root / 'notes.md').write_text('not a .txt file')
  return root, texts


def _jsonl(path, records):
  path.write_text(''.join(json.dumps(record) + '\n' for record in records))
  return path


def _packed(sp, docs):
  return np.concatenate([np.array(sp.encode(doc) + [data.EOS_ID], np.int32) for doc in docs])


def test_directory_is_split_by_relative_path_hash(text_dir):
  root, texts = text_dir
  train, validation = (local_text.documents(root, split) for split in ('train', 'validation'))
  expected = {split: [texts[name] for name in sorted(texts, key=lambda n: (root / n).as_posix())
                      if local_text.split_of(name) == split]
              for split in ('train', 'validation')}
  assert train == expected['train'] and validation == expected['validation']
  assert len(train) + len(validation) == N_FILES  # blank.txt and notes.md are skipped
  assert 0 < len(validation) < len(train)


def test_split_of_is_a_stable_hash_rule():
  keys = [f'doc{i}' for i in range(2000)]
  splits = [local_text.split_of(key) for key in keys]
  assert splits == [local_text.split_of(key) for key in keys]
  assert 0.08 < splits.count('validation') / len(keys) < 0.12
  assert local_text.split_of('doc0') == local_text.split_of('doc0')


def test_undecodable_bytes_are_replaced_and_counted_in_the_log(tmp_path, caplog):
  (tmp_path / 'bad.txt').write_bytes(b'caf\xe9 and \xff\xfe bytes')
  with caplog.at_level(logging.WARNING):
    [text] = local_text.documents(tmp_path, local_text.split_of('bad.txt'))
  assert text == 'caf\ufffd and \ufffd\ufffd bytes'
  assert 'replaced 3 undecodable byte sequences' in caplog.text


def test_jsonl_records_are_split_by_document_hash_and_duplicates_stay_together(tmp_path):
  records = [{'document': f'document {i}', 'summary': f'summary {i}', 'id': i}
             for i in range(100)]
  records += [{'document': 'document 7', 'summary': 'another summary'}]
  path = _jsonl(tmp_path / 'pairs.jsonl', records)
  fields = ('document', 'summary')
  train, validation = (local_text.documents(path, split, fields)
                       for split in ('train', 'validation'))
  assert len(train) + len(validation) == 101
  for split, docs in [('train', train), ('validation', validation)]:
    assert all(local_text.split_of(document) == split for document, _ in docs)
  assert ('document 7', 'another summary') in (train if local_text.split_of('document 7') ==
                                               'train' else validation)


def test_gzipped_jsonl_with_one_field_gives_strings(tmp_path):
  lines = ''.join(json.dumps({'text': f'text {i}'}) + '\n' for i in range(50)) + '\n'
  path = tmp_path / 'texts.jsonl.gz'
  path.write_bytes(gzip.compress(lines.encode()))
  docs = local_text.documents(path, 'train') + local_text.documents(path, 'validation')
  assert sorted(docs) == sorted(f'text {i}' for i in range(50))


@pytest.mark.parametrize('make_corpus, error, match', [
    (lambda d: d, ValueError, 'no usable documents'),
    (lambda d: (d / 'a.txt').write_text(' \n') and d, ValueError, 'no usable documents'),
    (lambda d: _jsonl(d / 'e.jsonl', []), ValueError, 'no usable documents'),
    (lambda d: _jsonl(d / 'f.jsonl', [{'text': 'a'}, {'txt': 'b'}]), ValueError,
     r"f.jsonl:2 lacks string field 'text'"),
    (lambda d: (d / 'g.jsonl').write_text('{"text": "a"}\n{oops\n') and d / 'g.jsonl',
     ValueError, 'g.jsonl:2 is not JSON'),
    (lambda d: d / 'missing', FileNotFoundError, 'does not exist'),
    (lambda d: (d / 'x.csv').write_text('a,b') and d / 'x.csv', ValueError, 'neither'),
    (lambda d: (d / 'one.txt').write_text('just one') and d, ValueError,  # one.txt is train
     'no validation documents'),
])
def test_unusable_corpora_raise_one_line_errors(tmp_path, make_corpus, error, match):
  path = make_corpus(tmp_path)
  with pytest.raises(error, match=match) as raised:
    local_text.documents(path, 'validation')
  assert '\n' not in str(raised.value)
  assert str(path) in str(raised.value)


def test_lm_inputs_pack_documents_and_eval_in_order(text_dir, spm_path, cache_dir):
  root, _ = text_dir
  inputs = data.local_text_lm_inputs(root, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                                     vocab_size=VOCAB_SIZE, spm_path=spm_path,
                                     cache_dir=cache_dir)
  train, evals = next(inputs.train_stream(1)), next(inputs.eval_stream(1))
  for x, y, weights in [train, evals]:
    assert x.shape == weights.shape == (BATCH_SIZE, SEQ_LEN) and x is y
    assert x.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(weights, 1.0)
  np.testing.assert_array_equal(next(inputs.train_stream(1))[0], train[0])
  sp = data.embedded_vocab(VOCAB_SIZE, cache_dir)
  expected = _packed(sp, local_text.documents(root, 'validation'))[:BATCH_SIZE * SEQ_LEN]
  np.testing.assert_array_equal(evals[0].reshape(-1), expected)


def test_lm_inputs_train_a_vocabulary_on_the_train_split(text_dir, tmp_path):
  root, _ = text_dir
  inputs = data.local_text_lm_inputs(root, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                                     vocab_size=VOCAB_SIZE, cache_dir=tmp_path)
  [model] = tmp_path.glob(f'local_{root.name}_*_{VOCAB_SIZE}_*.model')
  assert next(inputs.train_stream(1))[0].max() < VOCAB_SIZE
  assert model.exists()


def test_summarization_pairs_are_truncated_ended_with_eos_and_padded(tmp_path, paragraphs,
                                                                     spm_path, cache_dir):
  inputs_len, targets_len = 48, 16
  records = [{'article': paragraphs[i] + ' ' + paragraphs[i + 1], 'abstract': paragraphs[i][:20]}
             for i in range(60)]
  path = _jsonl(tmp_path / 'pairs.jsonl', records)
  inputs = data.local_text_summarization_inputs(
      path, batch_size=BATCH_SIZE, inputs_len=inputs_len, targets_len=targets_len,
      vocab_size=VOCAB_SIZE, document_field='article', summary_field='abstract',
      spm_path=spm_path, cache_dir=cache_dir)
  x, y, weights = next(inputs.eval_stream(1))
  assert x.shape == (BATCH_SIZE, inputs_len) and y.shape == weights.shape == (
      BATCH_SIZE, targets_len)
  sp = data.embedded_vocab(VOCAB_SIZE, cache_dir)
  pairs = local_text.documents(path, 'validation', ('article', 'abstract'))[:BATCH_SIZE]
  for row_x, row_y, row_w, (article, abstract) in zip(x, y, weights, pairs):
    for row, text, length in [(row_x, article, inputs_len), (row_y, abstract, targets_len)]:
      ids = sp.encode(text)[:length - 1] + [data.EOS_ID]
      np.testing.assert_array_equal(row, ids + [0] * (length - len(ids)))
    np.testing.assert_array_equal(row_w, row_y != 0)


def test_summarization_needs_a_jsonl_file(text_dir):
  with pytest.raises(ValueError, match='directory'):
    data.local_text_summarization_inputs(text_dir[0])


@pytest.mark.parametrize('name', ['local_text_lm_inputs', 'local_text_summarization_inputs'])
def test_input_functions_are_registered_with_gin(name):
  gin.parse_config([f'gin_check/sparse_scaling.data.{name}.batch_size = 4'])  # raises if unknown


def test_unusable_documents_are_skipped_with_a_count_and_the_rest_kept(tmp_path, paragraphs,
                                                                        caplog):
  good = {f'doc{i}.txt': '\n\n'.join(paragraphs[i * 5:(i + 1) * 5]) for i in range(30)}
  for name, text in good.items():
    (tmp_path / name).write_text(text)
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'binary.txt').write_bytes(bytes(range(256)) * 64)
  (tmp_path / 'latin1.txt').write_bytes('café crème'.encode('latin-1'))  # kept, bytes replaced
  (tmp_path / 'one_line.txt').write_bytes(b'word ' * 10_000_000)  # 50 MB, no newline
  start = time.perf_counter()
  with caplog.at_level(logging.WARNING):
    docs = (local_text.documents(tmp_path, 'train') +
            local_text.documents(tmp_path, 'validation'))
  seconds = time.perf_counter() - start
  assert sorted(docs) == sorted(list(good.values()) + ['caf\ufffd cr\ufffdme'])
  assert (f"{tmp_path}: skipped 3 of 34 documents: 1 binary (NUL bytes), e.g. 'binary.txt'; "
          "1 blank, e.g. 'empty.txt'; 1 a line over 1,000,000 characters, e.g. 'one_line.txt'"
          ) in caplog.text
  assert seconds < 10  # reading and checking the 50 MB line: well under a second here


def test_a_gzip_file_that_does_not_decompress_fails_naming_it(tmp_path):
  (tmp_path / 'good.txt.gz').write_bytes(gzip.compress(b'some text')[:-8])  # truncated
  with pytest.raises(ValueError, match=r'good\.txt\.gz does not decompress') as error:
    local_text.documents(tmp_path, 'train')
  assert '\n' not in str(error.value)


def test_a_directory_of_10000_tiny_files_loads_and_trains_a_vocabulary(tmp_path):
  corpus_dir = tmp_path / 'corpus'
  corpus_dir.mkdir()
  for i in range(10_000):
    (corpus_dir / f'{i:05d}.txt').write_text(f'line {i} of the corpus.\n')
  start = time.perf_counter()
  inputs = data.local_text_lm_inputs(corpus_dir, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                                     vocab_size=300, cache_dir=tmp_path / 'cache')
  x, _, _ = next(inputs.train_stream(1))
  seconds = time.perf_counter() - start
  assert x.shape == (BATCH_SIZE, SEQ_LEN) and x.max() < 300
  assert seconds < 30  # about 2 s here


def test_a_corpus_too_small_for_the_vocabulary_fails_in_one_line(tmp_path):
  for i in range(20):
    (tmp_path / f'{i}.txt').write_text(f'a few words, {i}')
  with pytest.raises(ValueError, match='SentencePiece cannot train a 4096-piece vocabulary') as e:
    data.local_text_lm_inputs(tmp_path, vocab_size=4096, cache_dir=tmp_path / 'cache')
  message = str(e.value).splitlines()[0]  # gin adds a line naming the input function
  assert '(Vocabulary size too high (4096). Please set it to a value <= ' in message
