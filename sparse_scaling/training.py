"""Training: trax's `Loop` configured by gin under trax's trainer names, with safe checkpoints.

`train` takes the arguments of `trax.supervised.trainer_lib.train` that our runs use, under
the same gin names (`train.steps`, `train.eval_frequency`, `train.optimizer`, ...). It builds `TrainTask`/`EvalTask` and runs a `Loop` that adds:

- checkpoints that are never half-written, read back without running code from the file and
  checked against the model (`checkpoints.py`); a restart resumes from the last one, data
  position included;
- randomness of each training step drawn from (seed, step), so a resumed run's steps are those
  of an uninterrupted run;
- a stop on SIGTERM or SIGINT after the step in flight, with a checkpoint of that step;
- a stop with a clear error, keeping the last good checkpoint, when the loss or the gradients'
  global norm is NaN or inf;
- one training run per output directory at a time (`checkpoints.lock_output_dir`);
- a progress line per `log_frequency` steps: step, loss, tokens/s and the time left.
"""

import contextlib
import math
import os
import signal
import threading
import time

from absl import logging
import gin
import jax
import numpy as np
from trax import fastmath
from trax import layers as tl
from trax import optimizers
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import history as trax_history
from trax.supervised import lr_schedules
from trax.supervised import training

from sparse_scaling import checkpoints

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_fold_in = jax.jit(jax.random.fold_in)  # one dispatch (27 us) instead of several (410 us)


def train(output_dir, model=gin.REQUIRED, inputs=gin.REQUIRED, steps=1000,
          eval_frequency=100, eval_steps=10, checkpoint_frequency=None,
          optimizer=optimizers.Adafactor,
          lr_schedule_fn=lr_schedules.multifactor, loss_fn=None, random_seed=None,
          n_devices=None, log_frequency=10, use_memory_efficient_trainer=False,
          evaluate_only=False):
  """Trains `model` on `inputs`, checkpointing and evaluating every `eval_frequency` steps.

  Resumes from the checkpoint in `output_dir` if there is one. One process at a time trains in
  `output_dir` (`checkpoints.lock_output_dir`, held while this runs).

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
    The `Loop` after training; `loop.stopped_by` names the signal that stopped it early.
  """
  # Held until this function returns: a second process training here fails at once.
  _lock = None if evaluate_only else checkpoints.lock_output_dir(output_dir)
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


class Loop(training.Loop):
  """trax's `Loop` with safe checkpoints, clean stops, NaN guards and progress lines.

  Attributes:
    stopped_by: The name of the signal that stopped `run` early ('SIGTERM'), or None.
  """

  def __init__(self, *args, total_steps, log_frequency, **kwargs):
    self._total_steps = total_steps
    self._log_frequency = log_frequency
    self._progress = None  # (time, step) at the last progress line
    self._saved_step = None  # step of the last checkpoint this Loop wrote
    self.stopped_by = None
    super().__init__(*args, **kwargs)
    # trax splits one key per step off a chain that evals draw from too, and does not
    # checkpoint it; a step's key from (seed, step) is the same in a resumed run.
    self._step_rng = self._rng

  def run(self, n_steps=1):
    """trax's `run`; SIGTERM or SIGINT stops it after the step in flight, with a checkpoint.

    A second signal has its usual effect at once.
    """
    with self._stopping_on_signals():
      try:
        super().run(n_steps)
        if self.stopped_by:  # the signal came after the last step
          self._stop()
      except _Stopped:
        pass

  @contextlib.contextmanager
  def _stopping_on_signals(self):
    if threading.current_thread() is not threading.main_thread():  # signals reach only it
      yield
      return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore():
      for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def stop_after_this_step(signum, unused_frame):
      self.stopped_by = signal.Signals(signum).name
      restore()

    for s in STOP_SIGNALS:
      signal.signal(s, stop_after_this_step)
    try:
      yield
    finally:
      restore()

  def _stop(self):
    """Checkpoints the last step (unless written already), says so and ends `run`."""
    if self._output_dir is None:
      print(f'Stopped by {self.stopped_by} after step {self.step} (no output_dir: nothing '
            'saved)', flush=True)
      raise _Stopped()
    if self._saved_step != self.step:
      self.save_checkpoint(checkpoints.BASENAME)
    print(f'Stopped by {self.stopped_by} after step {self.step}: checkpoint saved in '
          f'{checkpoints.latest_checkpoint(self._output_dir)}; run the same command to resume',
          flush=True)
    raise _Stopped()

  def _run_one_step(self, task_index, task_changed):
    if self.stopped_by:  # the signal came during an eval or a checkpoint: no step in flight
      self._step -= 1  # trax counted the step about to run
      self._stop()
    if self._progress is None:
      self._progress = (time.time(), self.step - 1)
    self._rng = _fold_in(self._step_rng, self.step)  # trax's step splits it once
    loss, stats = super()._run_one_step(task_index, task_changed)
    self._check_finite(loss, stats)
    if self.step % self._log_frequency == 0 or self.step == self._total_steps:
      self._print_progress(task_index, float(np.mean(loss)))
    if self.stopped_by:
      self._stop()
    return loss, stats

  def _check_finite(self, loss, stats):
    """Stops on a non-finite gradients' global norm or loss.

    trax's optimizers return the global norm of the step's gradients among their metrics
    (`gradients_l2`; one per layer group with the memory-efficient trainer): nothing is
    recomputed, and the loss is fetched here anyway. The gradients come first: they make the
    update, and overflow in backward while the loss can still be finite.
    """
    losses = np.ravel(loss)  # one per device
    norm = math.sqrt(sum(float(np.ravel(v)[0]) ** 2  # [n_devices] copies
                         for k, v in stats.items() if k.endswith('gradients_l2')))
    finite = np.isfinite(losses)
    if math.isfinite(norm) and finite.all():
      return
    loss = losses[~finite][0] if not finite.all() else losses[0]
    if not math.isfinite(norm):
      raise FloatingPointError(f"gradients' global norm is {norm} at step {self.step} (loss "
                               f'{loss}); stopped. {self._last_good()}')
    raise FloatingPointError(f'training loss is {loss} at step {self.step}; stopped. '
                             f'{self._last_good()}')

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
    """Writes a complete checkpoint directory, then swaps it in (`checkpoints.swapped_in`)."""
    if self._output_dir is None or basename != checkpoints.BASENAME:
      return super().save_checkpoint(basename)
    if not all(np.isfinite(w).all() for w in jax.tree.leaves(self._model.weights)):
      raise FloatingPointError(f'weights are not finite at step {self.step}; stopped without '
                               f'saving them. {self._last_good()}')
    root = self._output_dir
    with checkpoints.swapped_in(root, self.step) as writing:
      self._output_dir = writing
      try:
        super().save_checkpoint(basename)
      finally:
        self._output_dir = root
    self._saved_step = self.step
    logging.info('Checkpoint of step %d saved in %s', self.step, root)

  def _last_good(self):
    last = self._output_dir and checkpoints.latest_checkpoint(self._output_dir)
    return f'The last good checkpoint is kept: {last}' if last else 'No checkpoint was saved.'

  def load_checkpoint(self, directory=None, filename=None):
    """Restores the last checkpoint of `output_dir` (or the one in `directory`), if any.

    trax's own loader unpickles without restriction, stops quietly at a truncated weights
    file, loads weights that do not fit as far as they go, and fails on a checkpoint written
    before the first eval (it restores the eval model's state into the training model's
    structure). This one reads through `checkpoints` and checks everything first.

    Raises:
      checkpoints.CheckpointError: damaged, not admitted, or not fitting the model.
    """
    if directory is not None:
      checkpoint = checkpoints.read(directory, len(self._tasks), filename or 'model')
    elif self._output_dir is not None:
      checkpoint = checkpoints.load_latest(self._output_dir, len(self._tasks))
    else:
      checkpoint = None
    if checkpoint is None:
      return
    weights_file = os.path.join(checkpoint.directory, 'model.weights.npy.gz')
    checkpoints.check_fits(checkpoint.weights, self._model, weights_file)
    for i, (trainer, slots) in enumerate(zip(self._trainer_per_task, checkpoint.slots)):
      ours = training._flatten_and_remove_empty(trainer.slots)  # pylint: disable=protected-access
      if [np.shape(s) for s in ours] != [np.shape(s) for s in slots]:
        raise checkpoints.CheckpointError(
            f'{checkpoint.directory}/model.opt_slots{i}.npy.gz does not fit the optimizer '
            f'({len(slots)} slots there, {len(ours)} here): resume with the optimizer it was '
            'trained with (config.gin), or train in a new --output_dir')
      trainer.slots, _ = fastmath.tree_unflatten(self._from_bits(slots), trainer.slots,
                                                 copy_from_tree=[None, ()])
    self._step = self._saved_step = checkpoint.step
    self._history = trax_history.History.from_dict(checkpoint.history)
    trax_inputs.data_counters.clear()
    trax_inputs.data_counters.update(checkpoint.data_counters)
    self._model.weights, _ = fastmath.tree_unflatten(
        self._from_bits(checkpoint.weights), self._model.weights,
        copy_from_tree=[base.EMPTY_WEIGHTS, base.GET_WEIGHTS_FROM_CACHE])
    self._eval_model.weights = self._model.weights
    # State depends on the batch (a changed batch size keeps the fresh state, as trax does).
    # The eval model's was written in its own structure before the first eval, and in the
    # training model's after one (`run_evals` copies it over).
    state = _state_fitting(checkpoint.state, self._model.state)
    if state is not None:
      self._model.state = state
      eval_state = _state_fitting(checkpoint.eval_state, self._eval_model.state)
      if eval_state is None:
        eval_state = _state_fitting(checkpoint.eval_state, self._model.state)
      if eval_state is not None:
        self._eval_model.state = eval_state
    logging.info('Checkpoint of step %d loaded from %s', self.step, checkpoint.directory)


class _Stopped(Exception):
  """Ends `Loop.run` after a stop signal."""


def _state_fitting(flat, tree):
  """`tree` (a model's state) with the leaves of `flat`, or None if their shapes differ."""
  _, ours = tl.flatten_weights_and_state((), tree)
  if [np.shape(s) for s in ours] != [np.shape(s) for s in flat]:
    return None
  state, _ = fastmath.tree_unflatten(list(flat), tree,
                                     copy_from_tree=[base.EMPTY_STATE, base.GET_STATE_FROM_CACHE])
  return state


def _duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'
