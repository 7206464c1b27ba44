"""Timing and machine helpers shared by the benchmarks: clocks, bandwidth, the machine's line."""

import functools
import os
import platform
import time

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from sparse_scaling.layers import decode_kernels

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
  On a GPU whose JAX has Pallas' Triton backend a kernel made to stream, `stream_sums`, also
  runs at both shapes (one pass a call and looped; looped only at `large_shape`): XLA's
  probes read less than the dense 17B decoder itself, so that its floor lay above its time.
  Which probe reaches the memory's rate depends on the backend, so the floors take the best.

  Args:
    shape: The probes' array [rows, cols]; the default is 512 MiB.
    large_shape: The large probe's array on an accelerator; the default is 1.5 GB.
  """
  streams = (STREAM_PROBE,) if _streams() else ()
  rates = _probe_rates(shape, ('full reduction', 'row reduction', 'column reduction',
                               'matrix-vector product', 'vector-matrix product',
                               'scaled copy, read + write') + streams,
                       ('vector-matrix product', 'scaled copy, read + write') + streams)
  if jax.default_backend() != 'cpu':
    rates.update({f'{name} at {list(large_shape)}': rate for name, rate in _probe_rates(
        large_shape, (), ('vector-matrix product',) + streams).items()})
  return rates


STREAM_PROBE = 'streaming sum (Pallas Triton)'


def _streams():
  """Whether the probes include `stream_sums`: on a GPU, where Pallas has its Triton backend."""
  return jax.default_backend() == 'gpu' and decode_kernels.MISSING is None


# A streaming sum's programs (`stream_sums`): each loads ROWS rows of STREAM_WIDTH float32 at a
# time (64 KB in flight a program of STREAM_WARPS warps), at most STREAM_PROGRAMS programs
# (powers of 2), in turn along x (INTERLEAVED: step i of program p reads block i·P + p, so
# that at any moment the programs read neighbouring blocks) or each along its own share of
# consecutive blocks. On an H100, at [9216, 40960], these shares read 2.95-2.96 TB/s, as XLA's
# looped vector-matrix product (2.94); 2048 columns, 4 rows and 4 warps 2.78-2.81
# (`python -m sparse_scaling.bench.bandwidth --shares ...`, docs/decoding_gpu.md).
STREAM_WIDTH, STREAM_ROWS, STREAM_PROGRAMS, STREAM_WARPS, INTERLEAVED = 4096, 4, 1024, 8, True


def interpreted():
  """Whether the benchmarks' own Pallas kernels run in Pallas' interpreter here: where no GPU
  holds the arrays (the tests on a CPU, which set it to False to lower the kernels for
  Triton, or tell the probes that a GPU is there and still interpret the kernels)."""
  return jax.devices()[0].platform != 'gpu'


def stream_sums(x, scale, interpret=None, width=None, rows=None, programs=None,
                interleaved=None, warps=None):
  """Partial sums of a float32 array x (its size a multiple of `width`) times scale [1], as a
  Pallas Triton kernel that only streams x: x viewed as rows of `width`, each program adds
  `rows` of them at a time elementwise and reduces once at its end. A read-bandwidth probe
  (`bandwidth_probes`): no output to speak of, every load contiguous and independent of the
  others, as many programs as the card has room for. The shares default to the module's
  constants (STREAM_WIDTH, STREAM_ROWS, STREAM_PROGRAMS: the most, INTERLEAVED,
  STREAM_WARPS). It runs in Pallas' interpreter where `interpret` says, by default where no
  GPU runs them (`interpreted`).

  Returns:
    [P] float32, whose sum is scale·Σx.
  """
  width = width or STREAM_WIDTH
  interpret = interpreted() if interpret is None else interpret
  interleaved = INTERLEAVED if interleaved is None else interleaved
  if x.size % width:
    raise ValueError(f'stream_sums: x has {x.size} elements, which must be a multiple of '
                     f'the width ({width})')
  flat = x.reshape(-1, width)
  rows = _largest_power_of_2_dividing(flat.shape[0], rows or STREAM_ROWS)
  programs = _largest_power_of_2_dividing(flat.shape[0] // rows, programs or STREAM_PROGRAMS)
  steps = flat.shape[0] // (rows * programs)

  def kernel(scale_ref, x_ref, out_ref):
    p = pl.program_id(0)
    block = (lambda i: i * programs + p) if interleaved else (lambda i: p * steps + i)
    acc = lax.fori_loop(
        0, steps, lambda i, acc: acc + x_ref[pl.ds(block(i) * rows, rows), :],
        jnp.zeros((rows, width), jnp.float32))
    out_ref[p] = jnp.sum(acc) * scale_ref[0]
  return pl.pallas_call(
      kernel, grid=(programs,), out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
      interpret=interpret,
      compiler_params=None if interpret else decode_kernels.triton_params(
          warps or STREAM_WARPS))(scale, flat)


def _largest_power_of_2_dividing(n, most):
  """The largest power of 2 that divides n, at most `most`."""
  power = 1
  while power * 2 <= most and n % (power * 2) == 0:
    power *= 2
  return power


def probe_passes(x):
  """The probes' passes over x [rows, cols]: name -> (one pass (x, carry) -> carry, the carry's
  first value, bytes moved); the streaming sum's with its default shares (`stream_pass`)."""
  rows, cols = x.shape
  return {
      'full reduction': (lambda x, c: jnp.sum(x), None, x.nbytes),
      'row reduction': (lambda x, c: jnp.sum(x, axis=1), None, x.nbytes),
      'column reduction': (lambda x, c: jnp.sum(x, axis=0), None, x.nbytes),
      'matrix-vector product': (lambda x, c: x @ jnp.ones(cols, x.dtype), None, x.nbytes),
      'vector-matrix product': (lambda x, v: jnp.resize(v @ x, rows) / cols,
                                jnp.ones(rows, x.dtype), x.nbytes),
      'scaled copy, read + write': (lambda x, y: y * 0.999, x, 2 * x.nbytes),
      STREAM_PROBE: stream_pass(x)}


def stream_pass(x, **shares):
  """A probe's pass of `stream_sums` over x with `shares` (its keyword arguments), as
  `probe_passes` gives them: the carry [1] scales the next pass's sum."""
  return (lambda x, c: jnp.sum(stream_sums(x, c, **shares), keepdims=True) / x.size,
          jnp.ones(1, x.dtype), x.nbytes)


def looped(one_pass, passes=ACCELERATOR_PASSES):
  """jit((x, carry) -> carry after `passes` passes of one_pass(x, carry)), each pass depending
  on the one before: one call's dispatch over `passes` passes of reading."""
  return jax.jit(lambda x, c: lax.fori_loop(0, passes, lambda i, c: one_pass(x, c), c))


def _probe_rates(shape, names, looped_names):
  """`bandwidth_probes`' rates on an array of `shape`: the probes `names` one pass a call,
  and on an accelerator those `looped_names` also `ACCELERATOR_PASSES` passes in one call."""
  x = jnp.asarray(np.random.RandomState(0).rand(*shape).astype(np.float32))
  passes = probe_passes(x)
  probes = {name: (jax.jit(passes[name][0]), *passes[name][1:], 1) for name in names}
  if jax.default_backend() != 'cpu':
    for name in looped_names:
      one_pass, first, nbytes = passes[name]
      probes[f'{name}, {ACCELERATOR_PASSES} passes in one loop'] = (
          looped(one_pass), first, nbytes, ACCELERATOR_PASSES)
  return {name: n * nbytes / time_call(probe, x, first, min_runs=10, min_seconds=0.2)[0]
          for name, (probe, first, nbytes, n) in probes.items()}
