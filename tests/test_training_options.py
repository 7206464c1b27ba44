"""training.train's options for runs that observe or skip: eval_frequency=None, on_step.

One device, in this process; a tiny 1-layer LM on the embedded corpus.
"""

import numpy as np
import pytest

from sparse_scaling import checkpoints
from sparse_scaling import configs
from sparse_scaling import training
from tests import utils

# The tiny LM of the other in-process runs (conftest's `one_step_run`, test_training.py,
# test_checkpoints.py), whose training step the run's compilation cache then holds already.
BINDINGS = utils.TINY_LM + ['train.eval_frequency=None']


def _parse(cache_dir):
  configs.parse(['tiny/lm.gin'], BINDINGS + [f'embedded_lm_inputs.cache_dir={str(cache_dir)!r}'])


def test_no_evaluation_and_a_checkpoint_at_the_last_step_when_eval_frequency_is_none(
    tmp_path, cache_dir):
  _parse(cache_dir)
  seen = []
  loop = training.train(tmp_path, steps=2,
                        on_step=lambda loop, loss, seconds: seen.append((loop.step, loss, seconds)))
  assert not loop.history.get('eval', 'metrics/log_perplexity')
  assert not (tmp_path / 'eval').exists()
  assert checkpoints.load_latest(tmp_path).step == 2
  # on_step saw every step, its loss (a float) and how long it took.
  assert [step for step, _, _ in seen] == [1, 2]
  assert all(isinstance(loss, float) and np.isfinite(loss) for _, loss, _ in seen)
  assert all(seconds > 0 for _, _, seconds in seen)


class _Stop(Exception):
  pass


def test_on_step_that_raises_stops_training_and_output_dir_none_writes_nothing(
    tmp_path, cache_dir, monkeypatch):
  _parse(cache_dir)
  monkeypatch.chdir(tmp_path)
  steps = []

  def stop_at_1(loop, loss, seconds):
    steps.append(loop.step)
    raise _Stop

  with pytest.raises(_Stop):
    training.train(None, steps=10, on_step=stop_at_1)
  assert steps == [1]
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('value', [0, -5])
def test_eval_frequency_must_be_positive_or_none(tmp_path, value):
  with pytest.raises(ValueError, match=f'eval_frequency={value}: give a positive number'):
    training.train(tmp_path, model=None, inputs=None, eval_frequency=value)


@pytest.mark.parametrize('option, value, rule', [
    ('steps', -5, 'give a number of steps >= 0'),
    ('eval_steps', 0, 'give a positive number of batches'),
    ('checkpoint_frequency', 0, 'give a positive number of steps, or None')])
def test_step_counts_out_of_range_stop_before_anything_is_written(tmp_path, option, value, rule):
  with pytest.raises(ValueError, match=f'train.{option}={value}: {rule}'):
    training.train(tmp_path, model=None, inputs=None, **{option: value})
  assert not list(tmp_path.iterdir())
