"""Data-parallel training over every device of every process: JAX's multi-controller runtime.

A run of P processes (one per host, or one per GPU under Slurm) calls `initialize` first,
before anything touches a device; each process then runs the same training loop. The devices
of all processes form one mesh with one axis, `batch` (the axis name trax's gradient mean sums
over), ordered by process, then by local device, as `jax.pmap` orders them. One training step
is one compiled program over that mesh:

- a global batch of B rows is split over the mesh: device d of D takes rows d * B/D to
  (d + 1) * B/D - 1, as trax's `tl.reshape_by_device` splits it over one host's devices, so
  process p holds the rows p * B/P to (p + 1) * B/P - 1 and reads only those
  (`process_batches`);
- each device runs the forward and backward pass on its rows with its own key
  (`jax.random.split(rng, D)[d]`, the keys trax's `Trainer.one_step` gives its devices);
- the gradients are averaged over all D devices (trax's `_average_multidevice_gradients`:
  psum / D) and every device applies the same optimizer update to its copy of the weights;
- the loss is the mean over all devices, the same number on every process;
- each process's request to stop (`Trainer.stop_requested`, set by `training.Loop` on SIGTERM
  or SIGINT) goes in as one flag per device and comes out as their maximum
  (`stats['stop_requested']`), so every process learns after the same step that one of them
  was asked to stop, at no cost beyond the step itself.

`Trainer` does this in place of trax's `optimizers.Trainer`, which `training.Loop` uses when
the run has one device in all. trax's trainer keeps a device axis (`pmap`) and after every
step copies each weight and optimizer slot of device 0 back into the model and the optimizer
(`Accelerate.weights` and `Trainer.one_step`'s `_unreplicate`, one indexing op per array); it
also cannot span processes with one device each (its one-device step is a plain `jit`). Here
the weights and slots are global `jax.Array`s replicated on every device and stay there between
steps; the model's and the optimizer's host copies are refreshed only by `Trainer.to_host`
(for checkpoints and at the end of training). Model state (per device in trax, e.g. Sparse
FF's last choice of units) keeps a leading device axis: `[D, ...]`, sharded over the mesh.
"""

import functools

import jax
from jax.experimental import multihost_utils
import numpy as np
from trax.optimizers import trainer as trax_trainer

AXIS = 'batch'  # trax's collectives name this axis (`_average_multidevice_gradients`).
_P = jax.sharding.PartitionSpec


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               heartbeat_timeout_seconds=100):
  """Joins this process to a multi-process run (`jax.distributed.initialize`).

  Call it before anything touches a device. Arguments left None are read by JAX from the
  launcher's environment where it knows one: Slurm (`SLURM_*`), Open MPI (`OMPI_*`), Cloud TPU
  pod slices (the TPU VM's metadata), Kubernetes; `JAX_COORDINATOR_ADDRESS` also sets the
  coordinator.

  Args:
    coordinator_address: 'host:port' of process 0, which serves the coordination service.
    num_processes: Processes in the run.
    process_id: This process's index, 0 to num_processes - 1.
    heartbeat_timeout_seconds: After this long without a heartbeat from a process the others
      stop with an error instead of waiting for it (JAX's default: 100).
  """
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


@functools.lru_cache(maxsize=None)
def mesh():
  """The devices of all processes on one axis, `AXIS`: by process, then by local device."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def _sharding(spec):
  return jax.sharding.NamedSharding(mesh(), spec)


def _put(tree, spec):
  """Global arrays of `tree`'s leaves, from this process's data (host or device arrays)."""
  if jax.process_count() > 1:
    tree = jax.tree.map(np.asarray, tree)
  return jax.make_array_from_process_local_data(_sharding(spec), tree)


def replicated(tree):
  """`tree` (the same on every process) as arrays replicated on every device."""
  return _put(tree, _P())


def per_device(tree):
  """`tree` (the same on every process) as `[D, ...]` arrays, one copy per device."""
  n_local = jax.local_device_count()
  return _put(jax.tree.map(lambda x: np.broadcast_to(x, (n_local,) + np.shape(x)), tree),
              _P(AXIS))


def global_batch(batch):
  """A global batch from this process's rows (`process_batches`), split over the devices."""
  return _put(batch, _P(AXIS))


def to_host(tree, device_axis=False):
  """Numpy copies of global arrays: a replica's, or with `device_axis` the first device's."""
  leaves, treedef = jax.tree.flatten(tree)
  host = jax.device_get([leaf.addressable_data(0) for leaf in leaves])
  return jax.tree.unflatten(treedef, [h[0] for h in host] if device_axis else host)


def process_batches(batches):
  """Yields this process's rows of each global batch: process p of P takes a block of B/P.

  Rows p * B/P to (p + 1) * B/P - 1, the rows its devices take (see the module docstring). Each
  process reads the whole stream, so every process takes the same global batches, in order.

  Args:
    batches: Iterator of global batches, tuples of arrays with B rows each.

  Raises:
    ValueError: If a batch's B is not divisible by the number of processes.
  """
  index, count = jax.process_index(), jax.process_count()
  for batch in batches:
    if count == 1:
      yield batch
      continue
    rows = len(batch[0])
    if rows % count:
      raise ValueError(f'batch_size={rows} is not divisible by the {count} processes')
    block = rows // count
    yield tuple(x[index * block:(index + 1) * block] for x in batch)


def device_rows(batch):
  """The first rows of `batch` that one device takes: `B / D` of the global batch."""
  rows = len(batch[0]) * jax.process_count() // jax.device_count()
  return tuple(x[:rows] for x in batch)


def same_on_all_processes(value):
  """Whether `value` (a number) is the same on every process; every process must call it."""
  if jax.process_count() == 1:
    return True
  values = multihost_utils.process_allgather(np.asarray(value))
  return bool(np.all(values == values[0]))


def broadcast_seed(seed):
  """Process 0's `seed` (an int, or None for a random one) on every process."""
  if seed is None:
    seed = np.random.SeedSequence().entropy % 2**31
  if jax.process_count() == 1:
    return int(seed)
  return int(multihost_utils.broadcast_one_to_all(np.int32(seed)))


def _one_key(rng):
  """This device's key: the one trax's `Trainer.one_step` gives device d of D."""
  return jax.random.split(rng, jax.lax.axis_size(AXIS))[jax.lax.axis_index(AXIS)]


def _on_mesh(fn, in_specs, out_specs, donate_argnums=()):
  """`fn` on each device of the mesh, compiled as one program, as `jax.pmap` runs it.

  Without `check_vma`, a gradient inside `fn` with respect to a replicated input is this
  device's (as in pmap), not implicitly summed over the devices: `fn` averages it itself.
  """
  return jax.jit(jax.shard_map(fn, mesh=mesh(), in_specs=in_specs, out_specs=out_specs,
                               check_vma=False),
                 donate_argnums=donate_argnums)


def _unstack(state):
  return jax.tree.map(lambda s: s[0], state)   # [1, ...] -> this device's [...]


def _stack(state):
  return jax.tree.map(lambda s: s[None], state)  # this device's [...] -> [1, ...]


class _OnDevices:
  """A layer's weights and state on the devices, read by trax's Loop as `tl.Accelerate`.

  The Loop reads `weights` and `state` (its evals) and calls `replicate_weights` and
  `replicate_state` (it switches tasks). Both are placed from the layer at first use.
  """

  def __init__(self, layer):
    self.sublayer = layer
    self._weights = self._state = None

  @property
  def weights(self):
    if self._weights is None:
      self._weights = replicated(self.sublayer.weights)
    return self._weights

  @weights.setter
  def weights(self, weights):
    self._weights = weights

  @property
  def state(self):
    if self._state is None:
      self._state = per_device(self.sublayer.state)
    return self._state

  @state.setter
  def state(self, state):
    self._state = state

  def replicate_weights(self, weights):
    self.sublayer.weights, self._weights = weights, None

  def replicate_state(self, state):
    self.sublayer.state, self._state = state, None


class Trainer:
  """trax's `optimizers.Trainer` over every device of every process (the module docstring).

  Same interface as trax's (`one_step`, `slots`, `model_with_loss`,
  `accelerated_model_with_loss`), plus `to_host`, `from_host` and `stop_requested`.

  Attributes:
    stop_requested: This process's wish to stop training, sent with every step; the step's
      `stats['stop_requested']` is 1 if any process of the run sent True.
  """

  def __init__(self, model_with_loss, optimizer, adasum=False):
    """Builds the step of `model_with_loss` (initialized) with `optimizer` (`tree_init`-ed)."""
    self._model_with_loss = model_with_loss
    self._optimizer = optimizer
    self._on_devices = _OnDevices(model_with_loss)
    self._slots = None  # on the devices; placed from the optimizer at the first step
    self._host_is_stale = False
    self.stop_requested = False
    self._stop_flags = {}  # False/True -> the flags placed on this process's devices
    forward_and_backward = jax.value_and_grad(model_with_loss.pure_fn, argnums=1, has_aux=True)

    def step_on_one_device(weights_and_slots, step, opt_params, batch, state, rng, stop):
      weights, slots = weights_and_slots
      (loss, state), gradients = forward_and_backward(batch, weights, _unstack(state),
                                                      _one_key(rng))
      # pylint: disable-next=protected-access
      gradients = trax_trainer._average_multidevice_gradients(gradients, adasum=adasum)
      weights, slots, stats = optimizer.tree_update(step, gradients, weights, slots,
                                                    opt_params, store_slots=False)
      stats['loss'] = jax.lax.pmean(loss, AXIS)
      stats['stop_requested'] = jax.lax.pmax(stop[0], AXIS)
      return (weights, slots), _stack(state), stats

    self._step = _on_mesh(step_on_one_device,
                          in_specs=(_P(), _P(), _P(), _P(AXIS), _P(AXIS), _P(), _P(AXIS)),
                          out_specs=(_P(), _P(AXIS), _P()), donate_argnums=(0, 4))

  @property
  def model_with_loss(self):
    return self._model_with_loss

  @property
  def accelerated_model_with_loss(self):
    """The weights and state of `model_with_loss` on the devices (trax's name)."""
    return self._on_devices

  @property
  def optimizer(self):
    return self._optimizer

  @property
  def slots(self):
    """The optimizer slots on the host (copied from the devices if a step changed them)."""
    self.to_host()
    return self._optimizer.slots

  @slots.setter
  def slots(self, slots):
    self._optimizer.slots, self._slots = slots, None

  def one_step(self, batch, rng, step=0, learning_rate=None):
    """Trains on one global batch (this process's rows of it); returns (loss, stats).

    `loss` and `stats` are replicated scalars: the same on every device and process.
    """
    opt_params = dict(self._optimizer.opt_params)
    if learning_rate is not None:
      opt_params['learning_rate'] = learning_rate
    if self._slots is None:
      self._slots = replicated(self._optimizer.slots)
    on_devices = self._on_devices
    (on_devices.weights, self._slots), on_devices.state, stats = self._step(
        (on_devices.weights, self._slots), replicated(np.int32(step)), replicated(opt_params),
        global_batch(batch), on_devices.state, replicated(rng), self._stop_flag())
    self._host_is_stale = True
    return stats['loss'], stats

  def _stop_flag(self):
    """`stop_requested` as a flag per local device, placed once for each value."""
    flag = bool(self.stop_requested)
    if flag not in self._stop_flags:
      self._stop_flags[flag] = _put(np.full((jax.local_device_count(),), flag, np.int32),
                                    _P(AXIS))
    return self._stop_flags[flag]

  def to_host(self):
    """Copies the weights, state and slots of the devices into the model and the optimizer."""
    if not self._host_is_stale:
      return
    self._model_with_loss.weights = to_host(self._on_devices.weights)
    self._model_with_loss.state = to_host(self._on_devices.state, device_axis=True)
    self._optimizer.slots = to_host(self._slots)
    self._host_is_stale = False

  def from_host(self):
    """Drops the devices' copies: the next step places the model's and optimizer's values."""
    self._on_devices.replicate_weights(self._model_with_loss.weights)
    self._on_devices.replicate_state(self._model_with_loss.state)
    self._slots, self._host_is_stale = None, False


def metrics_fn(model_with_metrics):
  """trax's evaluator function over the mesh: the metrics averaged over all devices.

  Returns:
    `(batch, weights, state, rng) -> (metric values, state)` as trax's Loop calls it (its
    `_Evaluator.metrics_fn`): `batch` this process's rows, `weights` replicated, `state` per
    device, as `Trainer` and `replicated` / `per_device` hold them.
  """
  def on_one_device(batch, weights, state, rng):
    values, _ = model_with_metrics.pure_fn(batch, weights, _unstack(state), _one_key(rng))
    return jax.lax.pmean(values, AXIS)

  run = _on_mesh(on_one_device, in_specs=(_P(AXIS), _P(), _P(AXIS), _P()), out_specs=_P())

  def metrics(batch, weights, state, rng):
    values = run(global_batch(batch), weights, state, replicated(rng))
    values = values if isinstance(values, (list, tuple)) else [values]  # one metric: an array
    return np.array([float(v) for v in values]), state

  return metrics
