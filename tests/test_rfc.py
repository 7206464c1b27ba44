"""Tests for sparse_scaling.data.rfc on a small fake doc-rfc tree written to tmp_path.

The real package (Debian non-free, 530 MB) is not needed: the fake files follow its layout,
`<category>/rfcNNNN.txt.gz` in the RFC plain-text format (page footers, form feeds, running
headers) with the RFC Editor's `rfcNNNN.json` beside.
"""
import gzip
import json
import logging
import time

import gin
import numpy as np
import pytest

from sparse_scaling import data
from sparse_scaling.data import rfc as rfc_lib
from sparse_scaling.reproduce import summarization

VOCAB_SIZE = 512
BATCH_SIZE = 2


def _indent(text):
  return '\n'.join('   ' + line for line in text.split('\n'))


def _rfc_text(number, paragraphs, abstract=None):
  """An RFC in the plain-text format: two pages, an Abstract section if `abstract` is given."""
  abstract_section = f'Abstract\n\n{_indent(abstract)}\n\n' if abstract else ''
  return (
      f'Network Working Group                                          A. Author\n'
      f'Request for Comments: {number}                                    Example\n'
      f'Category: Informational                                       April 2001\n\n\n'
      f'                    A Protocol for Testing Loaders\n\n'
      f'{abstract_section}'
      f'Status of This Memo\n\n{_indent("This memo provides information.")}\n\n'
      f'1.  Introduction\n\n{_indent(paragraphs[0])}\n\n\n\n'
      f'Author                        Informational                     [Page 1]\r\n'
      f'\f\n'
      f'RFC {number}             Testing Loaders                     April 2001\n\n\n'
      f'2.  Details\n\n{_indent(paragraphs[1])}\n\n\n\n'
      f'Author                        Informational                     [Page 2]\n')


def _meta(number, abstract, obsoletes=()):
  return {'draft': '', 'doc_id': f'RFC{number:04d}', 'title': 'A Protocol for Testing Loaders',
          'authors': ['A. Author'], 'format': ['ASCII', 'HTML'], 'page_count': '2',
          'pub_status': 'INFORMATIONAL', 'status': 'INFORMATIONAL', 'source': 'Legacy',
          'abstract': abstract, 'pub_date': 'April 2001', 'keywords': [''],
          'obsoletes': [f'RFC{n:04d}' for n in obsoletes], 'obsoleted_by': [],
          'updates': [], 'updated_by': [], 'see_also': [], 'doi': f'10.17487/RFC{number:04d}',
          'errata_url': None}


@pytest.fixture(scope='module')
def paragraphs():
  hamlet = data.shakespeare_texts('validation')[0]
  return [p.replace('\n', ' ') for p in hamlet.split('\n\n') if len(p) > 200]


@pytest.fixture(scope='module')
def rfc_root(tmp_path_factory, paragraphs):
  """A fake doc-rfc tree; returns (root, {number: (text, json abstract or None, body)})."""
  root = tmp_path_factory.mktemp('RFC')
  rfcs = {}
  for i, number in enumerate(list(range(1, 60)) + [70, 83]):
    body = paragraphs[2 * i:2 * i + 2]
    abstract = f'<p>This memo number {number} &amp; its {paragraphs[100 + i][:150]}</p>'
    has_section, meta_abstract, obsoletes = True, abstract, ()
    if number == 3:  # JSON abstract copied from the introduction, no Abstract section
      has_section, meta_abstract = False, body[0][:300]
    elif number == 4:  # no JSON at all
      meta_abstract = None
    elif number == 5:  # empty JSON abstract, as for the early RFCs
      meta_abstract = ''
    elif number == 83:  # a revision of RFC 70: validation with it
      obsoletes = (70,)
    elif number == 41:  # RFC 41 obsoletes RFC 50: both train, by 41
      obsoletes = (50,)
    text = _rfc_text(number, body, rfc_lib.clean_abstract(abstract) if has_section else None)
    category = ('informational', 'historic', 'standard')[number % 3]
    (root / category).mkdir(exist_ok=True)
    name = f'rfc{number}.txt'
    if number == 7:  # under 4 kB: Debian leaves it uncompressed
      (root / category / name).write_text(text)
    else:
      (root / category / f'{name}.gz').write_bytes(gzip.compress(text.encode()))
    if meta_abstract is not None:
      meta = json.dumps(_meta(number, meta_abstract, obsoletes))
      (root / category / f'rfc{number}.json').write_text(meta)
    rfcs[number] = (text, meta_abstract, body)
  (root / 'links').mkdir()
  (root / 'links' / 'rfc-index.txt').write_text('index, not an RFC')
  return root, rfcs


@pytest.fixture(scope='module')
def spm_path(cache_dir):
  data.embedded_vocab(VOCAB_SIZE, cache_dir)
  [path] = cache_dir.glob(f'shakespeare_train_{VOCAB_SIZE}_*.model')
  return path


def test_index_finds_every_rfc_with_its_json(rfc_root):
  root, rfcs = rfc_root
  index = rfc_lib.rfc_index(str(root))
  assert [rfc.number for rfc in index] == sorted(rfcs)
  assert {rfc.number for rfc in index if not rfc.meta} == {4}
  assert all(rfc.meta['doc_id'] == f'RFC{rfc.number:04d}' for rfc in index if rfc.meta)


def test_clean_text_strips_page_footers_form_feeds_and_running_headers(rfc_root):
  root, rfcs = rfc_root
  [rfc] = [rfc for rfc in rfc_lib.rfc_index(str(root)) if rfc.number == 12]
  text = rfc_lib.read_rfc(rfc)
  assert '[Page' not in text and '\f' not in text and '\r' not in text
  assert 'RFC 12 ' not in text  # the running header after the form feed
  assert 'Request for Comments: 12' in text  # the first page's header block stays
  assert '\n\n\n' not in text
  assert '1.  Introduction' in text and '2.  Details' in text
  for paragraph in rfcs[12][2]:
    assert ' '.join(paragraph.split()) in ' '.join(text.split())


def test_abstract_section_is_removed_and_the_rest_kept(rfc_root):
  root, _ = rfc_root
  [rfc] = [rfc for rfc in rfc_lib.rfc_index(str(root)) if rfc.number == 12]
  text = rfc_lib.read_rfc(rfc)
  document = rfc_lib.remove_abstract_section(text)
  assert 'Abstract' in text and 'Abstract' not in document
  assert 'This memo number 12' in text and 'This memo number 12' not in document
  assert 'Status of This Memo' in document
  assert text.replace(text[text.index('Abstract'):text.index('Status of This Memo')], '') == (
      document)


def test_clean_abstract_removes_html_and_collapses_whitespace():
  assert rfc_lib.clean_abstract('<p>A &amp; B\n   over\tlines.</p>\n<p>Two.</p>') == (
      'A & B over lines. Two.')
  assert rfc_lib.clean_abstract(None) == rfc_lib.clean_abstract('') == ''


def test_split_is_by_number_and_revisions_stay_together(rfc_root):
  root, rfcs = rfc_root
  splits = {n: rfc_lib.split_of(n, str(root)) for n in rfcs}
  assert {n for n, s in splits.items() if s == 'validation'} == {10, 20, 30, 40, 70, 83}
  assert splits[50] == 'train'  # obsoleted by RFC 41
  train, validation = (rfc_lib.documents(s, str(root)) for s in ('train', 'validation'))
  assert len(train) + len(validation) == len(rfcs)


def test_pairs_skip_copied_missing_and_empty_abstracts(rfc_root):
  root, rfcs = rfc_root
  pairs = {rfc.number for split in ('train', 'validation')
           for rfc in rfc_lib.summarization_rfcs(split, str(root))}
  assert pairs == set(rfcs) - {3, 4, 5}
  [rfc] = [rfc for rfc in rfc_lib.rfc_index(str(root)) if rfc.number == 83]
  document, abstract = rfc_lib.summarization_pair(rfc)
  assert abstract == rfc_lib.clean_abstract(rfcs[83][1]) and abstract.startswith(
      'This memo number 83 & its')
  assert abstract[:30] not in ' '.join(document.split())
  assert 'Introduction' in document


def test_missing_directory_error_says_how_to_install_in_one_line(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    data.rfc_lm_inputs(root=tmp_path / 'RFC')
  message = str(error.value).splitlines()[0]  # gin appends a second line naming the function
  assert str(tmp_path / 'RFC') in message
  assert 'non-free' in message and 'apt-get install doc-rfc' in message
  with pytest.raises(FileNotFoundError) as error:
    rfc_lib.rfc_index(str(tmp_path))
  assert '\n' not in str(error.value)


def test_lm_inputs_pack_cleaned_rfcs_in_number_order(rfc_root, spm_path):
  root, _ = rfc_root
  seq_len = 64
  inputs = data.rfc_lm_inputs(batch_size=BATCH_SIZE, seq_len=seq_len, vocab_size=VOCAB_SIZE,
                              root=root, spm_path=spm_path)
  x, y, weights = next(inputs.eval_stream(1))
  assert x.shape == weights.shape == (BATCH_SIZE, seq_len) and x is y
  assert x.dtype == np.int32 and weights.dtype == np.float32
  train = next(inputs.train_stream(1))
  np.testing.assert_array_equal(next(inputs.train_stream(1))[0], train[0])
  sp = rfc_lib.vocab(str(root), VOCAB_SIZE, None, spm_path)
  first = rfc_lib.documents('validation', str(root))[0]
  assert first.number == 10
  expected = sp.encode(rfc_lib.read_rfc(first))[:BATCH_SIZE * seq_len]
  np.testing.assert_array_equal(x.reshape(-1)[:len(expected)], expected)


def test_summarization_inputs_end_in_eos_and_pad(rfc_root, spm_path):
  root, _ = rfc_root
  inputs_len, targets_len = 256, 24
  inputs = data.rfc_summarization_inputs(
      batch_size=BATCH_SIZE, inputs_len=inputs_len, targets_len=targets_len,
      vocab_size=VOCAB_SIZE, root=root, spm_path=spm_path)
  x, y, weights = next(inputs.eval_stream(1))
  assert x.shape == (BATCH_SIZE, inputs_len) and y.shape == weights.shape == (
      BATCH_SIZE, targets_len)
  sp = rfc_lib.vocab(str(root), VOCAB_SIZE, None, spm_path)
  rfcs = rfc_lib.summarization_rfcs('validation', str(root))[:BATCH_SIZE]
  for row_x, row_y, row_w, rfc in zip(x, y, weights, rfcs):
    document, abstract = rfc_lib.summarization_pair(rfc)
    for row, text, length in [(row_x, document, inputs_len), (row_y, abstract, targets_len)]:
      ids = sp.encode(text)[:length - 1] + [data.EOS_ID]
      np.testing.assert_array_equal(row, ids + [0] * (length - len(ids)))
    np.testing.assert_array_equal(row_w, row_y != 0)


def test_lm_vocabulary_is_trained_on_train_rfcs_when_no_spm_path(rfc_root, tmp_path):
  root, _ = rfc_root
  inputs = data.rfc_lm_inputs(batch_size=BATCH_SIZE, seq_len=32, vocab_size=VOCAB_SIZE,
                              root=root, cache_dir=tmp_path)
  assert next(inputs.train_stream(1))[0].max() < VOCAB_SIZE
  assert len(list(tmp_path.glob(f'rfc_*_{VOCAB_SIZE}_*.model'))) == 1


@pytest.mark.parametrize('name', ['rfc_lm_inputs', 'rfc_summarization_inputs'])
def test_input_functions_are_registered_with_gin(name):
  gin.parse_config([f'gin_check/sparse_scaling.data.{name}.batch_size = 4'])  # raises if unknown


def test_summarization_reproduction_trains_decodes_and_scores_both_arms(rfc_root, spm_path,
                                                                         tmp_path):
  pytest.importorskip('rouge_score', reason='rouge-score (the dev extra) is not installed')
  root, _ = rfc_root
  bindings = [f'rfc_summarization_inputs.root = {str(root)!r}',
              f'rfc_summarization_inputs.spm_path = {str(spm_path)!r}',
              f'VOCAB_SIZE = {VOCAB_SIZE}', 'D_MODEL = 32', 'D_FF = 64', 'N_LAYERS = 1',
              'INPUTS_LEN = 128', 'TARGETS_LEN = 16', 'rfc_summarization_inputs.batch_size = 2',
              'train.eval_frequency = 2', 'train.eval_steps = 1',
              'Terraformer.d_ff = 64', 'Terraformer.ff_sparsity = 8',
              # Without the SRU beside the FF (a third of the run's ~45 s, all compiling): a
              # Terraformer with an SRU trains by default in test_gin_configs.py (the C4 medium
              # twin) and the notebook's copy task, and decodes in test_decoding.py.
              'Terraformer.ff_use_sru = 0']
  rows = [summarization.run_arm(arm, str(tmp_path / arm), 2, 3, 2, bindings)
          for arm in summarization.ARMS]
  for row in rows:
    assert row['steps'] == 2 and row['n_docs'] == 3 and np.isfinite(row['val_log_ppl'])
    assert all(0 <= row[t] <= 100 for t in summarization.ROUGE_TYPES)
    assert len(row['examples']) == 3 and row['examples'][0]['reference']
  text = summarization.markdown(rows, 'test machine')
  assert 'Goal (issue #7)' in text and '| terraformer |' in text


def test_unusable_rfc_files_are_skipped_with_a_count(tmp_path, paragraphs, spm_path, caplog):
  root = tmp_path / 'RFC'
  (root / 'standard').mkdir(parents=True)
  for number in range(1, 24):
    text = _rfc_text(number, paragraphs[2 * number:2 * number + 2], 'An abstract.')
    (root / 'standard' / f'rfc{number}.txt.gz').write_bytes(gzip.compress(text.encode()))
    meta = json.dumps(_meta(number, f'The abstract of RFC {number}, not in its text.'))
    (root / 'standard' / f'rfc{number}.json').write_text('{oops' if number == 7 else meta)
  bad = {31: ('rfc31.txt.gz', b'not gzip'), 32: ('rfc32.txt', b''),
         33: ('rfc33.txt.gz', gzip.compress(bytes(range(256)) * 16)),
         34: ('rfc34.txt.gz', gzip.compress(b'word ' * 10_000_000, compresslevel=1))}  # 50 MB
  for name, content in bad.values():
    (root / 'standard' / name).write_bytes(content)
  with caplog.at_level(logging.WARNING):
    index = {rfc.number: rfc for rfc in rfc_lib.rfc_index(str(root))}
    assert index[7].meta == {}  # its JSON is not JSON: kept as an RFC without metadata
    assert [rfc_lib.usable_text(index[n]) for n in bad] == [None] * 4
    assert rfc_lib.usable_text(index[7]) and rfc_lib.summarization_pair(index[7]) is None
    pairs = rfc_lib.summarization_rfcs('train', str(root))
    inputs = data.rfc_lm_inputs(batch_size=BATCH_SIZE, seq_len=32, vocab_size=VOCAB_SIZE,
                                root=root, spm_path=spm_path)
    train = inputs.train_stream(1)
    for _ in range(100):  # more than an epoch of the train split
      next(train)
  assert {rfc.number for rfc in pairs} == set(range(1, 24)) - {7, 10, 20}
  for why in ['rfc7.json: skipped (not a JSON object', 'rfc31.txt.gz: skipped (',
              'rfc32.txt: skipped (blank)', 'rfc33.txt.gz: skipped (binary (NUL bytes))',
              'rfc34.txt.gz: skipped (a line over 1,000,000 characters)']:
    assert why in caplog.text
  assert 'RFC files skipped so far' in caplog.text


def test_a_split_of_unusable_rfcs_fails_in_one_line(tmp_path, spm_path):
  root = tmp_path / 'RFC'
  root.mkdir()
  for number in (10, 11, 12):
    (root / f'rfc{number}.txt').write_bytes(b'' if number > 10 else b'Some text.\n')
  with pytest.raises(ValueError, match=r'none of the 2 train RFCs is usable'):
    data.rfc_lm_inputs(root=root, vocab_size=VOCAB_SIZE, spm_path=spm_path)  # draws a batch


def test_an_index_of_10000_tiny_rfcs_is_quick(tmp_path, spm_path):
  root = tmp_path / 'RFC'
  root.mkdir()
  for number in range(1, 10_001):
    (root / f'rfc{number}.txt').write_text(f'RFC {number}: a tiny one.\n')
  start = time.perf_counter()
  inputs = data.rfc_lm_inputs(batch_size=BATCH_SIZE, seq_len=32, vocab_size=VOCAB_SIZE,
                              root=root, spm_path=spm_path)
  x, _, _ = next(inputs.train_stream(1))
  seconds = time.perf_counter() - start
  assert len(rfc_lib.rfc_index(str(root))) == 10_000 and x.shape == (BATCH_SIZE, 32)
  assert seconds < 30  # about 1 s here
