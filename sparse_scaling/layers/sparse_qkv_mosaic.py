"""Sparse QKV's multiplicative and convolution decoding kernels in Mosaic GPU (`mosaic_kernels.py`).

Two of the attention block's three kernels (`sparse_qkv_block_kernel.py`'s `mixed` and
`conv`) written for Mosaic GPU, used where `sparse_qkv_block_kernel.MOSAIC` asks for them: off
by default, as they are not yet timed on a GPU. Each program copies what it reads that the
kernel before it did not write (its fixed weights, and the convolution's state) into shared
memory with the TMA unit before it waits for that kernel, so that their latency passes while
that kernel runs; then what that kernel wrote.

`mixed_parts`, one program per (token, ROWS input rows, CHANNELS channels), all S modules:

  y_p[s, c] = Σ_{r in rows p} LayerNorm(x)[r]·D[s, r]·E[r, c]      [S, C], a partial sum

which the convolutions add over p, as they add the Triton kernel's (the same [T, P, S, M]
partial sums). Everything the program reads but x is a fixed weight: D's columns [S, ROWS],
E's slice [ROWS, C] and the LayerNorm's scale and bias; after the wait, x's row, whose
statistics the program computes, and its slice. Each module's partial sum is a reduction
over the rows of a [ROWS, C] matrix in the matrix units' layout (E's slice times D's row
scaled by LayerNorm(x)), in float32 as the Triton kernel computes it (IEEE products, not the
TF32 of the matrix units).

`convolutions`, one program per (token, output Q, K or V, module, WIDTH output channels):

  out = b[cols] + Σ_{i, j} window_i[module + j − k // 2] · W[i, j, :, cols]      [C]

over the lks positions i (the state's n = lks − 1 and the token's y, its partial sums added)
and the k module taps j (zero outside the modules), each a reduction over the M rows of a
[M, C] slice of the kernel, summed over the taps first. Before the wait: the kernel's taps,
its bias, y's bias and the state (which this block's attention kernel wrote a token before);
after it, y's partial sums. Q goes to its output, K and V into the caches at the token's
position in place (`mosaic_kernels.kernel`'s aliases), as the Triton kernel writes them.

Not yet here, as in `sparse_ff_mosaic.py`: the requests that the Triton kernels make in
bfloat16 for the L2 cache to keep their fixed weights (`decode_kernels.keep`); nor the
attention kernel, which stays Triton's.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers.mosaic_kernels import ALONG_COLUMNS
from sparse_scaling.layers.mosaic_kernels import ALONG_ROWS
from sparse_scaling.layers.mosaic_kernels import MATRIX
from sparse_scaling.layers.mosaic_kernels import plgpu

ROWS = 64       # input rows per program: the matrix units' layout's 64
CHANNELS = 16   # channels of M per program (as the Triton kernel's MIXED_CHANNELS at 800M)
WIDTH = 16      # output channels per `convolutions` program (as the Triton kernel's WIDTH)


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
  xn = program.layer_norm(x_s, scale_s, bias_s, stats).astype(jnp.float32)          # [ROWS]
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


def convolutions_fit(d_model, n_modules, n_channels, n_heads, dtype, width=None):
  """Whether `convolutions` takes these shapes: M a multiple of 64 (the rows of the matrix
  units' layout; 800M's 64), `width` (None: WIDTH) dividing M and the heads' d_head, a multiple
  of 8 and of 32 bytes."""
  width = width or WIDTH
  d_head = d_model // n_heads
  return (mosaic_kernels.MISSING is None and d_model % n_heads == 0
          and n_channels % 64 == 0 and n_channels % width == 0 and d_head % width == 0
          and mosaic_kernels.swizzles(width, dtype))


def _conv_kernel(index_g, y_g, y_bias_g, state_g, wq_g, bq_g, wk_g, bk_g, wv_g, bv_g, _k_in,
                 _v_in, q_g, position_g, k_g, v_g, w_s, bias_s, state_s, y_bias_s, y_s, out_s,
                 barriers, *, sizes, n_heads, interpret):
  """One (row, output, module, channel slice) program. Shapes in `convolutions`; k_g and v_g
  are the caches' buffers (_k_in and _v_in aliased). The scratch: the kernel's taps [(n + 1)·k,
  M, C], its bias [M], the state's rows [n, k, M] and y's bias [k, M] of the k modules the
  kernel reads, y's partial sums [k, P, M] there, the output [C], and barriers."""
  program = mosaic_kernels.Program(interpret)
  b, o, g, c = (lax.axis_index(name) for name in ('b', 'o', 'g', 'c'))
  program.launch_dependents()
  _, n, n_modules, n_channels = state_g.shape
  width = out_s.shape[0]
  d_head = k_g.shape[2]
  flat = g * n_channels + c * width             # the program's first channel in d_model
  index = jnp.minimum(index_g[0], k_g.shape[1] - 1)   # a full cache takes its last position
  for which, (w_g, b_g, out_g) in enumerate(((wq_g, bq_g, q_g), (wk_g, bk_g, k_g),
                                             (wv_g, bv_g, v_g))):
    size = sizes[which]

    @pl.when(o == which)
    def _(w_g=w_g, b_g=b_g, out_g=out_g, size=size, which=which):
      modules = [g + j - size // 2 for j in range(size)]   # the kernel's taps along modules
      inside = [((m >= 0) & (m < n_modules)).astype(jnp.float32) for m in modules]
      modules = [jnp.clip(m, 0, n_modules - 1) for m in modules]
      taps = [(i, j) for i in range(n + 1) for j in range(size)]
      # Fixed before the wait: the kernel's taps and bias, the state (written by this block's
      # attention kernel a token before) and y's bias; after it, y's partial sums.
      bar = iter(range(barriers.shape[0]))
      used = []
      def copy(src, dst):
        used.append(next(bar))
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[used[-1]])
      cols = pl.ds(c * width, width)
      for t, (i, j) in enumerate(taps):
        copy(w_g.at[i, j, :, cols], w_s.at[t])
      copy(b_g, bias_s)   # whole: a copy moves a multiple of 128 bytes
      for j, m in enumerate(modules):
        for i in range(n):
          copy(state_g.at[b, i, m, :], state_s.at[i, j])
        copy(y_bias_g.at[m, :], y_bias_s.at[j])
      program.wait()
      for j, m in enumerate(modules):
        copy(y_g.at[b, :, m, :], y_s.at[j])
      for i in used:
        plgpu.barrier_wait(barriers.at[i])
      acc = None   # summed over the taps first: one reduction across threads, not nine
      for t, (i, j) in enumerate(taps):
        if i < n:
          window = program.load(state_s.at[i, j], ALONG_ROWS)                        # [M]
        else:
          y = sum(program.load(y_s.at[j, p], ALONG_ROWS) for p in range(y_s.shape[1]))
          y = y + program.load(y_bias_s.at[j], ALONG_ROWS)
          window = y.astype(state_g.dtype).astype(jnp.float32)   # as the state will hold it
        weight = program.load(w_s.at[t], MATRIX)                                     # [M, C]
        product = lax.broadcast_in_dim(window * inside[j], weight.shape, (0,)) * weight
        acc = product if acc is None else acc + product
      bias = program.load(bias_s.at[cols], ALONG_COLUMNS)                             # [C]
      out_s[...] = (jnp.sum(acc, axis=0) + bias).astype(out_s.dtype)
      plgpu.commit_smem()
      if which == 0:
        plgpu.copy_smem_to_gmem(out_s, out_g.at[b, pl.ds(flat, width)])
      else:
        row = b * n_heads + flat // d_head
        plgpu.copy_smem_to_gmem(out_s, out_g.at[row, index, pl.ds(flat % d_head, width)])
      plgpu.wait_smem_to_gmem(0)

  position_g[0] = index_g[0]   # for the attention kernel, which moves the index on in place


def convolutions(index, y, y_bias, state, conv, k_cache, v_cache, *, n_heads, sizes,
                 interpret=False, width=None):
  """Sparse QKV's three module convolutions for one token per row: Q, and K and V written into
  the caches in place at the token's position (`sparse_qkv_block_kernel`'s `conv`).

  Args:
    index: [1] int32, the token's position (past the caches' end: their last position).
    y: [B, P, S, M] float32, the multiplicative layer's partial sums (`mixed_parts`').
    y_bias: [S, M], its bias.
    state: [B, n, S, M], the convolution's previous inputs (n = lks − 1, oldest first).
    conv: ((kernel [lks, k_o, M, M], bias [M]) for Q, K, V).
    k_cache, v_cache: [B·H, max_len, d_head].
    n_heads: H.
    sizes: k_o of Q, K and V.
    interpret: Run in Pallas' GPU interpreter (any backend).
    width: Output channels per program (None: WIDTH).

  Returns:
    (q [B, d] in the caches' dtype, position [1] int32 (= index), k_cache, v_cache).
  """
  batch, n, n_modules, n_channels = state.shape
  d_model = n_modules * n_channels
  width = width or WIDTH
  dtype = k_cache.dtype
  if not convolutions_fit(d_model, n_modules, n_channels, n_heads, dtype, width):
    raise ValueError(f'convolutions: {n_modules} modules of {n_channels} channels, {n_heads} '
                     f'heads ({width} channels a program) do not fit Mosaic GPU\'s layouts '
                     f'({mosaic_kernels.MISSING or "see convolutions_fit"})')
  largest, parts = max(sizes), y.shape[1]
  weights = [w for pair in conv for w in pair]
  kernel = mosaic_kernels.kernel(
      functools.partial(_conv_kernel, sizes=tuple(sizes), n_heads=n_heads,
                        interpret=interpret),
      out_type=(jax.ShapeDtypeStruct((batch, d_model), dtype),
                jax.ShapeDtypeStruct((1,), jnp.int32),
                jax.ShapeDtypeStruct(k_cache.shape, dtype),
                jax.ShapeDtypeStruct(v_cache.shape, dtype)),
      input_output_aliases={10: 2, 11: 3},
      grid=(batch, 3, n_modules, n_channels // width), grid_names=('b', 'o', 'g', 'c'),
      scratch_types=[mosaic_kernels.swizzled(((n + 1) * largest, n_channels, width),
                                             weights[0].dtype),
                     plgpu.SMEM((n_channels,), weights[1].dtype),
                     plgpu.SMEM((n, largest, n_channels), state.dtype),
                     plgpu.SMEM((largest, n_channels), y_bias.dtype),
                     plgpu.SMEM((largest, parts, n_channels), jnp.float32),
                     plgpu.SMEM((width,), dtype),
                     plgpu.Barrier(num_barriers=(2 * n + 3) * largest + 1)],
      interpret=interpret)
  return kernel(index, y, y_bias.reshape(n_modules, n_channels), state, *weights, k_cache,
                v_cache)
