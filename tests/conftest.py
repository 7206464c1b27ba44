"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A vocabulary cache directory of the module's own (nothing is written to ~/.cache)."""
  return tmp_path_factory.mktemp('vocab_cache')
