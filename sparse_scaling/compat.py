"""The one setup call: `apply()` readies trax 1.4.1 for jax 0.10 (the pinned stack) and 0.11.

`apply()` is idempotent (a no-op after its first call) and is the only thing importing
`sparse_scaling` does; `main.py`, the benchmarks, the reproductions, the notebook and the tests
call it themselves too, so that none of them depends on what an import did. In order it:

- sets `TF_CPP_MIN_LOG_LEVEL=3` unless set (TensorFlow only reads data here; trax imports it);
- checks the Python and JAX versions against the tested range before trax or JAX is imported
  (`runtime.check_versions`: one clear line instead of a traceback inside trax);
- imports trax with TensorFlow's and gym's import notices dropped and the SyntaxWarnings of
  trax's sources hidden (`runtime.quiet_imports`, `runtime.ignore_trax_syntax_warnings`),
  without its slowest part (`runtime.stack_without_source`), and keeps TensorFlow off the
  GPUs (`runtime.keep_tensorflow_off_gpus`);
- installs the shims below into trax and jax.

Tested on jax 0.10.2 (Python 3.11, the lock), 0.11.2 and 0.12.0.1 (Python 3.12): every break
below is the same on all three, so no shim branches on the version. `sparse_scaling.runtime`
refuses older jax. This module imports jax and trax only inside functions, after the version
check. Each shim is the narrowest patch we found for one break:

- `_for_n_devices` replaces `trax.layers.acceleration.for_n_devices` (also exported as
  `tl.for_n_devices`). trax calls `jax.device_put_replicated` there (acceleration.py, l.241)
  to replicate weights, state, optimizer slots and parameters onto the devices of a
  multi-device `training.Loop`; it was deprecated in jax 0.8.1 and removed in jax 0.10.0.
- `_pmap` replaces the `'pmap'` entry of trax's jax backend
  (`trax.fastmath.jax.JAX_BACKEND`), which every `fastmath.pmap` call of trax goes through:
  the training step (optimizers/trainer.py, `_accelerate_update_fn`) and the eval /
  `tl.Accelerate` forward pass (layers/acceleration.py, `_accelerate`). Since jax 0.8,
  `jax.pmap` is `jax.jit` with a `NamedSharding` over a one-axis mesh (jax 0.10 removed the
  old pmap and its opt-out flag `jax_pmap_shmap_merge`), and it refuses arguments committed
  to another placement ("Sharding passed to jit does not match the sharding on the
  respective arg"). The old pmap moved them, and trax relies on that: its trainer puts
  optimizer slots and parameters on one device (`tl.on_cpu`, optimizers/trainer.py l.58 and
  l.110).
- `_accelerate_update_fn` replaces `trax.optimizers.trainer._accelerate_update_fn`, whose
  single-device step is a plain `jit` (trainer.py l.212-227). Its optimizer slots and
  parameters are committed to the CPU (`tl.on_cpu`, trainer.py l.58), and jit runs where its
  committed arguments are, so on one GPU every training step ran on the CPU (4.7 s a step for
  a 23M-weight model on an H200 host). The shim moves the arguments to the first local device
  first, as `_pmap` does for several devices.
- `_tree_unflatten` replaces `trax.fastmath.tree_unflatten` (trax/fastmath/numpy.py, l.239),
  which tests `tree in copy_from_tree` on every node. `Loop.load_checkpoint`
  (supervised/training.py, l.944) restores optimizer slots with `copy_from_tree=[None, ()]`,
  so an array leaf is compared with `()`: jax 0.10 raises TypeError (NumPy 2 an
  ambiguous-truth ValueError), and no checkpoint with optimizer slots could be restored.
- `_reversible_one_step` wraps `trax.optimizers.ReversibleSerialTrainer.one_step` (the
  memory-efficient trainer of the Terraformer's runs). trax's Loop keeps that trainer's
  random keys on the CPU (`tl.on_cpu`, supervised/training.py l.189 and l.566) for its
  several-device path, which splits them on the CPU; on one device the trainer hands the key
  as it is to each layer's `jit` (optimizers/trainer.py l.509-511), and on a GPU jax refuses
  a computation whose activations are on the GPU and whose key is on the CPU. The wrapper
  moves the key to the first local device when the trainer runs on one device.
- `jax.host_count` is set to `jax.process_count`: trax calls the old name (training.py
  l.1296, data/inputs.py l.613), which jax 0.10 keeps only as an alias that warns on every
  call.
"""

# pylint: disable=g-import-not-at-top  (jax and trax: after the version check, in `apply`)
import functools
import importlib
import os

import numpy as np

from sparse_scaling import runtime

_AXIS = 'batch'  # The mesh axis name is arbitrary: jit compares device layouts only.
_trax_originals = {}  # trax's own functions that the shims fall back on, set by `apply`.


def apply():
  """Checks the versions, imports trax quietly and installs the shims; a no-op after the first
  call (see the module docstring).

  Raises:
    ImportError: Python or jax is older than tested (trax is then not imported).
  """
  if _trax_originals:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # before TensorFlow is imported
  runtime.check_versions()
  runtime.ignore_trax_syntax_warnings()
  with runtime.quiet_imports(), runtime.stack_without_source():
    import jax  # imports trax, TensorFlow and gym
    from trax import fastmath
    from trax import layers as tl
    from trax.fastmath import jax as fastmath_jax
    from trax.layers import acceleration
    from trax.optimizers import trainer as trax_trainer
    runtime.keep_tensorflow_off_gpus()
  # The module: the attribute `trax.fastmath.numpy` is trax's numpy backend instead.
  _fastmath_numpy = importlib.import_module('trax.fastmath.numpy')
  _trax_originals['for_n_devices'] = acceleration.for_n_devices
  _trax_originals['tree_unflatten'] = _fastmath_numpy.tree_unflatten
  # pylint: disable=protected-access
  _trax_originals['accelerate_update_fn'] = trax_trainer._accelerate_update_fn
  trax_trainer._accelerate_update_fn = _accelerate_update_fn
  _trax_originals['reversible_one_step'] = trax_trainer.ReversibleSerialTrainer.one_step
  trax_trainer.ReversibleSerialTrainer.one_step = _reversible_one_step
  # pylint: enable=protected-access
  acceleration.for_n_devices = tl.for_n_devices = _for_n_devices
  _fastmath_numpy.tree_unflatten = fastmath.tree_unflatten = _tree_unflatten
  fastmath_jax.JAX_BACKEND['pmap'] = _pmap
  jax.host_count = jax.process_count


@functools.lru_cache(maxsize=None)
def _device_sharding(n_devices):
  """Returns the sharding `jax.pmap` gives an argument mapped over `n_devices` devices.

  Args:
    n_devices: Size of the leading (device) axis.

  Returns:
    A `NamedSharding` that splits axis 0 over the first `n_devices` local devices, the
    devices (and order) that `jax.pmap` maps over in a single process.
  """
  import jax
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n_devices]), (_AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS))


def _for_n_devices(x, n_devices):
  """Replicates `x` onto `n_devices` devices along a new leading axis.

  Replaces `trax.layers.acceleration.for_n_devices`, whose jax branch calls
  `jax.device_put_replicated` (acceleration.py, l.241), removed in jax 0.10.0. Each copy is
  put on its own device, so no device ever holds all `n_devices` copies, and the result has
  the sharding that `jax.pmap` expects. With one device or trax's TF backend it calls
  trax's own function.

  Args:
    x: Array, scalar, or nested list/tuple/dict of them (None leaves stay None).
    n_devices: Number of devices.

  Returns:
    `x` with every leaf of shape `s` turned into an array of shape `(n_devices,) + s`.
  """
  import jax
  from jax import numpy as jnp
  from trax import fastmath
  if n_devices < 2 or not fastmath.is_backend(fastmath.Backend.JAX):
    return _trax_originals['for_n_devices'](x, n_devices)
  sharding = _device_sharding(n_devices)
  devices = list(sharding.mesh.devices.flat)

  def replicate(leaf):
    one = jnp.expand_dims(leaf, 0)  # [1, ...]
    return jax.make_array_from_single_device_arrays(
        (n_devices,) + one.shape[1:], sharding,
        [jax.device_put(one, d) for d in devices])

  return jax.tree_util.tree_map(replicate, x)


def _pmap(fun, axis_name=None, donate_argnums=()):
  """`jax.pmap` that first moves its arguments to the devices it maps over.

  Replaces `trax.fastmath.jax.JAX_BACKEND['pmap']`. Since jax 0.8, and only so in jax 0.10,
  a pmapped function is a `jit` with fixed input shardings that raises on any argument
  committed elsewhere, e.g. the optimizer slots trax keeps on one device
  (`tl.on_cpu`, optimizers/trainer.py l.58 and l.110). Before, pmap copied such arguments
  to its devices; this wrapper does that copy with `jax.device_put`, which is a no-op for
  arguments already in place. Only the arguments trax passes are accepted: every argument
  is mapped over axis 0 and passed by position.

  Args:
    fun: Function to map over the leading axis of its arguments.
    axis_name: Name of the mapped axis for collectives such as `psum`.
    donate_argnums: Positional arguments whose buffers `fun` may reuse.

  Returns:
    The pmapped `fun`.
  """
  import jax
  pmapped = jax.pmap(fun, axis_name=axis_name, donate_argnums=donate_argnums)

  @functools.wraps(fun)
  def placed_and_pmapped(*args):
    n_devices = np.shape(jax.tree_util.tree_leaves(args)[0])[0]
    return pmapped(*jax.device_put(args, _device_sharding(n_devices)))

  return placed_and_pmapped


def _reversible_one_step(self, batch, rng, step=0, learning_rate=None):
  """`ReversibleSerialTrainer.one_step` with the key on the device the step runs on.

  trax's Loop commits the memory-efficient trainer's keys to the CPU (`tl.on_cpu`); with one
  device trax passes the key as it is to the layers' jitted functions, which run on the first
  local device. Several devices: trax's own path (it splits the key on the CPU itself).
  """
  import jax
  if self._n_devices == 1:  # pylint: disable=protected-access
    rng = jax.device_put(rng, jax.local_devices()[0])
  return _trax_originals['reversible_one_step'](self, batch, rng, step=step,
                                                learning_rate=learning_rate)


def _accelerate_update_fn(forward_and_backward_fn, optimizer, n_devices, accelerate=True,
                          adasum=False):
  """trax's training-step builder whose single-device step runs on the first local device.

  trax's single-device step (optimizers/trainer.py l.212-227) is `jit`ted, and its optimizer
  slots and parameters arrive committed to the CPU (`tl.on_cpu`, l.58 and l.110), so the jit
  ran there. This moves the arguments to `jax.local_devices()[0]` first (a no-op for those
  already there: after the first step only the few optimizer parameters move). Several
  devices take trax's pmapped step, whose arguments `_pmap` places.

  Args:
    forward_and_backward_fn: `(batch, weights, state, rng) -> ((loss, state), gradients)`.
    optimizer: The trax optimizer.
    n_devices: Devices of the training step.
    accelerate: Whether to compile the single-device step.
    adasum: Adasum gradient merging (several devices).

  Returns:
    `((weights, slots), step, opt_params, batch, state, rng) -> ((weights, slots), state,
    stats)`, as trax's.
  """
  import jax
  update_fn = _trax_originals['accelerate_update_fn'](
      forward_and_backward_fn, optimizer, n_devices, accelerate=accelerate, adasum=adasum)
  if n_devices != 1 or not accelerate:
    return update_fn

  @functools.wraps(update_fn)
  def placed_update_fn(*args):
    return update_fn(*jax.device_put(args, jax.local_devices()[0]))

  return placed_update_fn


def _tree_unflatten(flat, tree, copy_from_tree=None):
  """`trax.fastmath.tree_unflatten` that never compares an array with `copy_from_tree`.

  trax's function (trax/fastmath/numpy.py, l.239) copies any node of `tree` found in
  `copy_from_tree` (placeholders such as `None` and `()`), testing membership with `==`; for an
  array that is an elementwise comparison, which jax 0.10 and NumPy 2 refuse to turn into a
  bool. An array is never a placeholder, so for one this calls trax's function without
  `copy_from_tree`; so for a numpy scalar (`np.int32(3) == ()` is an empty array), which a
  model state copied from the devices (`parallel.to_host`) and read from its checkpoint holds.
  Installed as trax's own name too, so trax's recursion comes back here.

  Args:
    flat: Flat list of leaves to put into the structure of `tree`.
    tree: Tree whose structure the result takes.
    copy_from_tree: Optional list of placeholder nodes to copy from `tree` as they are.

  Returns:
    A pair (new tree, leaves of `flat` left over), as trax's function.
  """
  import jax
  if isinstance(tree, (np.ndarray, np.generic, jax.Array)):
    copy_from_tree = None
  return _trax_originals['tree_unflatten'](
      flat, tree, copy_from_tree=copy_from_tree)

