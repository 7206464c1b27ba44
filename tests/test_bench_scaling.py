"""Data-parallel scaling benchmark.

The slow tests run the benchmark's three children on the tiny shape (1 device, 2 devices, the
1-device reference), one at a time, as `scaling.measure` runs them; on 2 shared cores their
times mean little, so they check what the rows hold. The fast tests run `scaling.measure` on a
stand-in child (tests/scaling_child_stub.py) to check that each line is printed as it arrives
and that a run out of time still reports its steps, and check the rows and their table.
"""

import json
import os
import re
import time

import gin
import jax
import numpy as np
import pytest

from sparse_scaling.bench import common
from sparse_scaling.bench import scaling
from sparse_scaling.bench import timing

DEVICE_COUNTS, STEPS, PER_DEVICE_BATCH, SEQ_LEN = [1, 2], 5, 2, 32
DIMS = dict(n_layers=2, d_model=64, d_ff=256, ff_sparsity=64, attention_sparsity=16,
            vocab_size=512)


def _cpu_env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', SPARSE_SCALING_CACHE=str(cache_dir))
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture
def stub_children(monkeypatch):
  """`scaling.measure` runs tests/scaling_child_stub.py; returns its printed (time, line)s."""
  monkeypatch.setattr(scaling, 'MODULE', 'tests.scaling_child_stub')
  printed = []
  monkeypatch.setattr(scaling, 'print', lambda line, **kwargs: printed.append(
      (time.perf_counter(), line)), raising=False)
  return printed


def test_each_line_of_a_run_is_printed_as_it_arrives(stub_children, tmp_path):
  runs, failures = scaling.measure('tiny', DEVICE_COUNTS, PER_DEVICE_BATCH, SEQ_LEN, STEPS,
                                   _cpu_env(tmp_path))
  assert not failures
  assert runs == {key: dict(step_seconds=[0.5, 0.25], losses=[5.0 + key[1], 4.0 + key[1]],
                            devices=['cpu:0'])
                  for key in [(1, 2), (2, 4), (1, 4)]}
  lines = [line for _, line in stub_children]
  assert [line for line in lines if line.startswith('# run')] == [
      '# run 1/3: 1 device(s), global batch 2', '# run 2/3: 2 device(s), global batch 4',
      '# run 3/3: 1 device(s), global batch 4']
  assert lines.count('a line of the child that is not a record') == 3
  assert '#   step    1:     500.0 ms, loss 7.0000  (compilation included)' in lines
  # The child waits 1.5 s between its steps: step 1 was printed then, not when it exited.
  first = next(t for t, line in stub_children if line.startswith('#   step    1'))
  second = next(t for t, line in stub_children if line.startswith('#   step    2'))
  assert second - first > 1.0


def test_a_run_out_of_time_is_killed_and_reports_its_steps(stub_children, tmp_path, monkeypatch):
  monkeypatch.setattr(scaling, 'KILL_GRACE_SECONDS', 1)
  start = timing.now()
  runs, failures = scaling.measure('tiny', DEVICE_COUNTS, PER_DEVICE_BATCH, SEQ_LEN, STEPS,
                                   _cpu_env(tmp_path), deadline=start + 3)
  assert timing.now() - start < 30  # the stub hangs for 600 s after its first step: killed
  assert [len(run['losses']) for run in runs.values()] == [1, 1, 1]
  assert len(failures) == 3 and 'failed (exit -9)' in failures[0]


class _Loop:
  step = 7
  device_weights = {'w': jax.numpy.ones(2)}


def test_step_recorder_prints_a_record_per_step_and_stops_at_the_deadline(capsys):
  recorder = scaling._StepRecorder(1, deadline=timing.now() + 60, min_steps=3)
  recorder(_Loop(), 3.5, 0.1)
  recorder(_Loop(), 3.25, 120.0)  # the next step would end past the deadline, but 2 < 3 steps
  with pytest.raises(scaling._OutOfTime):
    recorder(_Loop(), 3.0, 120.0)
  run = scaling.read_records(capsys.readouterr().out.splitlines(), echo=lambda line: None)
  assert run == dict(step_seconds=[0.1, 120.0, 120.0], losses=[3.5, 3.25, 3.0],
                     devices=[str(jax.devices()[0])])


def test_step_recorder_fails_when_the_step_ran_elsewhere(monkeypatch):
  host = jax.devices('cpu')[0]  # the weights on the host (on any backend), the step expected
  loop = _Loop()                # on an accelerator
  loop.device_weights = {'w': jax.device_put(jax.numpy.ones(2), host)}
  monkeypatch.setattr(jax, 'local_devices', lambda: ['cuda:7'])
  with pytest.raises(RuntimeError, match=re.escape(
      f"1-device training step ran on ['{host}'], not on ['cuda:7']. trax's Trainer keeps the "
      'optimizer slots on the host')):
    scaling._StepRecorder(1, deadline=None)(loop, 3.5, 0.1)


def _run(seconds, losses):
  return dict(step_seconds=seconds, losses=losses, devices=['cpu:0'])


def test_rows_hold_what_short_runs_measured_and_the_table_shows_it():
  runs = {(1, 2): _run([9.0, 0.2, 0.2, 0.1, 0.1], [8, 7, 6, 5, 4]),
          (2, 4): _run([9.0, 0.3, 0.3, 0.2, 0.2, 0.2], [8, 7, 6, 5, 4, 3.5]),
          (1, 4): _run([9.0, 0.5], [8.5, 7.25])}  # stopped after 2 steps: none timed
  rows = scaling.rows_of('tiny', DIMS, 1000, runs, PER_DEVICE_BATCH, SEQ_LEN, 30)
  one, two, reference = rows
  assert one['tokens_per_s'] == 2 * SEQ_LEN / 0.1 and one['speedup'] == 1.0
  assert two['tokens_per_s'] == 4 * SEQ_LEN / 0.2
  assert two['scaling_efficiency'] == pytest.approx(0.5 * two['speedup'])
  assert (reference['steps_run'], reference['timed_steps'], reference['ms_per_step']) == (2, 0,
                                                                                         None)
  # Over the 2 steps both took.
  assert two['max_abs_loss_diff'] == reference['max_abs_loss_diff'] == 0.5
  assert two['loss_agreement_steps'] == 2
  for row in rows:
    row.update(command='python -m sparse_scaling.bench.scaling --shapes=tiny', machine='test')
  text = scaling.markdown(rows)
  assert '| 1 (reference: the batch of 2) | 4 | 2 (0) | 9.0 | - (-) | - | - |  |  |' in text
  assert 'over the 2 steps both took is 0.5, 0.5 at step 1' in text


@pytest.mark.slow  # Three trax processes, one after the other: ~3 min on 2 cores.
def test_benchmark_runs_on_one_and_two_cpu_devices(cache_dir, tmp_path, monkeypatch):
  runs, failures = scaling.measure('tiny', DEVICE_COUNTS, PER_DEVICE_BATCH, SEQ_LEN, STEPS,
                                   _cpu_env(cache_dir))
  assert not failures
  dims = scaling.model_dimensions('tiny', SEQ_LEN)
  gin.clear_config()  # model_dimensions leaves the gin file parsed, for training.train
  rows = scaling.rows_of('tiny', dims, 1000, runs, PER_DEVICE_BATCH, SEQ_LEN, STEPS)
  assert [(r['n_devices'], r['global_batch'], r['role']) for r in rows] == [
      (1, 2, 'scaling'), (2, 4, 'scaling'), (1, 4, 'loss_reference')]
  assert [r['devices'] for r in rows] == [['cpu:0'], ['cpu:0', 'cpu:1'], ['cpu:0']]
  for row in rows:
    assert row['steps_run'] == STEPS and row['timed_steps'] == STEPS - scaling.WARMUP_STEPS
    assert 0 < row['ms_per_step'] <= row['p90_ms_per_step']
    assert len(row['losses']) == STEPS and np.isfinite(row['losses']).all()
    assert row['final_loss'] == row['losses'][-1] < row['losses'][0]
  # Same weights, same batches, but per-device Gumbel noise and hard-or-soft coins in Sparse
  # FF (and another summation order): close, not equal.
  _, two, reference = rows
  assert two['max_abs_loss_diff'] == reference['max_abs_loss_diff']
  assert 0 < two['loss_diff_at_step_1'] < 0.01
  assert two['max_abs_loss_diff'] < 0.1 * (two['losses'][0] - two['losses'][-1])
  # The results keep the rows of other shapes.
  monkeypatch.setattr(common, 'RESULTS_DIR', tmp_path)
  for row in rows:
    row.update(command='python -m sparse_scaling.bench.scaling --shapes=tiny', machine='test')
  (tmp_path / 'scaling.json').write_text(json.dumps([dict(row, shape='other') for row in rows]))
  scaling.write_results(rows)
  saved = json.loads((tmp_path / 'scaling.json').read_text())
  assert [row['shape'] for row in saved] == ['other'] * 3 + ['tiny'] * 3
  text = (tmp_path / 'scaling.md').read_text()
  assert text.count('| devices | global batch |') == 2
  assert 'Loss agreement, 2 devices against 1 at global batch 4' in text
