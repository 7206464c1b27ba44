"""Sparse FF's decoding kernels in Pallas' Mosaic GPU backend: the first moved off Triton.

jax 0.11 deprecates Pallas' Triton backend, which every decoding kernel here is written for
(`decode_kernels.py`), in favour of Mosaic GPU. This module holds `sparse_ff_kernel`'s two
kernels of an FF block that follows no attention block's partial sums, written for Mosaic
GPU, where `sparse_ff_kernel.MOSAIC` asks for them: off by default, as they are not yet timed
on a GPU. One warpgroup a program.

`norm_controller`, one program per (token, ROWS rows of C1): the block's LayerNorm of those
columns of x, written out, and their part of the controller's first product,

  z_p = LayerNorm(x)[cols]·C1[cols, :]        [r], a partial sum

`units_parts`, one program per (token, block of N units), in the units kernel's 'parts' form
(each program writes its block's part of the output, XLA adds the parts):

  logits = z·C2[:, block] + c[block]          z = Σ_p z_p, [r]
  u      = argmax(logits)                      ties to the lowest unit, as `jnp.argmax`
  part   = relu(x·W1[u] + b1[u])·W2[u]         + b2 (+ the residual) in program 0's part

Mosaic GPU differs from Triton in what a program may hold and how it loads (jax 0.10-0.12):
an array is laid out over the warpgroup's 128 threads, and a reduction along one axis needs
the tiled layout of Hopper's matrix units (WGMMA: [m, n], m a multiple of 64, n of 8), which
loads only from shared memory, and is written back through it. So the slices of C1 [ROWS, r]
and C2 [r, N], the LayerNorm's weights and c are copied into shared memory by the TMA unit
(tiled and swizzled, as the layout needs), as are x's columns and z's partial sums; whole rows
[d] (x for its statistics, W1's and W2's chosen rows) are read straight from the card's memory
in the strided layout (d a multiple of 128). What the backend brings that Triton's does not:
a program runs `griddepcontrol.wait` itself, so the copies of the fixed weights are issued
before it, while the kernel before this one still runs; under Triton, XLA places the wait at
the kernel's entry (`decode_kernels`' note on launching early). Not yet here: the requests
that the Triton kernels make in bfloat16 for the L2 cache to keep their fixed weights
(`decode_kernels.keep`).

Pallas' GPU interpreter runs the kernels on any backend (`interpret=True`; the tests do, on
the CPU); it has no rule for the layout casts or the grid dependency control, which it skips
(`_Program`).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as error:   # a JAX without the backend: `fits` says no
  plgpu = None
  MISSING = f'this JAX ({jax.__version__}) has no Pallas Mosaic GPU backend ({error})'
else:
  MISSING = None

SWIZZLE = 128   # bytes: the TMA unit's swizzle of C1's and C2's slices in shared memory
ROWS = 64       # rows of C1 per `norm_controller` program: the matrix units' layout's 64


def fits(d_model, d_lowrank, dtype, block=None):
  """Whether `norm_controller` (and, given N `block`, `units_parts`) take these shapes:
  d_model a multiple of 128 (the warpgroup's threads), the controller's rank a multiple of 64
  and of the swizzle's width, as N is (32 float32 or 64 bfloat16 columns; the matrix units'
  layout)."""
  width = SWIZZLE // jnp.dtype(dtype).itemsize
  return (MISSING is None and d_model % 128 == 0 and d_lowrank % 64 == 0
          and d_lowrank % width == 0 and (block is None or block % width == 0))


def _swizzled(shape, dtype):
  """A shared-memory array [m, n] tiled and swizzled for the TMA unit and the matrix units'
  layout (n a multiple of SWIZZLE bytes)."""
  tiling = plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(SWIZZLE)))


class _Program:
  """What a program body calls that Pallas' GPU interpreter has no rule for: outside it, the
  grid dependency control and the layouts; inside, nothing and the arrays as they are."""

  def __init__(self, interpret):
    self.interpret = interpret

  def launch_dependents(self):
    if not self.interpret:
      plgpu.griddepcontrol_launch_dependents()

  def wait(self):
    """Until the kernels before this one have finished and their writes are visible."""
    if not self.interpret:
      plgpu.griddepcontrol_wait()

  def load(self, ref, layout):
    """ref[...] in float32, in `layout`."""
    value = ref[...] if self.interpret else plgpu.layout_cast(ref[...], layout)
    return value.astype(jnp.float32)

  def iota(self, n, layout):
    return (lax.iota(jnp.int32, n) if self.interpret
            else plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=layout))


# The matrix units' layout of [m, n] arrays, and of the [m] and [n] vectors along them.
MATRIX = plgpu.Layout.WGMMA if plgpu else None
ALONG_ROWS = MATRIX.reduce(1) if plgpu else None
ALONG_COLUMNS = MATRIX.reduce(0) if plgpu else None


def _norm_kernel(x_g, scale_g, bias_g, c1_g, xn_g, z_g, c1_s, scale_s, bias_s, x_s, xn_s, z_s,
                 barriers, *, epsilon, interpret):
  """One (token, ROWS columns of x) program. Shapes in `norm_controller`; the scratch: C1's
  rows [ROWS, r], the LayerNorm's scale and bias, x's columns and LayerNorm(x)'s [ROWS], z's
  part [r], four barriers."""
  program = _Program(interpret)
  t, p = lax.axis_index('t'), lax.axis_index('p')
  program.launch_dependents()
  cols = pl.ds(p * ROWS, ROWS)
  plgpu.copy_gmem_to_smem(c1_g.at[cols, :], c1_s, barriers.at[0])
  plgpu.copy_gmem_to_smem(scale_g.at[cols], scale_s, barriers.at[1])
  plgpu.copy_gmem_to_smem(bias_g.at[cols], bias_s, barriers.at[2])
  program.wait()
  plgpu.copy_gmem_to_smem(x_g.at[t, cols], x_s, barriers.at[3])
  x = x_g[t, :].astype(jnp.float32)                                                    # [d]
  mean = jnp.sum(x) / x.shape[0]
  inv = lax.rsqrt(jnp.sum((x - mean) * (x - mean)) / x.shape[0] + epsilon)
  for i in range(4):
    plgpu.barrier_wait(barriers.at[i])
  xn = ((program.load(x_s, ALONG_ROWS) - mean) * inv * program.load(scale_s, ALONG_ROWS)
        + program.load(bias_s, ALONG_ROWS)).astype(x_s.dtype)                        # [ROWS]
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
                     f'GPU\'s layouts ({MISSING or "see fits"})')
  kernel = plgpu.kernel(
      functools.partial(_norm_kernel, epsilon=epsilon, interpret=interpret),
      out_type=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((n_tokens, d_model // ROWS, rank), jnp.float32)),
      grid=(n_tokens, d_model // ROWS), grid_names=('t', 'p'),
      scratch_types=[_swizzled((ROWS, rank), c1.dtype), plgpu.SMEM((ROWS,), scale.dtype),
                     plgpu.SMEM((ROWS,), bias.dtype), plgpu.SMEM((ROWS,), x.dtype),
                     plgpu.SMEM((ROWS,), x.dtype), plgpu.SMEM((rank,), jnp.float32),
                     plgpu.Barrier(num_barriers=4)],
      interpret=decode_kernels.mosaic_interpreter() if interpret else None)
  return kernel(x, scale, bias, c1)


def _units_kernel(x_g, z_g, c2_g, cb_g, w1_g, b1_g, w2_g, b2_g, *refs, n, interpret):
  """One (token, block) program. Shapes in `units_parts`; refs: the residual [T, d] if given,
  the parts [T, K, d] (float32), then the scratch: z [P, r], C2's slice [r, N], c's [N] in
  shared memory and three barriers."""
  *residual_g, out_g, z_s, c2_s, cb_s, barriers = refs
  program = _Program(interpret)
  t, k = lax.axis_index('t'), lax.axis_index('k')
  program.launch_dependents()
  units = pl.ds(k * n, n)
  plgpu.copy_gmem_to_smem(c2_g.at[:, units], c2_s, barriers.at[0])
  plgpu.copy_gmem_to_smem(cb_g.at[units], cb_s, barriers.at[1])
  extra = b2_g[...].astype(jnp.float32)                                                # [d]
  program.wait()
  plgpu.copy_gmem_to_smem(z_g.at[t], z_s, barriers.at[2])
  x = x_g[t, :].astype(jnp.float32)                                                    # [d]
  if residual_g:
    extra = extra + residual_g[0][t, :].astype(jnp.float32)
  for i in range(3):
    plgpu.barrier_wait(barriers.at[i])
  z = sum(program.load(z_s.at[p], ALONG_ROWS) for p in range(z_s.shape[0]))             # [r]
  c2 = program.load(c2_s, MATRIX)                                                   # [r, N]
  logits = (jnp.sum(lax.broadcast_in_dim(z, c2.shape, (0,)) * c2, axis=0)
            + program.load(cb_s, ALONG_COLUMNS))                                       # [N]
  best = jnp.max(logits)
  row = k * n + jnp.min(jnp.where(logits == best, program.iota(n, ALONG_COLUMNS), n))
  h = jnp.sum(x * w1_g[row, :].astype(jnp.float32)) + b1_g[row].astype(jnp.float32)
  part = jnp.maximum(h, 0.0) * w2_g[row, :].astype(jnp.float32)
  out_g[t, k, :] = part + (k == 0).astype(jnp.float32) * extra


def units_parts(x, z, c2, cb, w1, b1, w2, b2, residual=None, interpret=False):
  """Each block's part of Sparse FF's output for a few tokens: [T, K, d] float32, whose sum
  over K is `sparse_ff_kernel.sparse_units`' output.

  Args:
    x: [T, d], the layer's input (in a residual block, its LayerNorm).
    z: [T, P, r] float32: P partial sums of x·C1 (`sparse_ff_kernel.norm_controller`'s), or
      one.
    c2, cb, w1, b1, w2, b2: as `sparse_ff.py` keeps them: C2 [r, K, N], c [K, N], W1 and W2
      [K, N, d], b1 [K, N], b2 [d].
    residual: [T, d] or None, added with b2 to block 0's part.
    interpret: run in Pallas' GPU interpreter (any backend).
  """
  n_tokens, d_model = x.shape
  rank, n_blocks, n = c2.shape
  if not fits(d_model, rank, c2.dtype, n):
    raise ValueError(f'units_parts: d_model {d_model}, rank {rank} and N {n} do not fit '
                     f'Mosaic GPU\'s layouts ({MISSING or "see fits"})')
  kernel = plgpu.kernel(
      functools.partial(_units_kernel, n=n, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((n_tokens, n_blocks, d_model), jnp.float32),
      grid=(n_tokens, n_blocks), grid_names=('t', 'k'),
      scratch_types=[plgpu.SMEM(z.shape[1:], jnp.float32),
                     _swizzled((rank, n), c2.dtype),
                     plgpu.SMEM((n,), cb.dtype), plgpu.Barrier(num_barriers=3)],
      interpret=decode_kernels.mosaic_interpreter() if interpret else None)
  return kernel(x, z.astype(jnp.float32), c2.reshape(rank, n_blocks * n), cb.reshape(-1),
                w1.reshape(n_blocks * n, d_model), b1.reshape(-1),
                w2.reshape(n_blocks * n, d_model), b2, *([] if residual is None else [residual]))
