"""A Sparse QKV attention block decoding one token as three Pallas kernels.

The decoding half of a pre-LayerNorm residual block around Sparse QKV attention (§3.2,
`sparse_qkv.py`): x + Attention(ModuleConv(Multiplicative(LayerNorm(x)))). XLA runs one
token of it as about fifteen kernels of one or two microseconds each on a GPU, while the block
reads well under a megabyte. Here, with y the multiplicative layer's output, S modules of M
channels, H heads of d_head channels and C channels per program:

  mixed   program (row, p, q): LayerNorm(x)[rows p] · D[modules q, rows p] · E[rows p,
          channels q]: partial sums of y [modules q, channels q] over d / rows slices of the
          input (the next kernel adds them; where they are more than MAX_PARTS, XLA adds them
          first).
  conv    program (row, o, g, c): output o of the convolutions (Q, K or V) on channels
          [c·C, (c + 1)·C) of each module of group g: the window (the state's positions and
          y) times the kernel's C output columns, loaded once for the group. K and V programs
          write their channels into the KV caches in place, Q programs into q.
  attend  program (row·head, v): the head's scores q·K_cache (the token's own key among them,
          as `conv` wrote it), softmax, and the V cache's columns [v·Cv, (v + 1)·Cv); out =
          x + that. It also moves the convolution's state on at those channels and the
          position on, both in place. Caches of FILLED_MIN_LEN positions or more it reads in
          a loop, only the blocks up to the token's position.

Each program reads a few tens of kilobytes, so many programs share the work: a program of one
GPU multiprocessor reads far below the card's rate, and a launch costs about a microsecond.
Sides that are not powers of 2 (Triton's blocks must be) are loaded in power-of-2 pieces
(`decode_kernels.pieces`: 144 channels as 128 and 16), and each issues its loads early
(`decode_kernels`' note on load order). On an H200 at the 800M shape the three take 2.4, 4.2
and 4.3 µs, the last also writing the next FF block's partial sums
(docs/results/decode_profile_gpu.md), against fifteen XLA kernels in 26 µs; at 17B's shapes
12.7 (with XLA's LayerNorm statistics, STATS_IN_KERNEL), 14.4 and 9.7 µs, 44.2 in all traced
alone against XLA's 43.5, and a block looped in a program is slower with them than with
XLA's attention, so the block declines above MAX_D_MODEL (docs/decoding_gpu.md;
`bench/decode_shares.py` sweeps the shares below).
The result equals the layers' XLA path (`tests/test_fused_residual.py`).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where `sparse_qkv.py` calls it.
With MOSAIC the multiplicative and convolution programs run in Pallas' Mosaic GPU backend
instead (`sparse_qkv_mosaic.py`), where the shapes fit.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_qkv_mosaic
from sparse_scaling.layers.decode_kernels import f32

POSITIONS = 64  # cache positions read per block, at most
# Programs' shares (powers of 2), measured on an H200 at the 800M shape (WIDTH 16 against 8:
# convolutions 3.6 against 4.5 µs, docs/decoding_gpu.md): input rows per
# `mixed` program, channels per `conv` program, value columns per `attend` program, and each
# kernel's warps per program.
ROWS, WIDTH, VALUE_WIDTH = 64, 16, 16
MIXED_WARPS, CONV_WARPS, ATTEND_WARPS = 4, 4, 4
DOT = True   # `mixed` as matrix products where ROWS and every piece of modules and M are >= 16
# Each `mixed` program computes its row's LayerNorm statistics itself up to this d_model
# (every program reads the whole row: at 17B with 64 input rows per program, SPLIT 64's 1296
# programs read 36 KB each, and the kernel took 20.5 µs on an H200; SPLIT 16's 5184, 44.8);
# above, XLA computes them once and the programs read two numbers (12.7 µs, and 4 µs of XLA's
# kernels; docs/decoding_gpu.md).
STATS_IN_KERNEL = 4096
# Modules per `conv` program (a power of 2; None: at large shapes, where programs of WIDTH
# channels would be many more than CONV_PROGRAMS, programs first take WIDE channels, then
# several modules, so that one program's convolution weights serve more of the token: at 17B,
# 432 programs of 16 channels and 4 modules instead of 1728 of 16 and 1), and the most partial
# sums of y that `conv` adds itself (more are added by XLA first).
MODULES, CONV_PROGRAMS, WIDE, MAX_PARTS = None, 384, 16, 16
# Modules per `mixed` program (a power of 2; at 800M all 16 either way). Triton holds a
# product's operands in registers: at 17B (64 modules) [64, 64] x [64, 144] per program ran
# 340.8 us and [16, 64] x [64, 144] 21.4; with MIXED_CHANNELS' 16 channels, [64, 64] x [64, 16]
# 12.7 µs against 17.8 for [16, 64] x [64, 16] (E's rows read once, not four times).
SPLIT = 64
# Channels of M per `mixed` program (a power of 2 dividing M; None: all M, in pieces). At 800M
# a program of 16 modules and all 64 channels holds 255 registers per thread and spills
# (Nsight Compute on an H200) in a kernel of 16 programs; 16 channels make 64 programs, and
# the kernel took 2.0 µs against 2.7 run alone (docs/decoding_gpu.md).
MIXED_CHANNELS = 16
# The block is taken up to this d_model. At 17B's 9216 it ran 44.2 µs on an H200 (traced
# alone; 41.0 with 32 value columns per attention program) against the 43.5 of XLA's twenty
# kernels, and one 17B block looped in a program took 0.0645 ms with it (32 value columns,
# unchained; 0.0748 chained) against 0.0604-0.0622 with XLA's attention, where at 800M's 1024
# it runs 9.2 µs against 26 (docs/decoding_gpu.md).
MAX_D_MODEL = 4096
# With PREFETCH_CACHES the `mixed` programs ask the L2 cache for the block's KV caches, in one
# request a program and cache (`decode_kernels.prefetch_all` in bulk; Hopper and later), which
# `attend` reads whole two kernels later: from the card's memory at every token (the 24 blocks'
# caches, 33 MB at 800M, are read once a token among 180 MB that a token streams). With
# PREFETCH_STATE they ask, the same way, for the convolution's state (8 KB a block at 800M),
# which `conv` reads in the next kernel. Off: on an H200 the 800M generation took 0.370-0.401
# ms a token with the caches asked for, 0.381 with the state, against 0.382-0.391 without,
# within the spread between compiled copies (docs/decoding_gpu.md, "The KV caches asked for
# two kernels ahead").
PREFETCH_CACHES = False
PREFETCH_STATE = False
# With MOSAIC the multiplicative and convolution programs run as Mosaic GPU kernels
# (`sparse_qkv_mosaic.py`), which copy their fixed weights before they wait for the kernel
# before them: the multiplicative ones where the shapes fit (`sparse_qkv_mosaic.fits`) and the
# Triton kernel would compute the row's statistics itself and ask the L2 cache for nothing
# ahead, the convolutions where M is a multiple of 64 (`convolutions_fit`) and x and the
# caches share a dtype; and with MOSAIC_ATTEND the attention programs, where d_head is a
# multiple of 64, the caches hold 64 positions or more and the kernel asks the L2 cache for
# nothing ahead (`sparse_qkv_mosaic.attend_fits`). 800M's shapes take all three. Off: on an
# H200 the three took 15.3 µs of an 800M block's device time against the Triton kernels' 9.1
# (docs/decoding_gpu.md, "Mosaic GPU").
MOSAIC = False
MOSAIC_ATTEND = True
# From caches of FILLED_MIN_LEN positions, each `attend` program reads them in a loop over
# blocks of POSITIONS, as many as hold positions up to the token's (`_attend_filled`), where
# below it loads every block first: a generation with the gin files' caches of 2048 reads
# what it has decoded, not 2048 positions a token, as attention's kernel does with its SKIP
# (`attention_kernel.py`). Loading all 32 blocks of 2048 first, an 800M block looped took
# 0.316 ms on an H100 against 0.0155-0.0169 in the loop (Table 1's 168: 0.0151), a 6-block
# generation 1.9765 ms a token against 0.1747; at 512 the loop 0.0139-0.0162 against
# 0.0172-0.0213, at 256 0.0195 against 0.0160 (docs/decoding_gpu.md, "Long caches at 800M").
# Table 1's caches of 168 keep every load first. (The Mosaic GPU attention programs, MOSAIC,
# off, load every block.)
FILLED_MIN_LEN = 512
# ... of which the first FILLED_FIRST blocks load first, as below FILLED_MIN_LEN, and the loop
# reads on from there where the token lies beyond them (0: every block in the loop). An 800M
# 6-block generation with caches of 2048 (positions 128-160) took 0.1656 ms a token on an
# H100 against 0.1752 with every block in the loop (Table 1's 168: 0.1540; one run each).
FILLED_FIRST = 4
# ... and the loop reads FILLED_STEP blocks a step, loaded first (1: a block a step, the
# thirtieth session's loop). On an H100, 800M FF+QKV, caches of 2048 filled to 1920: one block
# looped 0.0384 ms with a block a step, 0.0334 with 2, 0.0303-0.0308 with 4, 0.0346 with 8
# (filled to 768: 0.0247 against 0.0227 with 4); the 24-block generation 1.3144 ms a token
# against 1.0049 with 4 (dense: 1.3133). Up to FILLED_FIRST's blocks no step runs, so Table
# 1's positions are unchanged (docs/decoding_gpu.md, "Tokens late in long caches").
FILLED_STEP = 4
# (Two forms in which a head's attention programs shared its positions past the first blocks,
# the last of them to finish merging their parts of the softmax, were timed against this
# one program per head's value columns and removed: split over more programs, and the head's
# value-column programs sharing its blocks. Neither was ahead of the declined block late in
# the caches, where LATE_POSITION below now declines it, and both were slower at 128
# (docs/decoding_gpu.md, "The sharing forms removed").)
# A generation's tokens from this cache position on (None: none) decline the block, which runs
# its layers one by one, attention's split kernel among them (`decoding.Decoder` runs them in
# a second loop, `fused_residual.late`), where the caches are long enough to be read in a
# loop (`reads_filled`). With POSITIONS, FILLED_FIRST and FILLED_STEP as above the loop takes
# ⌈(position // 64 − 3) / 4⌉ steps: 3 from 768 to 1023, 4 from 1024. One 800M block looped
# on an H100, caches of 2048, fused against declined:
# 0.0222 against 0.0238 ms at 768 and 0.0307 against 0.0232 at 1920 (7 steps; ~2.1 µs a step),
# 0.0187 against 0.0225 at 128; an earlier lease 0.0227 against 0.0229 at 768, 0.0303
# against 0.0235 at 1920. So the fused block is ahead up to 1023 and a step behind from 1024;
# the 24-block generation at 1920 took 0.7712 ms a token declined against 1.0049 fused
# (docs/decoding_gpu.md, "Late tokens in a loop of their own").
LATE_POSITION = 1024


def late_position(max_len):
  """The cache position from which a generation's tokens decline the block (LATE_POSITION),
  where caches of `max_len` positions reach it and are read in a loop; else None."""
  if LATE_POSITION is None or not reads_filled(max_len) or LATE_POSITION >= max_len:
    return None
  return LATE_POSITION


def fits(d_model, n_modules, n_heads, sizes, length_kernel_size):
  """Whether the kernels take these shapes, and pay there: three convolutions that look back
  along the length, d_model up to MAX_D_MODEL. Sides that are not powers of 2 (d_model 1152,
  144 channels, heads of 96) are loaded in power-of-2 pieces (`decode_kernels.pieces`)."""
  return (d_model % n_modules == 0 and d_model % n_heads == 0 and len(sizes) == 3
          and length_kernel_size >= 2 and d_model <= MAX_D_MODEL)


def reads_filled(max_len):
  """Whether the `attend` programs read caches of `max_len` positions in a loop over their
  filled blocks (FILLED_MIN_LEN; at least two blocks)."""
  return max_len >= max(FILLED_MIN_LEN, 2 * POSITIONS)


def _mixed_kernel(x_ref, scale_ref, bias_ref, d_ref, e_ref, *refs, rows, sub, split,
                  channels, dot, epsilon, ahead=0, caches=0, grid=()):
  """One (row, input slice, slice of `split` modules and `channels` channels) program:
  partial sums of y at those modules and channels [split, channels], in power-of-2 pieces of
  both sides.

  With `dot` (sub = rows; every piece and rows >= 16, Triton's least) each piece is one matrix
  product [S', rows] x [rows, M'] in IEEE float32; else sums of broadcast products. `refs`:
  (mean [B], inv [B], y) where XLA computed the row's statistics, else (y,), after `ahead`
  arrays whose parts the programs ask the L2 cache for (`decode_kernels.PREFETCH`) and
  `caches` more that they ask for in bulk (PREFETCH_CACHES, PREFETCH_STATE).
  """
  decode_kernels.launch_dependents()
  ahead_refs, cache_refs = refs[:ahead], refs[ahead:ahead + caches]
  *stats_refs, y_ref = refs[ahead + caches:]
  b, p = pl.program_id(0), pl.program_id(1)
  slices = e_ref.shape[1] // channels
  first, c0 = pl.program_id(2) // slices * split, pl.program_id(2) % slices * channels
  s_pieces, m_pieces = decode_kernels.pieces(split), decode_kernels.pieces(channels)
  # D's and E's rows and the slice before the row's statistics (`decode_kernels`' note).
  row_slices = [pl.ds(p * rows + k * sub, sub) for k in range(rows // sub)]
  loaded = [decode_kernels.load_norm_slice(x_ref, scale_ref, bias_ref, b, cols)
            for cols in row_slices]
  ds = [{s0: d_ref[pl.ds(first + s0, ls), cols] for s0, ls in s_pieces} for cols in row_slices]
  es = [{m0: e_ref[cols, pl.ds(c0 + m0, lm)] for m0, lm in m_pieces} for cols in row_slices]
  decode_kernels.prefetch_all(ahead_refs, grid)
  decode_kernels.prefetch_all(cache_refs, grid, bulk=True)
  if stats_refs:
    stats = tuple(ref[b] for ref in stats_refs)
  else:
    stats = decode_kernels.layer_norm_stats(x_ref, b, epsilon)
  y = {}
  for load, d, es_k in zip(loaded, ds, es):
    xn = f32(decode_kernels.layer_norm_slice(load, stats))
    scaled = {s0: f32(d[s0]) * xn[None, :] for s0 in d}
    for m0, e in es_k.items():
      e = f32(e)                                                                 # [sub, M']
      for s0, _ in s_pieces:
        if dot:
          part = jnp.dot(scaled[s0], e, precision=jax.lax.Precision.HIGHEST)     # [S', M']
        else:
          part = jnp.sum(scaled[s0][:, :, None] * e[None, :, :], axis=1)
        y[s0, m0] = part if (s0, m0) not in y else y[s0, m0] + part
  for s0, ls in s_pieces:
    for m0, lm in m_pieces:
      y_ref[b, p, pl.ds(first + s0, ls), pl.ds(c0 + m0, lm)] = y[s0, m0]
  decode_kernels.keep((scale_ref, bias_ref, d_ref, e_ref), grid)


def _conv_kernel(index_ref, y_ref, y_bias_ref, state_ref, wq_ref, bq_ref, wk_ref, bk_ref,
                 wv_ref, bv_ref, k_cache_ref, v_cache_ref, q_ref, position_ref, k_out_ref,
                 v_out_ref, *, sizes, n_heads, width, group, grid):
  """One (row, output, group of modules, channel slice) program of `grid`. Shapes in
  `decode_step`."""
  decode_kernels.launch_dependents()
  b, o, g, c = (pl.program_id(i) for i in range(4))
  _, n, n_modules, n_channels = state_ref.shape
  n_parts = y_ref.shape[1]
  d_head = q_ref.shape[1] // n_heads
  m0 = c * width
  m_pieces = decode_kernels.pieces(n_channels)
  position_ref[0] = index_ref[0]   # for `attend`, which moves index_ref on in place
  # A full cache takes the token at its last position, as XLA's dynamic_update_slice does.
  index = jnp.minimum(index_ref[0], k_cache_ref.shape[1] - 1)

  def load(i, shift, start, length):
    """The loads of the input at state position i (n: the token, its partial sums and y's
    bias) of module g·group + shift, channels [start, start + length), and whether that
    module is one (zero outside the modules)."""
    module = g * group + shift
    inside = ((module >= 0) & (module < n_modules)).astype(jnp.float32)
    module = jnp.clip(module, 0, n_modules - 1)
    cols = pl.ds(start, length)
    if i < n:
      return inside, [state_ref[b, i, module, cols]]
    parts = decode_kernels.load_pieces(lambda parts: y_ref[b, parts, module, cols], n_parts)
    return inside, parts + [y_bias_ref[module, cols]]

  def window(i, inside, loads):
    """[length]: `load`'s input as the state holds it (the token's partial sums added)."""
    if i < n:
      return f32(loads[0]) * inside
    *parts, bias = loads
    y = decode_kernels.sum_rows(parts) + f32(bias)
    return f32(y.astype(state_ref.dtype)) * inside

  def convolve(size, w_ref, bias_ref):
    """Channels [m0, m0 + width) of the output of kernel `size` at each module of the group.
    Every load first (`decode_kernels`' note on load order), the group's modules sharing
    their neighbours' windows."""
    weights = {(i, j, start): w_ref[i, j, pl.ds(start, length), pl.ds(m0, width)]
               for i in range(n + 1) for j in range(size) for start, length in m_pieces}
    bias = bias_ref[pl.ds(m0, width)]
    loads = {}
    for k in range(group):
      for (i, j, start), weight in weights.items():
        key = (i, k + j - size // 2, start)
        if key not in loads:
          loads[key] = load(*key, weight.shape[0])
    windows = {key: window(key[0], *loaded) for key, loaded in loads.items()}
    outs = []
    for k in range(group):
      products = {}   # summed over the taps first: one reduction across threads, not nine
      for (i, j, start), weight in weights.items():
        product = windows[i, k + j - size // 2, start][:, None] * f32(weight)    # [M', C]
        products[start] = product if start not in products else products[start] + product
      outs.append(f32(bias) + sum(jnp.sum(p, axis=0) for p in products.values()))
    return outs

  def cache_slot(k):
    """(cache row, offset in the head, flat channel) of module k of the group's channels."""
    flat = (g * group + k) * n_channels + m0
    return b * n_heads + flat // d_head, flat % d_head, flat

  @pl.when(o == 0)
  def _():
    for k, q in enumerate(convolve(sizes[0], wq_ref, bq_ref)):
      _, _, flat = cache_slot(k)
      q_ref[b, pl.ds(flat, width)] = q.astype(q_ref.dtype)

  @pl.when(o == 1)
  def _():
    for k, out in enumerate(convolve(sizes[1], wk_ref, bk_ref)):
      row, off, _ = cache_slot(k)
      k_out_ref[row, index, pl.ds(off, width)] = out.astype(k_out_ref.dtype)

  @pl.when(o == 2)
  def _():
    for k, out in enumerate(convolve(sizes[2], wv_ref, bv_ref)):
      row, off, _ = cache_slot(k)
      v_out_ref[row, index, pl.ds(off, width)] = out.astype(v_out_ref.dtype)

  decode_kernels.keep((y_bias_ref, wq_ref, bq_ref, wk_ref, bk_ref, wv_ref, bv_ref), grid)


def _attend_kernel(position_ref, x_ref, q_ref, k_cache_ref, v_cache_ref, y_ref, y_bias_ref,
                   state_ref, index_ref, *refs, n_heads, value_width, starts, block, barrier,
                   ff_norm, filled=False, ahead=0, grid=()):
  """One (row·head, value columns) program. Shapes in `decode_step`; the state flat
  [B, lks − 1, d] and y [B, parts, d]. index_ref and next_ref are one buffer, as are state_ref
  and state_out_ref: the program reads position_ref, never index_ref. With `ff_norm`, refs
  begin with the next FF block's LayerNorm scale and bias and C1, and end with this program's
  partial sums for it (`_ff_partials`). The inputs end with `ahead` arrays, whose parts the
  programs ask the L2 cache for (`decode_kernels.PREFETCH`)."""
  decode_kernels.launch_dependents()
  del index_ref
  if ff_norm:
    scale_ref, bias_ref, c1_ref, *refs = refs
  ahead_refs, (out_ref, state_out_ref, next_ref, *partial_refs) = refs[:ahead], refs[ahead:]
  r, v = pl.program_id(0), pl.program_id(1)
  b, h = r // n_heads, r % n_heads
  d_head = x_ref.shape[1] // n_heads
  next_ref[0] = position_ref[0] + 1   # the next token's position (every program writes it)
  index = jnp.minimum(position_ref[0], k_cache_ref.shape[1] - 1)
  cols = pl.ds(v * value_width, value_width)              # of the head's channels
  own = pl.ds(h * d_head + v * value_width, value_width)  # the same, of d_model's
  # Every load first (`decode_kernels`' note on load order): q's pieces of d_head, the
  # head's K cache in blocks of positions and pieces, its V cache's columns, x; then the
  # state's, which `_move_state` waits for before it writes the state. With `filled` only the
  # first FILLED_FIRST blocks load so; the others in a loop after, as far as the token's
  # position.
  q_pieces = decode_kernels.pieces(d_head)
  qs = [f32(q_ref[b, pl.ds(h * d_head + s0, ls)]) for s0, ls in q_pieces]
  first = starts[:FILLED_FIRST] if filled else starts
  keys = [[k_cache_ref[r, pl.ds(start, block), pl.ds(s0, ls)] for s0, ls in q_pieces]
          for start in first]
  values = [v_cache_ref[r, pl.ds(start, block), cols] for start in first]
  x = x_ref[b, own]
  if ff_norm:
    ff_weights = scale_ref[own], bias_ref[own], c1_ref[own, :]
  decode_kernels.prefetch_all(ahead_refs, grid)
  if ff_norm:
    decode_kernels.keep((scale_ref, bias_ref, c1_ref), grid)
  _move_state(y_ref, y_bias_ref, state_ref, state_out_ref, b, own, barrier)
  # q · K_cache, the head's pieces of d_head added; `conv` has written the token's own key
  # at `index`, so its score is read as the cache holds it, like the others'.
  if first:
    parts = _attend_blocks(qs, keys, values, first, block, index, masked=filled)
  else:   # every block in the loop: the parts of no position
    zero = f32(index - index)   # computed: a loop's carries are values in Triton's lowering
    parts = zero - 1e30, zero, jnp.zeros((value_width,), jnp.float32) + zero
  if filled:
    parts = _attend_filled(parts, qs, q_pieces, k_cache_ref, v_cache_ref, r, cols, index,
                           block, len(first))
  _, total, weighted = parts
  out = (f32(x) + weighted / total).astype(out_ref.dtype)
  out_ref[b, own] = out
  if ff_norm:   # the program's index among its row's d / Cv
    _ff_partials(f32(out), *ff_weights, *partial_refs, b, h * (d_head // value_width) + v)


def _scores(qs, key_pieces, position, valid_from, index):
  """q · K [block] / √d_head at these positions of the cache, the head's pieces of d_head
  added; −inf where a position lies before `valid_from` (a block that overlaps the one
  before) or after `index`."""
  root = float(sum(q.shape[0] for q in qs)) ** 0.5
  part = sum(jnp.sum(f32(k) * q[None, :], axis=1) for q, k in zip(qs, key_pieces))
  valid = (position >= valid_from) & (position <= index)
  return jnp.where(valid, part / root, -jnp.inf), valid


def _attend_blocks(qs, keys, values, starts, block, index, masked=False, first=0):
  """The softmax's parts over the blocks of the caches at `starts` (blocks first, first + 1,
  ... of the caches, each block's start clamped as `decode_kernels.cache_blocks` clamps the
  last), loaded before (`keys`, `values` per block), the positions after `index` masked out:
  the largest score, Σ exp(score − largest) and those weights times V [Cv] (softmax·V = the
  last over the second). With `masked`, masked positions' values count as 0 (the blocks may
  hold anything past `index`, as where `_attend_filled` reads on)."""
  found = [_scores(qs, pieces, start + jnp.arange(block), (first + i) * block, index)
           for i, (start, pieces) in enumerate(zip(starts, keys))]
  top = found[0][0].max()
  for score, _ in found[1:]:
    top = jnp.maximum(top, score.max())
  weights, weighted = None, None   # summed over the blocks first, then reduced once
  for (score, valid), value in zip(found, values):
    p = jnp.exp(score - top)                                             # [block]; 0 masked
    value = jnp.where(valid[:, None], f32(value), 0.0) if masked else f32(value)
    products = p[:, None] * value                                        # [block, Cv]
    weights = p if weights is None else weights + p
    weighted = products if weighted is None else weighted + products
  return top, jnp.sum(weights), jnp.sum(weighted, axis=0)


def _attend_filled(parts, qs, q_pieces, k_cache_ref, v_cache_ref, r, cols, index, block,
                   done):
  """The softmax's parts (`_attend_blocks`') `parts` of the first `done` blocks, merged with
  those of the blocks after them that hold positions up to `index`, read in a loop of
  FILLED_STEP blocks a step (⌈(index // block + 1 − done) / FILLED_STEP⌉ steps, none where
  the token lies in the first blocks; FILLED_MIN_LEN), each step's blocks loaded first and
  merged as flash-decoding merges parts; masked positions' values count as 0, so nothing
  past `index` reaches the output, whatever the caches hold there (blocks past the caches'
  end, in a last step, hold no position: their starts clamp to the last block's, and
  `_scores` masks every position of them as lying before the block)."""
  max_len, group = k_cache_ref.shape[1], FILLED_STEP

  def step(g, carry):
    first = done + g * group
    starts = [jnp.minimum((first + i) * block, max_len - block) for i in range(group)]
    keys = [[k_cache_ref[r, pl.ds(start, block), pl.ds(s0, ls)] for s0, ls in q_pieces]
            for start in starts]
    values = [v_cache_ref[r, pl.ds(start, block), cols] for start in starts]   # [block, Cv]
    # A step's first block holds a position up to `index`, so the step's largest score is
    # finite (`_merge` rescales by it).
    return _merge(carry, _attend_blocks(qs, keys, values, starts, block, index, masked=True,
                                        first=first))

  return jax.lax.fori_loop(0, (index // block + 1 - done + group - 1) // group, step, parts)


def _merge(parts, more):
  """Two (largest score, Σ exp(score − largest), weighted values) parts of one softmax as
  one, each rescaled to the larger of the two largest scores."""
  top = jnp.maximum(parts[0], more[0])
  scale, more_scale = jnp.exp(parts[0] - top), jnp.exp(more[0] - top)
  return (top, parts[1] * scale + more[1] * more_scale,
          parts[2] * scale + more[2] * more_scale)


def _ff_partials(x, scale, bias, c1, sum_ref, m2_ref, products_ref, b, p):
  """The partial sums over one program's columns of the residual x [C] from which the next
  FF block's units programs finish its LayerNorm and x·C1 (`sparse_ff_kernel.ff_block`'s
  `partials`): Σx and Σ(x − x̄)² (x̄ this slice's mean; merged as in Chan et al.'s parallel
  variance), and Σ(x − x̄)·scale·C1, Σscale·C1 and Σbias·C1 [r], so that, summed over the
  slices, LayerNorm(x)·C1 = inv·Σ(Σ(x − x̄)·scale·C1 + (x̄ − mean)·Σscale·C1) + Σbias·C1.
  Each slice centred on its own mean, no two large sums cancel where the residual's mean is
  large against its spread (`Σx·scale·C1 − mean·Σscale·C1` lost the logits' bits there:
  `tests/test_fused_residual.py`)."""
  total = jnp.sum(x)
  centred = x - total / x.shape[0]
  sum_ref[b, p] = total
  m2_ref[b, p] = jnp.sum(centred * centred)
  scaled = f32(scale)[:, None] * f32(c1)                                              # [C, r]
  products_ref[b, p, 0, :] = jnp.sum(centred[:, None] * scaled, axis=0)
  products_ref[b, p, 1, :] = jnp.sum(scaled, axis=0)
  products_ref[b, p, 2, :] = jnp.sum(f32(bias)[:, None] * f32(c1), axis=0)


def _move_state(y_ref, y_bias_ref, state_ref, state_out_ref, b, cols, barrier):
  """The convolution's state moves one position on at channels `cols`, in place: the newest
  position takes this token's multiplicative output y (its partial sums added, as the state's
  dtype holds it). `conv` has read the whole state before (its programs read their
  neighbours' modules, so none of them could write it); here a program reads and writes its
  own channels only, all reads first (`barrier`: a GPU's threads wait for each other)."""
  n = state_ref.shape[1]
  older = [state_ref[b, i + 1, cols] for i in range(n - 1)]
  parts = decode_kernels.load_pieces(lambda parts: y_ref[b, parts, cols], y_ref.shape[1])
  bias = y_bias_ref[cols]
  y = decode_kernels.sum_rows(parts)
  newer = older + [y + f32(bias)]
  if barrier:
    decode_kernels.plgpu.debug_barrier()
  for i, value in enumerate(newer):
    state_out_ref[b, i, cols] = value.astype(state_out_ref.dtype)


def decode_step(x, norm, mixed, conv, state, k_cache, v_cache, index, *, n_heads, sizes,
                epsilon, interpret=False, rows=None, width=None, value_width=None,
                modules=None, split=None, ff_norm=None, ahead=()):
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
    rows, width, value_width, modules, split: Input rows per `mixed` program, channels per
      `conv` program, value columns per `attend` program, modules per `conv` program, modules
      per `mixed` program (powers of 2, each capped at what divides its sides; None: ROWS,
      WIDTH, VALUE_WIDTH, MODULES, SPLIT).
    ff_norm: (scale [d], bias [d], C1 [d, r]) of the next FF block's LayerNorm and
      controller, or None. Given, the attention programs also return the partial sums from
      which `sparse_ff_kernel.ff_block` finishes that LayerNorm without a kernel of its own.
    ahead: Arrays the kernel after this block's reads (the next FF block's fixed weights).
      With `decode_kernels.PREFETCH`, the attention programs ask the L2 cache for them, and
      the multiplicative programs for the convolutions' weights.

  Returns:
    (out [B, d] in x's dtype, new state, k_cache, v_cache, index + 1), and with `ff_norm` the
    partial sums (Σx [B, P], Σ(x − x̄)² [B, P], products [B, P, 3, r]) of its P = d / Cv
    programs' columns (`_ff_partials`); each state written in
    place into the buffer it came in: where the state is donated (a jitted step) or carried
    (a generation's loop), XLA then copies nothing into it. A new state in a buffer of its
    own cost two copy kernels per block (on an H200 at 800M, 84 µs a step outside the blocks
    against 44; `bench/decode_profile.py`).
  """
  batch, d_model = x.shape
  d, e, y_bias = mixed
  n_modules, n_channels = d.shape[0], e.shape[1]
  d_head = d_model // n_heads
  max_len = k_cache.shape[1]
  share = decode_kernels.largest_share
  rows = share(rows or ROWS, d_model)
  # A program's channels lie in one module and one head.
  width, modules = share(width or WIDTH, n_channels, d_head), modules or MODULES
  if modules is None:
    modules = 1
    while 3 * n_modules * (n_channels // width) // modules > 2 * CONV_PROGRAMS:
      wider = share(2 * width, n_channels, d_head)
      if wider <= WIDE and wider > width:
        width = wider
      elif n_modules % (2 * modules) == 0:
        modules *= 2
      else:
        break
  modules = share(modules, n_modules)
  value_width = share(value_width or VALUE_WIDTH, d_head)
  split = share(split or SPLIT, n_modules)
  channels = n_channels if MIXED_CHANNELS is None else share(MIXED_CHANNELS, n_channels)
  block, starts = decode_kernels.cache_blocks(max_len, POSITIONS)
  index = jnp.reshape(index, (1,)).astype(jnp.int32)

  dot = DOT and min(rows, *(length for side in (split, channels)
                            for _, length in decode_kernels.pieces(side))) >= 16
  stats = ()
  if d_model > STATS_IN_KERNEL:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=1)
    stats = (mean, jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean[:, None]), axis=1) + epsilon))
  conv_weights = [w for pair in conv for w in pair]
  mixed_ahead, ahead = ((conv_weights, tuple(ahead)) if decode_kernels.PREFETCH else ((), ()))
  caches = ((k_cache, v_cache) if PREFETCH_CACHES else ()) + ((state,) if PREFETCH_STATE else ())
  grid = (batch, d_model // rows, n_modules // split * (n_channels // channels))
  if (MOSAIC and not (stats or mixed_ahead or caches)
      and sparse_qkv_mosaic.fits(d_model, n_modules, n_channels, e.dtype)):
    y = sparse_qkv_mosaic.mixed_parts(x, *norm, d, e, epsilon, interpret)
  else:
    y = pl.pallas_call(
        functools.partial(_mixed_kernel, rows=rows, sub=rows if dot else min(rows, 8),
                          split=split, channels=channels, dot=dot, epsilon=epsilon,
                          ahead=len(mixed_ahead), caches=len(caches), grid=grid),
        grid=grid,
        out_shape=jax.ShapeDtypeStruct((batch, d_model // rows, n_modules, n_channels),
                                       jnp.float32),
        interpret=interpret, compiler_params=decode_kernels.triton_params(MIXED_WARPS),
    )(x, *norm, d, e, *mixed_ahead, *caches, *stats)
  if y.shape[1] > MAX_PARTS:   # else every `conv` program would add them all
    y = jnp.sum(y, axis=1, keepdims=True)

  grid = (batch, 3, n_modules // modules, n_channels // width)
  if (MOSAIC and x.dtype == k_cache.dtype
      and sparse_qkv_mosaic.convolutions_fit(
          d_model, n_modules, n_channels, n_heads, k_cache.dtype, n_state=state.shape[1],
          largest=max(sizes), parts=y.shape[1])):
    q, position, k_cache, v_cache = sparse_qkv_mosaic.convolutions(
        index, y, y_bias, state, conv, k_cache, v_cache, n_heads=n_heads, sizes=sizes,
        interpret=interpret)
  else:
    q, position, k_cache, v_cache = pl.pallas_call(
        functools.partial(_conv_kernel, sizes=tuple(sizes), n_heads=n_heads, width=width,
                          group=modules, grid=grid),
        grid=grid,
        out_shape=(jax.ShapeDtypeStruct((batch, d_model), x.dtype),
                   jax.ShapeDtypeStruct((1,), jnp.int32),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={10: 2, 11: 3},
        interpret=interpret, compiler_params=decode_kernels.triton_params(CONV_WARPS),
    )(index, y, y_bias.reshape(n_modules, n_channels), state, *conv_weights, k_cache, v_cache)

  flat_state = state.reshape(batch, state.shape[1], d_model)
  y = y.reshape(batch, y.shape[1], d_model)
  rank = None if ff_norm is None else ff_norm[2].shape[1]
  if (MOSAIC and MOSAIC_ATTEND and not ahead and x.dtype == k_cache.dtype == state.dtype
      and sparse_qkv_mosaic.attend_fits(d_model, n_heads, max_len, state.shape[1],
                                        k_cache.dtype, rank, value_width)):
    out, flat_state, index, *partials = sparse_qkv_mosaic.attend(
        position, x, q, k_cache, v_cache, y, y_bias, flat_state, index, ff_norm,
        n_heads=n_heads, partial=value_width, interpret=interpret)
  else:
    partials = (() if ff_norm is None
                else sparse_ff_kernel.partials_type(batch, d_model // value_width, rank))
    grid = (batch * n_heads, d_head // value_width)
    out, flat_state, index, *partials = pl.pallas_call(
        functools.partial(_attend_kernel, n_heads=n_heads, value_width=value_width,
                          starts=starts, block=block, barrier=not interpret,
                          ff_norm=ff_norm is not None, filled=reads_filled(max_len),
                          ahead=len(ahead), grid=grid),
        grid=grid,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(flat_state.shape, flat_state.dtype),
                   jax.ShapeDtypeStruct((1,), jnp.int32), *partials),
        input_output_aliases={7: 1, 8: 2},
        interpret=interpret, compiler_params=decode_kernels.triton_params(ATTEND_WARPS),
    )(position, x, q, k_cache, v_cache, y, y_bias, flat_state, index, *(ff_norm or ()),
      *ahead)
  return (out, flat_state.reshape(state.shape), k_cache, v_cache, index[0], *partials)
