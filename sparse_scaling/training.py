"""Training: trax's `Loop` configured by gin under trax's trainer names, with safe checkpoints.

`train` takes the arguments of `trax.supervised.trainer_lib.train` that our runs use, under
the same gin names (`train.steps`, `train.eval_frequency`, `train.optimizer`, ...). It builds `TrainTask`/`EvalTask` and runs a `Loop` that adds:

- checkpoints that are never half-written: each is a complete trax checkpoint directory
  (`model.pkl.gz`, weights, optimizer slots, data counters), written beside the last one and
  swapped in by renames; a restart resumes from it, data position included;
- a stop with a clear error, keeping the last good checkpoint, when the loss is NaN or inf;
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
import shutil
import time

from absl import logging
import gin
import jax
import numpy as np
from trax import layers as tl
from trax import optimizers
from trax import shapes
from trax.data import inputs as trax_inputs
from trax.supervised import lr_schedules
from trax.supervised import training

from sparse_scaling import convert
from sparse_scaling import parallel

CHECKPOINT_DIR = 'checkpoint'      # output_dir/checkpoint/model.pkl.gz, ...
_PREVIOUS = CHECKPOINT_DIR + '.previous'
_WRITING = CHECKPOINT_DIR + '.writing'


def train(output_dir, model=gin.REQUIRED, inputs=gin.REQUIRED, steps=1000,
          eval_frequency=100, eval_steps=10, checkpoint_frequency=None,
          optimizer=optimizers.Adafactor,
          lr_schedule_fn=lr_schedules.multifactor, loss_fn=None, random_seed=None,
          n_devices=None, log_frequency=10, use_memory_efficient_trainer=False,
          evaluate_only=False, on_step=None):
  """Trains `model` on `inputs`, checkpointing and evaluating every `eval_frequency` steps.

  Resumes from the checkpoint in `output_dir` if there is one. In a run of several processes
  (`parallel.initialize` called first), every process calls `train` with the same arguments.

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
    The `trax.supervised.training.Loop` after training.
  """
  n_devices = n_devices or jax.local_device_count()
  processes = jax.process_count()
  if use_memory_efficient_trainer and processes > 1:
    raise ValueError(f'use_memory_efficient_trainer=True trains in one process, not in a run '
                     f'of {processes}')
  if eval_frequency is not None and eval_frequency < 1:
    raise ValueError(f'eval_frequency={eval_frequency}: give a positive number of steps, or '
                     'None for no evaluation')
  if evaluate_only and output_dir is None:
    raise ValueError('evaluate_only=True needs the output_dir of a trained run')
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
  """trax's `Loop` with swapped-in checkpoints, a NaN stop, progress lines, a step callback and
  `parallel.Trainer` unless training on one CPU device (the module docstring)."""

  def __init__(self, *args, total_steps, log_frequency, tokens_per_step, on_step=None,
               **kwargs):
    self._total_steps = total_steps
    self._log_frequency = log_frequency
    self._tokens_per_step = tokens_per_step
    self._on_step = on_step
    self._progress = None  # (time, step) at the last progress line
    super().__init__(*args, **kwargs)
    if not parallel.same_on_all_processes(self.step):
      raise ValueError(f'the processes resumed from different steps (this one from step '
                       f'{self.step}): output_dir must be one directory that every process '
                       'reads, e.g. on a shared filesystem')

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
    super().run(n_steps)
    self._weights_to_host()
    self._eval_model.weights = self._model.weights

  def _weights_to_host(self):
    """Copies the trained weights, state and slots from the devices to the model (if stale)."""
    for trainer in self._parallel_trainers():
      trainer.to_host()

  def _run_one_step(self, task_index, task_changed):
    if task_changed:
      self._weights_to_host()  # trax re-places the model's weights on the devices
    start = time.perf_counter()
    if self._progress is None:
      self._progress = (time.time(), self.step - 1)
    loss, stats = super()._run_one_step(task_index, task_changed)
    mean_loss = float(np.mean(loss))  # waits for the step
    seconds = time.perf_counter() - start
    if not np.isfinite(mean_loss):
      raise FloatingPointError(f'training loss is {mean_loss} at step {self.step}; '
                               f'stopped. {self._last_good()}')
    if self._on_step is not None:
      self._on_step(self, mean_loss, seconds)
    if self.step % self._log_frequency == 0 or self.step == self._total_steps:
      self._print_progress(mean_loss)
    return loss, stats

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
    """Writes a complete checkpoint directory, then swaps it in by renames (process 0)."""
    if self._output_dir is None:
      return super().save_checkpoint(basename)
    self._weights_to_host()
    if basename != 'model':
      return super().save_checkpoint(basename)
    if not all(np.isfinite(w).all() for w in jax.tree.leaves(self._model.weights)):
      raise FloatingPointError(f'weights are not finite at step {self.step}; stopped without '
                               f'saving them. {self._last_good()}')
    if not self.is_chief:
      return
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
    if directory is None and self._output_dir is not None:
      directory = latest_checkpoint(self._output_dir)
      if directory is None:
        return
      # Process 0 saved its data position; every process reads the same global batches.
      trax_inputs.load_data_counters(directory, host_id=0)
    super().load_checkpoint(directory, filename)
    for trainer in self._parallel_trainers():
      trainer.from_host()  # the next step places the restored weights and slots


def _duration(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'
