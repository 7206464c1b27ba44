"""Decoding speed of one feed-forward layer: dense vs our SparseFF vs trax's reference SparseFF.

Batch 1, one token: each layer runs in predict mode, jitted with its weights as arguments,
warmed up, and timed as the median of many calls. The ideal speedup of Sparse FF over dense is
about N where reading the weights dominates; a sweep over N at one shape shows how the time
follows the bytes read.

  python -m sparse_scaling.bench.ff_decode [--json] [--shapes 1024x4096x32,...] [--nosweep]

--shapes takes d_modelxd_ffxN or d_modelxd_ffxNxdtype.
"""

import gc
import itertools
import json

import jax
import jax.numpy as jnp
from absl import flags
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity as trax_sparsity

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.layers import SparseFF

# (d_model, d_ff, N, d_lowrank, dtype): issue #2's shapes; the last is the paper's 17B FF
# (d_lowrank 32 as in trax's 17B timing config). float32 fits (one layer at a time); in
# bfloat16, XLA's CPU matrix-vector product is compute-bound (~1.3 GB/s here against 32 GB/s
# in float32), which would flatter sparsity, so bfloat16 is measured as an extra row.
SHAPES = (
    (1024, 4096, 32, None, 'float32'),
    (1024, 6144, 64, None, 'float32'),
    (2048, 16384, 64, None, 'float32'),
    (9216, 65536, 256, 32, 'float32'),
    (9216, 65536, 256, 32, 'bfloat16'),
)
SWEEP_SHAPE, SWEEP_NS = (2048, 16384), (8, 16, 32, 64, 128, 256)
FLAGS = flags.FLAGS


def shape_names(shape):
  """What --shapes calls `shape`: 'd_modelxd_ffxN' (the rows of every dtype) and
  'd_modelxd_ffxNxdtype'."""
  name = 'x'.join(map(str, shape[:3]))
  return name, f'{name}x{shape[4]}'


TOKENS = 16   # different inputs a layer is timed on, in turn


def decode_seconds(layer, d_model, dtype):
  """Median seconds of one batch-1 token through `layer` in predict mode, each call on the
  next of TOKENS random inputs: a sparse layer then reads other rows from call to call, as it
  does decoding, and not the rows of the call before from the cache (at the 17B shape a fixed
  input took 1.5-1.7 ms a call, 16 inputs in turn 1.9-4.1; docs/speed.md)."""
  xs = [jax.random.normal(jax.random.PRNGKey(i), (1, 1, d_model), dtype) for i in range(TOKENS)]
  layer.init(shapes.signature(xs[0]))
  layer.weights = jax.tree.map(lambda w: w.astype(dtype), layer.weights)
  step = decoding.jit(lambda weights, state, x: layer.pure_fn(x, weights, state, None)[0],
                      layer.weights)
  inputs = itertools.cycle(xs)
  median, _ = timing.time_call(lambda: step(layer.weights, layer.state, next(inputs)))
  return median


def sparse_bytes_read(d_model, d_ff, n, d_lowrank, itemsize):
  """Weight bytes one token reads in our SparseFF: controller + d_ff/N rows of W1 and W2."""
  return itemsize * (d_model * d_lowrank + d_lowrank * d_ff + d_ff + 2 * (d_ff // n) * d_model)


def measure(d_model, d_ff, n, d_lowrank, dtype, impls=('dense', 'trax', 'ours')):
  """Seconds per token of each implementation at one shape, built and freed one at a time."""
  d_lowrank = d_lowrank or max(1, d_model // n)
  build = {
      'dense': lambda: tl.Serial(tl.Dense(d_ff), tl.Relu(), tl.Dense(d_model)),
      'trax': lambda: trax_sparsity.SparseFF(d_ff, n, d_lowrank=d_lowrank, mode='predict'),
      'ours': lambda: SparseFF(d_ff, n, d_lowrank=d_lowrank, mode='predict'),
  }
  seconds = {}
  for impl in impls:
    seconds[impl] = decode_seconds(build[impl](), d_model, dtype)
    gc.collect()
  return d_lowrank, seconds


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True,
                      shapes=dict.fromkeys(n for shape in SHAPES for n in shape_names(shape)))
  flags.DEFINE_bool('sweep', True, 'Also sweep N at d_model 2048, d_ff 16384.')


def main(argv):
  del argv
  shapes_ = SHAPES
  if FLAGS.shapes:
    shapes_ = [s for s in SHAPES if set(shape_names(s)) & set(FLAGS.shapes)]
  bandwidth = timing.memory_bandwidth()
  print(f'# FF decode, batch 1, one token: {timing.machine_description()}')
  print(f'# measured read bandwidth {bandwidth / 1e9:.1f} GB/s; floor = weight bytes read / it')
  print()
  print(common.table_header(['d_model', 'd_ff', 'N', 'd_lowrank', 'dtype', 'dense ms', 'trax ms',
                             'ours ms', 'dense/ours', 'trax/ours', 'ours floor ms',
                             'ours GB/s']))
  rows = []
  for d_model, d_ff, n, d_lowrank, dtype in shapes_:
    itemsize = jnp.dtype(dtype).itemsize
    needed = 2 * 2 * d_model * d_ff * 4  # float32 init of W1 and W2, and room for a copy
    if needed > timing.available_memory_bytes():
      print(f'| {d_model} | {d_ff} | {n} | | {dtype} | skipped: needs ~{needed / 2**30:.0f} GiB '
            f'free | | | | | | |')
      continue
    d_lowrank, s = measure(d_model, d_ff, n, d_lowrank, dtype)
    read = sparse_bytes_read(d_model, d_ff, n, d_lowrank, itemsize)
    print(common.table_row([
        d_model, d_ff, n, d_lowrank, dtype, f'{s["dense"] * 1e3:.3f}', f'{s["trax"] * 1e3:.3f}',
        f'{s["ours"] * 1e3:.3f}', f'{s["dense"] / s["ours"]:.1f}x',
        f'{s["trax"] / s["ours"]:.1f}x', f'{read / bandwidth * 1e3:.3f}',
        f'{read / s["ours"] / 1e9:.1f}']), flush=True)
    rows.append(dict(d_model=d_model, d_ff=d_ff, n=n, d_lowrank=d_lowrank, dtype=dtype,
                     dense_ms=s['dense'] * 1e3, ours_ms=s['ours'] * 1e3,
                     trax_ms=s['trax'] * 1e3))
  if FLAGS.sweep:
    d_model, d_ff = SWEEP_SHAPE
    _, dense = measure(d_model, d_ff, 2, None, 'float32', impls=('dense',))
    print()
    print(f'# Sweep over N at d_model {d_model}, d_ff {d_ff}, float32, d_lowrank d_model/N; '
          f'dense {dense["dense"] * 1e3:.3f} ms')
    print(common.table_header(['N', 'weights read MB', 'ours ms', 'GB/s', 'dense/ours']))
    for n in SWEEP_NS:
      d_lowrank, s = measure(d_model, d_ff, n, None, 'float32', impls=('ours',))
      read = sparse_bytes_read(d_model, d_ff, n, d_lowrank, 4)
      print(common.table_row([n, f'{read / 1e6:.2f}', f'{s["ours"] * 1e3:.3f}',
                              f'{read / s["ours"] / 1e9:.1f}',
                              f'{dense["dense"] / s["ours"]:.1f}x']), flush=True)
  if FLAGS.json:
    print(json.dumps(rows))


if __name__ == '__main__':
  common.run(main, define_flags)
