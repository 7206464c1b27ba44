"""Sparse FF's units kernel in Pallas' Mosaic GPU backend: the first decoding kernel moved off
Triton.

jax 0.11 deprecates Pallas' Triton backend, which every decoding kernel here is written for
(`decode_kernels.py`), in favour of Mosaic GPU. This module is `sparse_ff_kernel`'s `units`
kernel in its 'parts' form (each program writes its block's part of the output, XLA adds the
parts) written for Mosaic GPU, where `sparse_ff_kernel.MOSAIC` asks for it: off by default, as
it is not yet timed on a GPU. One program per (token, block of N units), one warpgroup:

  logits = z·C2[:, block] + c[block]          z = Σ_p z_p, [r] (the controller's partial sums)
  u      = argmax(logits)                      ties to the lowest unit, as `jnp.argmax`
  part   = relu(x·W1[u] + b1[u])·W2[u]         + b2 (+ the residual) in program 0's part

Mosaic GPU differs from Triton in what a program may hold and how it loads (jax 0.10-0.12):
an array is laid out over the warpgroup's 128 threads, and a reduction along one axis needs
the tiled layout of Hopper's matrix units (WGMMA: [m, n], m a multiple of 64, n of 8), which
loads only from shared memory. So the controller's slice of C2 [r, N] and its biases are
copied into shared memory by the TMA unit (tiled and swizzled, as the layout needs), and z's
partial sums too; the rows of W1 and W2 [d] are read straight from the card's memory in the
strided layout (d a multiple of 128). What the backend brings that Triton's does not: the
program runs `griddepcontrol.wait` itself, so the copies of the fixed weights (C2's slice, c,
b2) are issued before it, while the kernel before this one still runs; under Triton, XLA
places the wait at the kernel's entry (`decode_kernels`' note on launching early). Not yet
here: the requests that the Triton kernels make in bfloat16 for the L2 cache to keep their
fixed weights (`decode_kernels.keep`).

Pallas' GPU interpreter runs the kernel on any backend (`interpret=True`; the tests do, on
the CPU); it has no rule for the layout casts or the grid dependency control, which it skips.
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

SWIZZLE = 128   # bytes: the TMA unit's swizzle of C2's slice in shared memory


def fits(d_model, d_lowrank, block, dtype):
  """Whether `units_parts` takes these shapes: the controller's rank a multiple of 64 and N a
  multiple of the swizzle's width (32 float32 or 64 bfloat16 units; the matrix units'
  layout), d_model a multiple of 128 (the warpgroup's threads)."""
  width = SWIZZLE // jnp.dtype(dtype).itemsize
  return (MISSING is None and d_lowrank % 64 == 0 and block % width == 0
          and d_model % 128 == 0)


def _units_kernel(x_g, z_g, c2_g, cb_g, w1_g, b1_g, w2_g, b2_g, *refs, n, interpret):
  """One (token, block) program. Shapes in `units_parts`; refs: the residual [T, d] if given,
  the parts [T, K, d] (float32), then the scratch: z [P, r], C2's slice [r, N], c's [N] in
  shared memory and three barriers."""
  *residual_g, out_g, z_s, c2_s, cb_s, barriers = refs
  t, k = lax.axis_index('t'), lax.axis_index('k')
  if not interpret:
    plgpu.griddepcontrol_launch_dependents()
  units = pl.ds(k * n, n)
  plgpu.copy_gmem_to_smem(c2_g.at[:, units], c2_s, barriers.at[0])
  plgpu.copy_gmem_to_smem(cb_g.at[units], cb_s, barriers.at[1])
  extra = b2_g[...].astype(jnp.float32)                                                # [d]
  if not interpret:
    plgpu.griddepcontrol_wait()   # what the kernels before this one wrote is visible
  plgpu.copy_gmem_to_smem(z_g.at[t], z_s, barriers.at[2])
  x = x_g[t, :].astype(jnp.float32)                                                    # [d]
  if residual_g:
    extra = extra + residual_g[0][t, :].astype(jnp.float32)
  for i in range(3):
    plgpu.barrier_wait(barriers.at[i])
  cast = (lambda a, _: a) if interpret else plgpu.layout_cast
  layout = plgpu.Layout.WGMMA
  rows, cols = layout.reduce(1), layout.reduce(0)   # [r] along C2's rows, [N] along its columns
  z = sum(cast(z_s[p, :], rows) for p in range(z_s.shape[0]))                          # [r]
  c2 = cast(c2_s[...], layout).astype(jnp.float32)                                    # [r, N]
  r = c2_s.shape[0]
  logits = (jnp.sum(lax.broadcast_in_dim(z, (r, n), (0,)) * c2, axis=0)
            + cast(cb_s[...], cols).astype(jnp.float32))                                # [N]
  best = jnp.max(logits)
  unit_ids = (lax.iota(jnp.int32, n) if interpret
              else plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=cols))
  row = k * n + jnp.min(jnp.where(logits == best, unit_ids, n))
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
  if not fits(d_model, rank, n, c2.dtype):
    raise ValueError(f'units_parts: d_model {d_model}, rank {rank} and N {n} do not fit '
                     f'Mosaic GPU\'s layouts ({MISSING or "see fits"})')
  tiling = plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(c2.dtype).itemsize))
  kernel = plgpu.kernel(
      functools.partial(_units_kernel, n=n, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((n_tokens, n_blocks, d_model), jnp.float32),
      grid=(n_tokens, n_blocks), grid_names=('t', 'k'),
      scratch_types=[plgpu.SMEM(z.shape[1:], jnp.float32),
                     plgpu.SMEM((rank, n), c2.dtype,
                                transforms=(tiling, plgpu.SwizzleTransform(SWIZZLE))),
                     plgpu.SMEM((n,), cb.dtype), plgpu.Barrier(num_barriers=3)],
      interpret=decode_kernels.mosaic_interpreter() if interpret else None)
  return kernel(x, z.astype(jnp.float32), c2.reshape(rank, n_blocks * n), cb.reshape(-1),
                w1.reshape(n_blocks * n, d_model), b1.reshape(-1),
                w2.reshape(n_blocks * n, d_model), b2, *([] if residual is None else [residual]))
