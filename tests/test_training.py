"""training.py's Loop under faults: an early checkpoint, SIGINT, a changed model, a failed write,
a second run on one directory. In this process, on the tiny LM (tests/utils.py's TINY_LM); a
real main.py run's SIGTERM and diverging gradients are in test_main.py.
"""

import errno
import logging
import shutil
import signal
import subprocess
import sys

import pytest
import tensorflow as tf
from trax import layers as tl
from trax import optimizers
from trax.supervised import training as trax_training

from sparse_scaling import checkpoints
from sparse_scaling import parallel
from sparse_scaling import training
from tests import utils


@pytest.fixture
def run(one_step_run, tmp_path):
  """A copy of the one-step run's output directory, and the vocabulary cache."""
  shutil.copytree(one_step_run[0], tmp_path / 'run')
  return tmp_path / 'run', one_step_run[1]


def test_a_step_1_checkpoint_resumes_stops_cleanly_on_sigint_and_evaluates(run, capsys,
                                                                          monkeypatch):
  # The step-1 checkpoint is written before the first eval, with the eval model's own state
  # (trax's loader failed on it: IndexError). SIGINT comes in the middle of step 2.
  out, cache = run
  # The trainer the Loop uses here: trax's on a CPU, ours (parallel.py) on one accelerator.
  trainer = optimizers.Trainer if training._trainer_is_trax(False) else parallel.Trainer  # pylint: disable=protected-access
  one_step = trainer.one_step

  def interrupted_step(self, *args, **kwargs):
    monkeypatch.setattr(trainer, 'one_step', one_step)  # once
    signal.raise_signal(signal.SIGINT)  # the handler runs here, during the step
    return one_step(self, *args, **kwargs)

  monkeypatch.setattr(trainer, 'one_step', interrupted_step)
  # What the process had before (Python's default; ignored in a shell's background job).
  before = signal.getsignal(signal.SIGINT)
  loop = utils.train_tiny_lm(out, cache, steps=5)
  assert loop.stopped_by == 'SIGINT' and loop.step == 2
  stdout = capsys.readouterr().out
  assert 'Resumed from the checkpoint of step 1' in stdout
  [line] = [l for l in stdout.splitlines() if l.startswith('Stopped')]
  assert line == (f'Stopped by SIGINT after step 2: checkpoint saved in {out}/checkpoint; run '
                  'the same command to resume')
  assert checkpoints.load_latest(out).step == 2
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored
  utils.train_tiny_lm(out, cache, steps=5, evaluate_only=True)
  assert 'Evaluating the checkpoint of step 2' in capsys.readouterr().out


def test_a_changed_model_fails_naming_the_weights_that_do_not_fit(run):
  out, cache = run
  before = utils.snapshot(out)
  with pytest.raises(checkpoints.CheckpointError) as e:
    utils.train_tiny_lm(out, cache, 'ScalingTransformerLM.d_model=48', steps=2)
  message = str(e.value).splitlines()[0]  # gin adds a line naming `train`; main.py drops it
  assert message == (
      f'{out}/checkpoint/model.weights.npy.gz does not fit the model: 27 weights there, 27 in '
      'the model, 24 of different shape; first #0 Embedding_4096_48 is (4096, 128) there and '
      '(4096, 48) in the model. Resume with the config it was trained with (config.gin beside '
      'it), or train in a new --output_dir')
  assert utils.snapshot(out) == before


def _fails_after_a_partial_write(error):
  def write(unused_data, path, **unused_kwargs):  # as trax's np_to_file and pickle_to_file
    with open(path, 'wb') as f:
      f.write(b'half a file')
    raise error
  return write


@pytest.mark.parametrize('where, error, reason', [
    ('np_to_file', OSError(errno.ENOSPC, 'No space left on device'), 'No space left on device'),
    ('pickle_to_file', tf.errors.PermissionDeniedError(None, None, 'Permission denied'),
     'Permission denied'),
])
def test_a_failed_checkpoint_write_stops_and_keeps_the_last_good_one(one_step_run, monkeypatch,
                                                                     where, error, reason):
  out, _, loop = one_step_run
  before = utils.snapshot(out)
  monkeypatch.setattr(tl if where == 'np_to_file' else trax_training, where,
                      _fails_after_a_partial_write(error))
  with pytest.raises(checkpoints.CheckpointWriteError) as e:
    loop.save_checkpoint('model')
  assert isinstance(e.value, OSError)  # main.py: one line, exit 1
  assert str(e.value) == (
      f'could not write the checkpoint of step 1 in {out} ({reason}); the last good checkpoint '
      f'is kept in {out}/checkpoint. Free disk space or make the directory writable, then run '
      'the same command to resume')
  assert utils.snapshot(out) == before  # nothing half-written is left
  assert checkpoints.load_latest(out).step == 1


def test_a_second_run_on_an_output_dir_is_refused_until_the_first_dies(run):
  out, cache = run
  holder = subprocess.Popen(  # a first run: holds the lock as training.train does, then dies
      [sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); '
       'fcntl.flock(f, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(600)',
       str(out / checkpoints.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    before = utils.snapshot(out)
    with pytest.raises(checkpoints.OutputDirInUseError, match='another process is training'):
      utils.train_tiny_lm(out, cache, steps=2)
    assert utils.snapshot(out) == before
  finally:
    holder.kill()  # SIGKILL: no chance to clean up
    holder.wait()
  lock = checkpoints.lock_output_dir(out)  # the OS released it
  assert checkpoints.lock_output_dir(out) is lock  # shared within a process
  del lock


def test_an_output_dir_that_cannot_be_locked_warns_in_one_line(tmp_path, monkeypatch, caplog):
  def no_locks(unused_file, unused_operation):  # as flock on a filesystem without locks
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(checkpoints.fcntl, 'flock', no_locks)
  with caplog.at_level(logging.WARNING):
    checkpoints.lock_output_dir(tmp_path / 'run')  # no OutputDirInUseError
  [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning == (f'cannot lock {tmp_path}/run/train.lock (No locks available): nothing '
                     f'stops a second run on output_dir={tmp_path}/run; keep one run per '
                     'directory yourself')
