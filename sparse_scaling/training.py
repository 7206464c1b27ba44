"""Training: trax's `Loop` configured by gin under trax's trainer names, with safe checkpoints.

`train` takes the arguments of `trax.supervised.trainer_lib.train` that our runs use, under
the same gin names (`train.steps`, `train.eval_frequency`, `train.optimizer`, ...). It builds `TrainTask`/`EvalTask` and runs a `Loop` that adds:

- checkpoints that are never half-written: each is a complete trax checkpoint directory
  (`model.pkl.gz`, weights, optimizer slots, data counters), written beside the last one and
  swapped in by renames; a restart resumes from it, data position included;
- a stop with a clear error, keeping the last good checkpoint, when the loss is NaN or inf;
- a progress line per `log_frequency` steps: step, loss, tokens/s and the time left.
"""

import os
import shutil
import time

from absl import logging
import gin
import jax
import numpy as np
from trax import layers as tl
from trax import optimizers
from trax.data import inputs as trax_inputs
from trax.supervised import lr_schedules
from trax.supervised import training

from sparse_scaling import convert

CHECKPOINT_DIR = 'checkpoint'      # output_dir/checkpoint/model.pkl.gz, ...
_PREVIOUS = CHECKPOINT_DIR + '.previous'
_WRITING = CHECKPOINT_DIR + '.writing'


def train(output_dir, model=gin.REQUIRED, inputs=gin.REQUIRED, steps=1000,
          eval_frequency=100, eval_steps=10, checkpoint_frequency=None,
          optimizer=optimizers.Adafactor,
          lr_schedule_fn=lr_schedules.multifactor, loss_fn=None, random_seed=None,
          n_devices=None, log_frequency=10, use_memory_efficient_trainer=False,
          evaluate_only=False):
  """Trains `model` on `inputs`, checkpointing and evaluating every `eval_frequency` steps.

  Resumes from the checkpoint in `output_dir` if there is one.

  Args:
    output_dir: Directory for the checkpoint, TensorBoard files and `config.gin` (the
      operative gin config).
    model: `mode -> layer`, e.g. `@sparse_scaling.models.ScalingTransformerLM`.
    inputs: `trax.data.inputs.Inputs`, or a function returning them.
    steps: Total training steps, counting those of a resumed run.
    eval_frequency: Steps between evaluations (and checkpoints, unless given below).
    checkpoint_frequency: Steps between checkpoints; None means `eval_frequency`. Small
      models on a GPU spend more time saving than stepping: checkpoint less often there.
    eval_steps: Batches per evaluation.
    optimizer: A trax optimizer class (Adafactor, as the paper).
    lr_schedule_fn: A function returning a `step -> learning rate` schedule.
    loss_fn: Loss layer (default: weighted cross-entropy).
    random_seed: Seed of the weights and the training randomness (None: random).
    n_devices: Devices for data-parallel training (None: all local devices).
    log_frequency: Steps between progress lines.
    use_memory_efficient_trainer: Train reversible models (Terraformer) with trax's
      `ReversibleSerialTrainer`, which recomputes activations backwards instead of storing
      them: memory flat in depth.
    evaluate_only: Only evaluate the checkpoint in `output_dir` (which must exist).

  Returns:
    The `trax.supervised.training.Loop` after training.
  """
  n_devices = n_devices or jax.local_device_count()
  # trax counts batches per process (CountAndSkip); a second run here starts from 0 too
  # (a resumed one from its checkpoint's counters).
  trax_inputs.data_counters.clear()
  inputs = inputs() if callable(inputs) else inputs
  train_task = training.TrainTask(
      trax_inputs.CountAndSkip('train')(inputs.train_stream(n_devices)),
      loss_layer=loss_fn or tl.WeightedCategoryCrossEntropy(),
      # The memory-efficient trainer makes one optimizer per layer.
      optimizer=optimizer if use_memory_efficient_trainer else optimizer(),
      lr_schedule=lr_schedule_fn(),
      n_steps_per_checkpoint=checkpoint_frequency or eval_frequency)
  eval_task = training.EvalTask(
      inputs.eval_stream(n_devices),
      [tl.WeightedCategoryCrossEntropy(), tl.WeightedCategoryAccuracy()],
      metric_names=['log_perplexity', 'accuracy'], n_eval_batches=eval_steps)
  loop = Loop(model(mode='train'), [train_task], eval_model=model(mode='eval'),
              eval_tasks=[eval_task], output_dir=output_dir, n_devices=n_devices,
              eval_at=lambda step: step == 1 or step % eval_frequency == 0,
              random_seed=random_seed, use_memory_efficient_trainer=use_memory_efficient_trainer,
              total_steps=steps, log_frequency=log_frequency)
  if evaluate_only:
    if not loop.step:
      raise FileNotFoundError(f'no checkpoint in {output_dir}: train first')
    print(f'Evaluating the checkpoint of step {loop.step} in {output_dir}', flush=True)
    loop.run_evals()
    return loop
  with open(os.path.join(output_dir, 'config.gin'), 'w') as f:
    f.write(gin.operative_config_str())  # as t5x: the bindings this run actually used
  if loop.step:
    print(f'Resumed from the checkpoint of step {loop.step} in {output_dir}', flush=True)
  if loop.step < steps:
    loop.run(steps - loop.step)
  return loop


# Registered with gin under the bare name `train` (no module): gin prefers an exact selector
# match, so `train.steps` binds this function although trax's `trainer_lib.train` is
# registered too (as `trax.supervised.trainer_lib.train`).
train.__module__ = None
train = gin.configurable('train', denylist=['output_dir', 'evaluate_only'])(train)


def latest_checkpoint(output_dir):
  """The directory of the last complete checkpoint in `output_dir`, or None."""
  for name in (CHECKPOINT_DIR, _PREVIOUS):
    path = os.path.join(output_dir, name)
    if os.path.exists(os.path.join(path, 'model.pkl.gz')):
      return path
  return None


def checkpoint_weights(output_dir):
  """The weights of the last checkpoint in `output_dir`, as a flat list in layer order."""
  path = latest_checkpoint(output_dir)
  if path is None:
    raise FileNotFoundError(f'no checkpoint in {output_dir}: train first')
  return convert.read_checkpoint_weights(os.path.join(path, 'model.pkl.gz'))


class Loop(training.Loop):
  """trax's `Loop` with swapped-in checkpoints, a NaN stop and progress lines."""

  def __init__(self, *args, total_steps, log_frequency, **kwargs):
    self._total_steps = total_steps
    self._log_frequency = log_frequency
    self._progress = None  # (time, step) at the last progress line
    super().__init__(*args, **kwargs)

  def _run_one_step(self, task_index, task_changed):
    if self._progress is None:
      self._progress = (time.time(), self.step - 1)
    loss, stats = super()._run_one_step(task_index, task_changed)
    if not np.all(np.isfinite(loss)):
      raise FloatingPointError(f'training loss is {np.ravel(loss)[0]} at step {self.step}; '
                               f'stopped. {self._last_good()}')
    if self.step % self._log_frequency == 0 or self.step == self._total_steps:
      self._print_progress(task_index, float(np.mean(loss)))
    return loss, stats

  def _print_progress(self, task_index, loss):
    now, step = time.time(), self.step
    then, then_step = self._progress
    seconds_per_step = (now - then) / max(1, step - then_step)
    tokens = np.size(self._tasks[task_index].sample_batch[0])
    left = max(0, self._total_steps - step) * seconds_per_step
    print(f'step {step:6d}/{self._total_steps} | loss {loss:.4f} | '
          f'{tokens / seconds_per_step:,.0f} tokens/s | {1 / seconds_per_step:.2f} steps/s | '
          f'ETA {_duration(left)}', flush=True)
    self._progress = (now, step)

  def save_checkpoint(self, basename):
    """Writes a complete checkpoint directory, then swaps it in by renames."""
    if self._output_dir is None or basename != 'model':
      return super().save_checkpoint(basename)
    if not all(np.isfinite(w).all() for w in jax.tree.leaves(self._model.weights)):
      raise FloatingPointError(f'weights are not finite at step {self.step}; stopped without '
                               f'saving them. {self._last_good()}')
    root = self._output_dir
    writing, current, previous = (os.path.join(root, name)
                                  for name in (_WRITING, CHECKPOINT_DIR, _PREVIOUS))
    shutil.rmtree(writing, ignore_errors=True)
    os.makedirs(writing)
    self._output_dir = writing
    try:
      super().save_checkpoint(basename)
    finally:
      self._output_dir = root
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(current):
      os.rename(current, previous)  # a crash here leaves `previous`, which loads
    os.rename(writing, current)
    shutil.rmtree(previous, ignore_errors=True)
    logging.info('Checkpoint of step %d saved in %s', self.step, current)

  def _last_good(self):
    last = self._output_dir and latest_checkpoint(self._output_dir)
    return f'The last good checkpoint is kept: {last}' if last else 'No checkpoint was saved.'

  def load_checkpoint(self, directory=None, filename=None):
    if directory is not None or self._output_dir is None:
      return super().load_checkpoint(directory, filename)
    path = latest_checkpoint(self._output_dir)
    if path is None:
      return None
    trax_inputs.load_data_counters(path)
    return super().load_checkpoint(path, filename)


def _duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'
