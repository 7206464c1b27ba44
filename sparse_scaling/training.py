"""Training: trax's `Loop` configured by gin under trax's trainer names, with safe checkpoints.

`train` takes the arguments of `trax.supervised.trainer_lib.train` that our runs use, under
the same gin names (`train.steps`, `train.eval_frequency`, `train.optimizer`, ...). It builds `TrainTask`/`EvalTask` and runs a `Loop` that adds:

- checkpoints that are never half-written, read back without running code from the file and
  checked against the model (`checkpoints.py`); a restart resumes from the last one, data
  position included;
- randomness of each training step drawn from (seed, step), so a resumed run's steps are those
  of an uninterrupted run;
- a stop on SIGTERM or SIGINT after the step in flight, with a checkpoint of that step (in a
  run of several processes, all stop after the same step: the step carries the request);
- a stop with a clear error, keeping the last good checkpoint, when the loss or the gradients'
  global norm is NaN or inf;
- one training run per output directory at a time (`checkpoints.lock_output_dir`, held by
  process 0);
- a progress line per `log_frequency` steps: step, loss, tokens/s and the time left;
- on accelerators (one GPU or TPU too) or more than one device in all, `parallel.Trainer`'s
  step over every device of every process, whose weights and optimizer slots stay on the
  devices between steps (trax's Trainer, kept for one CPU device, copies the optimizer slots
  to the host and back at every step: on one H200 that made the 800M LM's step 1.25x slower
  than each of two devices' step, `docs/results/scaling.md`); a run of
  several processes (`parallel.initialize` first) has each read its rows of every global
  batch, and only process 0 writes checkpoints, TensorBoard files and `config.gin`.
"""

import contextlib
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
from trax import shapes
from trax.data import inputs as trax_inputs
from trax.layers import base
from trax.supervised import history as trax_history
from trax.supervised import lr_schedules
from trax.supervised import training

from sparse_scaling import checkpoints
from sparse_scaling import parallel

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_fold_in = jax.jit(jax.random.fold_in)  # one dispatch (27 us) instead of several (410 us)


def train(output_dir, model=gin.REQUIRED, inputs=gin.REQUIRED, steps=1000,
          eval_frequency=100, eval_steps=10, checkpoint_frequency=None,
          optimizer=optimizers.Adafactor,
          lr_schedule_fn=lr_schedules.multifactor, loss_fn=None, random_seed=None,
          n_devices=None, log_frequency=10, use_memory_efficient_trainer=False,
          evaluate_only=False, on_step=None):
  """Trains `model` on `inputs`, checkpointing and evaluating every `eval_frequency` steps.

  Resumes from the checkpoint in `output_dir` if there is one. One run at a time trains in
  `output_dir`: its process 0 holds `checkpoints.lock_output_dir` while this runs. In a run of
  several processes (`parallel.initialize` called first), every process calls `train` with the
  same arguments.

  Args:
    output_dir: Directory for the checkpoint, TensorBoard files and `config.gin` (the
      operative gin config); None writes nothing. Several processes share one directory.
    model: `mode -> layer`, e.g. `@sparse_scaling.models.ScalingTransformerLM`.
    inputs: `trax.data.inputs.Inputs`, or a function returning them. Their batch size is the
      global batch, over all devices of all processes.
    steps: Total training steps, counting those of a resumed run.
    eval_frequency: Steps between evaluations (and checkpoints, unless given below); None:
      no evaluation (trax then writes no training metrics to TensorBoard either).
    checkpoint_frequency: Steps between checkpoints; None means `eval_frequency`, and with
      no evaluation a checkpoint at the last step only. Small models on a GPU spend more time
      saving than stepping: checkpoint less often there.
    eval_steps: Batches per evaluation.
    optimizer: A trax optimizer class (Adafactor, as the paper).
    lr_schedule_fn: A function returning a `step -> learning rate` schedule.
    loss_fn: Loss layer (default: weighted cross-entropy).
    random_seed: Seed of the weights and the training randomness (None: random; in a run of
      several processes, process 0's).
    n_devices: Devices of this process to train on (None: all local devices; trax's Loop
      takes no other number).
    log_frequency: Steps between progress lines.
    use_memory_efficient_trainer: Train reversible models (Terraformer) with trax's
      `ReversibleSerialTrainer`, which recomputes activations backwards instead of storing
      them: memory flat in depth. One process only.
    evaluate_only: Only evaluate the checkpoint in `output_dir` (which must exist).
    on_step: None, or a function called after every training step as
      `on_step(loop, loss, seconds)`: the `Loop`, the step's training loss (a float, the mean
      over the global batch) and the step's wall-clock seconds, from taking the batch to the
      loss being ready (the first step's include compilation). An exception it raises stops
      training and leaves `train`.

  Returns:
    The `Loop` after training; `loop.stopped_by` names the signal that stopped it early.
  """
  n_devices = n_devices or jax.local_device_count()
  processes = jax.process_count()
  if use_memory_efficient_trainer and processes > 1:
    raise ValueError(f'use_memory_efficient_trainer=True trains in one process, not in a run '
                     f'of {processes}')
  if steps < 0:
    raise ValueError(f'train.steps={steps}: give a number of steps >= 0')
  if eval_frequency is not None and eval_frequency < 1:
    raise ValueError(f'eval_frequency={eval_frequency}: give a positive number of steps, or '
                     'None for no evaluation')
  if eval_steps < 1:
    raise ValueError(f'train.eval_steps={eval_steps}: give a positive number of batches')
  if checkpoint_frequency is not None and checkpoint_frequency < 1:
    raise ValueError(f'train.checkpoint_frequency={checkpoint_frequency}: give a positive number '
                     'of steps, or None')
  if evaluate_only and output_dir is None:
    raise ValueError('evaluate_only=True needs the output_dir of a trained run')
  # Held until this function returns: a second run training here fails at once. Process 0
  # writes for the whole run, so it alone takes the lock (the others share the directory).
  _lock = (checkpoints.lock_output_dir(output_dir)
           if output_dir is not None and not evaluate_only and jax.process_index() == 0
           else None)
  if processes > 1:
    random_seed = parallel.broadcast_seed(random_seed)
  # trax counts batches per process (CountAndSkip); a second run here starts from 0 too
  # (a resumed one from its checkpoint's counters).
  trax_inputs.data_counters.clear()
  inputs = inputs() if callable(inputs) else inputs
  all_devices = n_devices * processes
  train_batches = trax_inputs.CountAndSkip('train')(
      parallel.process_batches(inputs.train_stream(all_devices)))
  first = next(train_batches)  # a sample, not trained on (as trax's TrainTask takes one)
  every = checkpoint_frequency or eval_frequency
  train_task = training.TrainTask(
      train_batches,
      loss_layer=loss_fn or tl.WeightedCategoryCrossEntropy(),
      # The memory-efficient trainer makes one optimizer per layer.
      optimizer=optimizer if use_memory_efficient_trainer else optimizer(),
      lr_schedule=lr_schedule_fn(), n_steps_per_checkpoint=every,
      # `parallel.Trainer`'s model state holds one device's rows: init it for those.
      sample_batch=(first if _trainer_is_trax(use_memory_efficient_trainer)
                    else parallel.device_rows(first)))
  eval_tasks = eval_model = None
  if eval_frequency is not None or evaluate_only:
    eval_tasks = [training.EvalTask(
        parallel.process_batches(inputs.eval_stream(all_devices)),
        [tl.WeightedCategoryCrossEntropy(), tl.WeightedCategoryAccuracy()],
        metric_names=['log_perplexity', 'accuracy'], n_eval_batches=eval_steps)]
    eval_model = model(mode='eval')
  loop = Loop(model(mode='train'), [train_task], eval_model=eval_model,
              eval_tasks=eval_tasks, output_dir=output_dir, n_devices=n_devices,
              checkpoint_at=((lambda step: step == 1 or step % every == 0) if every
                             else (lambda step: step == steps)),
              eval_at=eval_frequency and (lambda step: step == 1 or step % eval_frequency == 0),
              random_seed=random_seed, use_memory_efficient_trainer=use_memory_efficient_trainer,
              total_steps=steps, log_frequency=log_frequency,
              tokens_per_step=np.size(first[0]) * processes, on_step=on_step)
  if evaluate_only:
    if not loop.step:
      raise FileNotFoundError(f'no checkpoint in {output_dir}: train first')
    loop.print(f'Evaluating the checkpoint of step {loop.step} in {output_dir}')
    loop.run_evals()
    return loop
  if output_dir is not None and loop.is_chief:
    with open(os.path.join(output_dir, 'config.gin'), 'w') as f:
      f.write(gin.operative_config_str())  # as t5x: the bindings this run actually used
  if loop.step:
    loop.print(f'Resumed from the checkpoint of step {loop.step} in {output_dir}')
  if loop.step < steps:
    loop.run(steps - loop.step)
  return loop


def _trainer_is_trax(use_memory_efficient_trainer):
  """Whether `Loop` trains with trax's trainer: one CPU device in all, or the memory-efficient
  one (where weights live on the host anyway)."""
  return use_memory_efficient_trainer or (jax.device_count() == 1
                                          and jax.devices()[0].platform == 'cpu')


# Registered with gin under the bare name `train` (no module): gin prefers an exact selector
# match, so `train.steps` binds this function although trax's `trainer_lib.train` is
# registered too (as `trax.supervised.trainer_lib.train`).
train.__module__ = None
train = gin.configurable('train', denylist=['output_dir', 'evaluate_only'])(train)


class Loop(training.Loop):
  """trax's `Loop` with safe checkpoints, clean stops, NaN guards, progress lines, a step
  callback and `parallel.Trainer` unless training on one CPU device (the module docstring).

  Attributes:
    stopped_by: What stopped `run` early ('SIGTERM', 'SIGINT', or in a run of several
      processes 'a signal to another process'), or None.
  """

  def __init__(self, *args, total_steps, log_frequency, tokens_per_step, on_step=None,
               **kwargs):
    self._total_steps = total_steps
    self._log_frequency = log_frequency
    self._tokens_per_step = tokens_per_step
    self._on_step = on_step
    self._progress = None  # (time, step) at the last progress line
    self._saved_step = None  # step of the last checkpoint this Loop wrote
    self.stopped_by = None
    _check_stray_data_counters(kwargs.get('output_dir'))
    super().__init__(*args, **kwargs)
    if not parallel.same_on_all_processes(self.step):
      raise ValueError(f'the processes resumed from different steps (this one from step '
                       f'{self.step}): output_dir must be one directory that every process '
                       'reads, e.g. on a shared filesystem')
    # trax splits one key per step off a chain that evals draw from too, and does not
    # checkpoint it; a step's key from (seed, step) is the same in a resumed run.
    self._step_rng = self._rng

  def print(self, message):
    """Prints `message` (flushed), on process 0 only."""
    if self.is_chief:
      print(message, flush=True)

  @property
  def device_weights(self):
    """The weights the training step updates, where they live (on the training devices).

    Not for the memory-efficient trainer, which keeps them per layer on the host.
    """
    return self._trainer_per_task[0].accelerated_model_with_loss.weights

  def _parallel_trainers(self):
    return [t for t in self._trainer_per_task if isinstance(t, parallel.Trainer)]

  def _init_trainer(self, task):
    if _trainer_is_trax(self._use_memory_efficient_trainer):
      return super()._init_trainer(task)
    model_with_loss = training._model_with_ends(  # pylint: disable=protected-access
        self._model, [task.loss_layer], shapes.signature(task.sample_batch))
    task.optimizer.tree_init(model_with_loss.weights)
    return parallel.Trainer(model_with_loss, task.optimizer, adasum=self._adasum)

  def _init_evaluator(self, eval_task):
    if _trainer_is_trax(self._use_memory_efficient_trainer):
      return super()._init_evaluator(eval_task)
    # pylint: disable=protected-access
    model_with_metrics = training._model_with_metrics(self._eval_model, eval_task)
    return training._Evaluator(weights=parallel.replicated(model_with_metrics.weights[1]),
                               state=parallel.per_device(model_with_metrics.state[1]),
                               metrics_fn=parallel.metrics_fn(model_with_metrics))

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
    self._weights_to_host()
    self._eval_model.weights = self._model.weights

  def _weights_to_host(self):
    """Copies the trained weights, state and slots from the devices to the model (if stale)."""
    for trainer in self._parallel_trainers():
      trainer.to_host()

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
      self.print(f'Stopped by {self.stopped_by} after step {self.step} (no output_dir: '
                 'nothing saved)')
      raise _Stopped()
    if self._saved_step != self.step:
      self.save_checkpoint(checkpoints.BASENAME)
    self.print(f'Stopped by {self.stopped_by} after step {self.step}: checkpoint saved in '
               f'{checkpoints.latest_checkpoint(self._output_dir)}; run the same command to '
               'resume')
    raise _Stopped()

  def _run_one_step(self, task_index, task_changed):
    # A signal during an eval or a checkpoint: no step in flight. In a run of several
    # processes the step after it carries the request to the others (below).
    if self.stopped_by and self._n_hosts == 1:
      self._step -= 1  # trax counted the step about to run
      self._stop()
    if task_changed:
      self._weights_to_host()  # trax re-places the model's weights on the devices
    start = time.perf_counter()
    if self._progress is None:
      self._progress = (time.time(), self.step - 1)
    self._rng = _fold_in(self._step_rng, self.step)  # trax's step splits it once
    for trainer in self._parallel_trainers():
      trainer.stop_requested = self.stopped_by is not None
    loss, stats = super()._run_one_step(task_index, task_changed)
    mean_loss, stop_requested = self._check_finite(loss, stats)  # waits for the step
    seconds = time.perf_counter() - start
    if self._on_step is not None:
      self._on_step(self, mean_loss, seconds)
    if self.step % self._log_frequency == 0 or self.step == self._total_steps:
      self._print_progress(mean_loss)
    # One process: a signal until now. Several: one that a process sent with this step, so
    # that all stop after the same step (a later one goes with the next step).
    if self.stopped_by if stop_requested is None else stop_requested:
      self.stopped_by = self.stopped_by or 'a signal to another process'
      self._stop()
    return loss, stats

  def _check_finite(self, loss, stats):
    """Fetches the step's mean loss; stops on a non-finite gradients' global norm or loss.

    trax's optimizers return the global norm of the step's gradients among their metrics
    (`gradients_l2`; one per layer group with the memory-efficient trainer): nothing is
    recomputed, and they come in the one fetch that waits for the loss anyway. The gradients
    come first: they make the update, and overflow in backward while the loss can still be
    finite.

    Returns:
      (the mean loss over the global batch, and in a run of several processes whether any
      process asked to stop with this step, as `parallel.Trainer`'s step reports it; else
      None).
    """
    request = stats.pop('stop_requested', None)  # not a metric for TensorBoard
    norms = [v for k, v in stats.items() if k.endswith('gradients_l2')]
    if self._n_hosts == 1:
      request = None
    fetched = jax.device_get([loss, norms, request])
    losses, norms = np.ravel(fetched[0]), [np.ravel(n)[0] for n in fetched[1]]  # per device
    stop_requested = None if request is None else bool(fetched[2])
    with np.errstate(over='ignore', invalid='ignore'):
      norm = float(np.sqrt(np.sum(np.square(np.asarray(norms, np.float64)))))
    finite = np.isfinite(losses)
    if np.isfinite(norm) and finite.all():
      return float(np.mean(losses)), stop_requested
    loss = losses[~finite][0] if not finite.all() else np.mean(losses)
    if not np.isfinite(norm):
      raise FloatingPointError(f"gradients' global norm is {norm} at step {self.step} (loss "
                               f'{loss}); stopped. {self._last_good()}')
    raise FloatingPointError(f'training loss is {loss} at step {self.step}; stopped. '
                             f'{self._last_good()}')

  def _print_progress(self, loss):
    now, step = time.time(), self.step
    then, then_step = self._progress
    seconds_per_step = (now - then) / max(1, step - then_step)
    left = max(0, self._total_steps - step) * seconds_per_step
    self.print(f'step {step:6d}/{self._total_steps} | loss {loss:.4f} | '
               f'{self._tokens_per_step / seconds_per_step:,.0f} tokens/s | '
               f'{1 / seconds_per_step:.2f} steps/s | ETA {_duration(left)}')
    self._progress = (now, step)

  def _log_step(self, msg, stdout=True):
    super()._log_step(msg, stdout=stdout and self.is_chief)

  @contextlib.contextmanager
  def _open_summary_writers(self):
    if self.is_chief:
      with super()._open_summary_writers() as writers:
        yield writers
    else:  # as trax's without an output_dir
      yield [None] * len(self._tasks), [None] * len(self._eval_tasks)

  def save_checkpoint(self, basename):
    """Writes a complete checkpoint directory, then swaps it in (`checkpoints.swapped_in`).

    Only process 0 writes; the others only copy their weights from the devices (as it does).
    """
    if self._output_dir is None:
      return super().save_checkpoint(basename)
    self._weights_to_host()
    if basename != checkpoints.BASENAME:
      return super().save_checkpoint(basename)
    if not all(np.isfinite(w).all() for w in jax.tree.leaves(self._model.weights)):
      raise FloatingPointError(f'weights are not finite at step {self.step}; stopped without '
                               f'saving them. {self._last_good()}')
    if not self.is_chief:
      self._saved_step = self.step
      return
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
    structure). This one reads through `checkpoints` and checks everything first. Every
    process of a run reads the checkpoint, data position included (process 0's: every
    process reads the same global batches).

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
    for trainer in self._parallel_trainers():
      trainer.from_host()  # the next step places the restored weights and slots
    logging.info('Checkpoint of step %d loaded from %s', self.step, checkpoint.directory)


class _Stopped(Exception):
  """Ends `Loop.run` after a stop signal."""


def _check_stray_data_counters(output_dir):
  """Reads `output_dir/data_counters<i>.pkl`, if any, through `checkpoints.unpickle` first.

  Our checkpoints keep the data position inside `checkpoint/`; a file in `output_dir` itself
  was written by trax's own Loop, or put there. trax's Loop unpickles it without restriction
  as it starts (and then uses the checkpoint's): read here first, a pickle that would run code
  stops the run with `checkpoints.CheckpointError` naming its type before trax opens it.
  """
  if output_dir is None:
    return
  path = os.path.join(os.path.expanduser(output_dir), f'data_counters{jax.process_index()}.pkl')
  if os.path.exists(path):
    checkpoints.unpickle(path)


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
