"""Memory benchmark: a measured row is positive and formats as the table; failures are rows."""

import math

import jax
import pytest

from sparse_scaling.bench import memory

# 384 + 128 tokens (one LSH chunk of 128 is the least), one layer a side, a narrow model.
POINT = memory.Point('terraformer', 512, 1)


@pytest.fixture(scope='module')
def row():
  if jax.default_backend() != 'cpu':
    pytest.skip('the memory benchmark measures host memory (ru_maxrss): a CPU benchmark')
  with pytest.MonkeyPatch.context() as patch:
    for name, value in (('D_MODEL', 64), ('D_FF', 128), ('N_HEADS', 2), ('VOCAB_SIZE', 64)):
      patch.setattr(memory, name, value)
    return memory.measure_point(POINT)


def _columns(line):
  return line.count('|') - 1


def test_a_step_of_the_reversible_trainer_is_measured(row):
  assert row['status'] == 'ok'
  assert (row['model'], row['length'], row['depth']) == POINT
  assert (row['encoder_length'], row['decoder_length']) == (384, 128)
  assert row['params'] > 0
  assert 0 < row['baseline_mb'] <= row['peak_mb']
  assert 0 < row['step_mb'] < row['peak_mb']
  assert row['first_step_s'] > 0 and row['step_s'] > 0
  assert math.isfinite(row['loss']) and row['load'] >= 0


def test_rows_have_the_columns_of_the_table(row):
  failed = dict(POINT._asdict(), status='OOM', detail='RESOURCE_EXHAUSTED')
  header = memory.TABLE_HEADER.splitlines()[0]
  assert _columns(memory.format_row(row)) == _columns(memory.format_row(failed)) == _columns(header)
  assert memory.format_row(row).startswith('| terraformer | 512 (384 + 128) | 1 |')
  assert memory.format_row(failed).startswith('| terraformer | 512 | 1 | OOM |')


def test_a_point_past_its_time_is_a_timeout_row():
  row = memory.run_point(POINT, timeout_s=1)
  assert row == dict(POINT._asdict(), status='timeout', detail='killed after 1 s')


def _synthetic(model, length, depth, step_mb):
  encoder_length, decoder_length = memory.split(length)
  return dict(model=model, length=length, depth=depth, status='ok',
              encoder_length=encoder_length, decoder_length=decoder_length, params=depth * 1e6,
              baseline_mb=100.0 * depth, peak_mb=100.0 * depth + step_mb, step_mb=step_mb,
              first_step_s=2.0, step_s=1.0, loss=1.0, load=1.0)


def test_markdown_states_the_longest_sequence_and_the_goal():
  by_length = [_synthetic('terraformer', n, 2, n / 8) for n in (1024, 2048, 4096)]
  by_length += [_synthetic('dense', 1024, 2, 100.0), _synthetic('dense', 2048, 2, 400.0),
                dict(memory.Point('dense', 4096, 2)._asdict(), status='OOM',
                     detail='RESOURCE_EXHAUSTED')]
  by_depth = [_synthetic('terraformer', 1024, d, 128.0 + d) for d in (2, 4, 8)]
  by_depth += [_synthetic('dense', 1024, d, 50.0 * d) for d in (2, 4, 8)]
  text = memory.markdown([('length', by_length), ('depth', by_depth)], 'python -m x',
                         'some machine', 20, 600)
  assert ('- terraformer: the longest sequence that trains in 20 GB is 4,096 tokens, the longest '
          'measured; its step memory grows as length^1.00 between the two longest (~linear; x '
          'from each length to the next: x2.00, x2.00); from depth 2 to 8, step memory x1.05 '
          '(depth^0.03: flat)' in text)
  assert ('- dense: the longest sequence that trains in 20 GB is 2,048 tokens (4,096: OOM); its '
          'step memory grows as length^2.00 between the two longest (faster than linear' in text)
  assert 'from depth 2 to 8, step memory x4.00 (depth^1.00: growing)' in text
  assert 'exponent <= 0.25): met.' in text
  assert '- dense, 4,096 tokens, depth 2: OOM (RESOURCE_EXHAUSTED)' in text
  for row in by_length + by_depth:
    assert memory.format_row(row) in text
