"""Timing and machine helpers shared by the benchmarks: clocks, bandwidth, the machine's line."""

import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

now = time.perf_counter


def time_call(fn, *args, min_runs=20, min_seconds=1.0, warmup=3):
  """Median and p90 wall time of `fn(*args)` in seconds, after warm-up.

  Every call is blocked until its result is ready. Runs at least `min_runs` times and at
  least `min_seconds` in total.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < min_runs or time.perf_counter() - start < min_seconds:
    times.append(seconds_of(fn, *args))
  return median_p90(times)


def per_step(run, short, long, min_runs=5):
  """Seconds per step of `run(n_steps)`: the difference of the fastest of `long` and of
  `short` steps over the difference in steps, so that what a call costs besides its steps (a
  prompt pass, dispatch) cancels out.

  The two lengths run in alternating rounds (`min_runs` calls each, after one warm-up) and
  each keeps its fastest call: another job on the machine only adds time, so the minima are
  the least disturbed pair, and a burst of load cannot fall on one length alone.
  """
  return per_steps([run], short, long, min_runs)[0]


def per_steps(runs, short, long, min_runs=5):
  """`per_step` of each of `runs`, every run's two lengths in the same alternating rounds
  (`interleaved_times`), so that a drift of the machine falls on all of them alike."""
  fns = [functools.partial(run, n) for run in runs for n in (short, long)]
  times = interleaved_times(fns, rounds=min_runs, runs_per_round=1, warmup=1)
  return [(min(times[2 * i + 1]) - min(times[2 * i])) / (long - short)
          for i in range(len(runs))]


def seconds_of(fn, *args):
  """Wall time of one call `fn(*args)`, blocked until its result is ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


FLUSH_BYTES = 256 << 20   # more than the last-level cache of this project's machines: the
                          # EPYC's L3 (32 MB), the H200's L2 (50 MB)


def cache_flusher(nbytes=FLUSH_BYTES):
  """flush(): reads and writes a buffer of `nbytes` on the default device (each element one
  more than before) and waits for it, so that a call timed next reads its weights from
  memory, not from a cache that the call before filled (a decoded token's block finds its
  weights evicted by the other blocks'); returns the buffer."""
  buffer = [jnp.zeros(nbytes // 4, jnp.float32)]
  bump = jax.jit(lambda a: a + 1, donate_argnums=0)

  def flush():
    buffer[0] = jax.block_until_ready(bump(buffer[0]))
    return buffer[0]
  return flush


def median_p90(times):
  """(median, p90) of a list of seconds."""
  return float(np.median(times)), float(np.percentile(times, 90))


def interleaved_times(fns, rounds, runs_per_round, warmup=3):
  """Wall times of each of `fns` (called without arguments), in alternating rounds.

  Each fn is warmed up first; then every round calls each fn `runs_per_round` times in turn,
  the order reversed every other round, so that a drift of the machine (another job, the
  clock) falls on every fn alike and their ratios compare like with like. Every call is
  blocked until its result is ready. Returns one list of seconds per fn.
  """
  for fn in fns:
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for r in range(rounds):
    for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
      times[i] += [seconds_of(fns[i]) for _ in range(runs_per_round)]
  return times


def available_memory_bytes():
  """Physical memory not in use now."""
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def machine_description():
  """One line naming the processor, core count and JAX backend."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  on = device.platform if device.platform == 'cpu' else f'{device.device_kind} ({device.platform})'
  return f'{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {on}'


ACCELERATOR_PASSES = 20  # passes of a looped bandwidth probe per call on a GPU or TPU


def memory_bandwidth(with_probe=False):
  """Device memory bandwidth in bytes per second: the best of `bandwidth_probes`.

  Args:
    with_probe: Also return the name of the probe that set it.
  """
  rates = bandwidth_probes()
  best = max(rates, key=rates.get)
  return (rates[best], best) if with_probe else rates[best]


def bandwidth_probes(shape=(16384, 8192), large_shape=(9216, 40960)):
  """Bytes per second that each of several jitted probes reads: name -> rate.

  Each probe streams a float32 array x of `shape` once per call: a full reduction,
  a reduction of every row and of every column, a matrix-vector and a vector-matrix product
  (a decoding step's dense layer reads its weight as the latter does) and a scaled copy (read
  plus write counted). On an accelerator the last two also run `ACCELERATOR_PASSES` passes in
  one compiled loop, each pass depending on the one before, so that a call's dispatch and
  synchronisation (~0.1 ms on an H200's host, against ~0.15 ms of reading) drop out, and the
  looped vector-matrix product runs once more on an array of `large_shape`: on an H200 it
  read 4.15 TB/s at the 17B FF layer's [9216, 40960] against 3.77 at 512 MiB, nearer the 4.3
  that the dense 17B decoder reads (docs/decoding_gpu.md, "Floors and the bandwidth probe").
  Which probe reaches the memory's rate depends on the backend, so the floors take the best.

  Args:
    shape: The probes' array [rows, cols]; the default is 512 MiB.
    large_shape: The large probe's array on an accelerator; the default is 1.5 GB.
  """
  rates = _probe_rates(shape, ('full reduction', 'row reduction', 'column reduction',
                               'matrix-vector product', 'vector-matrix product',
                               'scaled copy, read + write'),
                       looped=('vector-matrix product', 'scaled copy, read + write'))
  if jax.default_backend() != 'cpu':
    rates.update({f'{name} at {list(large_shape)}': rate for name, rate in _probe_rates(
        large_shape, (), looped=('vector-matrix product',)).items()})
  return rates


def _probe_rates(shape, names, looped):
  """`bandwidth_probes`' rates on an array of `shape`: the probes `names` one pass a call,
  and on an accelerator those `looped` also `ACCELERATOR_PASSES` passes in one call."""
  x = jnp.asarray(np.random.RandomState(0).rand(*shape).astype(np.float32))
  rows, cols = shape
  passes = {  # name: (one pass (x, carry) -> carry, the carry's first value, bytes moved)
      'full reduction': (lambda x, c: jnp.sum(x), None, x.nbytes),
      'row reduction': (lambda x, c: jnp.sum(x, axis=1), None, x.nbytes),
      'column reduction': (lambda x, c: jnp.sum(x, axis=0), None, x.nbytes),
      'matrix-vector product': (lambda x, c: x @ jnp.ones(cols, x.dtype), None, x.nbytes),
      'vector-matrix product': (lambda x, v: jnp.resize(v @ x, rows) / cols,
                                jnp.ones(rows, x.dtype), x.nbytes),
      'scaled copy, read + write': (lambda x, y: y * 0.999, x, 2 * x.nbytes)}
  probes = {name: (jax.jit(passes[name][0]), *passes[name][1:], 1) for name in names}
  if jax.default_backend() != 'cpu':
    for name in looped:
      one_pass, first, nbytes = passes[name]
      loop = jax.jit(lambda x, c, one_pass=one_pass: jax.lax.fori_loop(
          0, ACCELERATOR_PASSES, lambda i, c: one_pass(x, c), c))
      probes[f'{name}, {ACCELERATOR_PASSES} passes in one loop'] = (
          loop, first, nbytes, ACCELERATOR_PASSES)
  return {name: n * nbytes / time_call(probe, x, first, min_runs=10, min_seconds=0.2)[0]
          for name, (probe, first, nbytes, n) in probes.items()}
