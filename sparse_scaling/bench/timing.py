"""Timing and machine helpers shared by the benchmarks: clocks, bandwidth, the machine's line."""

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


def seconds_of(fn, *args):
  """Wall time of one call `fn(*args)`, blocked until its result is ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


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


def memory_bandwidth(with_probe=False):
  """Device memory bandwidth in bytes per second: the best of five jitted probes.

  Each probe streams a 512 MiB float32 array once: a full reduction (`jnp.sum`), a reduction
  of every row and of every column of its [16384, 8192] view, a matrix-vector product (what
  a decoding step's dense layers are) and a scaled copy (read plus write counted). Which one
  reaches the memory's rate depends on the backend (on an H200 the reductions and the copy
  stayed at 2.5-2.8 TB/s while the dense 17B decoder's matrix-vector products read 4.3 TB/s,
  `docs/results/table1_gpu.md`), so the floors take the best.

  Args:
    with_probe: Also return the name of the probe that set it.
  """
  a = jnp.asarray(np.random.RandomState(0).rand(16384, 8192).astype(np.float32))
  probes = {'full reduction': (jnp.sum, a.nbytes),
            'row reduction': (lambda x: jnp.sum(x, axis=1), a.nbytes),
            'column reduction': (lambda x: jnp.sum(x, axis=0), a.nbytes),
            'matrix-vector product': (lambda x: x @ jnp.ones(x.shape[1], x.dtype), a.nbytes),
            'scaled copy, read + write': (lambda x: x * 1.5, 2 * a.nbytes)}
  rates = {name: nbytes / time_call(jax.jit(fn), a, min_runs=10, min_seconds=0.2)[0]
           for name, (fn, nbytes) in probes.items()}
  best = max(rates, key=rates.get)
  return (rates[best], best) if with_probe else rates[best]
