"""Fixtures and settings shared by the test modules."""

import importlib.util
import os
import pathlib
import shutil
import tempfile

import gin
import jax
import pytest

# Before any backend starts. With SPARSE_SCALING_TEST_GPUS=0,1 (a list of GPU indices) the
# pytest-xdist workers take those GPUs in turn (worker gwN the N-th modulo their number), so
# that `-n 16` spreads the suite over a machine's GPUs instead of sharing the first.
_GPUS = os.environ.get('SPARSE_SCALING_TEST_GPUS', '').split(',')
if _GPUS != [''] and os.environ.get('PYTEST_XDIST_WORKER', '').startswith('gw'):
  os.environ['CUDA_VISIBLE_DEVICES'] = _GPUS[
      int(os.environ['PYTEST_XDIST_WORKER'][2:]) % len(_GPUS)]

# On GPUs, each process takes the card's memory as it needs it, not 75% up front: workers can
# share a GPU, and tests start child processes beside a process that holds most of it (the
# cuBLAS check's child stopped with CUDA_ERROR_OUT_OF_MEMORY so: docs/testing.md). Every
# child inherits the setting. No effect on the CPU.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# On GPUs, scatter-adds (embedding gradients) otherwise sum in a
# varying order, and tests compare two training runs to 1e-6. No effect on the CPU.
if '--xla_gpu_deterministic_ops' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_gpu_deterministic_ops=true').strip()

# Where JAX has only the CPU (no accelerator plugin, or JAX_PLATFORMS=cpu), the suite and the
# programs it starts compile at XLA's backend optimization level 0 (XLA's default: 3). LLVM's
# optimizations are much of the time XLA takes to compile a program, which is most of the
# suite's time, and its tiny programs gain little from them: on a 2-core Xeon
# test_scaling_transformer.py, test_sparse_qkv.py and test_sparse_ff.py took 224 s of CPU time
# at level 0 against 300 at level 2. Every test passes at either level except one, whose bound
# rests on XLA's optimizations (bfloat16 decoding: the optimized programs skip some of
# bfloat16's roundings); it compiles its programs at XLA's default (tests/test_decoding.py).
_ONLY_CPU = (os.environ.get('JAX_PLATFORMS') == 'cpu' or
             not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu')))
if _ONLY_CPU and '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'

# Compiling takes most of the suite's time on a CPU (tiny models, many programs), and the
# workers and the programs that tests start (main.py, the notebook's kernel, the distributed
# processes) compile many of the same programs: they share one persistent compilation cache,
# JAX's own, made by the first process of the run (pytest itself, before its workers start:
# they and every child inherit the environment) and removed when the run ends. Its entries are
# keyed by the program, the jax version and the flags, and hold the same executable a fresh
# compilation gives. A cache directory already set in the environment is used and kept.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='sparse_scaling_jax_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # every program
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

# The embedded corpus's SentencePiece vocabularies likewise: one cache directory for the run
# (`SPARSE_SCALING_CACHE`, the `cache_dir` fixture), so that each vocabulary is trained once
# (~3 s) and each process tokenizes the corpus once per vocabulary (~4 s), where a directory
# per test repeated both; removed when the run ends, unless it was set in the environment.
# Tests of the cache itself give their own directories.
_OWN_VOCAB_CACHE = 'SPARSE_SCALING_CACHE' not in os.environ
if _OWN_VOCAB_CACHE:
  os.environ['SPARSE_SCALING_CACHE'] = tempfile.mkdtemp(prefix='sparse_scaling_vocab_cache_')

from sparse_scaling import compat  # pylint: disable=g-import-not-at-top,g-bad-import-order

compat.apply()  # the package's setup, as every program makes it (idempotent)


# Modules with a test or fixture of one to two minutes on 2 CPU cores, started first: the
# workers then end on short tests, instead of one worker running a long one alone at the end.
LONG_FIRST = ('test_distributed.py', 'test_compat.py', 'test_notebook.py', 'test_rfc.py')


def pytest_collection_modifyitems(items):
  """Runs LONG_FIRST's modules first, each in its collected order."""
  items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: the rest in order


def pytest_unconfigure(config):
  """The run's caches are removed by the process that made them."""
  if hasattr(config, 'workerinput'):
    return
  for own, name in ((_OWN_CACHE, 'JAX_COMPILATION_CACHE_DIR'),
                    (_OWN_VOCAB_CACHE, 'SPARSE_SCALING_CACHE')):
    if own:
      shutil.rmtree(os.environ[name], ignore_errors=True)


def pytest_configure(config):  # pylint: disable=unused-argument
  """Float32 matmuls and convolutions at full precision on accelerators.

  The tests compare implementations of the same math (ours and trax's, predict and eval mode,
  one and two devices) to 1e-5. On GPUs of the Ampere generation and later JAX's default
  precision runs float32 matmuls as TF32 (10-bit mantissa, ~1e-3 relative), and on TPUs as
  bfloat16 passes: the differences the tests look for would drown in rounding. 'highest' is
  what the CPU computes anyway, so the CPU run is unchanged. Children (main.py runs) inherit
  it through the environment.
  """
  if jax.default_backend() != 'cpu':
    os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
    jax.config.update('jax_default_matmul_precision',
                      os.environ['JAX_DEFAULT_MATMUL_PRECISION'])


@pytest.fixture(scope='session')
def cache_dir():
  """The run's vocabulary cache directory (above; nothing is written to ~/.cache)."""
  return pathlib.Path(os.environ['SPARSE_SCALING_CACHE'])


@pytest.fixture(autouse=True)
def _clean_gin_config():
  """Every test starts and ends with no gin bindings: a config one test parses (a reproduction
  run, a gin file's twin) must not reshape another test's layers."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope='session')
def one_step_run(tmp_path_factory, cache_dir):
  """main.py's tiny LM (tests/utils.py's TINY_LM) trained for one step in this process.

  Returns:
    (output directory, the vocabulary cache, the `training.Loop`). Tests copy the directory
    before they change anything in it.
  """
  from tests import utils  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('one_step_run')
  loop = utils.train_tiny_lm(root / 'run', cache_dir, steps=1)
  gin.clear_config()
  return root / 'run', cache_dir, loop
