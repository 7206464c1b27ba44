"""Multi-process training: main.py in 2 processes on localhost, one CPU device each.

JAX's distributed runtime joins them (`--coordinator_address`, `--num_processes`,
`--process_id`), gloo carries their collectives. They train the tiny LM of tiny/lm.gin (one
layer) on one output directory, against the reference: one process with two CPU devices. A
gin-bound `train.on_step` (tests/distributed_probe.py) has each process report its losses and
weights.

Default: the two processes and the reference train STEPS steps, all at once; after step STEPS
process 1 is killed (process 0 has checkpointed, and evaluates next). Then two processes resume
a copy of that run, and a SIGTERM to process 1 alone stops both after the same step, with a
checkpoint. Slow: both runs resume from their checkpoints for a step, against the reference
resumed likewise.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sparse_scaling import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4  # Checkpoints and evaluations at steps 1, 2 and 4.
HEARTBEAT_TIMEOUT = 15
FAST = ['train.eval_frequency=2', 'train.eval_steps=1', 'train.log_frequency=1',
        'embedded_lm_inputs.batch_size=4', 'embedded_lm_inputs.seq_len=32',
        'ScalingTransformerLM.n_layers=1', 'sample.max_new_tokens=4']


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(output_dir, reports, steps, log, *args, env, weights_at=STEPS):
  reports.mkdir(exist_ok=True)
  params = FAST + [f'train.steps={steps}', f'report_step.report_dir={str(reports)!r}',
                   f'report_step.weights_at={weights_at}']
  command = [sys.executable, str(ROOT / 'main.py'), '--gin_file=tiny/lm.gin',
             f'--gin_file={ROOT / "tests" / "distributed_probe.gin"}',
             f'--output_dir={output_dir}', *[f'--gin_param={p}' for p in params], *args]
  with open(log, 'w') as f:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _processes(tmp, reports, steps, log, env, run='run'):
  """Starts process 0 and 1 of a run on tmp/<run>; their output goes to tmp/logs/<log>I.txt."""
  port = _free_port()
  return [_start(tmp / run, reports, steps, tmp / 'logs' / f'{log}{i}.txt',
                 f'--coordinator_address=localhost:{port}', '--num_processes=2',
                 f'--process_id={i}', f'--heartbeat_timeout={HEARTBEAT_TIMEOUT}', env=env)
          for i in range(2)]


def _reference(tmp, reports, steps, log, env):
  """Starts the reference run on tmp/reference: one process, two CPU devices."""
  return _start(tmp / 'reference', reports, steps, tmp / 'logs' / f'{log}.txt', '--n_devices=2',
                env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'))


def _steps(reports, process):
  path = reports / f'steps{process}.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(reports, step, processes):
  deadline = time.time() + 600
  while not all(len(_steps(reports, i)) >= step for i in range(2)):
    assert all(p.poll() is None for p in processes), f'a process exited before step {step}'
    assert time.time() < deadline, f'no step {step} in 600 s'
    time.sleep(0.2)


def _kill_all(processes):
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.fixture(scope='module')
def env(cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', SPARSE_SCALING_CACHE=str(cache_dir))
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


@pytest.fixture(scope='module')
def run(tmp_path_factory, env):
  """Two processes and the reference train STEPS steps; then process 1 is killed.

  Returns:
    (the run's directory, process 0's exit code, seconds from the kill to its exit).
  """
  tmp = tmp_path_factory.mktemp('distributed')
  (tmp / 'logs').mkdir()
  processes = _processes(tmp, tmp / 'reports', 1000, 'process', env)
  reference = _reference(tmp, tmp / 'reference_reports', STEPS, 'reference', env)
  try:
    _wait_for_step(tmp / 'reports', STEPS, processes)
    processes[1].send_signal(signal.SIGKILL)
    killed = time.time()
    returncode = processes[0].wait(timeout=120)
    seconds = time.time() - killed
    assert reference.wait(timeout=600) == 0, (tmp / 'logs' / 'reference.txt').read_text()[-3000:]
  finally:
    _kill_all(processes + [reference])
  return tmp, returncode, seconds


def test_processes_train_as_one_process_with_two_devices(run):
  # Each process trains on its rows of the global batch with its device's key, as device i
  # of the one process does: the same losses (to the compat tests' tolerance).
  tmp = run[0]
  process0, process1 = (_steps(tmp / 'reports', i)[:STEPS] for i in range(2))
  reference = _steps(tmp / 'reference_reports', 0)
  assert [s['step'] for s in process0] == [s['step'] for s in process1] == [1, 2, 3, 4]
  assert [s['loss'] for s in process0] == [s['loss'] for s in process1]  # a global mean
  np.testing.assert_allclose([s['loss'] for s in process0], [s['loss'] for s in reference],
                             rtol=1e-5)


def test_processes_hold_identical_weights(run):
  tmp = run[0]
  weights0, weights1 = (np.load(tmp / 'reports' / f'weights{i}.npz') for i in range(2))
  reference = np.load(tmp / 'reference_reports' / 'weights0.npz')
  assert len(weights0.files) == len(weights1.files) == len(reference.files) > 10
  for name in weights0.files:
    np.testing.assert_array_equal(weights0[name], weights1[name])
    np.testing.assert_allclose(weights0[name], reference[name], rtol=1e-5, atol=1e-6)


def test_only_process_0_writes_checkpoints_tensorboard_and_config(run):
  tmp = run[0]
  assert (tmp / 'run' / 'config.gin').exists()
  assert (tmp / 'run' / 'checkpoint' / 'model.pkl.gz').exists()
  assert [p.name for p in (tmp / 'run').rglob('data_counters*')] == ['data_counters0.pkl']
  for part in ('train', 'eval'):
    assert len(list((tmp / 'run' / part).glob('events.out.tfevents.*'))) == 1, part
  assert 'step      4/1000 | loss' in (tmp / 'logs' / 'process0.txt').read_text()
  assert 'step ' not in (tmp / 'logs' / 'process1.txt').read_text()


def test_a_killed_process_stops_the_other_with_a_clear_error(run):
  tmp, returncode, seconds = run
  output = (tmp / 'logs' / 'process0.txt').read_text()
  assert returncode != 0
  assert seconds < HEARTBEAT_TIMEOUT + 30
  # Ours when a collective fails (gloo on CPU); JAX's when its heartbeat finds the process gone.
  assert ('error: process 0 of 2:' in output
          or 'the JAX distributed service detected fatal errors' in output), output[-3000:]


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(run, env):
  # Both resume a copy of the run (every process reads the checkpoint, process 0's data
  # position). Process 1 alone is signalled (as a scheduler may reach one host first); the
  # next step carries its request to process 0, and both stop after that step.
  tmp = run[0]
  shutil.copytree(tmp / 'run', tmp / 'stopped')
  reports = tmp / 'stopped_reports'
  processes = _processes(tmp, reports, 1000, 'stopped', env, run='stopped')
  try:
    _wait_for_step(reports, 1, processes)
    processes[1].send_signal(signal.SIGTERM)
    returncodes = [p.wait(timeout=300) for p in processes]
  finally:
    _kill_all(processes)
  logs = [(tmp / 'logs' / f'stopped{i}.txt').read_text() for i in range(2)]
  assert returncodes == [0, 0], [log[-3000:] for log in logs]
  steps = [[s['step'] for s in _steps(reports, i)] for i in range(2)]
  assert steps[0] == steps[1] and steps[0][0] == STEPS + 1  # resumed, stopped together
  assert [s['loss'] for s in _steps(reports, 0)] == [s['loss'] for s in _steps(reports, 1)]
  last = steps[0][-1]
  assert (f'Stopped by a signal to another process after step {last}: checkpoint saved in '
          f'{tmp}/stopped/checkpoint; run the same command to resume') in logs[0]
  assert 'Stopped by' not in logs[1]  # process 0 speaks for the run
  assert checkpoints.load_latest(tmp / 'stopped').step == last


@pytest.mark.slow  # ~1 min on 2 cores: three more trax processes
def test_every_process_resumes_from_the_checkpoint(run, env):
  # Weights, optimizer slots and data position restored in both processes: their step 5 is
  # the resumed reference's.
  tmp = run[0]
  processes = _processes(tmp, tmp / 'resumed_reports', 1000, 'resumed', env)
  reference = _reference(tmp, tmp / 'resumed_reference_reports', STEPS + 1,
                         'resumed_reference', env)
  try:
    _wait_for_step(tmp / 'resumed_reports', 1, processes)
    assert reference.wait(timeout=600) == 0, (
        tmp / 'logs' / 'resumed_reference.txt').read_text()[-3000:]
  finally:
    _kill_all(processes + [reference])
  resumed_reference = _steps(tmp / 'resumed_reference_reports', 0)
  assert [s['step'] for s in resumed_reference] == [STEPS + 1]
  for process in range(2):
    first = _steps(tmp / 'resumed_reports', process)[0]
    assert first['step'] == STEPS + 1
    np.testing.assert_allclose(first['loss'], resumed_reference[0]['loss'], rtol=1e-5)
