"""Tests for sparse_scaling.compat: trax 1.4.1's training Loop on jax 0.10.

The Loop tests train a tiny TransformerLM in two child processes: one with two CPU devices
(XLA_FLAGS must be set before jax starts, hence a child process) and `Loop(n_devices=2)`,
one with a single device and `Loop(n_devices=1)`. Both train on the same deterministic
batches, evaluate every step, save a checkpoint, restore it into a fresh Loop and train on.
A child is this file run as `python -m tests.test_compat N_DEVICES DIR`; it writes its
measurements to DIR/report.json and its output to DIR/log.txt.

The children start with the module's first test and run while the in-process tests import
trax; the Loop tests then wait for them.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_STEPS = 8  # Training steps before the checkpoint.
BATCH, LENGTH, VOCAB = 8, 16, 32
LOSS = 'WeightedCategoryCrossEntropy'


def _batch(index):
  """Returns batch `index` of a stream of counting sequences: t + 1 follows t (mod VOCAB).

  Args:
    index: Position of the batch in the stream; equal indices give equal batches.

  Returns:
    (inputs, targets, weights), each [BATCH, LENGTH]; the targets are the inputs
    (language modelling).
  """
  starts = np.random.RandomState(index).randint(0, VOCAB, size=(BATCH, 1))
  x = ((starts + np.arange(LENGTH)) % VOCAB).astype(np.int32)  # [BATCH, LENGTH]
  return x, x, np.ones_like(x, dtype=np.float32)


def _stream(start):
  return (_batch(i) for i in itertools.count(start))


def _train_and_report(n_devices, output_dir):
  """Trains, checkpoints and restores with `Loop(n_devices=...)`; writes report.json.

  Args:
    n_devices: Number of devices for the Loop; must be all visible devices.
    output_dir: Directory for the checkpoint and report.json.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_scaling import compat
  compat.apply()
  import trax
  from trax import layers as tl
  from trax.supervised import training
  # pylint: enable=g-import-not-at-top

  def make_loop(random_seed, first_batch, eval_tasks=()):
    model = trax.models.TransformerLM(
        vocab_size=VOCAB, d_model=16, d_ff=32, n_layers=1, n_heads=2,
        max_len=LENGTH, dropout=0.0, mode='train')
    task = training.TrainTask(
        _stream(first_batch), tl.WeightedCategoryCrossEntropy(),
        trax.optimizers.Adam(0.03), sample_batch=_batch(0))
    return training.Loop(
        model, [task], eval_tasks=eval_tasks, output_dir=output_dir,
        n_devices=n_devices, random_seed=random_seed,
        checkpoint_at=lambda step: step == N_STEPS,
        permanent_checkpoint_at=lambda step: False,
        eval_at=lambda step: True)  # Logs every step's training loss in history.

  eval_task = training.EvalTask(
      _stream(1000), [tl.WeightedCategoryCrossEntropy()], metric_names=[LOSS])
  loop = make_loop(random_seed=0, first_batch=1, eval_tasks=[eval_task])
  loop.run(N_STEPS)
  # Restore into a Loop with other initial weights whose stream goes on where `loop`'s
  # is, and take one more step with each.
  restored = make_loop(random_seed=1, first_batch=N_STEPS + 1)
  restored_step = restored.step
  loop.run(1)
  restored.run(1)

  def losses(a_loop, kind):
    return [float(v) for _, v in a_loop.history.get(kind, 'metrics/' + LOSS)]

  report = {
      'device_count': jax.device_count(),
      'train_losses': losses(loop, 'train'),
      'eval_losses': losses(loop, 'eval'),
      'restored_step': restored_step,
      'restored_next_loss': losses(restored, 'train')[-1],
  }
  with open(os.path.join(output_dir, 'report.json'), 'w') as f:
    json.dump(report, f)


@pytest.fixture(scope='module', autouse=True)
def children(tmp_path_factory):
  """Starts both children with the first test (autouse); kills any still running at the end.

  Yields:
    {n_devices: (Popen, output directory)}.
  """
  started = {}
  for n_devices in (2, 1):
    output_dir = str(tmp_path_factory.mktemp(f'loop_{n_devices}_devices'))
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    if n_devices > 1:
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n_devices}'
    with open(os.path.join(output_dir, 'log.txt'), 'w') as log:
      child = subprocess.Popen(
          [sys.executable, '-m', 'tests.test_compat', str(n_devices), output_dir],
          cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    started[n_devices] = (child, output_dir)
  yield started
  for child, _ in started.values():
    if child.poll() is None:
      child.kill()
      child.wait()


@pytest.fixture(scope='module')
def reports(children):
  """Waits for the children; maps n_devices to its report, or to its log's tail."""
  results = {}
  for n_devices, (child, output_dir) in children.items():
    returncode = child.wait(timeout=600)
    if returncode:
      with open(os.path.join(output_dir, 'log.txt')) as log:
        results[n_devices] = f'child exited with {returncode}:\n{log.read()[-3000:]}'
    else:
      with open(os.path.join(output_dir, 'report.json')) as f:
        results[n_devices] = json.load(f)
  return results


def _report(reports, n_devices):
  report = reports[n_devices]
  assert isinstance(report, dict), report
  return report


def test_apply_is_idempotent_and_installs_shims():
  from sparse_scaling import compat  # pylint: disable=g-import-not-at-top
  import trax  # pylint: disable=g-import-not-at-top

  def installed():
    return (trax.layers.for_n_devices, trax.layers.acceleration.for_n_devices,
            trax.fastmath.tree_unflatten,
            sys.modules['trax.fastmath.numpy'].tree_unflatten,
            trax.fastmath.jax.JAX_BACKEND['pmap'],
            trax.optimizers.trainer._accelerate_update_fn,
            trax.optimizers.trainer.ReversibleSerialTrainer.one_step)

  compat.apply()
  first = installed()
  compat.apply()
  assert installed() == first
  assert first == (compat._for_n_devices, compat._for_n_devices,
                   compat._tree_unflatten, compat._tree_unflatten,
                   compat._pmap, compat._accelerate_update_fn, compat._reversible_one_step)


def test_reversible_trainer_gets_its_key_on_the_device_of_its_step(monkeypatch):
  # trax's Loop commits the memory-efficient trainer's keys to the CPU; on one device the
  # step's layers run on the first local device (a GPU where there is one), so the key must
  # be there. Several devices: trax's key, as it was.
  import jax  # pylint: disable=g-import-not-at-top
  from sparse_scaling import compat  # pylint: disable=g-import-not-at-top
  compat.apply()
  seen = []
  monkeypatch.setitem(compat._trax_originals, 'reversible_one_step',
                      lambda self, batch, rng, step, learning_rate: seen.append(rng) or 'ran')
  key = jax.device_put(jax.random.PRNGKey(3), jax.devices('cpu')[0])
  moved, device_put = [], jax.device_put
  monkeypatch.setattr(jax, 'device_put', lambda x, device: moved.append(device) or
                      device_put(x, device))
  trainer = type('Trainer', (), {'_n_devices': 1})()
  assert compat._reversible_one_step(trainer, 'batch', key, step=2) == 'ran'
  assert moved == [jax.local_devices()[0]]  # the first local device: a GPU where there is one
  assert seen[0].devices() == {jax.local_devices()[0]}
  np.testing.assert_array_equal(seen[0], key)
  trainer._n_devices = 2
  compat._reversible_one_step(trainer, 'batch', key)
  assert seen[1] is key and len(moved) == 1


def test_tree_unflatten_fills_arrays_and_copies_placeholders():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import sparse_scaling  # pylint: disable=g-import-not-at-top,unused-import
  from trax import fastmath  # pylint: disable=g-import-not-at-top
  from trax.layers import base  # pylint: disable=g-import-not-at-top

  # Adam slots of (Dense, Relu), restored as Loop.load_checkpoint restores them.
  slots = ((jnp.zeros(3), jnp.zeros(3)), ())
  tree, rest = fastmath.tree_unflatten(
      [np.ones(3), np.full(3, 2.0)], slots, copy_from_tree=[None, ()])
  assert not rest
  np.testing.assert_array_equal(tree[0][1], np.full(3, 2.0))
  assert tree[1] == ()
  # A model state with numpy scalars (parallel.to_host's, as its checkpoint holds it) as the
  # structure, restored as training.Loop.load_checkpoint restores state.
  state = ((np.int32(3), ()), np.float32(0.5))
  tree, rest = fastmath.tree_unflatten(
      [np.int32(4), np.float32(1.5)], state,
      copy_from_tree=[base.EMPTY_STATE, base.GET_STATE_FROM_CACHE])
  assert not rest and tree == ((4, ()), 1.5)


def test_loop_trains_on_two_devices(reports):
  report = _report(reports, 2)
  assert report['device_count'] == 2
  assert len(report['train_losses']) == N_STEPS + 1
  assert np.all(np.isfinite(report['train_losses']))


def test_loss_falls_on_two_devices(reports):
  report = _report(reports, 2)
  train, evals = report['train_losses'], report['eval_losses']
  assert train[-1] < train[0] - 0.3, train
  assert evals[-1] < evals[0] - 0.3, evals


def test_two_devices_match_one_device(reports):
  # Same global batches, initial weights and optimizer: each step of the 2-device Loop
  # averages the losses and gradients of two half batches of equal weight, which equals the
  # full-batch mean up to float32 summation order (eps 1.2e-7). rtol 1e-5 leaves ~100 eps
  # for that and its growth over the steps, yet is ~1000x below the ~1e-2 a step changes
  # the loss: a device that missed the gradient average or ran on stale weights would fail.
  two, one = _report(reports, 2), _report(reports, 1)
  assert one['device_count'] == 1
  np.testing.assert_allclose(two['train_losses'], one['train_losses'], rtol=1e-5)
  np.testing.assert_allclose(two['eval_losses'], one['eval_losses'], rtol=1e-5)


@pytest.mark.parametrize('n_devices', [2, 1])
def test_checkpoint_restores_weights_and_optimizer_slots(reports, n_devices):
  # A fresh Loop (other seed) restored from the step-N_STEPS checkpoint takes the same next
  # step as the Loop that saved it only if both weights and Adam slots came back.
  report = _report(reports, n_devices)
  assert report['restored_step'] == N_STEPS
  np.testing.assert_allclose(
      report['restored_next_loss'], report['train_losses'][-1], rtol=1e-6)


if __name__ == '__main__':
  _train_and_report(int(sys.argv[1]), sys.argv[2])
