"""`python -m sparse_scaling` (or the `sparse_scaling` command): the repository's main.py.

An installed package carries main.py as `sparse_scaling/_cli/main.py` (pyproject.toml); in a
checkout it is the file at the root of the repository.
"""

import importlib
import importlib.util
import pathlib
import sys

from absl import app


def _main_module():
  """main.py as a module: the installed copy, else the checkout's, loaded once per process
  (main.py defines its absl flags when loaded, and absl refuses a flag defined twice)."""
  try:
    return importlib.import_module('sparse_scaling._cli.main')
  except ModuleNotFoundError:
    pass
  if 'sparse_scaling_main' in sys.modules:
    return sys.modules['sparse_scaling_main']
  path = pathlib.Path(__file__).resolve().parents[1] / 'main.py'
  spec = importlib.util.spec_from_file_location('sparse_scaling_main', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def run():
  app.run(_main_module().main)


if __name__ == '__main__':
  run()
