"""Training-step benchmark: one row per variant, positive times, matched parameters."""

import pytest

from sparse_scaling.bench import train_step

# One layer and 64 tokens: the time goes to compiling four training steps.
TINY = train_step.SHAPES['tiny']._replace(n_layers=1, batch=2, length=32)


@pytest.fixture(scope='module')
def rows():
  return list(train_step.measure('tiny', TINY, dropout=0.1, min_runs=2, min_seconds=0, warmup=1))


def test_every_variant_has_a_row_in_order(rows):
  assert [row['shape'] for row in rows] == ['tiny'] * len(train_step.VARIANTS)
  assert [row['variant'] for row in rows] == list(train_step.VARIANTS)


def test_times_and_throughput_are_positive(rows):
  for row in rows:
    assert 0 < row['ms_per_step'] <= row['p90_ms_per_step']
    assert row['tokens_per_s'] == pytest.approx(TINY.batch * TINY.length * 1e3
                                                / row['ms_per_step'])
  assert rows[0]['ratio_to_dense'] == 1.0


@pytest.mark.parametrize('variant', ['ff', 'ff_qkv'])
def test_matched_variants_have_the_dense_parameter_count(rows, variant):
  dense, = (row['params'] for row in rows if row['variant'] == 'dense')
  params, = (row['params'] for row in rows if row['variant'] == variant)
  assert params == pytest.approx(dense, rel=0.05)
