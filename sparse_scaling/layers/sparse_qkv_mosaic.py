"""Sparse QKV's decoding kernels in Mosaic GPU (`mosaic_kernels.py`).

The attention block's three kernels (`sparse_qkv_block_kernel.py`'s `mixed`, `conv` and
`attend`) written for Mosaic GPU, used where `sparse_qkv_block_kernel.MOSAIC` asks for them:
off by default, as on an H200 they are slower than the Triton kernels (docs/decoding_gpu.md,
"Mosaic GPU"). Each program copies what it reads that the
kernels of this token did not write (its fixed weights, the convolution's state, the KV
caches' older positions) into shared
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

`attend`, one program per (token, head, HEAD_COLUMNS value columns):

  out = x[cols] + Σ_t softmax_t(q·K[t] / √d_head)·V[t, cols]      [C], t up to the position

over the caches in blocks of 64 positions (the rows of a matrix layout), the token's own
score and value from the row the convolutions have just written, read after the wait (the
blocks, copied before it, may hold the row's old contents). It also moves the convolution's
state on in place and, chained, writes the next FF block's partial sums (`attend`'s note).

Not yet here, as in `sparse_ff_mosaic.py`: the requests that the Triton kernels make in
bfloat16 for the L2 cache to keep their fixed weights (`decode_kernels.keep`).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers.mosaic_kernels import ALONG_COLUMNS
from sparse_scaling.layers.mosaic_kernels import ALONG_ROWS
from sparse_scaling.layers.mosaic_kernels import MATRIX
from sparse_scaling.layers.mosaic_kernels import plgpu

ROWS = 64       # input rows per program: the matrix units' layout's 64
CHANNELS = 16   # channels of M per program (as the Triton kernel's MIXED_CHANNELS at 800M)
WIDTH = 16      # output channels per `convolutions` program (as the Triton kernel's WIDTH)
HEAD_COLUMNS = 64   # value columns per `attend` program: the matrix units' layout's 64 rows
# The most bytes of the KV caches' blocks an `attend` program holds in shared memory (of the
# 227 KB a Hopper SM has): K's and V's 168 positions of 64 channels at 800M take 96 KB in
# float32; longer caches go to the Triton kernel, which reads a block at a time.
CACHE_BYTES = 160 * 1024
# The most bytes of shared memory a `convolutions` program takes (its taps, the state's rows,
# y's partial sums; of the 227 KB a Hopper SM has, less its barriers): 800M's M 64, kernels of
# 3 modules and 16 partial sums, takes 51 KB in float32, M 256 202 KB; M 512 goes to Triton.
CONV_BYTES = 220 * 1024


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
  copy = mosaic_kernels.Copies(barriers)
  copy(d_g.at[:, rows], d_s)
  copy(e_g.at[rows, channels], e_s)
  copy(scale_g.at[rows], scale_s)
  copy(bias_g.at[rows], bias_s)
  program.wait()
  copy(x_g.at[t, rows], x_s)
  stats = mosaic_kernels.row_stats(x_g[t, :], epsilon)                             # of x [d]
  copy.wait()
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


def convolutions_fit(d_model, n_modules, n_channels, n_heads, dtype, width=None, *, n_state,
                     largest, parts):
  """Whether `convolutions` takes these shapes: M a multiple of 64 (the rows of the matrix
  units' layout; 800M's 64), `width` (None: WIDTH) dividing M and the heads' d_head, a multiple
  of 8 and of 32 bytes, and a program's shared arrays (`_conv_scratch`: the state's `n_state`
  positions, the `largest` module kernel, y's `parts` partial sums) within CONV_BYTES, taken
  in `dtype` but for y's float32 sums."""
  width = width or WIDTH
  d_head = d_model // n_heads
  shapes = _conv_scratch(n_state, largest, parts, n_channels, width)
  shared = (sum(math.prod(shape) for name, shape in shapes.items() if name != 'sums')
            * jnp.dtype(dtype).itemsize + math.prod(shapes['sums']) * 4)
  return (mosaic_kernels.MISSING is None and d_model % n_heads == 0
          and n_channels % 64 == 0 and n_channels % width == 0 and d_head % width == 0
          and mosaic_kernels.swizzles(width, dtype) and shared <= CONV_BYTES)


def _conv_scratch(n, largest, parts, n_channels, width):
  """The shapes of a `convolutions` program's shared arrays, by name: the taps [(n + 1)·k, M,
  C], the bias [M], the state's rows [n, k, M], y's bias [k, M] and float32 partial sums
  [k, P, M] (k: the `largest` module kernel), the output [C]."""
  return {'taps': ((n + 1) * largest, n_channels, width), 'bias': (n_channels,),
          'state': (n, largest, n_channels), 'y_bias': (largest, n_channels),
          'sums': (largest, parts, n_channels), 'out': (width,)}


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
      copy = mosaic_kernels.Copies(barriers)
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
      copy.wait()
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
  largest, parts = max(sizes), y.shape[1]
  if not convolutions_fit(d_model, n_modules, n_channels, n_heads, dtype, width, n_state=n,
                          largest=largest, parts=parts):
    raise ValueError(f'convolutions: {n_modules} modules of {n_channels} channels, {n_heads} '
                     f'heads ({width} channels a program) do not fit Mosaic GPU\'s layouts '
                     f'({mosaic_kernels.MISSING or "see convolutions_fit"})')
  weights = [w for pair in conv for w in pair]
  shapes = _conv_scratch(n, largest, parts, n_channels, width)
  kernel = mosaic_kernels.kernel(
      functools.partial(_conv_kernel, sizes=tuple(sizes), n_heads=n_heads,
                        interpret=interpret),
      out_type=(jax.ShapeDtypeStruct((batch, d_model), dtype),
                jax.ShapeDtypeStruct((1,), jnp.int32),
                jax.ShapeDtypeStruct(k_cache.shape, dtype),
                jax.ShapeDtypeStruct(v_cache.shape, dtype)),
      input_output_aliases={10: 2, 11: 3},
      grid=(batch, 3, n_modules, n_channels // width), grid_names=('b', 'o', 'g', 'c'),
      scratch_types=[mosaic_kernels.swizzled(shapes['taps'], weights[0].dtype),
                     plgpu.SMEM(shapes['bias'], weights[1].dtype),
                     plgpu.SMEM(shapes['state'], state.dtype),
                     plgpu.SMEM(shapes['y_bias'], y_bias.dtype),
                     plgpu.SMEM(shapes['sums'], jnp.float32),
                     plgpu.SMEM(shapes['out'], dtype),
                     plgpu.Barrier(num_barriers=(2 * n + 3) * largest + 1)],
      interpret=interpret)
  return kernel(index, y, y_bias.reshape(n_modules, n_channels), state, *weights, k_cache,
                v_cache)


def attend_fits(d_model, n_heads, max_len, n_state, dtype, d_lowrank=None, partial=None):
  """Whether `attend` takes these shapes: d_head a multiple of HEAD_COLUMNS' 64 (a program's
  value columns, the rows of the matrix units' layout), caches of at least 64 positions (a
  block of them is a matrix's 64 rows) whose blocks a program holds in CACHE_BYTES, a state
  of at least one position; given the next FF
  block's controller rank `d_lowrank`, a multiple of 8 and of 32 bytes, and the `partial`
  sums' columns (None: 64) dividing 64. 800M: d_head 64, 168 positions, rank 16."""
  d_head = d_model // n_heads
  cache_bytes = (sum(math.prod(shape) for shape in _cache_scratch(max_len, d_head))
                 * jnp.dtype(dtype).itemsize)
  return (mosaic_kernels.MISSING is None and d_model % n_heads == 0
          and d_head % HEAD_COLUMNS == 0 and max_len >= HEAD_COLUMNS and n_state >= 1
          and cache_bytes <= CACHE_BYTES
          and mosaic_kernels.swizzles(d_head, dtype)
          and jnp.dtype(dtype).itemsize * HEAD_COLUMNS % 128 == 0
          and (d_lowrank is None or mosaic_kernels.swizzles(d_lowrank, dtype))
          and HEAD_COLUMNS % (partial or HEAD_COLUMNS) == 0)


def _cache_scratch(max_len, d_head):
  """The shapes of an `attend` program's blocks of the caches in shared memory: K's [blocks,
  64, d_head] and V's value columns [blocks, 64, HEAD_COLUMNS] (`decode_kernels.cache_blocks`'
  blocks of 64 positions)."""
  block, starts = decode_kernels.cache_blocks(max_len, HEAD_COLUMNS)
  return (len(starts), block, d_head), (len(starts), block, HEAD_COLUMNS)


def _attend_kernel(position_g, x_g, q_g, k_g, v_g, y_g, y_bias_g, state_g, _index_g, *refs,
                   n_heads, starts, partial, chained, interpret):
  """One (row, head, 64 value columns) program. Shapes in `attend`; state_g and state_out_g
  are one buffer, as are _index_g and next_g. refs: with `chained`, the next FF block's
  LayerNorm scale and bias and C1; the outputs; the scratch."""
  program = mosaic_kernels.Program(interpret)
  program.launch_dependents()
  if chained:
    scale_g, bias_g, c1_g, *refs = refs
    (out_g, state_out_g, next_g, sums_g, m2_g, products_g, k_s, v_s, q_s, k_row_s, v_row_s,
     x_s, y_s, y_bias_s, state_s, out_s, scale_s, bias_s, c1_s, products_s, barriers) = refs
  else:
    (out_g, state_out_g, next_g, k_s, v_s, q_s, k_row_s, v_row_s, x_s, y_s, y_bias_s,
     state_s, out_s, barriers) = refs
  b, h, c = lax.axis_index('b'), lax.axis_index('h'), lax.axis_index('c')
  d_head, block, n = k_g.shape[2], k_s.shape[1], state_g.shape[1]
  r = b * n_heads + h                                      # the row of the caches
  cols = pl.ds(c * HEAD_COLUMNS, HEAD_COLUMNS)             # of the head's channels
  own = pl.ds(h * d_head + c * HEAD_COLUMNS, HEAD_COLUMNS)  # the same, of d_model's
  copy = mosaic_kernels.Copies(barriers)
  # Before the wait, what no kernel of this token writes: the caches' blocks (the token's own
  # position, which the convolutions write, is read again after the wait), the state's
  # older positions (written by this kernel a token before), y's bias and the FF block's
  # weights; the new state's older positions go straight to their place in state_s.
  for i, start in enumerate(starts):
    copy(k_g.at[r, pl.ds(start, block)], k_s.at[i])
    copy(v_g.at[r, pl.ds(start, block), cols], v_s.at[i])
  if n > 1:
    copy(state_g.at[b, pl.ds(1, n - 1), own], state_s.at[pl.ds(0, n - 1)])
  copy(y_bias_g.at[own], y_bias_s)
  if chained:
    copy(scale_g.at[own], scale_s)
    copy(bias_g.at[own], bias_s)
    copy(c1_g.at[own], c1_s)
  program.wait()
  position = position_g[0]
  index = jnp.minimum(position, k_g.shape[1] - 1)
  copy(q_g.at[b, pl.ds(h * d_head, d_head)], q_s)
  copy(k_g.at[r, index], k_row_s)
  copy(v_g.at[r, index, cols], v_row_s)
  copy(x_g.at[b, own], x_s)
  copy(y_g.at[b, :, own], y_s)
  copy.wait()

  root = float(d_head) ** 0.5
  q = program.load(q_s, ALONG_COLUMNS)                                              # [Dh]
  own_score = jnp.sum(q * program.load(k_row_s, ALONG_COLUMNS)) / root   # the token's key
  scores, at_index = [], []
  for i, start in enumerate(starts):
    keys = program.load(k_s.at[i], MATRIX)                                     # [block, Dh]
    score = jnp.sum(keys * lax.broadcast_in_dim(q, keys.shape, (1,)), axis=1) / root
    position_i = start + program.iota(block, ALONG_ROWS)
    valid = (position_i >= i * block) & (position_i <= index)   # blocks overlap at the end
    at_index.append(position_i == index)
    scores.append(jnp.where(valid, jnp.where(at_index[-1], own_score, score), -jnp.inf))
  top = functools.reduce(jnp.maximum, [jnp.max(score) for score in scores])
  weights, weighted = None, None   # the token's own value apart: the cache's copy is stale
  for i, score in enumerate(scores):
    p = jnp.exp(score - top)                                                      # [block]
    values = program.load(v_s.at[i], MATRIX)                                    # [block, C]
    products = lax.broadcast_in_dim(jnp.where(at_index[i], 0.0, p), values.shape, (0,))
    weights = jnp.sum(p) if weights is None else weights + jnp.sum(p)
    part = jnp.sum(products * values, axis=0)                                         # [C]
    weighted = part if weighted is None else weighted + part
  weighted = weighted + jnp.exp(own_score - top) * program.load(v_row_s, ALONG_COLUMNS)
  x = program.load(x_s, ALONG_COLUMNS)
  out_s[...] = (x + weighted / weights).astype(out_s.dtype)
  # The state moves on at the program's columns: its newest position is y (partial sums
  # added), as the state's dtype holds it.
  y = sum(program.load(y_s.at[p], ALONG_COLUMNS) for p in range(y_s.shape[0]))
  state_s[n - 1] = (y + program.load(y_bias_s, ALONG_COLUMNS)).astype(state_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_s, out_g.at[b, own])
  plgpu.copy_smem_to_gmem(state_s, state_out_g.at[b, :, own])
  if chained:   # the partial sums of `partial` columns each (`_ff_partials'`), from out_s
    x = program.load(out_s, ALONG_ROWS)
    scale, bias = (program.load(ref, ALONG_ROWS) for ref in (scale_s, bias_s))
    c1 = program.load(c1_s, MATRIX)                                                # [C, r]
    scaled = lax.broadcast_in_dim(scale, c1.shape, (0,)) * c1
    piece = program.iota(HEAD_COLUMNS, ALONG_ROWS) // partial
    first = (h * d_head + c * HEAD_COLUMNS) // partial
    along = lambda v: lax.broadcast_in_dim(v, c1.shape, (0,))
    for j in range(HEAD_COLUMNS // partial):
      inside = (piece == j).astype(jnp.float32)
      total = jnp.sum(x * inside)
      centred = (x - total / partial) * inside
      sums_g[b, first + j] = total
      m2_g[b, first + j] = jnp.sum(centred * centred)
      products_s[j, 0] = jnp.sum(along(centred) * scaled, axis=0)
      products_s[j, 1] = jnp.sum(along(inside) * scaled, axis=0)
      products_s[j, 2] = jnp.sum(along(bias * inside) * c1, axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(products_s, products_g.at[b, pl.ds(first, HEAD_COLUMNS // partial)])
  next_g[0] = position + 1   # the next token's position (every program writes it)
  plgpu.wait_smem_to_gmem(0)


def attend(position, x, q, k_cache, v_cache, y, y_bias, state, index, ff_norm=None, *,
           n_heads, partial=None, interpret=False):
  """Attention of one token per row over the KV caches, the residual added, and the
  convolution's state moved on in place (`sparse_qkv_block_kernel`'s `attend`).

  One program per (row, head, HEAD_COLUMNS value columns). Before it waits: the caches'
  blocks of 64 positions (the last overlapping the one before), the state's older positions,
  y's bias and the next FF block's fixed weights; after it, q, the token's own key and value
  (which the convolutions have just written, so the blocks' copies of them are stale: the
  score and value at the token's position are its own), x's columns and y's partial sums.

  Args:
    position: [1] int32, the token's position (the convolutions' output).
    x: [B, d], the block's input (the residual).
    q: [B, d], the token's query (the convolutions').
    k_cache, v_cache: [B·H, max_len, d_head], the token's key and value written at
      min(position, max_len − 1).
    y: [B, P, d] float32, the multiplicative layer's partial sums; y_bias: [d], its bias.
    state: [B, n, d], the convolution's previous inputs (oldest first).
    index: [1] int32, the buffer the next position is written into.
    ff_norm: (scale [d], bias [d], C1 [d, r]) of the next FF block's LayerNorm and
      controller, or None.
    n_heads: H.
    partial: Columns per partial sum with `ff_norm` (a divisor of 64; None: 64).
    interpret: Run in Pallas' GPU interpreter (any backend).

  Returns:
    (out [B, d] in x's dtype, the new state [B, n, d] in state's buffer, position + 1 [1] in
    index's), and with `ff_norm` the partial sums Σx [B, d / partial], Σ(x − x̄)² [B, d /
    partial] and products [B, d / partial, 3, r] (`sparse_qkv_block_kernel._ff_partials`).
  """
  batch, d_model = x.shape
  _, max_len, d_head = k_cache.shape
  n = state.shape[1]
  partial = partial or HEAD_COLUMNS
  rank = None if ff_norm is None else ff_norm[2].shape[1]
  dtype = k_cache.dtype
  if not (attend_fits(d_model, n_heads, max_len, n, dtype, rank, partial)
          and x.dtype == q.dtype == dtype == state.dtype):
    raise ValueError(f'attend: d_model {d_model}, {n_heads} heads, {max_len} positions, a '
                     f'state of {n}, rank {rank} and {partial} columns a partial sum do not '
                     f'fit Mosaic GPU\'s layouts, or x, q, the caches and the state differ in '
                     f'dtype ({mosaic_kernels.MISSING or "see attend_fits"})')
  _, starts = decode_kernels.cache_blocks(max_len, HEAD_COLUMNS)
  partials = (() if ff_norm is None
              else sparse_ff_kernel.partials_type(batch, d_model // partial, rank))
  ff_scratch = () if ff_norm is None else (
      plgpu.SMEM((HEAD_COLUMNS,), ff_norm[0].dtype), plgpu.SMEM((HEAD_COLUMNS,), ff_norm[1].dtype),
      mosaic_kernels.swizzled((HEAD_COLUMNS, rank), ff_norm[2].dtype),
      plgpu.SMEM((HEAD_COLUMNS // partial, 3, rank), jnp.float32))
  n_copies = 2 * len(starts) + (n > 1) + 1 + 3 * (ff_norm is not None) + 5
  kernel = mosaic_kernels.kernel(
      functools.partial(_attend_kernel, n_heads=n_heads, starts=starts, partial=partial,
                        chained=ff_norm is not None, interpret=interpret),
      out_type=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(state.shape, state.dtype),
                jax.ShapeDtypeStruct((1,), jnp.int32), *partials),
      input_output_aliases={7: 1, 8: 2},
      grid=(batch, n_heads, d_head // HEAD_COLUMNS), grid_names=('b', 'h', 'c'),
      scratch_types=[*(mosaic_kernels.swizzled(shape, dtype)
                       for shape in _cache_scratch(max_len, d_head)),
                     plgpu.SMEM((d_head,), dtype), plgpu.SMEM((d_head,), dtype),
                     plgpu.SMEM((HEAD_COLUMNS,), dtype), plgpu.SMEM((HEAD_COLUMNS,), dtype),
                     plgpu.SMEM((y.shape[1], HEAD_COLUMNS), jnp.float32),
                     plgpu.SMEM((HEAD_COLUMNS,), y_bias.dtype),
                     plgpu.SMEM((n, HEAD_COLUMNS), state.dtype),
                     plgpu.SMEM((HEAD_COLUMNS,), x.dtype), *ff_scratch,
                     plgpu.Barrier(num_barriers=n_copies)],
      interpret=interpret)
  return kernel(position, x, q, k_cache, v_cache, y, y_bias, state, index, *(ff_norm or ()))
