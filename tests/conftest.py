"""Fixtures shared by the test modules."""

import gin
import pytest


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A vocabulary cache directory of the module's own (nothing is written to ~/.cache)."""
  return tmp_path_factory.mktemp('vocab_cache')


@pytest.fixture(autouse=True)
def _clean_gin_config():
  """Every test starts and ends with no gin bindings: a config one test parses (a reproduction
  run, a gin file's twin) must not reshape another test's layers."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope='session')
def one_step_run(tmp_path_factory):
  """main.py's tiny LM (tests/utils.py's TINY_LM) trained for one step in this process.

  Returns:
    (output directory, the vocabulary cache, the `training.Loop`). Tests copy the directory
    before they change anything in it.
  """
  from tests import utils  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('one_step_run')
  loop = utils.train_tiny_lm(root / 'run', root / 'cache', steps=1)
  gin.clear_config()
  return root / 'run', root / 'cache', loop
