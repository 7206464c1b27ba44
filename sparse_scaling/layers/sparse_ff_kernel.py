"""Sparse FF decoding as Pallas kernels: controller choice, gathered rows, ReLU, products.

The decoding half of §3.1 (`sparse_ff.py`) for calls of a few tokens. XLA runs it as about
six kernels per layer (the controller's second product, its argmax, two gathers, two
products), each of a few microseconds on a GPU while the layer reads well under a megabyte.
Here `units`, one program per (token, group of G blocks of N units), finds each block's unit:

  logits[k] = z·C2[:, k] + c[k]                  z = x·C1, [d_lowrank]
  u[k]      = argmax(logits[k])                  the chosen unit of block k
  h[k]      = relu(x·W1[k, u[k]] + b1[k, u[k]])
  y         = Σ_k h[k]·W2[k, u[k]] + b2          (+ a residual)

and the last line is done one of two ways. Where the programs are few (800M: 96 blocks of
d_model 1024), each multiplies its own rows of W2 and writes a part [d_model], which XLA adds
('parts'; `bench/parts_sum.py` times other ways of adding them). Where the parts would be
large (17B: 256 parts of 9216, 9.4 MB written and read again), `units` writes h and the
chosen rows, and a second kernel, `down`, one program per (token, slice of d_model's
columns), gathers those columns of every chosen row of W2
('columns'). Measured on an H200 (2026-12-01), the FF block looped on its own output in one
compiled program, µs per iteration with the loop's own ~18 µs (`python -m
sparse_scaling.bench.decode_shares --shape 17b --measure kernels --settings
default,FF_PARTS_BYTES=1073741824,FF_GATHER=64,FF_COLUMNS=32,default`): at 17B columns 33.2
and 32.3, parts 41.0; at 800M parts 22.9 and 23.2, columns 23.6 and 24.9 (`--shape 800m
--settings default,FF_PARTS_BYTES=0,default,FF_PARTS_BYTES=0`). In a decoding step's profile
the 17B FF block went from 27.5 µs (units 20.0, norm_controller 4.3, XLA's sum 3.2) to 22.1
(units 12.3, down 5.8, norm_controller 4.0; docs/results/decode_profile_gpu_17b.md).

Reads per token: z, C2 and the 2·(d_ff / N) chosen rows of W1 and W2, as `gathered_units`
does. z comes from XLA (`SparseFFDecode`) or, in a residual block (`SparseFFResidual`,
`ff_block`), from `norm_controller`: the block's LayerNorm and x·C1 as partial sums over
slices of d_model, which `units` adds.

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs the same kernels on any
backend (the tests do, on the CPU). `decode_kernels.use(name)` chooses where `sparse_ff.py`
calls them. With MOSAIC `norm_controller` and the units programs run in Pallas' Mosaic GPU
backend instead (`sparse_ff_mosaic.py`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_ff_mosaic
from sparse_scaling.layers.decode_kernels import f32

# Blocks of N units per `units` program (None: one, or up to 8 while 256 programs or more per
# token remain; at 17B's 256 blocks one a program ran 11% faster than two) and warps per
# program of `units` and `down`.
GROUP, WARPS = None, 4
NORM_ROWS = 64  # rows of C1 per `norm_controller` program (a power of 2)
# The units programs multiply their own rows of W2 while the parts they write hold at most
# MAX_PARTS_BYTES (float32); beyond, `down` does, COLUMNS of d_model per program, gathering at
# most GATHER chosen rows a load (at 17B in the loop above: 64 columns of all 256 rows in one
# load 33.2 and 32.3 µs, 32 columns 31.8, 64 rows a load 42.6). 32 columns since 2026-12-04:
# one 17B block looped in a compiled program took 0.0636 and 0.0640 ms against 0.0656 and
# 0.0670 with 64, `down` traced alone 6.6 µs against 7.7 (docs/decoding_gpu.md, "17B shapes").
MAX_PARTS_BYTES, COLUMNS, GATHER = 1 << 20, 32, 256
# With MOSAIC, where the shapes fit (`sparse_ff_mosaic.fits`), `norm_controller` and the units
# programs run as Mosaic GPU kernels (`sparse_ff_mosaic.py`), the units one block of N a
# program, in the parts form or, where the parts would pass MAX_PARTS_BYTES, writing each
# block's activation and chosen row for `down` (Triton's): at 800M (parts) and 17B (`down`),
# chained or not. Off: on an H200 the 800M FF block took 5.3 µs of device time with them
# against 4.7 with the Triton kernels, and the 17B block the same (docs/decoding_gpu.md,
# "Mosaic GPU").
MOSAIC = False
# What the FF block reads next, asked of the L2 cache a kernel ahead (the forty-third
# session's CONTROLLER_AHEAD, C2 and c by the `norm_controller` programs, and ROWS_AHEAD,
# each units program's chosen rows of W2 for `down`), made those reads faster and the
# kernels that asked slower: a 17B FF+QKV block looped 0.6-5% slower on an H100 in two
# sessions (the forty-sixth: 0.0539-0.0540 ms against 0.0531-0.0536), so both were removed
# (docs/decoding_gpu.md, "The FF block's next reads asked for a kernel ahead").


def _writes_parts(n_tokens, programs, d_model):
  """Whether `programs` units programs a token write their parts [d] (float32), within
  MAX_PARTS_BYTES, or the activations for `down`."""
  return n_tokens * programs * d_model * 4 <= MAX_PARTS_BYTES


def fits(d_lowrank, block):
  """Whether `sparse_units` and `ff_block` take these shapes: the controller's rank and N
  powers of 2. d_model may be any: rows and partial sums are loaded in power-of-2 pieces."""
  return decode_kernels.is_power_of_2(d_lowrank, block)


def partials_type(n_tokens, n_partials, rank):
  """The shapes of the partial sums an attention kernel writes for the FF block after it
  (`merge_partials`' Σx [T, P], Σ(x − x̄)² [T, P] and products [T, P, 3, r], float32)."""
  return (jax.ShapeDtypeStruct((n_tokens, n_partials), jnp.float32),
          jax.ShapeDtypeStruct((n_tokens, n_partials), jnp.float32),
          jax.ShapeDtypeStruct((n_tokens, n_partials, 3, rank), jnp.float32))


def merge_partials(sums, m2s, products, d_model, epsilon):
  """(mean, 1/σ, z = LayerNorm(x)·C1 [r]) of a row from its slices' partial sums, as
  `load_pieces` gives them (`sparse_qkv_block_kernel._ff_partials`; P slices of d / P
  columns): Σx [P] and Σ(x − x̄)² [P], merged as in Chan et al.'s parallel variance, and
  Σ(x − x̄)·scale·C1, Σscale·C1 and Σbias·C1 [P, r]. Each slice's first product is moved
  from its own mean x̄ to the row's: + (x̄ − mean)·Σscale·C1. Triton's kernel and Mosaic GPU's
  (`sparse_ff_mosaic`, one piece of each) both merge them here."""
  size = d_model // sum(part.shape[0] for part in sums)
  mean = decode_kernels.sum_rows(sums) / d_model
  moves = [f32(part) / size - mean for part in sums]                               # [P']
  spread = sum(jnp.sum(move * move) for move in moves)
  inv = jax.lax.rsqrt((decode_kernels.sum_rows(m2s) + size * spread) / d_model + epsilon)
  moved = sum(jnp.sum(jax.lax.broadcast_in_dim(move, scaled.shape, (0,)) * f32(scaled), axis=0)
              for move, scaled in zip(moves, products[1]))
  centred, biased = (decode_kernels.sum_rows(products[i]) for i in (0, 2))
  return mean, inv, inv * (centred + moved) + biased


def _units_kernel(x_ref, *refs, group, n, chunk, n_chunks, parts, epsilon, ahead=0, grid=()):
  """One (token, group of blocks) program. Shapes in `sparse_units`; refs: `ahead` arrays
  whose parts the programs ask the L2 cache for (`decode_kernels.PREFETCH`), z's partial sums
  [T, P, r], or with `epsilon` the attention programs' partial sums (Σx, Σ(x − x̄)²,
  products; `sparse_qkv_block_kernel._ff_partials`) and the LayerNorm's scale and bias, x
  then being the block's input; C2, c, W1, b1; with `parts`, W2, b2, the residual [T, d] if
  given and the parts [T, P, d]; else the outputs hidden [T, K] (float32) and rows [T, K]
  (int32). Loads in the order of `decode_kernels`' note: all that wait on nothing first, then
  the chosen rows of W1, b1 and W2 together."""
  decode_kernels.launch_dependents()
  ahead_refs, refs = refs[:ahead], refs[ahead:]
  t, p = pl.program_id(0), pl.program_id(1)
  chunks = [pl.ds(c * chunk, chunk) for c in range(n_chunks)]
  blocks = [p * group + g for g in range(group)]
  if epsilon is None:
    z_ref, c2_ref, cb_ref, w1_ref, b1_ref, *refs = refs
    z_parts = decode_kernels.load_pieces(lambda ps: z_ref[t, ps, :], z_ref.shape[1])
  else:
    sum_ref, m2_ref, products_ref, scale_ref, bias_ref, c2_ref, cb_ref, w1_ref, b1_ref, *refs = (
        refs)
    n_slices = sum_ref.shape[1]
    sums = decode_kernels.load_pieces(lambda ps: sum_ref[t, ps], n_slices)
    m2s = decode_kernels.load_pieces(lambda ps: m2_ref[t, ps], n_slices)
    products = [decode_kernels.load_pieces(lambda ps, i=i: products_ref[t, ps, i, :], n_slices)
                for i in range(3)]
    norms = [(scale_ref[cols], bias_ref[cols]) for cols in chunks]
  xs = [x_ref[t, cols] for cols in chunks]
  c2s = [c2_ref[:, pl.ds(k * n, n)] for k in blocks]
  cbs = [cb_ref[pl.ds(k * n, n)] for k in blocks]
  decode_kernels.prefetch_all(ahead_refs, grid)
  fixed = [c2_ref, cb_ref, b1_ref] + ([] if epsilon is None else [scale_ref, bias_ref])
  if parts:
    w2_ref, b2_ref, *residual_ref, out_ref = refs
    extras = [f32(b2_ref[cols]) for cols in chunks]
    if residual_ref:
      extras = [extra + f32(residual_ref[0][t, cols]) for extra, cols in zip(extras, chunks)]
    fixed.append(b2_ref)
  decode_kernels.keep(fixed, grid)
  # In float32 whatever the weights' dtype: summed in bfloat16, the controller's logits lose
  # the bits that decide its argmax.
  if epsilon is None:
    z = decode_kernels.sum_rows(z_parts)                                             # [r]
  else:
    mean, inv, z = merge_partials(sums, m2s, products, x_ref.shape[1], epsilon)
    xs = [decode_kernels.layer_norm_slice((x, *norm), (mean, inv))
          for x, norm in zip(xs, norms)]
  rows = []
  for k, c2, cb in zip(blocks, c2s, cbs):
    logits = jnp.sum(z[:, None] * f32(c2), axis=0) + f32(cb)                        # [N]
    best = jnp.max(logits)
    rows.append(k * n + jnp.min(jnp.where(logits == best, jnp.arange(n, dtype=jnp.int32), n)))
  b1s = [b1_ref[row] for row in rows]
  w1s = [[w1_ref[row, cols] for cols in chunks] for row in rows]
  if parts:
    w2s = [[w2_ref[row, cols] for cols in chunks] for row in rows]
  hidden = []
  for b1, w1 in zip(b1s, w1s):
    h = f32(b1) + sum(jnp.sum(f32(x) * f32(w)) for x, w in zip(xs, w1))
    hidden.append(jnp.maximum(h, 0.0))
  if not parts:
    hidden_ref, row_ref = refs
    for g, (h, row) in enumerate(zip(hidden, rows)):
      hidden_ref[t, p * group + g] = h
      row_ref[t, p * group + g] = row
    return
  first = (p == 0).astype(jnp.float32)   # program 0's part also carries b2 (and residual)
  for c, (cols, extra) in enumerate(zip(chunks, extras)):
    part = sum(h * f32(w2[c]) for h, w2 in zip(hidden, w2s))
    out_ref[t, p, cols] = part + first * extra


def _down_kernel(hidden_ref, row_ref, w2_ref, b2_ref, *refs, columns):
  """One (token, slice of columns) program: Σ_k hidden[k]·W2[row_k, cols] + b2 (+ residual),
  the chosen rows gathered GATHER at a time. Shapes in `sparse_units`."""
  decode_kernels.launch_dependents()
  *residual_ref, out_ref = refs
  t, c = pl.program_id(0), pl.program_id(1)
  cols = pl.ds(c * columns, columns)
  out = f32(b2_ref[cols])
  if residual_ref:
    out += f32(residual_ref[0][t, cols])
  for start, length in decode_kernels.pieces(hidden_ref.shape[1], largest=GATHER):
    blocks = pl.ds(start, length)
    w = f32(w2_ref[row_ref[t, blocks], cols])                                   # [length, C]
    out += jnp.sum(hidden_ref[t, blocks][:, None] * w, axis=0)
  out_ref[t, cols] = out.astype(out_ref.dtype)


def sparse_units(x, z, c2, cb, w1, b1, w2, b2, interpret=False, group=None, residual=None,
                 norm=None, ahead=()):
  """Sparse FF output for a few tokens: x [T, d], z = x·C1 [T, r] -> [T, d].

  Weights as `sparse_ff.py` keeps them: C2 [r, K, N], c [K, N], W1 and W2 [K, N, d],
  b1 [K, N], b2 [d] (K = d_ff / N blocks). The units are chosen by argmax, as in eval and
  predict mode; ties go to the lowest unit, as `jnp.argmax`. z may also come as P partial
  sums [T, P, r] (`norm_controller`'s), which the kernel adds. A `residual` [T, d] is added
  to the output inside the kernels (a residual block's x + FF(...), with no kernel of its
  own). With `norm` (scale [d], bias [d], ε), z is the attention programs' partial sums
  (`sparse_qkv_block_kernel.decode_step`'s with `ff_norm`) and x the block's input: each
  program finishes the LayerNorm and x·C1 from them. With `decode_kernels.PREFETCH` the
  units programs ask the L2 cache for the arrays `ahead` (what the next kernels read: the
  next attention block's fixed weights). With MOSAIC the units programs are Mosaic GPU's
  where the shapes fit: `sparse_ff_mosaic.units_parts`, or where the parts would be large
  `sparse_ff_mosaic.units_hidden` and then the `down` kernel.
  """
  n_tokens, d_model = x.shape
  r, n_blocks, n = c2.shape
  if norm is None and z.ndim == 2:
    z = z[:, None, :]
  mosaic = (MOSAIC and not (decode_kernels.PREFETCH and ahead)
            and sparse_ff_mosaic.fits(d_model, r, c2.dtype, n, None if norm is None else z))
  if mosaic and _writes_parts(n_tokens, n_blocks, d_model):   # one block a Mosaic program
    out = sparse_ff_mosaic.units_parts(x, z, c2, cb, w1, b1, w2, b2, residual, interpret, norm)
    return jnp.sum(out, axis=1).astype(x.dtype)
  w2 = w2.reshape(n_blocks * n, d_model)
  residual = [] if residual is None else [residual]
  if mosaic:
    hidden, rows = sparse_ff_mosaic.units_hidden(x, z, c2, cb, w1, b1, interpret, norm)
    return _down(hidden, rows, w2, b2, residual, interpret, x.dtype)
  if norm is None:
    z, epsilon = (z,), None
  else:
    *norm, epsilon = norm
    z = (*z, *norm)
  group = decode_kernels.largest_share(group or GROUP or min(8, max(1, n_blocks // 256)),
                                      n_blocks)
  parts = _writes_parts(n_tokens, n_blocks // group, d_model)
  chunk = decode_kernels.row_chunk(d_model)
  ahead = tuple(ahead) if decode_kernels.PREFETCH else ()
  grid = (n_tokens, n_blocks // group)
  kernel = functools.partial(_units_kernel, group=group, n=n, chunk=chunk,
                             n_chunks=d_model // chunk, parts=parts, epsilon=epsilon,
                             ahead=len(ahead), grid=grid)
  params = decode_kernels.triton_params(WARPS)
  inputs = (x, *ahead, *z, c2.reshape(r, n_blocks * n), cb.reshape(-1),
            w1.reshape(n_blocks * n, d_model), b1.reshape(-1))
  if parts:
    out = pl.pallas_call(
        kernel, grid=grid, interpret=interpret,
        compiler_params=params,
        out_shape=jax.ShapeDtypeStruct((n_tokens, n_blocks // group, d_model), jnp.float32),
    )(*inputs, w2, b2, *residual)
    return jnp.sum(out, axis=1).astype(x.dtype)
  hidden, rows = pl.pallas_call(
      kernel, grid=grid, interpret=interpret, compiler_params=params,
      out_shape=(jax.ShapeDtypeStruct((n_tokens, n_blocks), jnp.float32),
                 jax.ShapeDtypeStruct((n_tokens, n_blocks), jnp.int32)),
  )(*inputs)
  return _down(hidden, rows, w2, b2, residual, interpret, x.dtype)


def _down(hidden, rows, w2, b2, residual, interpret, dtype):
  """The `down` kernel: Σ_k hidden[k]·W2[rows_k] + b2 (+ the residual) [T, d] in `dtype`,
  COLUMNS of d a program. hidden [T, K], rows [T, K] of W2 [K·N, d]."""
  n_tokens, d_model = hidden.shape[0], w2.shape[1]
  columns = decode_kernels.largest_share(COLUMNS, d_model)
  return pl.pallas_call(
      functools.partial(_down_kernel, columns=columns), grid=(n_tokens, d_model // columns),
      interpret=interpret, compiler_params=decode_kernels.triton_params(WARPS),
      out_shape=jax.ShapeDtypeStruct((n_tokens, d_model), dtype),
  )(hidden, rows, w2, b2, *residual)


def ff_block(x, scale, bias, controller, units, epsilon, interpret=False, partials=None,
             ahead=()):
  """x + SparseFF(LayerNorm(x)) for a few tokens x [T, d] (trax's centred `LayerNorm` of
  scale and bias [d]; controller (C1, C2, c) and units (W1, b1, W2, b2) as `sparse_units`):
  `norm_controller`, then `sparse_units` with x as the residual; or, given the attention
  programs' `partials` for this block (`sparse_qkv_block_kernel.decode_step`'s with
  `ff_norm`), `sparse_units` alone. `ahead`: as `sparse_units`'."""
  c1, c2, cb = controller
  if partials is not None:
    return sparse_units(x, partials, c2, cb, *units, interpret=interpret, residual=x,
                        norm=(scale, bias, epsilon), ahead=ahead)
  normed, z = norm_controller(x, scale, bias, c1, epsilon, interpret)
  return sparse_units(normed, z, c2, cb, *units, interpret=interpret, residual=x, ahead=ahead)


def _norm_kernel(x_ref, scale_ref, bias_ref, c1_ref, xn_ref, z_ref, *, rows, sub, epsilon):
  """One (token, slice of rows of C1) program. Shapes in `norm_controller`. C1's rows and the
  slice are loaded before the row's statistics (`decode_kernels`' note on load order)."""
  decode_kernels.launch_dependents()
  t, p = pl.program_id(0), pl.program_id(1)
  slices = [pl.ds(p * rows + k * sub, sub) for k in range(rows // sub)]
  loaded = [decode_kernels.load_norm_slice(x_ref, scale_ref, bias_ref, t, cols)
            for cols in slices]
  c1s = [c1_ref[cols, :] for cols in slices]
  stats = decode_kernels.layer_norm_stats(x_ref, t, epsilon)
  z = None
  for cols, load, c1 in zip(slices, loaded, c1s):
    xn = decode_kernels.layer_norm_slice(load, stats)                                 # [sub]
    xn_ref[t, cols] = xn
    part = jnp.sum(f32(xn)[:, None] * f32(c1), axis=0)                                 # [r]
    z = part if z is None else z + part
  z_ref[t, p, :] = z


def norm_controller(x, scale, bias, c1, epsilon, interpret=False, rows=None):
  """The block's LayerNorm and the controller's first product, split over rows of C1.

  Args:
    x: [T, d], the residual stream.
    scale, bias: [d], the LayerNorm's weights (trax's `LayerNorm`, centred).
    c1: [d, r], the controller's first factor.
    epsilon: The LayerNorm's ε.
    interpret: Run in Pallas' interpreter (any backend).
    rows: Rows of C1 per program (a power of 2, capped at what divides d; None: NORM_ROWS,
      or with MOSAIC, where the shapes fit, `sparse_ff_mosaic.norm_controller`'s ROWS).

  Returns:
    (LayerNorm(x) [T, d] in x's dtype, partial sums of LayerNorm(x)·C1 [T, d / rows, r]),
    the inputs of `sparse_units`.
  """
  n_tokens, d_model = x.shape
  if MOSAIC and rows is None and sparse_ff_mosaic.fits(d_model, c1.shape[1], c1.dtype):
    return sparse_ff_mosaic.norm_controller(x, scale, bias, c1, epsilon, interpret)
  rows = decode_kernels.largest_share(rows or NORM_ROWS, d_model)
  kernel = functools.partial(_norm_kernel, rows=rows, sub=min(rows, 64), epsilon=epsilon)
  return pl.pallas_call(
      kernel, grid=(n_tokens, d_model // rows),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((n_tokens, d_model // rows, c1.shape[1]), jnp.float32)),
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(4),
  )(x, scale, bias, c1)
