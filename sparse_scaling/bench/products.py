"""One-token weight products: the rate a dense block's products reach, form by form.

  python -m sparse_scaling.bench.products [--shape 800m] [--forms xla,rewrite,cublas,split,rows]
      [--dtype float32]

Decoding one token of one row makes every dense layer a vector-matrix product. Table 1's
floors count the bytes a token reads at the card's rate, which the bandwidth probe measures
on a 512 MiB array (`timing.bandwidth_probes`). An 800M block's products are 4-17 MB each,
and a block's time is theirs plus its small kernels'. This times, for each pair of products
of the shape's dense block, x -> x + (relu(x·A + a)·B + b)·10⁻³:
- 'ff': the FF's W1 [d, d_ff] and W2 [d_ff, d];
- 'qkv': a [d, 3d] weight, as XLA fuses Q, K and V, and a [3d, d] back;
- 'output': the attention's output projection [d, d] and another like it.
The pairs are chained over enough distinct weights (COLD_BYTES) that the L2 cache holds none
of them from one use to the next, as in a generation, whose 800M blocks read ~50 MB each.
They are looped in one compiled program, and the time per pair is the difference between
two loop lengths (`timing.per_step`). The forms:

  xla      XLA's kernels, as float32 decoders compile them (`decoding.jit`; on a GPU, XLA's
           dot rewrite off, and its Triton product kernels)
  rewrite  XLA's default options: on a GPU, a product of up to ten million elements becomes
           an elementwise product and a sum
  cublas   those options with XLA's Triton products off: cuBLAS's kernels on a GPU, as
           bfloat16 decoders compile them (`decoding.COMPILER_OPTIONS_16BIT`)
  split    a Pallas kernel: programs of SPLIT_ROWS rows and SPLIT_COLUMNS columns of W write
           partial sums, which XLA adds
  rows     a Pallas kernel on Wᵀ [n, d] (transposed once, outside the loop): programs of
           ROWS_ROWS output rows, reading theirs whole in pieces of ROWS_PIECE

Weights and activations are `--dtype` (bfloat16: half the bytes; the Pallas kernels
accumulate in float32, XLA's forms as XLA's kernels do).

Each row prints µs per pair, the rate (both products' bytes over that time) and the pair's
floor at the probe's rate, as measured, and how far the outputs are from the first form's.
At 17B's shapes (3 GB an FF pair) a form takes about a minute on an H200. On a CPU the
Pallas forms run in Pallas' interpreter (the tests do) and the options of XLA's GPU compiler
change nothing. docs/decoding_gpu.md quotes runs on an H200.
"""

import functools
import math

from absl import app
from absl import flags
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import decoders
from sparse_scaling.bench import timing

COLD_BYTES = 128 << 20   # distinct weights per loop iteration, at least (an H200's L2: 50 MB)
SPLIT_ROWS, SPLIT_COLUMNS = 256, 32
ROWS_ROWS, ROWS_PIECE = 2, 512
WARPS = 8


def _split_kernel(x_ref, w_ref, out_ref):
  """Program (k, c): Σ_i x[i]·W[i, cols] over its SPLIT_ROWS rows i, written to out[k, cols]."""
  k, c = pl.program_id(0), pl.program_id(1)
  rows, cols = pl.ds(k * SPLIT_ROWS, SPLIT_ROWS), pl.ds(c * SPLIT_COLUMNS, SPLIT_COLUMNS)
  x, w = x_ref[0, rows].astype(jnp.float32), w_ref[rows, cols].astype(jnp.float32)
  out_ref[k, cols] = jnp.sum(x[:, None] * w, axis=0)


def _rows_kernel(x_ref, wt_ref, b_ref, out_ref):
  """Program r: Wᵀ[rows]·x + b[rows] for its ROWS_ROWS rows, read in ROWS_PIECE columns a step,
  accumulated elementwise and summed once."""
  rows = pl.ds(pl.program_id(0) * ROWS_ROWS, ROWS_ROWS)

  def step(i, acc):
    cols = pl.ds(pl.multiple_of(i * ROWS_PIECE, ROWS_PIECE), ROWS_PIECE)
    return acc + (wt_ref[rows, cols].astype(jnp.float32)
                  * x_ref[0, cols].astype(jnp.float32)[None, :])

  acc = jax.lax.fori_loop(0, wt_ref.shape[1] // ROWS_PIECE, step,
                          jnp.zeros((ROWS_ROWS, ROWS_PIECE), jnp.float32))
  out_ref[0, rows] = jnp.sum(acc, axis=1) + b_ref[rows].astype(jnp.float32)


def _pallas_call(kernel, grid, out_shape, *args):
  """The kernel compiled for a GPU (Triton), or in Pallas' interpreter elsewhere."""
  interpret = timing.interpreted()
  params = None if interpret else plgpu.CompilerParams(num_warps=WARPS)
  return pl.pallas_call(kernel, grid=grid, out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
                        interpret=interpret, compiler_params=params)(*args)


def xla_product(x, w, b):
  """x [1, d] · W [d, n] + b, as XLA compiles it."""
  return x @ w + b


def split_product(x, w, b):
  """x·W + b: Pallas programs of SPLIT_ROWS rows and SPLIT_COLUMNS columns, summed by XLA."""
  d, n = w.shape
  parts = _pallas_call(_split_kernel, (d // SPLIT_ROWS, n // SPLIT_COLUMNS),
                       (d // SPLIT_ROWS, n), x, w)
  return jnp.sum(parts, axis=0, keepdims=True) + b


def rows_product(x, wt, b):
  """x·W + b from Wᵀ [n, d]: Pallas programs of ROWS_ROWS output rows."""
  n, _ = wt.shape
  return _pallas_call(_rows_kernel, (n // ROWS_ROWS,), (1, n), x, wt, b)


# XLA's options for decoding programs whose loop repeats a product, not a token
# (`decoding.compiler_options`).
_options = functools.partial(decoding.compiler_options, loops=False)

# form -> (product(x, weight, bias), a function giving XLA's options, weights transposed)
FORMS = {
    'xla': (xla_product, _options, False),
    'rewrite': (xla_product, lambda: None, False),
    'cublas': (xla_product, lambda: dict(_options() or {},
                                         **decoding.COMPILER_OPTIONS_16BIT['gpu']), False),
    'split': (split_product, _options, False),
    'rows': (rows_product, _options, True),
}


def pairs_of(dims):
  """{pair: (d, n)}: the dense block's products as pairs d -> n -> d."""
  d = dims['d_model']
  return {'ff': (d, dims['d_ff']), 'qkv': (d, 3 * d), 'output': (d, d)}


def fits(d, n):
  """Whether every form takes a pair d -> n -> d (the Pallas programs' shares divide it)."""
  return all(side % SPLIT_ROWS == 0 and side % SPLIT_COLUMNS == 0 and side % ROWS_PIECE == 0
             and side % ROWS_ROWS == 0 for side in (d, n))


def random_pairs(d, n, copies, seed=0, dtype=jnp.float32):
  """`copies` pairs (A [d, n], a [n], B [n, d], b [d]) of random weights of `dtype`."""
  rng = np.random.RandomState(seed)
  normal = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32), dtype)
  return [(normal(d, n) / math.sqrt(d), 0.1 * normal(n), normal(n, d) / math.sqrt(n),
           0.1 * normal(d)) for _ in range(copies)]


def chain(form, pairs):
  """(run(x, steps) -> x after `steps` passes over the pairs, compiled with the form's
  options; the pairs as the form reads them)."""
  product, options, transposed = FORMS[form]
  if transposed:
    pairs = [(a.T.copy(), a_bias, b.T.copy(), b_bias) for a, a_bias, b, b_bias in pairs]

  def one_pass(_, x):   # each product back in x's dtype (the Pallas kernels write float32)
    for a, a_bias, b, b_bias in pairs:
      hidden = jnp.maximum(product(x, a, a_bias), 0.0).astype(x.dtype)
      x = x + (product(hidden, b, b_bias) * 1e-3).astype(x.dtype)
    return x

  return jax.jit(lambda x, steps: jax.lax.fori_loop(0, steps, one_pass, x),
                 compiler_options=options())


def measure(dims, forms, bandwidth, steps=(20, 220), on_row=print, dtype=jnp.float32):
  """One row per (pair, form): {pair, d, n, mb, form, us, tbs, floor_us, error}, each handed to
  `on_row` as measured, weights and activations of `dtype`. `steps`: the two loop lengths
  whose difference times a pass."""
  rows = []
  for pair, (d, n) in pairs_of(dims).items():
    nbytes = 2 * d * n * jnp.dtype(dtype).itemsize
    pairs = random_pairs(d, n, max(1, -(-COLD_BYTES // nbytes)), dtype=dtype)
    x = jnp.ones((1, d), dtype)
    expected = None
    for form in forms:
      run = chain(form, pairs)
      out = jax.block_until_ready(run(x, 2))
      expected = out.astype(jnp.float32) if expected is None else expected
      seconds = timing.per_step(lambda s, run=run: run(x, s), *steps) / len(pairs)
      row = dict(pair=pair, d=d, n=n, mb=nbytes / 1e6, form=form, us=seconds * 1e6,
                 tbs=nbytes / seconds / 1e12, floor_us=nbytes / bandwidth * 1e6,
                 error=float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected))))
      rows.append(row)
      on_row(row)
  return rows


COLUMNS = ['pair', 'shape', 'MB', 'form', 'µs/pair', 'TB/s', 'floor µs', 'max |Δ| vs first form']


def table_row(row):
  """The Markdown row of a `measure` row."""
  return common.table_row([row['pair'], f"{row['d']} -> {row['n']} -> {row['d']}",
                           f"{row['mb']:.1f}", row['form'], f"{row['us']:.2f}",
                           f"{row['tbs']:.2f}", f"{row['floor_us']:.2f}", f"{row['error']:.1e}"])


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_enum('shape', '800m', list(decoders.SHAPES), "Table 1 shape whose dense "
                    "block's products are timed.")
  flags.DEFINE_list('forms', list(FORMS), f'Forms to time, of {list(FORMS)}; the first is '
                    'the reference of the last column.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Weights and activations.')


def check_flags(args):
  """Raises app.UsageError, naming the flag and its rule, where `args` (the parsed flags)
  ask for what the benchmark cannot run."""
  if not args.forms or not set(args.forms) <= set(FORMS):
    raise app.UsageError(f'--forms: {args.forms} must name one or more of {list(FORMS)}')
  dims = decoders.dimensions(args.shape, 'dense')
  for d, n in pairs_of(dims).values():
    if not fits(d, n):
      raise app.UsageError(f'--shape: {args.shape}\'s products ({d} -> {n}) must have sides '
                           f'that {SPLIT_ROWS}, {SPLIT_COLUMNS} and {ROWS_PIECE} divide')


def main(argv):
  del argv
  args = flags.FLAGS
  check_flags(args)
  dims = decoders.dimensions(args.shape, 'dense')
  bandwidth, probe = timing.memory_bandwidth(with_probe=True)
  print(f'Machine: {timing.machine_description()}. The {args.shape} dense block\'s products, '
        f'{args.dtype}, one row, pairs chained over {COLD_BYTES >> 20}+ MiB of distinct '
        f'weights, looped in one compiled program. Floor: the pair\'s bytes at {bandwidth / 1e12:.2f} '
        f'TB/s ({probe}).', flush=True)
  print(common.table_header(COLUMNS), flush=True)
  measure(dims, args.forms, bandwidth, on_row=lambda row: print(table_row(row), flush=True),
          dtype=jnp.dtype(args.dtype))


if __name__ == '__main__':
  common.run(main, define_flags)
