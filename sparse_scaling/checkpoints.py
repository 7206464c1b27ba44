"""Checkpoints on disk: trax's format, swapped in whole, read without running code from the file.

A checkpoint is what `trax.supervised.training.Loop.save_checkpoint` writes, in a directory of
its own under the run's `output_dir`:

  checkpoint/model.pkl.gz            pickle: step, history, model state, input signature
  checkpoint/model.weights.npy.gz    the weights, flat in layer order (`np.save`, no pickle)
  checkpoint/model.opt_slots0.npy.gz the optimizer slots of training task 0 (`np.save`)
  checkpoint/data_counters0.pkl      pickle: batches drawn so far, so a resumed run reads on
                                     (process 0's; every process of a run resumes from it)

Writing (`swapped_in`): a checkpoint is written into `checkpoint.writing/` and swapped in by two
renames (`checkpoint/` -> `checkpoint.previous/`, `checkpoint.writing/` -> `checkpoint/`), so a
run that dies at any moment leaves a complete checkpoint behind. A write that fails (a full
disk, no permission) removes its half-written directory and raises `CheckpointWriteError`; the
last good checkpoint is not touched.

Reading (`load_latest`, `read_weights`): every file is read whole and checked: a truncated or
garbled file raises `CheckpointError` naming it, and `checkpoint.previous/`, where a crash in
the swap left one, is used instead with a one-line warning. A pickle can run any code while it
loads, so the two pickles go through `unpickle`, which admits only the types a trax checkpoint
holds (`_ADMITTED`) and refuses any other by name; the arrays are read by `np.load` with
`allow_pickle=False`. `check_fits` says which weights of a checkpoint do not fit a model.

Locking (`lock_output_dir`): a training run holds `fcntl.flock` on `output_dir/train.lock`, so a
second run on the same directory stops at once. The OS releases the lock when the process ends,
however it ends, so a crashed run never leaves it stuck. In a run of several processes only
process 0, which writes for all of them, takes it (`training.train`).
"""

import collections
import contextlib
import errno
import fcntl
import gzip
import os
import pickle
import shutil
import weakref
from typing import NamedTuple

from absl import logging
from jax._src import array as jax_array
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from numpy._core import multiarray as numpy_multiarray
from numpy._core import numeric as numpy_numeric
import tensorflow as tf
from trax import shapes
from trax.layers import base

CHECKPOINT_DIR = 'checkpoint'        # output_dir/checkpoint/model.pkl.gz, ...
PREVIOUS = CHECKPOINT_DIR + '.previous'
WRITING = CHECKPOINT_DIR + '.writing'
BASENAME = 'model'                   # the basename trax's Loop gives its main checkpoint
LOCK_FILE = 'train.lock'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: damaged, holding a type not admitted, or not fitting."""


class CheckpointWriteError(OSError):
  """A checkpoint that could not be written; the last good one is kept."""


class OutputDirInUseError(OSError):
  """Another process is training in the same output directory."""


def _jax_array(fun, args, array_state, aval_state):
  """`jax.Array`'s unpickling (`jax._src.array._reconstruct_array`), for numpy arrays only."""
  if fun is not numpy_multiarray._reconstruct or set(aval_state) - {'weak_type'}:  # pylint: disable=protected-access
    raise pickle.UnpicklingError('a jax array that is not a plain numpy array')
  return jax_array._reconstruct_array(fun, args, array_state, aval_state)  # pylint: disable=protected-access


def _frombuffer(buffer, dtype, shape, order):
  """numpy's unpickling of an array under pickle protocol 5 (`numpy._core.numeric._frombuffer`).

  trax pickles with the highest protocol, under which numpy writes a numpy array (not a jax
  one) as its raw bytes: the model state that `parallel.Trainer` copies to the host is one.
  """
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError(f'an array of dtype {dtype!r} from a buffer')
  return numpy_numeric._frombuffer(buffer, dtype, shape, order)  # pylint: disable=protected-access


def _defaultdict(factory):
  """`collections.defaultdict(list)`, the containers of trax's `History`, and no other."""
  if factory is not list:
    raise pickle.UnpicklingError(f'a defaultdict of {factory!r}')
  return collections.defaultdict(list)


# What a trax checkpoint's pickles hold besides str, int, float, bool, None, tuple, list and dict
# (which pickle builds without looking a name up): numpy arrays (pickle protocols 4 and 5),
# dtypes (bfloat16 too) and scalars, jax arrays
# (model state), trax's ShapeDtype (the input signature), and History's defaultdict(list).
# numpy 1.x wrote `numpy.core`, numpy 2 `numpy._core`.
_ADMITTED = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy._core.multiarray', '_reconstruct'): numpy_multiarray._reconstruct,  # pylint: disable=protected-access
    ('numpy._core.multiarray', 'scalar'): numpy_multiarray.scalar,
    ('numpy.core.multiarray', '_reconstruct'): numpy_multiarray._reconstruct,  # pylint: disable=protected-access
    ('numpy.core.multiarray', 'scalar'): numpy_multiarray.scalar,
    ('numpy._core.numeric', '_frombuffer'): _frombuffer,
    ('numpy.core.numeric', '_frombuffer'): _frombuffer,
    ('ml_dtypes', 'bfloat16'): ml_dtypes.bfloat16,  # the type of a bfloat16 array's dtype
    ('jax._src.array', '_reconstruct_array'): _jax_array,
    ('trax.shapes', 'ShapeDtype'): shapes.ShapeDtype,
    ('collections', 'defaultdict'): _defaultdict,
    ('builtins', 'list'): list,
}


class _Unpickler(pickle.Unpickler):
  """Looks up only the names of `_ADMITTED`; any other raises `CheckpointError`."""

  def __init__(self, file, path):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) not in _ADMITTED:
      raise CheckpointError(
          f'{self._path} holds a {module}.{name}, which a trax checkpoint never does; it was '
          'not loaded, since loading it could run code from the file (load checkpoints from '
          'people you trust only: docs/troubleshooting.md)')
    return _ADMITTED[(module, name)]


def unpickle(path):
  """The object pickled in `path` (gunzipped if it ends in `.gz`), through `_Unpickler`.

  Raises:
    CheckpointError: the file is damaged, or holds a type a trax checkpoint does not.
  """
  return _read(path, lambda f: _Unpickler(f, path).load())


def read_arrays(path):
  """The arrays that `trax.layers.np_to_file` wrote to `path`, all of them or an error.

  trax's own reader (`np_from_file`) stops quietly at the first error, so a truncated file
  gives a shorter list; this one raises.

  Raises:
    CheckpointError: the file is damaged, or holds a pickled (object) array.
  """
  def arrays(f):
    out = []
    while f.peek(1):  # b'' only at the end of a complete gzip stream; a truncated one raises
      out.append(np.load(f, allow_pickle=False))
    return out
  return _read(path, arrays)


def _read(path, read_fn):
  try:
    with tf.io.gfile.GFile(path, 'rb') as raw:
      if not path.endswith('.gz'):
        return read_fn(raw)
      with gzip.GzipFile(fileobj=raw) as f:
        return read_fn(f)
  except CheckpointError:
    raise
  except tf.errors.NotFoundError:
    raise CheckpointError(f'{path} is missing: {_WHAT_TO_DO}') from None
  except Exception as e:  # pylint: disable=broad-except  (a damaged file raises anything)
    raise CheckpointError(f'{path} is damaged ({type(e).__name__}: {_one_line(e)}): '
                          f'{_WHAT_TO_DO}') from None


_WHAT_TO_DO = ('restore the checkpoint directory from a copy, or move it away to train from '
               'step 0')


def _one_line(error):
  return ' '.join(str(getattr(error, 'message', None) or error).split())[:200]


class Checkpoint(NamedTuple):
  """A checkpoint read whole (`read`)."""
  directory: str
  step: int
  weights: list        # flat, in layer order (bfloat16 as uint16 bits, as trax writes them)
  state: list          # flat model state
  eval_state: list     # flat state of the eval model when it was written
  history: dict        # `trax.supervised.history.History.to_dict()`
  slots: list          # per training task, the flat optimizer slots; [] for weights only
  data_counters: dict  # {stream name: batches drawn}
  input_signature: object  # of the model's inputs (`ShapeDtype`s)


def read(directory, n_tasks=1, basename=BASENAME):
  """Reads and checks every file of the checkpoint in `directory`.

  Args:
    directory: A checkpoint directory (`output_dir/checkpoint`).
    n_tasks: Training tasks whose optimizer slots to read (0: weights only).
    basename: The checkpoint's basename (`model`, or trax's `model_<step>`).

  Raises:
    CheckpointError: a file is missing, damaged or holds a type not admitted.
  """
  prefix = os.path.join(directory, basename)
  pkl = unpickle(prefix + '.pkl.gz')
  # A Loop's checkpoint has a step; `Layer.save_to_file` writes weights (and state) only.
  if (not isinstance(pkl, dict) or 'flat_weights' not in pkl or
      not isinstance(pkl.get('step', 0), int)):
    raise CheckpointError(f'{prefix}.pkl.gz is not a trax checkpoint: {_WHAT_TO_DO}')
  weights = pkl['flat_weights']
  if isinstance(weights, int):  # since 2021 in a file of its own; the int is its compresslevel
    weights = read_arrays(prefix + '.weights.npy.gz')
  slots = []
  if n_tasks and 'slots' in pkl:  # trax's format before multi-task Loops
    slots = [pkl['slots']]
  elif n_tasks and isinstance(pkl.get('slots_per_task'), int):  # the files' compresslevel
    slots = [read_arrays(f'{prefix}.opt_slots{i}.npy.gz') for i in range(n_tasks)]
  elif n_tasks:
    slots = list(pkl.get('slots_per_task') or [])[:n_tasks]
  counters = {}
  if n_tasks:
    # Process 0's: it alone writes a checkpoint, and every process of a run reads the same
    # global batches (`parallel.process_batches`), so its position is theirs.
    path = os.path.join(directory, 'data_counters0.pkl')
    if tf.io.gfile.exists(path):
      counters = unpickle(path)
      if not isinstance(counters, dict):
        raise CheckpointError(f'{path} is damaged (not a dict of counters): {_WHAT_TO_DO}')
  return Checkpoint(directory, pkl.get('step', 0), list(weights),
                    list(pkl.get('flat_state', [])),
                    list(pkl.get('flat_eval_state', pkl.get('flat_state', []))),
                    pkl.get('history', {}), slots, counters, pkl.get('input_signature'))


def latest_checkpoint(output_dir):
  """The directory of the checkpoint that `load_latest` tries first in `output_dir`, or None."""
  for name in (CHECKPOINT_DIR, PREVIOUS):
    path = os.path.join(output_dir, name)
    if tf.io.gfile.exists(os.path.join(path, BASENAME + '.pkl.gz')):
      return path
  return None


def load_latest(output_dir, n_tasks=1):
  """The last complete checkpoint in `output_dir`, read whole (`read`), or None if none.

  `checkpoint/` is read if it exists; if it is damaged and `checkpoint.previous/` (left by a
  crash while swapping) reads, that is used with a one-line warning. A damaged run never
  silently starts from step 0.

  Raises:
    CheckpointError: `checkpoint/` is damaged and there is no good previous one.
  """
  current, previous = (os.path.join(output_dir, name) for name in (CHECKPOINT_DIR, PREVIOUS))
  if not tf.io.gfile.exists(current):
    return read(previous, n_tasks) if tf.io.gfile.exists(previous) else None
  try:
    return read(current, n_tasks)
  except CheckpointError as damaged:
    if not tf.io.gfile.exists(previous):
      raise
    try:
      checkpoint = read(previous, n_tasks)
    except CheckpointError:
      raise damaged from None
    logging.warning('%s; using the previous checkpoint %s (step %d) instead', damaged,
                    previous, checkpoint.step)
    return checkpoint


def weight_names(model, weights=None):
  """A name for each of `model`'s flat weights, in trax's order: '#index LayerName'.

  Args:
    model: A layer.
    weights: Its weights, or their signature (`weights_and_state_signature`); default
      `model.weights`.
  """
  names = []

  def walk(layer, tree):
    if layer.sublayers and isinstance(tree, (tuple, list)) and len(tree) == len(
        layer.sublayers):
      for sublayer, subtree in zip(layer.sublayers, tree):
        walk(sublayer, subtree)
    else:  # a leaf, a layer with weights of its own, or a shared layer's second use (none)
      names.extend([layer.name] * len(_flat(tree)))

  walk(model, model.weights if weights is None else weights)
  return [f'#{i} {name}' for i, name in enumerate(names)]


def _flat(weights):
  return base.flatten_weights_and_state(weights, ())[0]


def weights_signature(model, input_signature):
  """The shapes and dtypes of the weights that `model.init(input_signature)` would make, none
  made. trax's `weights_and_state_signature` then puts the model's old state back, which fails
  on a fresh Terraformer (trax 1.4.1: the state setter of its EncoderAttentionHalfResidual
  wants an entry for each of its sublayers, and a fresh layer's state has none), so the model
  is left as its abstract init left it: for its layer tree, not to run."""
  signature, _ = model.weights_and_state_signature(input_signature, unsafe=True)
  return signature


def check_fits(checkpoint_weights, model, where, weights=None):
  """Raises a one-line `CheckpointError` unless the checkpoint's weights fit `model`'s.

  Args:
    checkpoint_weights: The checkpoint's flat weights.
    model: The model.
    where: The checkpoint file or directory, for the message.
    weights: The model's weights or their signature; default `model.weights`.
  """
  weights = model.weights if weights is None else weights
  ours = [tuple(np.shape(w)) for w in _flat(weights)]
  theirs = [tuple(np.shape(w)) for w in checkpoint_weights]
  if ours == theirs:
    return
  names = weight_names(model, weights)
  differ = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
  first = differ[0] if differ else min(len(ours), len(theirs))
  detail = (f'{names[first]} is {theirs[first]} there and {ours[first]} in the model'
            if first < min(len(ours), len(theirs)) else f'{names[first]} and on are missing'
            if first < len(ours) else 'the model ends first')
  raise CheckpointError(
      f'{where} does not fit the model: {len(theirs)} weights there, {len(ours)} in the model, '
      f'{len(differ)} of different shape; first {detail}. Resume with the config it was '
      'trained with (config.gin beside it), or train in a new --output_dir')


def read_weights(output_dir, model_fn):
  """The flat weights of the last checkpoint in `output_dir`, checked against `model_fn`.

  Args:
    output_dir: A run's output directory.
    model_fn: `mode -> layer`, the model the weights are for.

  Raises:
    FileNotFoundError: no checkpoint.
    CheckpointError: damaged, holds a type not admitted, or does not fit the model.
  """
  checkpoint = load_latest(output_dir, n_tasks=0)
  if checkpoint is None:
    raise FileNotFoundError(f'no checkpoint in {output_dir}: train first')
  model = model_fn(mode='eval')
  signature = weights_signature(model, checkpoint.input_signature)
  check_fits(checkpoint.weights, model, checkpoint.directory, signature)
  return from_bits(checkpoint.weights)


def from_bits(arrays):
  """Arrays as trax wrote them, bfloat16 ones as their uint16 bits (`Loop._to_bits`), restored."""
  return [a.view(jnp.bfloat16) if a.dtype == np.uint16 else a for a in arrays]


def file_reason(error):
  """Why a write failed, in a few words: 'No space left on device', 'Permission denied'."""
  return getattr(error, 'strerror', None) or _one_line(error)


@contextlib.contextmanager
def swapped_in(output_dir, step):
  """Yields an empty directory to write a checkpoint into, then swaps it in as `checkpoint/`.

  Raises:
    CheckpointWriteError: writing or swapping failed; the half-written directory is removed
      and the last good checkpoint is kept.
  """
  writing, current, previous = (os.path.join(output_dir, name)
                                for name in (WRITING, CHECKPOINT_DIR, PREVIOUS))
  try:
    shutil.rmtree(writing, ignore_errors=True)
    os.makedirs(writing)
    yield writing
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(current):
      os.rename(current, previous)  # a crash here leaves `previous`, which loads
    os.rename(writing, current)
    shutil.rmtree(previous, ignore_errors=True)
  except (OSError, tf.errors.OpError) as e:
    shutil.rmtree(writing, ignore_errors=True)
    last = latest_checkpoint(output_dir)
    kept = f'the last good checkpoint is kept in {last}' if last else 'no checkpoint was kept'
    raise CheckpointWriteError(
        f'could not write the checkpoint of step {step} in {output_dir} ({file_reason(e)}); '
        f'{kept}. Free disk space or make the directory writable, then run the same command '
        'to resume') from e


_held_locks = weakref.WeakValueDictionary()  # realpath of the lock file -> _Lock


class _Lock:
  """An open lock file holding `flock`; closing it (when this is collected) releases it."""

  def __init__(self, file):
    self.file = file


def lock_output_dir(output_dir):
  """Takes `output_dir/train.lock` for this process while the returned object lives.

  A second call in the same process for the same directory returns the same lock (one process
  may build several Loops on a directory, one after the other). On a filesystem that cannot
  lock (`flock` fails with anything but EWOULDBLOCK), it logs a one-line warning and returns an
  object that holds no lock: the run goes on, unprotected.

  Raises:
    OutputDirInUseError: another process holds it.
  """
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
  held = _held_locks.get(path)
  if held is not None:
    return held
  file = open(path, 'a')  # pylint: disable=consider-using-with  (kept open: it is the lock)
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    file.close()
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      logging.warning('cannot lock %s (%s): nothing stops a second run on output_dir=%s; '
                      'keep one run per directory yourself', path, file_reason(e), output_dir)
      return _Lock(None)
    raise OutputDirInUseError(
        f'output_dir={output_dir} is in use: another process is training there (it holds '
        f'{path}); wait for it to end, or use another --output_dir') from None
  held = _held_locks[path] = _Lock(file)
  return held
