"""Sparse QKV's multiplicative decoding kernel in Mosaic GPU (`mosaic_kernels.py`).

The first of the attention block's three kernels (`sparse_qkv_block_kernel.py`'s `mixed`)
written for Mosaic GPU, used where `sparse_qkv_block_kernel.MOSAIC` asks for it: off by
default, as it is not yet timed on a GPU. One program per (token, ROWS input rows, CHANNELS
channels), all S modules:

  y_p[s, c] = Σ_{r in rows p} LayerNorm(x)[r]·D[s, r]·E[r, c]      [S, C], a partial sum

which the convolutions' kernel adds over p, as it adds the Triton kernel's (the same [T, P, S,
M] partial sums). Everything the program reads but x is a fixed weight: D's columns [S, ROWS],
E's slice [ROWS, C] and the LayerNorm's scale and bias. The TMA unit copies them into shared
memory before the program waits for the kernel before it (the previous block's, which wrote
x), so that their latency passes while that kernel runs; then x's row, whose statistics the
program computes, and its slice. Each module's partial sum is a reduction over the rows of a
[ROWS, C] matrix in the matrix units' layout (E's slice times D's row scaled by LayerNorm(x)),
in float32 as the Triton kernel computes it (IEEE products, not the TF32 of the matrix units).
Not yet here, as in `sparse_ff_mosaic.py`: the requests that the Triton kernel makes in
bfloat16 for the L2 cache to keep its fixed weights (`decode_kernels.keep`).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers.mosaic_kernels import ALONG_ROWS
from sparse_scaling.layers.mosaic_kernels import MATRIX
from sparse_scaling.layers.mosaic_kernels import plgpu

ROWS = 64       # input rows per program: the matrix units' layout's 64
CHANNELS = 16   # channels of M per program (as the Triton kernel's MIXED_CHANNELS at 800M)


def fits(d_model, n_modules, n_channels, dtype, channels=None):
  """Whether `mixed_parts` takes these shapes: d_model a multiple of 128 (the warpgroup's
  threads; ROWS divides it), `channels` (None: CHANNELS) dividing M, a multiple of 8 and of 32
  bytes, and S at most 256 (a TMA copy's side). 800M: d_model 1024, S 16, M 64."""
  channels = channels or CHANNELS
  return (mosaic_kernels.MISSING is None and d_model % 128 == 0 and n_modules <= 256
          and n_channels % channels == 0 and mosaic_kernels.swizzles(channels, dtype))


def _mixed_kernel(x_g, scale_g, bias_g, d_g, e_g, y_g, d_s, e_s, scale_s, bias_s, x_s, y_s,
                  barriers, *, epsilon, interpret):
  """One (token, ROWS input rows, channels) program. Shapes in `mixed_parts`; the scratch:
  D's columns [S, ROWS], E's slice [ROWS, C], the LayerNorm's scale and bias and x's slice
  [ROWS], y's partial sum [S, C], five barriers."""
  program = mosaic_kernels.Program(interpret)
  t, p, c = lax.axis_index('t'), lax.axis_index('p'), lax.axis_index('c')
  program.launch_dependents()
  rows, channels = pl.ds(p * ROWS, ROWS), pl.ds(c * e_s.shape[1], e_s.shape[1])
  plgpu.copy_gmem_to_smem(d_g.at[:, rows], d_s, barriers.at[0])
  plgpu.copy_gmem_to_smem(e_g.at[rows, channels], e_s, barriers.at[1])
  plgpu.copy_gmem_to_smem(scale_g.at[rows], scale_s, barriers.at[2])
  plgpu.copy_gmem_to_smem(bias_g.at[rows], bias_s, barriers.at[3])
  program.wait()
  plgpu.copy_gmem_to_smem(x_g.at[t, rows], x_s, barriers.at[4])
  stats = mosaic_kernels.row_stats(x_g[t, :], epsilon)                             # of x [d]
  for i in range(5):
    plgpu.barrier_wait(barriers.at[i])
  xn = decode_kernels.layer_norm_slice(
      [program.cast(ref[...], ALONG_ROWS) for ref in (x_s, scale_s, bias_s)], stats)
  xn = xn.astype(jnp.float32)                                                       # [ROWS]
  e = program.load(e_s, MATRIX)                                                   # [ROWS, C]
  for s in range(d_s.shape[0]):
    scaled = xn * program.load(d_s.at[s], ALONG_ROWS)                              # [ROWS]
    y_s[s] = jnp.sum(lax.broadcast_in_dim(scaled, e.shape, (0,)) * e, axis=0)       # [C]
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(y_s, y_g.at[t, p, :, channels])
  plgpu.wait_smem_to_gmem(0)


def mixed_parts(x, scale, bias, d, e, epsilon, interpret=False, channels=None):
  """The multiplicative layer of a Sparse QKV block on LayerNorm(x), as partial sums.

  Args:
    x: [T, d], the block's input (the residual stream at each token).
    scale, bias: [d], the block's LayerNorm (trax's, centred).
    d: [S, d], e: [d, M], the multiplicative layer's D and E (`multiplicative_dense.py`).
    epsilon: The LayerNorm's ε.
    interpret: Run in Pallas' GPU interpreter (any backend).
    channels: Channels of M per program (None: CHANNELS).

  Returns:
    [T, d / ROWS, S, M] float32, whose sum over axis 1 is LayerNorm(x)·D·E without its bias
    (`sparse_qkv_block_kernel.decode_step`'s partial sums of y).
  """
  n_tokens, d_model = x.shape
  n_modules, n_channels = d.shape[0], e.shape[1]
  channels = channels or CHANNELS
  if not fits(d_model, n_modules, n_channels, e.dtype, channels):
    raise ValueError(f'mixed_parts: d_model {d_model}, {n_modules} modules and {n_channels} '
                     f'channels ({channels} a program) do not fit Mosaic GPU\'s layouts '
                     f'({mosaic_kernels.MISSING or "see fits"})')
  kernel = mosaic_kernels.kernel(
      functools.partial(_mixed_kernel, epsilon=epsilon, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((n_tokens, d_model // ROWS, n_modules, n_channels),
                                    jnp.float32),
      grid=(n_tokens, d_model // ROWS, n_channels // channels), grid_names=('t', 'p', 'c'),
      scratch_types=[plgpu.SMEM((n_modules, ROWS), d.dtype),
                     mosaic_kernels.swizzled((ROWS, channels), e.dtype),
                     plgpu.SMEM((ROWS,), scale.dtype), plgpu.SMEM((ROWS,), bias.dtype),
                     plgpu.SMEM((ROWS,), x.dtype), plgpu.SMEM((n_modules, channels), jnp.float32),
                     plgpu.Barrier(num_barriers=5)],
      interpret=interpret)
  return kernel(x, scale, bias, d, e)
