"""Gin files: where they live and how the command line reads them.

`gin_configs/` mirrors the paper's tables: `models/` bind a model from UPPERCASE macros,
`paper/` are one file per table row (an include and a few macros), `tiny/` are CPU-sized twins.
A `--gin_file` is a path, or a path relative to `gin_configs/` (`paper/c4_800m_ff.gin`);
includes inside gin files are relative to `gin_configs/`. In a checkout `gin_configs/` is the
directory beside the package; an installed package carries it as `sparse_scaling/gin_configs`
(pyproject.toml). Importing this module changes nothing in gin: `parse` sets up how gin finds
the files (`_setup_gin`), once.
"""

import functools
import importlib.util
import os
import pathlib

import gin
from gin import resource_reader

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
GIN_DIR = next((d for d in (_PACKAGE_DIR / 'gin_configs', _PACKAGE_DIR.parent / 'gin_configs')
                if d.is_dir()), _PACKAGE_DIR.parent / 'gin_configs')


def _package_file_exists(path):
  """gin's check for an include inside a Python package, asked only of real packages.

  gin (0.5.0, `resource_reader.system_path_file_exists`) reads the include
  `runs/c4_span_corruption.gin` as package `runs`, file `c4_span_corruption.gin`: for a head
  that is no package it logs a false "Path not found" error before gin tries `gin_configs/`,
  and a directory `runs/` in the working directory (the README's main job writes one), a
  namespace package without a file, made it raise TypeError.
  """
  head = os.path.dirname(path).replace('/', '.')
  try:
    spec = importlib.util.find_spec(head) if head else None
  except (ImportError, ValueError):
    spec = None
  if spec is None or spec.origin is None:
    return False
  return resource_reader.system_path_file_exists(path)


@functools.cache
def _setup_gin():
  """Makes gin find includes under gin_configs/, with no false error on the way; once.

  gin tries every reader at the prefix '' (the working directory) before the search paths,
  and its public API only adds readers (`gin.config.register_file_reader`) and paths
  (`gin.add_config_file_search_path`) behind its own: gin 0.5.0 has no public way to keep its
  package reader from being asked about `runs/...` first. So its check alone is replaced, in
  gin's list of readers, by `_package_file_exists`.
  """
  gin.add_config_file_search_path(str(GIN_DIR))
  gin.config._FILE_READERS[:] = [  # pylint: disable=protected-access
      (reader, _package_file_exists if exists is resource_reader.system_path_file_exists
       else exists) for reader, exists in gin.config._FILE_READERS]  # pylint: disable=protected-access


def parse(gin_files, gin_params=()):
  """Parses gin files and bindings (later ones win).

  Raises:
    FileNotFoundError: a gin file is neither a path nor under gin_configs/.
  """
  paths = []
  for name in gin_files:
    path = name if os.path.isfile(name) else GIN_DIR / name
    if not os.path.isfile(path):
      raise FileNotFoundError(f'--gin_file: no such file: {name} (nor {GIN_DIR / name})')
    paths.append(str(path))
  _setup_gin()
  # Not finalized (locked): tests and benchmarks parse several configs in one process.
  gin.parse_config_files_and_bindings(paths, list(gin_params), finalize_config=False)


def configured_model():
  """The `train.model` of the parsed config, as a `mode -> layer` function."""
  return gin.query_parameter('train.model').scoped_configurable_fn


def configured_vocab():
  """The `sample.vocab` of the parsed config (evaluated: trains or loads the vocabulary)."""
  if not has_binding('sample.vocab'):
    raise ValueError('the config binds no vocabulary (sample.vocab)')
  return gin.query_parameter('sample.vocab').scoped_configurable_fn()


def has_binding(name):
  """Whether the parsed config binds `name` (e.g. 'sample.vocab')."""
  try:
    gin.query_parameter(name)
  except ValueError:
    return False
  return True
