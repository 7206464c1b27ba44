"""Training-step benchmark: one row per variant, times of trax's own steps, matched parameters."""

import time

import jax
import pytest
from trax import optimizers

from sparse_scaling.bench import train_step

# One layer and 64 tokens: the time goes to compiling four training steps.
TINY = train_step.SHAPES['tiny']._replace(n_layers=1, batch=2, length=32)


@pytest.fixture(scope='module')
def measured():
  """(row, steps) per variant: the benchmark's row, and every training step trax ran for it as
  (tokens in its batch, seconds), timed here around trax's `Trainer.one_step`."""
  steps, one_step = [], optimizers.Trainer.one_step

  def timed_one_step(trainer, batch, rng, step=0, learning_rate=None):
    start = time.perf_counter()
    result = jax.block_until_ready(one_step(trainer, batch, rng, step, learning_rate))
    steps.append((batch[0].size, time.perf_counter() - start))
    return result

  measured = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(optimizers.Trainer, 'one_step', timed_one_step)
    for row in train_step.measure('tiny', TINY, dropout=0.1, min_runs=2, min_seconds=0,
                                  warmup=1):
      measured.append((row, list(steps)))
      steps.clear()
  return measured


def test_every_variant_has_a_row_in_order(measured):
  rows = [row for row, _ in measured]
  assert [row['shape'] for row in rows] == ['tiny'] * len(train_step.VARIANTS)
  assert [row['variant'] for row in rows] == list(train_step.VARIANTS)


def test_times_and_throughput_are_those_of_the_steps_trax_ran(measured):
  for row, steps in measured:
    assert len(steps) == 3  # one warm-up step (compilation included), then the two timed
    tokens, seconds = zip(*steps[1:])
    assert set(tokens) == {TINY.batch * TINY.length}
    # The benchmark's clock is around each of these steps: its median is at least theirs,
    # and Python's overhead on top is small.
    low, high = sorted(seconds)[0] * 1e3, sorted(seconds)[1] * 1e3
    assert low <= row['ms_per_step'] <= row['p90_ms_per_step'] <= 2 * high + 50
    median = sum(seconds) / 2
    assert tokens[0] / (2 * median + 0.05) <= row['tokens_per_s'] <= tokens[0] / median
  assert measured[0][0]['ratio_to_dense'] == 1.0


@pytest.mark.parametrize('variant', ['ff', 'ff_qkv'])
def test_matched_variants_have_the_dense_parameter_count(measured, variant):
  dense, = (row['params'] for row, _ in measured if row['variant'] == 'dense')
  params, = (row['params'] for row, _ in measured if row['variant'] == variant)
  assert params == pytest.approx(dense, rel=0.05)


def test_the_gpu_shape_times_every_quality_arm_at_its_size():
  # The step of issue #16's GPU runs: reproduce/quality_gpu.gin with each arm's bindings.
  shape = train_step.SHAPES['gpu']
  assert shape.variants[0] == 'dense' and 'dense_conv' in shape.variants
  dense, conv = (train_step.dimensions(shape, arm) for arm in ('dense', 'dense_conv'))
  assert (dense['d_model'], dense['d_ff'], dense['attention_conv']) == (512, 2048, 0)
  assert (conv['d_ff'], conv['attention_conv'], conv['attention_sparsity']) == (2720, 8, 0)


def test_op_labels_name_the_pass_the_innermost_layer_and_the_operation():
  label = train_step.op_label
  assert label('jit(f)/jit(main)/Serial/SparseFF_64_8/SparseFFController/cumsum') == \
      'fwd SparseFFController/cumsum'
  assert label('jit(f)/transpose(jvp(Serial))/ChosenUnitsFF/dot_general') == \
      'bwd ChosenUnitsFF/dot_general'
  assert label('jit(f)/jit(main)/mul') == 'fwd optimizer/mul'
  assert label('') == 'fwd optimizer/(no op_name)'


def test_profile_attributes_the_step_s_device_time_to_its_layers():
  # One Sparse FF layer's training step, traced: the groups add up to the step's kernels,
  # and the controller and the units show up by their layers' names in both passes.
  model = train_step.build_model(TINY, 'ff', dropout=0.0)
  tokens = jax.numpy.ones((TINY.batch, TINY.length), jax.numpy.int32)
  profile = train_step.profile_step(model, (tokens, tokens, tokens * 1.0), n_steps=2)
  total, rows = profile['device_s'], profile['groups']
  assert total > 0 and profile['wall_s'] > 0
  assert profile['kernels'] == sum(row['kernels'] for row in rows)
  assert sum(row['seconds'] for row in rows) == pytest.approx(total)
  assert [row['seconds'] for row in rows] == sorted((row['seconds'] for row in rows),
                                                    reverse=True)
  labels = {row['label'] for row in rows}
  for pass_ in ('fwd', 'bwd'):
    assert any(l.startswith(f'{pass_} ChosenUnitsFF/') for l in labels), labels
  assert any(l.startswith('fwd SparseFFController/') for l in labels), labels


def test_rounds_time_every_row_in_alternating_rounds(monkeypatch):
  # Stand-in steps of known length, one per (variant, kernel choice): the rows are built
  # first, timed in turns (the order reversed every other round), and their ratios are those
  # of the steps.
  calls, sleep_ms = [], {('dense', 'xla'): 4, ('ff', 'xla'): 8, ('ff', 'interpret'): 12}

  def stand_in(model, batch, kernels='auto'):
    arm = (model.variant, kernels)

    def one_step():
      calls.append(arm)
      time.sleep(sleep_ms[arm] / 1e3)
      return batch[0]
    return one_step

  monkeypatch.setattr(train_step, 'stepper', stand_in)
  monkeypatch.setattr(train_step, 'build_model',
                      lambda shape, variant, dropout: type('M', (), {'variant': variant})())
  monkeypatch.setattr(train_step, 'parameter_counts', lambda model, signature: {'total': 1})
  shape = TINY._replace(variants=('dense', 'ff'))
  rows = list(train_step.measure('tiny', shape, kernels=('xla', 'interpret'), rounds=3,
                                 min_runs=6, warmup=1))
  arms = list(sleep_ms)
  assert [(row['variant'], row['kernels']) for row in rows] == arms
  assert calls[:3] == arms  # one warm-up each, then rounds of 2 steps per row
  timed = calls[3:]
  assert timed == [a for a in arms for _ in '12'] + [a for a in arms[::-1] for _ in '12'] + \
      [a for a in arms for _ in '12']
  ratios = [row['ratio_to_dense'] for row in rows]
  assert ratios[0] == 1.0
  assert ratios[1] == pytest.approx(2.0, rel=0.25) and ratios[2] == pytest.approx(3.0, rel=0.25)
