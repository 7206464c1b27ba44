"""Sparse FF's decoding kernels in Pallas' Mosaic GPU backend (`mosaic_kernels.py`).

Two of `sparse_ff_kernel`'s kernels written for Mosaic GPU, the backend JAX keeps, used where
`sparse_ff_kernel.MOSAIC` asks for them: off by default, as on an H200 they are slower than the
Triton kernels at 800M and no faster at 17B (docs/decoding_gpu.md, "Mosaic GPU").

`norm_controller`, one program per (token, ROWS rows of C1): the FF block's LayerNorm of those
columns of x, written out, and their part of the controller's first product,

  z_p = LayerNorm(x)[cols]·C1[cols, :]        [r], a partial sum

`units_parts`, one program per (token, block of N units), in the units kernel's 'parts' form
(each program writes its block's part of the output, XLA adds the parts):

  logits = z·C2[:, block] + c[block]          z = Σ_p z_p, [r]; or, chained after an
  u      = argmax(logits)                     attention block, LayerNorm(x)·C1 merged from
  part   = relu(x·W1[u] + b1[u])·W2[u]        its programs' partial sums (`_merged`)
           + b2 (+ the residual) in program 0's part;  ties to the lowest unit, as argmax

`units_hidden`, the same programs in the kernel's other form, where the parts would be large
(17B: 256 parts of 9216): each writes relu(x·W1[u] + b1[u]) and u's row, and
`sparse_ff_kernel`'s `down` kernel (Triton's) multiplies W2's chosen rows.

The kernels follow Mosaic GPU's rules (`mosaic_kernels.py`): the slices of C1 [ROWS, r] and
C2 [r, N], the LayerNorm's weights, c, x's columns and z's partial sums are copied into shared
memory by the TMA unit (each copy a multiple of 128 bytes), and C2's slice is read transposed,
[N, r], as the 800M and 17B ranks (16, 32) are below the matrix layouts' 64 rows; whole rows
[d] (x for its statistics, W1's and W2's chosen rows) are read straight from the card's memory
(d a multiple of 128). Each program issues the copies of its fixed weights before it waits for
the kernel before it. Not yet here: the requests that the Triton kernels make in bfloat16 for
the L2 cache to keep their fixed weights (`decode_kernels.keep`).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers import sparse_ff_kernel   # which imports this module: used in calls
from sparse_scaling.layers.mosaic_kernels import ALONG_COLUMNS_T
from sparse_scaling.layers.mosaic_kernels import ALONG_ROWS
from sparse_scaling.layers.mosaic_kernels import ALONG_ROWS_T
from sparse_scaling.layers.mosaic_kernels import MATRIX
from sparse_scaling.layers.mosaic_kernels import TRANSPOSED
from sparse_scaling.layers.mosaic_kernels import plgpu

ROWS = 64       # rows of C1 per `norm_controller` program: the matrix units' layout's 64


def fits(d_model, d_lowrank, dtype, block=None, partials=None):
  """Whether `norm_controller` (and, given N `block`, `units_parts`) take these shapes:
  d_model a multiple of 128 (the warpgroup's threads), the controller's rank a multiple of 8
  and of 32 bytes, N a multiple of 64 (the matrix units' layout; 800M: rank 16, N 64; 17B:
  32, 256); and given the attention programs' `partials` (Σx [T, P], ...), P a multiple of
  64 (800M: 64)."""
  return (mosaic_kernels.MISSING is None and d_model % 128 == 0
          and mosaic_kernels.swizzles(d_lowrank, dtype) and (block is None or block % 64 == 0)
          and (partials is None or partials[0].shape[1] % 64 == 0))


def _norm_kernel(x_g, scale_g, bias_g, c1_g, xn_g, z_g, c1_s, scale_s, bias_s, x_s, xn_s, z_s,
                 barriers, *, epsilon, interpret):
  """One (token, ROWS columns of x) program. Shapes in `norm_controller`; the scratch: C1's
  rows [ROWS, r], the LayerNorm's scale and bias, x's columns and LayerNorm(x)'s [ROWS], z's
  part [r], four barriers."""
  program = mosaic_kernels.Program(interpret)
  t, p = lax.axis_index('t'), lax.axis_index('p')
  program.launch_dependents()
  cols = pl.ds(p * ROWS, ROWS)
  copy = mosaic_kernels.Copies(barriers)
  copy(c1_g.at[cols, :], c1_s)
  copy(scale_g.at[cols], scale_s)
  copy(bias_g.at[cols], bias_s)
  program.wait()
  copy(x_g.at[t, cols], x_s)
  mean, inv = mosaic_kernels.row_stats(x_g[t, :], epsilon)                         # of x [d]
  copy.wait()
  xn = program.layer_norm(x_s, scale_s, bias_s, (mean, inv))
  xn_s[...] = xn
  c1 = program.load(c1_s, MATRIX)                                                 # [ROWS, r]
  z_s[...] = jnp.sum(lax.broadcast_in_dim(xn.astype(jnp.float32), c1.shape, (0,)) * c1, axis=0)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(xn_s, xn_g.at[t, cols])
  plgpu.copy_smem_to_gmem(z_s, z_g.at[t, p])
  plgpu.wait_smem_to_gmem(0)


def norm_controller(x, scale, bias, c1, epsilon, interpret=False):
  """`sparse_ff_kernel.norm_controller` in Mosaic GPU, ROWS rows of C1 a program: x [T, d],
  the LayerNorm's scale and bias [d], C1 [d, r] -> (LayerNorm(x) [T, d] in x's dtype, partial
  sums of LayerNorm(x)·C1 [T, d / ROWS, r] float32)."""
  n_tokens, d_model = x.shape
  rank = c1.shape[1]
  if not fits(d_model, rank, c1.dtype):
    raise ValueError(f'norm_controller: d_model {d_model} and rank {rank} do not fit Mosaic '
                     f'GPU\'s layouts ({mosaic_kernels.MISSING or "see fits"})')
  kernel = mosaic_kernels.kernel(
      functools.partial(_norm_kernel, epsilon=epsilon, interpret=interpret),
      out_type=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((n_tokens, d_model // ROWS, rank), jnp.float32)),
      grid=(n_tokens, d_model // ROWS), grid_names=('t', 'p'),
      scratch_types=[mosaic_kernels.swizzled((ROWS, rank), c1.dtype),
                     plgpu.SMEM((ROWS,), scale.dtype), plgpu.SMEM((ROWS,), bias.dtype),
                     plgpu.SMEM((ROWS,), x.dtype), plgpu.SMEM((ROWS,), x.dtype),
                     plgpu.SMEM((rank,), jnp.float32), plgpu.Barrier(num_barriers=4)],
      interpret=interpret)
  return kernel(x, scale, bias, c1)


def _merged(program, sums_s, m2_s, products_s, z_s, d_model, epsilon):
  """(mean, 1/σ, z = LayerNorm(x)·C1 [r] along the columns of C2's slice transposed) of a row
  from the attention programs' P partial sums in shared memory, merged as the Triton kernel
  merges them (`sparse_ff_kernel.merge_partials`). The sums over P leave z along the columns
  of a [P, r] matrix, another layout: z_s [r] moves it."""
  sums, m2s = (program.load(ref, ALONG_ROWS) for ref in (sums_s, m2_s))               # [P]
  products = [[program.load(ref, MATRIX)] for ref in products_s]                   # [P, r]
  mean, inv, z_s[...] = sparse_ff_kernel.merge_partials([sums], [m2s], products, d_model,
                                                        epsilon)
  return mean, inv, program.load(z_s, ALONG_COLUMNS_T)


def _units_kernel(*refs, n, n_inputs, chained, parts, epsilon, interpret):
  """One (token, block) program. Shapes in `units_parts` and `units_hidden`. refs: the
  inputs (`n_inputs`); the outputs: with `parts` the parts [T, K, d] (float32), else hidden
  [T, K] (float32) and rows [T, K] (int32); then the scratch: C2's slice [r, N] and c's [N] in
  shared memory; z [P, r] and three barriers, or, `chained`, the partial sums Σx and
  Σ(x − x̄)² [P], the three products [P, r], z [r] and seven barriers."""
  inputs, outputs = refs[:n_inputs], refs[n_inputs:n_inputs + (1 if parts else 2)]
  c2_s, cb_s, *scratch = refs[n_inputs + len(outputs):]
  if chained:
    x_g, sums_g, m2_g, products_g, scale_g, bias_g, c2_g, cb_g, w1_g, b1_g, *rest = inputs
    sums_s, m2_s, *products_s, z_s, barriers = scratch
  else:
    x_g, z_g, c2_g, cb_g, w1_g, b1_g, *rest = inputs
    z_s, barriers = scratch
  program = mosaic_kernels.Program(interpret)
  t, k = lax.axis_index('t'), lax.axis_index('k')
  program.launch_dependents()
  units = pl.ds(k * n, n)
  copy = mosaic_kernels.Copies(barriers)
  copy(c2_g.at[:, units], c2_s)
  copy(cb_g.at[units], cb_s)
  if parts:
    w2_g, b2_g, *residual_g = rest
    extra = b2_g[...].astype(jnp.float32)                                              # [d]
  if chained:
    norm = scale_g[...], bias_g[...]
  program.wait()
  if chained:
    copy(sums_g.at[t], sums_s)
    copy(m2_g.at[t], m2_s)
    for i, products in enumerate(products_s):
      copy(products_g.at[t, :, i, :], products)
  else:
    copy(z_g.at[t], z_s)
  x = x_g[t, :]                                                                        # [d]
  if parts and residual_g:
    extra = extra + residual_g[0][t, :].astype(jnp.float32)
  copy.wait()
  if chained:
    mean, inv, z = _merged(program, sums_s, m2_s, products_s, z_s, x.shape[0], epsilon)
    x = decode_kernels.layer_norm_slice((x, *norm), (mean, inv))
  else:
    z = sum(program.load(z_s.at[p], ALONG_COLUMNS_T) for p in range(z_s.shape[0]))      # [r]
  c2 = program.load_transposed(c2_s)                                        # C2's slice.T [N, r]
  z = program.cast(lax.broadcast_in_dim(z, c2.shape, (1,)), TRANSPOSED)
  logits = jnp.sum(z * c2, axis=1) + program.load(cb_s, ALONG_ROWS_T)                  # [N]
  best = jnp.max(logits)
  row = k * n + jnp.min(jnp.where(logits == best, program.iota(n, ALONG_ROWS_T), n))
  h = jnp.sum(x.astype(jnp.float32) * w1_g[row, :].astype(jnp.float32)) + b1_g[row].astype(
      jnp.float32)
  if parts:
    part = jnp.maximum(h, 0.0) * w2_g[row, :].astype(jnp.float32)
    outputs[0][t, k, :] = part + (k == 0).astype(jnp.float32) * extra
  else:
    hidden_g, rows_g = outputs
    hidden_g[t, k] = jnp.maximum(h, 0.0)
    rows_g[t, k] = row


def units_parts(x, z, c2, cb, w1, b1, w2, b2, residual=None, interpret=False, norm=None):
  """Each block's part of Sparse FF's output for a few tokens: [T, K, d] float32, whose sum
  over K is `sparse_ff_kernel.sparse_units`' output.

  Args:
    x: [T, d], the layer's input (in a residual block, its LayerNorm; with `norm`, the
      block's input).
    z: [T, P, r] float32: P partial sums of x·C1 (`sparse_ff_kernel.norm_controller`'s, or
      one); with `norm`, the attention programs' partial sums for this block (Σx [T, P],
      Σ(x − x̄)² [T, P], products [T, P, 3, r]; `sparse_qkv_block_kernel._ff_partials`).
    c2, cb, w1, b1, w2, b2: as `sparse_ff.py` keeps them: C2 [r, K, N], c [K, N], W1 and W2
      [K, N, d], b1 [K, N], b2 [d].
    residual: [T, d] or None, added with b2 to block 0's part.
    interpret: run in Pallas' GPU interpreter (any backend).
    norm: (scale [d], bias [d], ε) of the block's LayerNorm, which each program finishes
      from the partial sums, or None.
  """
  n_tokens, d_model = x.shape
  _, n_blocks, n = c2.shape
  residual = () if residual is None else (residual,)
  return _units('units_parts', x, z, c2, cb, w1, b1,
                (w2.reshape(n_blocks * n, d_model), b2, *residual), interpret, norm,
                jax.ShapeDtypeStruct((n_tokens, n_blocks, d_model), jnp.float32))


def units_hidden(x, z, c2, cb, w1, b1, interpret=False, norm=None):
  """Each block's chosen unit and its activation, for `sparse_ff_kernel`'s `down` kernel to
  multiply W2's chosen rows (where the parts would be large: 17B's 256 blocks of d_model
  9216): hidden [T, K] float32, and rows [T, K] int32, the chosen unit's row of W1 and W2
  taken as [K·N, d]. Arguments as `units_parts`'."""
  n_tokens, _ = x.shape
  _, n_blocks, _ = c2.shape
  return _units('units_hidden', x, z, c2, cb, w1, b1, (), interpret, norm,
                (jax.ShapeDtypeStruct((n_tokens, n_blocks), jnp.float32),
                 jax.ShapeDtypeStruct((n_tokens, n_blocks), jnp.int32)))


def _units(name, x, z, c2, cb, w1, b1, rest, interpret, norm, out_type):
  """The units kernel with `rest` (W2, b2 and the residual, for the parts; or none) after the
  inputs, its outputs `out_type`."""
  n_tokens, d_model = x.shape
  rank, n_blocks, n = c2.shape
  if not fits(d_model, rank, c2.dtype, n, None if norm is None else z):
    raise ValueError(f'{name}: d_model {d_model}, rank {rank}, N {n}'
                     f'{"" if norm is None else f" and {z[0].shape[1]} partial sums"} do not '
                     f'fit Mosaic GPU\'s layouts ({mosaic_kernels.MISSING or "see fits"})')
  if norm is None:
    # A copy into shared memory moves a multiple of 128 bytes (one a thread of the warpgroup):
    # zero partial sums pad z's (one [r] where the controller's product comes from XLA).
    step = 128 // math.gcd(128, rank * 4)
    rows = -(-z.shape[1] // step) * step
    z = jnp.pad(z.astype(jnp.float32), ((0, 0), (0, rows - z.shape[1]), (0, 0)))
    inputs, epsilon = (x, z), None
    scratch = [plgpu.SMEM(z.shape[1:], jnp.float32), plgpu.Barrier(num_barriers=3)]
  else:
    *norm, epsilon = norm
    (sums, m2s, products), n_partials = z, z[0].shape[1]
    inputs = (x, sums, m2s, products, *norm)
    scratch = [plgpu.SMEM((n_partials,), jnp.float32), plgpu.SMEM((n_partials,), jnp.float32),
               *[mosaic_kernels.swizzled((n_partials, rank), jnp.float32)] * 3,
               plgpu.SMEM((rank,), jnp.float32), plgpu.Barrier(num_barriers=7)]
  inputs += (c2.reshape(rank, n_blocks * n), cb.reshape(-1), w1.reshape(n_blocks * n, d_model),
             b1.reshape(-1), *rest)
  kernel = mosaic_kernels.kernel(
      functools.partial(_units_kernel, n=n, n_inputs=len(inputs), chained=norm is not None,
                        parts=bool(rest), epsilon=epsilon, interpret=interpret),
      out_type=out_type, grid=(n_tokens, n_blocks), grid_names=('t', 'k'),
      scratch_types=[mosaic_kernels.swizzled((rank, n), c2.dtype), plgpu.SMEM((n,), cb.dtype),
                     *scratch],
      interpret=interpret)
  return kernel(*inputs)
