"""sparse_scaling.parallel in one process: `training.train` on two devices through
`parallel.Trainer`, whose weights stay on the devices between steps.

A dense tiny LM (deterministic: no sparse noise, no dropout) trains in a child process with two
CPU devices (XLA_FLAGS must be set before jax starts), and here, on one device, through trax's
trainer: same batches, same initial weights. The child runs
`python -m tests.test_parallel DIR CACHE_DIR`, writes DIR/report.json and its output to
DIR/log.txt; it starts with the module's first test. Several processes: test_distributed.py.

After its STEPS steps the child resumes on the two devices and a SIGTERM during step STEPS + 1
stops it after that step; then it resumes once more at a learning rate of 1e30 and diverges.
"""

import json
import os
import re
import signal
import subprocess
import sys

import gin
import numpy as np
import pytest

from sparse_scaling import checkpoints
from sparse_scaling import configs
from sparse_scaling import parallel
from sparse_scaling import training

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # Checkpoints and evaluations at steps 1, 2 and 4.
# Dense and deterministic, so that two devices and one differ only by float32 rounding.
BINDINGS = ['train.eval_frequency=2', 'train.eval_steps=1', 'train.log_frequency=1',
            'embedded_lm_inputs.batch_size=4', 'embedded_lm_inputs.seq_len=32',
            'ScalingTransformerLM.n_layers=1', 'ScalingTransformerLM.ff_sparsity=0',
            'ScalingTransformerLM.attention_sparsity=0', 'ScalingTransformerLM.loss_sparsity=0',
            'train.optimizer=@trax.optimizers.Adam', 'multifactor.constant=0.01']


def _parse(cache_dir):
  gin.clear_config()
  configs.parse(['tiny/lm.gin'], BINDINGS + [f'embedded_lm_inputs.cache_dir={str(cache_dir)!r}'])


def _evals(loop):
  return [float(v) for _, v in loop.history.get('eval', 'metrics/log_perplexity')]


def _equal(arrays, others):
  return len(arrays) == len(others) and all(np.array_equal(a, b) for a, b in zip(arrays, others))


def _two_device_child(output_dir, cache_dir):
  """Trains STEPS steps on two devices, counting host copies; writes report.json."""
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_scaling import parallel
  # pylint: enable=g-import-not-at-top
  _parse(cache_dir)
  host_copies = []
  to_host = parallel.to_host

  def counting_to_host(*args, **kwargs):
    host_copies.append(1)
    return to_host(*args, **kwargs)

  parallel.to_host = counting_to_host
  records, copies_after_step, sharded = [], [], []

  def on_step(loop, loss, seconds):
    records.append(loss)
    copies_after_step.append(len(host_copies))
    sharded.append(all(isinstance(leaf, jax.Array) and len(leaf.devices()) == 2
                       for leaf in jax.tree.leaves(loop.device_weights)))

  loop = training.train(output_dir, steps=STEPS, on_step=on_step)
  copies_at_end = len(host_copies)
  device_weights = jax.tree.leaves(to_host(loop.device_weights[0]))  # the model's, not the loss's
  checkpoint = checkpoints.from_bits(checkpoints.load_latest(output_dir, n_tasks=0).weights)
  report = dict(
      device_count=jax.device_count(), losses=records, evals=_evals(loop),
      copies_after_step=copies_after_step, copies_at_end=copies_at_end, sharded=sharded,
      checkpoint_is_device_weights=_equal(device_weights, checkpoint),
      model_is_device_weights=_equal(device_weights, jax.tree.leaves(loop.model.weights)),
      n_weights=len(checkpoint))

  # Resumed; a SIGTERM in the middle of step STEPS + 1 (as it reaches parallel.Trainer).
  parallel.to_host = to_host
  one_step = parallel.Trainer.one_step

  def interrupted_step(self, batch, rng, step=0, learning_rate=None):
    if step == STEPS + 1:
      signal.raise_signal(signal.SIGTERM)
    return one_step(self, batch, rng, step=step, learning_rate=learning_rate)

  parallel.Trainer.one_step = interrupted_step
  resumed = []
  loop = training.train(output_dir, steps=STEPS + 3,
                        on_step=lambda loop, loss, seconds: resumed.append(loss))
  parallel.Trainer.one_step = one_step
  report.update(stopped_by=loop.stopped_by, stopped_at=loop.step, resumed_losses=resumed,
                checkpoint_after_stop=checkpoints.load_latest(output_dir).step)

  # Resumed at a learning rate of 1e30: Adam moves every weight by ~1e30, then overflows.
  gin.bind_parameter('multifactor.constant', 1e30)
  try:
    training.train(output_dir, steps=STEPS + 20)
    report.update(diverged='no error')
  except FloatingPointError as e:
    report.update(diverged=str(e))
  kept = checkpoints.load_latest(output_dir)
  report.update(kept_step=kept.step, kept_finite=all(np.isfinite(w).all() for w in kept.weights))
  with open(os.path.join(output_dir, 'report.json'), 'w') as f:
    json.dump(report, f)


@pytest.fixture(scope='module', autouse=True)
def child(tmp_path_factory, cache_dir):
  """Starts the two-device child with the first test; kills it if still running at the end."""
  output_dir = tmp_path_factory.mktemp('two_devices')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  with open(output_dir / 'log.txt', 'w') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'tests.test_parallel', str(output_dir), str(cache_dir)],
        cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  yield process, output_dir
  if process.poll() is None:
    process.kill()
    process.wait()


@pytest.fixture(scope='module')
def two_devices(child):
  process, output_dir = child
  returncode = process.wait(timeout=600)
  assert returncode == 0, (output_dir / 'log.txt').read_text()[-3000:]
  return json.loads((output_dir / 'report.json').read_text())


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, cache_dir):
  """The child's run on this process's one device (trax's trainer), never stopped."""
  _parse(cache_dir)
  losses = []
  loop = training.train(tmp_path_factory.mktemp('one_device'), steps=STEPS + 1,
                        on_step=lambda loop, loss, seconds: losses.append(loss))
  gin.clear_config()
  return dict(losses=losses, evals=_evals(loop))


def test_two_devices_train_on_both_and_copy_to_the_host_only_for_checkpoints(two_devices):
  assert two_devices['device_count'] == 2
  assert all(two_devices['sharded'])  # after every step, each weight is on both devices
  # Host copies (weights, state, slots: 3 per copy) happen at the checkpoints of steps 1, 2
  # and 4, after the step's on_step; trax's trainer copied them back after every step.
  assert two_devices['copies_after_step'] == [0, 3, 6, 6]
  assert two_devices['copies_at_end'] == 9  # nothing more at the end: step 4 was saved


def test_checkpoint_and_model_hold_the_weights_the_devices_trained(two_devices):
  assert two_devices['n_weights'] > 10
  assert two_devices['checkpoint_is_device_weights']
  assert two_devices['model_is_device_weights']


def test_two_devices_match_one_device(two_devices, one_device):
  # As tests/test_compat.py: two half batches of equal weight average to the full batch's
  # mean up to float32 summation order; rtol 1e-5 is ~1000x below a step's change of the
  # loss, so evaluations of stale weights or a missed gradient mean would fail.
  np.testing.assert_allclose(two_devices['losses'], one_device['losses'][:STEPS], rtol=1e-5)
  np.testing.assert_allclose(two_devices['evals'], one_device['evals'], rtol=1e-5)


def test_sigterm_stops_two_devices_after_the_step_and_the_resumed_step_is_uninterrupted(
    two_devices, one_device):
  # The run resumed from step STEPS's checkpoint (weights, slots, data position placed on the
  # devices again) and stopped after the step the signal came in, with a checkpoint of it.
  assert two_devices['stopped_by'] == 'SIGTERM'
  assert two_devices['stopped_at'] == two_devices['checkpoint_after_stop'] == STEPS + 1
  assert len(two_devices['resumed_losses']) == 1
  # Its step is the one-device run's step STEPS + 1, which was never stopped (as above).
  np.testing.assert_allclose(two_devices['resumed_losses'], one_device['losses'][STEPS:],
                             rtol=1e-5)


def test_two_devices_stop_on_the_gradients_norm_and_keep_the_last_good_checkpoint(two_devices):
  diverged = re.fullmatch(r"gradients' global norm is (nan|inf) at step (\d+) \(loss \S+\); "
                          r'stopped\. The last good checkpoint is kept: \S+/checkpoint',
                          two_devices['diverged'].splitlines()[0])  # gin adds a line
  assert diverged, two_devices['diverged']
  assert STEPS + 1 <= two_devices['kept_step'] < int(diverged.group(2))
  assert two_devices['kept_finite']


def test_one_accelerator_trains_with_the_parallel_trainer(monkeypatch, tmp_path, cache_dir,
                                                           one_device):
  # On one GPU or TPU the Loop takes `parallel.Trainer` (weights and slots stay on the
  # device); it must train as trax's trainer does on the same device.
  monkeypatch.setattr(training, '_trainer_is_trax', lambda memory_efficient: memory_efficient)
  _parse(cache_dir)
  losses = []
  loop = training.train(tmp_path, steps=STEPS,
                        on_step=lambda loop, loss, seconds: losses.append(loss))
  assert isinstance(loop._trainer_per_task[0], parallel.Trainer)  # pylint: disable=protected-access
  np.testing.assert_allclose(losses, one_device['losses'][:STEPS], rtol=1e-5)
  np.testing.assert_allclose(_evals(loop), one_device['evals'], rtol=1e-5)


if __name__ == '__main__':
  from sparse_scaling import compat  # pylint: disable=g-import-not-at-top
  compat.apply()
  _two_device_child(sys.argv[1], sys.argv[2])
