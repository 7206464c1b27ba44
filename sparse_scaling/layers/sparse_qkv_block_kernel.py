"""A Sparse QKV attention block decoding one token as three Pallas kernels.

The decoding half of a pre-LayerNorm residual block around Sparse QKV attention (§3.2,
`sparse_qkv.py`): x + Attention(ModuleConv(Multiplicative(LayerNorm(x)))). XLA runs one
token of it as about fifteen kernels of one or two microseconds each on a GPU, while the block
reads well under a megabyte. Here, with y the multiplicative layer's output, S modules of M
channels, H heads of d_head channels and C channels per program:

  mixed   program (row, p):  LayerNorm(x)[rows p] · D[:, rows p] · E[rows p, :]  [S, M]
          partial sums of y over d / rows slices of the input (the next kernel adds them).
  conv    program (row, o, c): output o of the convolutions (Q, K or V) on channels
          [c·C, (c + 1)·C): the window (the state's positions and y) times the kernel's C
          output columns. K and V programs write their channels into the KV caches in place
          (and V's the convolution's new state); Q programs write q and the partial scores
          q[C]·K_cache[:, C] of every cached position, one row per channel slice.
  attend  program (row·head, v): the head's scores (its slices' partial scores added, the
          token's own from q and its cached key), softmax, and the V cache's columns
          [v·Cv, (v + 1)·Cv); out = x + that.

Each program reads a few tens of kilobytes, so many programs share the work: a program of one
GPU multiprocessor reads far below the card's rate, and a launch costs about a microsecond.
On an H200 at the 800M shape the three take 3.2, 6.2 and 2.8 µs, against fifteen XLA kernels
in 26 µs (README, "Decoding on a GPU"; `bench/decode_shares.py` sweeps ROWS, WIDTH,
VALUE_WIDTH, WARPS and DOT). The result equals the layers' XLA path (`tests/test_fused_residual.py`).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where `sparse_qkv.py` calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_scaling.layers import decode_kernels

POSITIONS = 64  # cache positions read per block, at most
# Programs' shares (powers of 2), measured on an H200 at the 800M shape: input rows per
# `mixed` program, channels per `conv` program, value columns per `attend` program, warps.
ROWS, WIDTH, VALUE_WIDTH, WARPS = 64, 8, 16, 4
DOT = True   # `mixed` as one matrix product per program where S, M and ROWS are >= 16


def fits(d_model, n_modules, n_heads, sizes, length_kernel_size):
  """Whether the kernels take these shapes (Triton's blocks are powers of 2)."""
  n_channels, d_head = d_model // n_modules, d_model // n_heads
  return (decode_kernels.is_power_of_2(d_model, n_channels, d_head) and len(sizes) == 3
          and length_kernel_size >= 2)


def _f32(a):
  return a.astype(jnp.float32)


def _mixed_kernel(x_ref, scale_ref, bias_ref, d_ref, e_ref, y_ref, *, rows, sub, dot,
                  epsilon):
  """One (row, input slice) program: partial sums of y [S, M].

  With `dot` (sub = rows; S, M and rows all >= 16, Triton's least) the product is one matrix
  product [S, rows] x [rows, M] in IEEE float32; else sums of broadcast products.
  """
  b, p = pl.program_id(0), pl.program_id(1)
  stats = decode_kernels.layer_norm_stats(x_ref, b, epsilon)
  slices = [pl.ds(p * rows + k * sub, sub) for k in range(rows // sub)]
  loads = [(decode_kernels.layer_norm_slice(x_ref, scale_ref, bias_ref, b, cols, stats),
            d_ref[:, cols], e_ref[cols, :]) for cols in slices]
  y = None
  for xn, d, e in loads:                                                         # xn [sub]
    scaled = _f32(d) * _f32(xn)[None, :]                                          # [S, sub]
    if dot:
      part = jnp.dot(scaled, _f32(e), precision=jax.lax.Precision.HIGHEST)         # [S, M]
    else:
      part = jnp.sum(scaled[:, :, None] * _f32(e)[None, :, :], axis=1)            # [S, M]
    y = part if y is None else y + part
  y_ref[b, p] = y


def _conv_kernel(index_ref, y_ref, y_bias_ref, state_ref, wq_ref, bq_ref, wk_ref, bk_ref,
                 wv_ref, bv_ref, k_cache_ref, v_cache_ref, scores_ref, q_ref, state_out_ref,
                 k_out_ref, v_out_ref, *, sizes, n_heads, width, starts, block):
  """One (row, output, channel slice) program. Shapes in `decode_step`."""
  b, o, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  _, n, n_modules, n_channels = state_ref.shape
  d_head = q_ref.shape[1] // n_heads
  flat = c * width
  s, m0 = flat // n_channels, flat % n_channels
  row = b * n_heads + flat // d_head          # the caches' row: (row, head)
  off = flat % d_head
  # A full cache takes the token at its last position, as XLA's dynamic_update_slice does.
  index = jnp.minimum(index_ref[0], k_cache_ref.shape[1] - 1)

  def token(module, cols):
    """This token's multiplicative output at `module`, as the state holds it: [len(cols)]."""
    y = jnp.sum(_f32(y_ref[b, :, module, cols]), axis=0) + _f32(y_bias_ref[module, cols])
    return _f32(y.astype(state_ref.dtype))

  def convolve(size, w_ref, bias_ref):
    """Channels [m0, m0 + width) of the output with module kernel `size`: [width]."""
    taps = []
    for i in range(n + 1):
      for j in range(size):
        module = s + j - size // 2
        inside = ((module >= 0) & (module < n_modules)).astype(jnp.float32)
        module = jnp.clip(module, 0, n_modules - 1)
        window = (_f32(state_ref[b, i, module, :]) if i < n
                  else token(module, pl.ds(0, n_channels)))                        # [M]
        taps.append((window * inside, w_ref[i, j, :, pl.ds(m0, width)]))          # [M, C]
    products = None   # summed over the taps first: one reduction across threads, not nine
    for window, weight in taps:
      product = window[:, None] * _f32(weight)                                   # [M, C]
      products = product if products is None else products + product
    return _f32(bias_ref[pl.ds(m0, width)]) + jnp.sum(products, axis=0)

  @pl.when(o == 0)
  def _():
    keys = [k_cache_ref[row, pl.ds(start, block), pl.ds(off, width)] for start in starts]
    q = convolve(sizes[0], wq_ref, bq_ref).astype(q_ref.dtype)
    q_ref[b, pl.ds(flat, width)] = q
    for start, key in zip(starts, keys):       # positions from `index` on: unused
      scores_ref[b, c, pl.ds(start, block)] = jnp.sum(_f32(key) * _f32(q)[None, :], axis=1)

  @pl.when(o == 1)
  def _():
    k_out_ref[row, index, pl.ds(off, width)] = (
        convolve(sizes[1], wk_ref, bk_ref).astype(k_out_ref.dtype))

  @pl.when(o == 2)
  def _():
    v_out_ref[row, index, pl.ds(off, width)] = (
        convolve(sizes[2], wv_ref, bv_ref).astype(v_out_ref.dtype))
    cols = pl.ds(m0, width)
    for i in range(n):  # the state moves one position on
      newer = state_ref[b, i + 1, s, cols] if i + 1 < n else token(s, cols)
      state_out_ref[b, i, s, cols] = newer.astype(state_out_ref.dtype)


def _attend_kernel(index_ref, x_ref, q_ref, scores_ref, k_cache_ref, v_cache_ref, out_ref,
                   next_ref, *, n_heads, width, value_width, starts, block):
  """One (row·head, value columns) program. Shapes in `decode_step`."""
  r, v = pl.program_id(0), pl.program_id(1)
  b, h = r // n_heads, r % n_heads
  d_head = x_ref.shape[1] // n_heads
  slices = d_head // width
  next_ref[0] = index_ref[0] + 1   # the next token's position (every program writes it)
  index = jnp.minimum(index_ref[0], k_cache_ref.shape[1] - 1)
  cols = pl.ds(v * value_width, value_width)
  parts = [scores_ref[b, pl.ds(h * slices, slices), pl.ds(start, block)] for start in starts]
  values = [v_cache_ref[r, pl.ds(start, block), cols] for start in starts]
  q = _f32(q_ref[b, pl.ds(h * d_head, d_head)])
  key = _f32(k_cache_ref[r, index, :])             # the token's key, as the cache holds it
  x = _f32(x_ref[b, pl.ds(h * d_head + v * value_width, value_width)])
  root = float(d_head) ** 0.5
  own = jnp.sum(q * key) / root
  scores = []
  for i, (start, part) in enumerate(zip(starts, parts)):
    position = start + jnp.arange(block)
    score = jnp.where(position == index, own, jnp.sum(part, axis=0) / root)
    valid = (position >= i * block) & (position <= index)   # blocks overlap at the end
    scores.append(jnp.where(valid, score, -jnp.inf))
  top = scores[0].max()
  for score in scores[1:]:
    top = jnp.maximum(top, score.max())
  weights, weighted = None, None   # summed over the blocks first, then reduced once
  for score, value in zip(scores, values):
    p = jnp.exp(score - top)                                             # [block]; 0 masked
    products = p[:, None] * _f32(value)                                  # [block, Cv]
    weights = p if weights is None else weights + p
    weighted = products if weighted is None else weighted + products
  out = jnp.sum(weighted, axis=0) / jnp.sum(weights)
  out_ref[b, pl.ds(h * d_head + v * value_width, value_width)] = (x + out).astype(out_ref.dtype)


def decode_step(x, norm, mixed, conv, state, k_cache, v_cache, index, *, n_heads, sizes,
                epsilon, interpret=False, rows=None, width=None, value_width=None,
                warps=None):
  """x + SparseQKVAttention(LayerNorm(x)) for one token per row, and the new states.

  Args:
    x: [B, d], the residual stream at the token.
    norm: (scale, bias) [d] of the block's LayerNorm (trax's, centred).
    mixed: (D [S, d], E [d, M], bias [d]) of the multiplicative layer.
    conv: ((kernel [lks, k_o, M, M], bias [M]) for Q, K, V) of `ModuleConv`.
    state: [B, lks − 1, S, M], the convolution's previous inputs (oldest first).
    k_cache, v_cache: [B·H, max_len, d_head], valid before `index`.
    index: int32 scalar, the token's position (past the cache's end: its last position).
    n_heads: H.
    sizes: k_o, the module kernel sizes of Q, K, V.
    epsilon: The LayerNorm's ε.
    interpret: Run in Pallas' interpreter (any backend).
    rows, width, value_width, warps: Input rows per `mixed` program, channels per `conv`
      program, value columns per `attend` program, warps per program (powers of 2; None:
      ROWS, WIDTH, VALUE_WIDTH, WARPS).

  Returns:
    (out [B, d] in x's dtype, new state, k_cache, v_cache, index + 1), the caches updated in
    place. The next position comes from the last kernel, so that no XLA kernel of a few
    microseconds is left to add 1 to a scalar.
  """
  batch, d_model = x.shape
  d, e, y_bias = mixed
  n_modules, n_channels = d.shape[0], e.shape[1]
  d_head = d_model // n_heads
  max_len = k_cache.shape[1]
  rows, width = rows or ROWS, width or WIDTH
  value_width, warps = value_width or VALUE_WIDTH, warps or WARPS
  rows = min(rows, decode_kernels.row_chunk(d_model))
  width = min(width, n_channels, d_head)   # a program's channels lie in one module and head
  value_width = min(value_width, d_head)
  block, starts = decode_kernels.cache_blocks(max_len, POSITIONS)
  params = plgpu.CompilerParams(num_warps=warps)   # Triton, not Mosaic GPU
  index = jnp.reshape(index, (1,)).astype(jnp.int32)

  dot = DOT and min(n_modules, n_channels, rows) >= 16
  y = pl.pallas_call(
      functools.partial(_mixed_kernel, rows=rows, sub=rows if dot else min(rows, 8), dot=dot,
                        epsilon=epsilon),
      grid=(batch, d_model // rows),
      out_shape=jax.ShapeDtypeStruct((batch, d_model // rows, n_modules, n_channels),
                                     jnp.float32),
      interpret=interpret, compiler_params=params,
  )(x, *norm, d, e)

  scores, q, state, k_cache, v_cache = pl.pallas_call(
      functools.partial(_conv_kernel, sizes=tuple(sizes), n_heads=n_heads, width=width,
                        starts=starts, block=block),
      grid=(batch, 3, d_model // width),
      out_shape=(jax.ShapeDtypeStruct((batch, d_model // width, max_len), jnp.float32),
                 jax.ShapeDtypeStruct((batch, d_model), x.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      input_output_aliases={10: 3, 11: 4},
      interpret=interpret, compiler_params=params,
  )(index, y, y_bias.reshape(n_modules, n_channels), state,
    *[w for pair in conv for w in pair], k_cache, v_cache)

  out, index = pl.pallas_call(
      functools.partial(_attend_kernel, n_heads=n_heads, width=width,
                        value_width=value_width, starts=starts, block=block),
      grid=(batch * n_heads, d_head // value_width),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((1,), jnp.int32)),
      interpret=interpret, compiler_params=params,
  )(index, x, q, scores, k_cache, v_cache)
  return out, state, k_cache, v_cache, index[0]
