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
