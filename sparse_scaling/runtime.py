"""Where the code runs: tested versions, the accelerator JAX sees, and quiet imports.

- `check_versions()` runs first in `compat.apply()` (the package's setup, which importing it
  calls), before trax or JAX is imported: a Python or JAX outside the tested range gets one
  clear line instead of a traceback inside trax.
- `describe()` is the line `main.py` prints at start (backend, devices, jax and trax
  versions); `check_accelerator()` stops a run that would silently train on the CPU while
  an NVIDIA GPU or a TPU is attached (JAX without its CUDA or TPU plugin).
- `keep_tensorflow_off_gpus()` leaves the GPUs to JAX.
- `quiet_imports()` drops the notices that TensorFlow's C++ code and gym print while they
  are imported (see `NOISE`); any other output of those imports is passed on.
  `ignore_trax_syntax_warnings()` hides the SyntaxWarnings of trax's sources. These are
  filters because no dependency avoids them: trax 1.4.1 needs tensorflow-text, which needs
  the `tensorflow` distribution itself (not tensorflow-cpu), and trax imports gym.
- `stack_without_source()` makes importing trax much faster (`main.py --help`: 27 s to 8 s on a
  2-core CPU): see its docstring.
"""

import contextlib
import glob
import importlib.metadata
import inspect
import io
import os
import re
import sys
import tempfile
import warnings

PYTHON_RANGE = ((3, 11), (3, 12))            # tested minor versions, inclusive
JAX_RANGE = ((0, 10, 2), (0, 12, 0))         # tested jax releases, inclusive
_JAX_PIN = "'jax>=0.10.2,<0.13'"

# Lines that importing the pinned stack prints and that say nothing about the run: they come
# from TensorFlow's C++ libraries as they load and probe for CUDA (TF_CPP_MIN_LOG_LEVEL is
# read too late for them); gym's banner is dropped separately. Whether JAX sees an attached
# accelerator is checked by `check_accelerator` instead.
NOISE = (
    re.compile(r'WARNING: All log messages before absl::InitializeLog\(\) is called'),
    re.compile(r'^[IW]\d{4} .*\] oneDNN custom operations are on'),
    re.compile(r'^[IW]\d{4} .*cudart_stub\.cc.*Could not find cuda drivers'),
    re.compile(r'^E\d{4} .*cuda_platform\.cc.*failed call to cuInit'),
    re.compile(r'^[IW]\d{4} .*cpu_feature_guard\.cc.*This TensorFlow binary is optimized'),
    re.compile(r'^To enable the following instructions: .*rebuild TensorFlow'),
)


def _release(version):
  """'0.10.2.dev1' -> (0, 10, 2)."""
  return tuple(int(part) for part in re.findall(r'\d+', version)[:3])


def tested_jax(version):
  """Whether jax `version` is in the tested range (any patch of the newest tested minor)."""
  low, high = JAX_RANGE
  return low <= _release(version) and _release(version)[:2] <= high[:2]


def check_versions(python=None, jax_version=None):
  """Raises ImportError when Python or JAX is older than tested; warns when newer.

  Args:
    python: (major, minor) to check; None: the running interpreter.
    jax_version: The installed jax's version string; None: read from its metadata (jax is
      not imported).

  Raises:
    ImportError: one line naming the version found and the range tested.
  """
  python = tuple(python or sys.version_info[:2])
  low, high = PYTHON_RANGE
  if python < low:
    raise ImportError(f'sparse_scaling needs Python >= {low[0]}.{low[1]} (tested '
                      f'{low[0]}.{low[1]} to {high[0]}.{high[1]}); this is '
                      f'{python[0]}.{python[1]}')
  if python > high:
    warnings.warn(f'sparse_scaling is tested on Python {low[0]}.{low[1]} to '
                  f'{high[0]}.{high[1]}; this is {python[0]}.{python[1]}', stacklevel=2)
  if jax_version is None:
    try:
      jax_version = importlib.metadata.version('jax')
    except importlib.metadata.PackageNotFoundError:
      raise ImportError(f'sparse_scaling needs jax: pip install {_JAX_PIN}') from None
  low, high = JAX_RANGE
  found = _release(jax_version)
  tested = f'{".".join(map(str, low))} to {".".join(map(str, high))}'
  if found < low:
    raise ImportError(f'sparse_scaling needs jax >= {".".join(map(str, low))} (tested '
                      f'{tested}); found jax {jax_version}: pip install {_JAX_PIN}')
  if found[:2] > high[:2]:
    warnings.warn(f'sparse_scaling is tested on jax {tested}; found jax {jax_version}',
                  stacklevel=2)


def accelerator_hardware():
  """The accelerator the operating system shows, whatever JAX sees.

  Returns:
    ('gpu', device file) for an NVIDIA GPU (/dev/nvidia0, ...), ('tpu', device file) for a
    TPU (/dev/accel* on TPU VMs up to v4, /dev/vfio/<n> on v5e and later), else None.
    nvidia-smi alone proves nothing: CPU images ship it too.
  """
  for kind, pattern in (('gpu', '/dev/nvidia[0-9]*'), ('tpu', '/dev/accel[0-9]*'),
                        ('tpu', '/dev/vfio/[0-9]*')):
    found = sorted(glob.glob(pattern))
    if found:
      return kind, found[0]
  return None


def describe():
  """One line: JAX's backend, its devices, and the jax and trax versions."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return (f'running on {jax.default_backend()}: {len(devices)} x {devices[0].device_kind} '
          f'({jax.process_count()} process), jax {jax.__version__}, '
          f'trax {importlib.metadata.version("trax")}')


def check_accelerator(allow_cpu=False):
  """Raises RuntimeError if a GPU or TPU is attached but JAX runs on the CPU.

  Args:
    allow_cpu: Run on the CPU anyway. `JAX_PLATFORMS=cpu` in the environment counts as
      this choice too.

  Raises:
    RuntimeError: one line saying what is attached and how to make JAX use it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  hardware = accelerator_hardware()
  if (allow_cpu or hardware is None or jax.default_backend() != 'cpu'
      or os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu'):
    return
  kind, device = hardware
  plugin = {'gpu': "pip install 'sparse_scaling[gpu]' (jax[cuda12])",
            'tpu': "pip install 'sparse_scaling[tpu]' (jax[tpu])"}[kind]
  raise RuntimeError(f'a {kind.upper()} is attached ({device}) but JAX {jax.__version__} '
                     f'sees only the CPU: {plugin}, or pass --allow_cpu to train on the CPU')


def keep_tensorflow_off_gpus():
  """Hides the GPUs from TensorFlow, which only reads data here (trax imports it).

  The `tensorflow` wheel finds the CUDA libraries that JAX's CUDA plugin installs; its first
  op would then take most of the GPU's memory from JAX. A no-op once TensorFlow has set up
  its devices (whoever did that chose).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with contextlib.suppress(RuntimeError):  # devices already initialized
    tf.config.set_visible_devices([], 'GPU')


def _is_noise(line):
  return any(pattern.search(line) for pattern in NOISE)


@contextlib.contextmanager
def quiet_imports():
  """Drops the `NOISE` lines and gym's banner printed inside the block; passes on the rest.

  Both what C++ libraries write to file descriptor 2 and what Python writes to `sys.stderr`
  are held until the block ends, then written to stderr without the noise.
  """
  banner = ''
  with contextlib.suppress(Exception):  # gym's notice for its own version, if any
    from gym_notices import notices  # pylint: disable=g-import-not-at-top
    banner = notices.notices.get(importlib.metadata.version('gym'), '')
  python_err = io.StringIO()
  with tempfile.TemporaryFile(mode='w+b') as native_err:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(native_err.fileno(), 2)
    try:
      with contextlib.redirect_stderr(python_err):
        yield
    finally:  # also when the import fails: its messages are passed on
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      native_err.seek(0)
      text = native_err.read().decode('utf-8', 'replace') + python_err.getvalue()
      if banner:
        text = text.replace(banner, '')
      kept = [line for line in text.splitlines(keepends=True)
              if line.strip() and not _is_noise(line)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


def ignore_trax_syntax_warnings():
  """Ignores the SyntaxWarnings of trax's own sources (`is` with a tuple literal in
  supervised/training.py and layers/combinators.py), printed whenever Python compiles them
  without a cached .pyc; SyntaxWarnings of any other code still show."""
  warnings.filterwarnings('ignore', category=SyntaxWarning, module=r'.*[\\/]trax[\\/]')


@contextlib.contextmanager
def stack_without_source():
  """Inside the block, `inspect.stack()` lists the frames without looking up their source.

  trax's `assert_shape` decorator (trax/layers/assert_shape.py, l.98) calls `inspect.stack()`
  for the file and line of each of its 65 uses, as trax's modules are imported. That call
  looks up the source of every frame on the stack, and for the import machinery's frames
  (`<frozen importlib._bootstrap>`, no file) `inspect.getmodule` scans all of `sys.modules`,
  some 4,000 modules once TensorFlow is in: three quarters of the time it takes to import
  trax. trax reads only the frame (`inspect.stack()[1][0]`), so the frames here carry their
  file, line and function but no source lines (`code_context` and `index` None). The real
  `inspect.stack` is back when the block ends.
  """
  def stack(context=1):
    del context  # no source lines are read
    frames, frame = [], sys._getframe(1)  # pylint: disable=protected-access
    while frame is not None:
      code = frame.f_code
      frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                      None, None))
      frame = frame.f_back
    return frames

  real = inspect.stack
  inspect.stack = stack
  try:
    yield
  finally:
    inspect.stack = real
