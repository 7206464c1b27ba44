"""Sparse FF decoding as Pallas kernels: controller choice, gathered rows, ReLU, product.

The decoding half of §3.1 (`sparse_ff.py`) for calls of a few tokens. XLA runs it as about
six kernels per layer (the controller's second product, its argmax, two gathers, two
products), each of a few microseconds on a GPU while the layer reads well under a megabyte.
Here one kernel (`sparse_units`) does all of it for a group of G blocks of N units per program:

  logits[k] = z·C2[:, k] + c[k]                  z = x·C1, [d_lowrank]
  u[k]      = argmax(logits[k])                  the chosen unit of block k
  h[k]      = relu(x·W1[k, u[k]] + b1[k, u[k]])
  part[p]   = Σ_{k of program p} h[k]·W2[k, u[k]]           [d_model]

and XLA adds the programs' parts in one reduction (program 0's part carries b2, and a
residual if given). Reads per token: z, the G·N controller columns and the 2·(d_ff / N) chosen
rows of W1 and W2, as `gathered_units` does. z comes from XLA (`SparseFFDecode`) or, in a
residual block (`SparseFFResidual`), from a second kernel (`norm_controller`): the block's
LayerNorm and x·C1, as partial sums over slices of d_model that `sparse_units` adds. The
block is then two kernels and the sum (on an H200 at the 800M shape 2.3, 3.8 and 1.5 µs).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs the same kernels on any
backend (the tests do, on the CPU). `decode_kernels.use(name)` chooses where `sparse_ff.py`
calls them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_scaling.layers import decode_kernels

# Blocks of N units per `sparse_units` program (None: one, or up to 8 while 256 programs or
# more per token remain; at 17B's 256 blocks one a program ran 11% faster than two) and warps
# per program.
GROUP, WARPS = None, 4
NORM_ROWS = 64  # rows of C1 per `norm_controller` program (a power of 2)


def fits(d_lowrank, block):
  """Whether `sparse_units` (and so the FF block, `norm_controller` then `sparse_units`) takes
  these shapes: the controller's rank and N powers of 2. d_model may be any: rows and partial
  sums are loaded in power-of-2 pieces."""
  return decode_kernels.is_power_of_2(d_lowrank, block)


def _kernel(x_ref, z_ref, c2_ref, cb_ref, w1_ref, b1_ref, w2_ref, b2_ref, *refs, group, n,
            chunk, n_chunks):
  """One (token, group of blocks) program. Shapes in `sparse_units`; refs: the residual
  [T, d] if there is one, then the output."""
  *residual_ref, out_ref = refs
  t, p = pl.program_id(0), pl.program_id(1)
  first = (p == 0).astype(jnp.float32)   # program 0's part also carries b2 (and residual)
  # In float32 whatever the weights' dtype: summed in bfloat16, the controller's logits lose
  # the bits that decide its argmax.
  z = decode_kernels.sum_pieces(lambda parts: z_ref[t, parts, :], z_ref.shape[1])   # [r]
  hidden, rows = [], []
  for g in range(group):
    k = p * group + g
    logits = jnp.sum(z[:, None] * c2_ref[:, pl.ds(k * n, n)].astype(jnp.float32), axis=0)
    logits = logits + cb_ref[pl.ds(k * n, n)].astype(jnp.float32)   # [N]
    best = jnp.max(logits)
    unit = jnp.min(jnp.where(logits == best, jnp.arange(n, dtype=jnp.int32), n))
    row = k * n + unit
    h = b1_ref[row].astype(jnp.float32)
    for c in range(n_chunks):
      x = x_ref[t, pl.ds(c * chunk, chunk)].astype(jnp.float32)
      h += jnp.sum(x * w1_ref[row, pl.ds(c * chunk, chunk)].astype(jnp.float32))
    hidden.append(jnp.maximum(h, 0.0))
    rows.append(row)
  for c in range(n_chunks):
    part = hidden[0] * w2_ref[rows[0], pl.ds(c * chunk, chunk)].astype(jnp.float32)
    for g in range(1, group):
      part += hidden[g] * w2_ref[rows[g], pl.ds(c * chunk, chunk)].astype(jnp.float32)
    extra = b2_ref[pl.ds(c * chunk, chunk)].astype(jnp.float32)
    if residual_ref:
      extra += residual_ref[0][t, pl.ds(c * chunk, chunk)].astype(jnp.float32)
    out_ref[t, p, pl.ds(c * chunk, chunk)] = part + first * extra


def sparse_units(x, z, c2, cb, w1, b1, w2, b2, interpret=False, group=None, residual=None):
  """Sparse FF output for a few tokens: x [T, d], z = x·C1 [T, r] -> [T, d].

  Weights as `sparse_ff.py` keeps them: C2 [r, K, N], c [K, N], W1 and W2 [K, N, d],
  b1 [K, N], b2 [d] (K = d_ff / N blocks). The units are chosen by argmax, as in eval and
  predict mode; ties go to the lowest unit, as `jnp.argmax`. z may also come as P partial
  sums [T, P, r] (`norm_controller`'s), which the kernel adds. A `residual` [T, d] is added
  to the output inside the kernel (a residual block's x + FF(...), with no kernel of its own).
  """
  if z.ndim == 2:
    z = z[:, None, :]
  n_tokens, d_model = x.shape
  r, n_blocks, n = c2.shape
  group = decode_kernels.largest_share(group or GROUP or min(8, max(1, n_blocks // 256)),
                                      n_blocks)
  chunk = decode_kernels.row_chunk(d_model)
  kernel = functools.partial(_kernel, group=group, n=n, chunk=chunk,
                             n_chunks=d_model // chunk)
  parts = pl.pallas_call(
      kernel, grid=(n_tokens, n_blocks // group),
      out_shape=jax.ShapeDtypeStruct((n_tokens, n_blocks // group, d_model), jnp.float32),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=WARPS),   # Triton, not Mosaic GPU
  )(x, z, c2.reshape(r, n_blocks * n), cb.reshape(-1), w1.reshape(n_blocks * n, d_model),
    b1.reshape(-1), w2.reshape(n_blocks * n, d_model), b2,
    *([] if residual is None else [residual]))
  return jnp.sum(parts, axis=1).astype(x.dtype)


def _norm_kernel(x_ref, scale_ref, bias_ref, c1_ref, xn_ref, z_ref, *, rows, sub, epsilon):
  """One (token, slice of rows of C1) program. Shapes in `norm_controller`."""
  t, p = pl.program_id(0), pl.program_id(1)
  stats = decode_kernels.layer_norm_stats(x_ref, t, epsilon)
  z = None
  for k in range(rows // sub):
    cols = pl.ds(p * rows + k * sub, sub)
    xn = decode_kernels.layer_norm_slice(x_ref, scale_ref, bias_ref, t, cols, stats)  # [sub]
    xn_ref[t, cols] = xn
    part = jnp.sum(xn.astype(jnp.float32)[:, None]
                   * c1_ref[cols, :].astype(jnp.float32), axis=0)                      # [r]
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
    rows: Rows of C1 per program (a power of 2, capped at what divides d; None: NORM_ROWS).

  Returns:
    (LayerNorm(x) [T, d] in x's dtype, partial sums of LayerNorm(x)·C1 [T, d / rows, r]),
    the inputs of `sparse_units`.
  """
  n_tokens, d_model = x.shape
  rows = decode_kernels.largest_share(rows or NORM_ROWS, d_model)
  kernel = functools.partial(_norm_kernel, rows=rows, sub=min(rows, 64), epsilon=epsilon)
  return pl.pallas_call(
      kernel, grid=(n_tokens, d_model // rows),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((n_tokens, d_model // rows, c1.shape[1]), jnp.float32)),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4),   # Triton, not Mosaic GPU
  )(x, scale, bias, c1)
