"""Causal attention of one decoded token over its KV cache as one Pallas kernel.

The decoding half of `CausalAttentionCore` (`causal_attention.py`) for one token per row:
write the token's key and value into the caches at `index`, then

  out = softmax(q·Kᵀ / √d_head)·V       over the cache's positions 0..index

per row and head. XLA runs this as about six kernels (two in-place cache updates, the scores,
the softmax's max and sum, the weighted sum), each of one or two microseconds on a GPU. Here
one kernel does all of it, its programs in one of two forms:

  split   (SPLIT, the default) program (row·head, block): one block of up to 64 of the
          head's cached positions, every column: its largest score, Σ exp(score − largest)
          and the values weighted by those (the token's own key and value in block 0's, which
          also writes them into the caches); XLA then adds the blocks' parts, rescaled to the
          largest score of all, as flash-decoding does. The programs of blocks past the
          token's position load nothing (SKIP), so a cache is read as far as it is filled.
  columns program (row·head, c): every position, and VALUE_WIDTH columns of the head's
          values; the first program of a head also writes the token's key.

Each program issues its loads together (`decode_kernels`' note on load order) and masks the
positions from `index` on; the kernel's outputs alias its cache inputs. A d_head that is not
a power of 2 (17B's 96) is loaded in power-of-2 pieces (`decode_kernels.pieces`: 64 and 32).

Where it pays. XLA's kernels read 17B's 12 MB of caches (96 heads of 96, 168 positions) at
1.5-1.9 TB/s on an H200 (docs/decoding_gpu.md). There one FF+QKV block looped in a program
took 0.0558-0.0577 ms with the split kernel on an H100 against 0.0595-0.0613 with XLA's
ops; at the 800M shape (16 heads of 64) an earlier one-program-a-head kernel took 4.2 µs on
an H200 and a whole generation was no faster with it. With caches of 2048 positions (the gin
files' MAX_LEN), where XLA's path reads every position at every token, a 2-block 17B
generation in bfloat16 took 0.3016 ms a token on an H100, against 0.3608 without SKIP and
0.4081 with XLA's attention; at 800M, a dense 24-block generation 1.1982 ms a token against
1.3486. So on a GPU `decode_kernels.py`'s 'auto' takes it where a step attends from at least
MIN_ROWS rows·heads or over caches of at least MIN_LEN positions (`pays`), XLA's ops
elsewhere.

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where the attention calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers.decode_kernels import f32

POSITIONS = 64  # cache positions read per block, at most
# The programs' form (the module's note): at 17B's shapes on an H100, one FF+QKV block looped
# 0.0558-0.0577 ms split against 0.0574 by columns; on an H200 the columns' form took
# 0.0541-0.0543 against XLA's 0.0538-0.0542 (docs/decoding_gpu.md).
SPLIT = True
# With SKIP (and SPLIT) the programs of blocks that hold no cached position before the token
# load nothing: a generation reads the filled part of its caches, not all max_len positions
# at every token, as XLA's path does. On an H100 at 17B with caches of 2048 positions one
# FF+QKV block looped 0.0616 ms with it against 0.1113 without (XLA's path 0.1164); a 2-block
# generation took 0.5195 ms a token against 0.6203, in bfloat16 0.3016 against 0.3608
# (docs/decoding_gpu.md).
SKIP = True
VALUE_WIDTH = 32  # value columns per program without SPLIT, at most (a power of 2)
WARPS = 8  # per program
# 'auto' takes the kernel on a GPU where a step attends from at least MIN_ROWS rows·heads:
# 17B's 96 heads at batch 1, not 800M's 16, whose decoder was no faster with it.
MIN_ROWS = 64
# ... or where its caches hold at least MIN_LEN positions (None: never), which XLA's path
# reads whole at every token and the kernel as far as they are filled (SKIP). On an H100 at
# 800M (16 heads), caches of 2048: a dense block looped 0.0491-0.0498 ms with the kernel
# against 0.0549 with XLA's path (caches of 512: 0.0487-0.0491 against 0.0479-0.0492, a
# tie); a 24-block generation 1.1982 ms a token against 1.3486 (docs/decoding_gpu.md, "Long
# caches at 800M"). Table 1's caches of 168 keep XLA's path at 800M.
MIN_LEN = 512


def value_width(d_head):
  """Value columns per program without SPLIT: the largest power of 2 up to VALUE_WIDTH
  dividing d_head."""
  return min(VALUE_WIDTH, d_head & -d_head)


def pays(batch, n_heads, max_len=0):
  """Whether 'auto' takes the kernel on a GPU: at least MIN_ROWS rows·heads a step, or
  caches of at least MIN_LEN positions."""
  return batch * n_heads >= MIN_ROWS or (MIN_LEN is not None and max_len >= MIN_LEN)


def _kernel(index_ref, q_ref, k_ref, v_ref, k_cache_ref, v_cache_ref, out_ref, k_out_ref,
            v_out_ref, *, n_heads, block, starts, width):
  """One (row·head, value columns) program without SPLIT. Shapes in `attention_step`.

  Every load first (`decode_kernels`' note on load order): q and the token's key in pieces of
  d_head, the head's K cache in blocks of positions (the last may overlap the one before) and
  pieces, the program's columns of its V cache; positions from `index` on are masked out of
  the softmax.
  """
  decode_kernels.launch_dependents()
  r, c = pl.program_id(0), pl.program_id(1)       # the caches' row (row · heads + head)
  b, h = r // n_heads, r % n_heads
  index = jnp.minimum(index_ref[0], k_cache_ref.shape[1] - 1)   # past the end, the last
  head = decode_kernels.pieces(q_ref.shape[-1])
  cols = pl.ds(c * width, width)
  keys = [[k_cache_ref[r, pl.ds(start, block), pl.ds(s0, ls)] for s0, ls in head]
          for start in starts]                                        # [block, piece]
  values = [v_cache_ref[r, pl.ds(start, block), cols] for start in starts]   # [block, width]
  qs = [f32(q_ref[b, h, pl.ds(s0, ls)]) for s0, ls in head]
  ks = [k_ref[b, h, pl.ds(s0, ls)].astype(k_out_ref.dtype) for s0, ls in head]
  v = v_ref[b, h, cols].astype(v_out_ref.dtype)

  @pl.when(c == 0)
  def _():
    for (s0, ls), k in zip(head, ks):
      k_out_ref[r, index, pl.ds(s0, ls)] = k

  v_out_ref[r, index, cols] = v
  root = float(q_ref.shape[-1]) ** 0.5           # scores are q·k / √d_head, as the layer's
  own = sum(jnp.sum(q * f32(k)) for q, k in zip(qs, ks)) / root   # the token as cached
  scores, masks = [], []
  for i, (start, pieces) in enumerate(zip(starts, keys)):
    position = start + jnp.arange(block)
    valid = (position >= i * block) & (position < index)
    part = sum(jnp.sum(f32(k) * q[None, :], axis=1) for q, k in zip(qs, pieces))
    scores.append(jnp.where(valid, part / root, -jnp.inf))
    masks.append(valid)
  top = own
  for score in scores:
    top = jnp.maximum(top, jnp.max(score))
  total = jnp.exp(own - top)
  out = total * f32(v)
  for score, valid, value in zip(scores, masks, values):
    p = jnp.exp(score - top)                                              # [block]; 0 masked
    total += jnp.sum(p)
    out += jnp.sum(p[:, None] * jnp.where(valid[:, None], f32(value), 0.0), axis=0)
  out_ref[b, h, cols] = (out / total).astype(out_ref.dtype)


_EMPTY = -1e30   # a masked score: exp(_EMPTY − top) is 0 for any top a score can reach


def _split_kernel(index_ref, q_ref, k_ref, v_ref, k_cache_ref, v_cache_ref, top_ref, total_ref,
                  out_ref, k_out_ref, v_out_ref, *, n_heads, block, max_len, skip):
  """One (row·head, block of positions) program of SPLIT: the softmax's parts over its block,
  every column of the head (in pieces): its largest score, Σ exp(score − top) and the values
  weighted by those, the token's own among them in block 0's, which also writes the token's
  key and value into the caches. `attention_step` adds the blocks' parts. With `skip`
  (SKIP), a block holding no position before the token's loads nothing and writes the parts
  of an empty block, as the masks would give them."""
  decode_kernels.launch_dependents()
  r, j = pl.program_id(0), pl.program_id(1)
  b, h = r // n_heads, r % n_heads
  index = jnp.minimum(index_ref[0], k_cache_ref.shape[1] - 1)   # past the end, the last
  head = decode_kernels.pieces(q_ref.shape[-1])
  qs = [f32(q_ref[b, h, pl.ds(s0, ls)]) for s0, ls in head]
  ks = [k_ref[b, h, pl.ds(s0, ls)].astype(k_out_ref.dtype) for s0, ls in head]
  vs = [v_ref[b, h, pl.ds(s0, ls)].astype(v_out_ref.dtype) for s0, ls in head]
  first = j == 0

  @pl.when(first)
  def _():
    for (s0, ls), k, v in zip(head, ks, vs):
      k_out_ref[r, index, pl.ds(s0, ls)] = k
      v_out_ref[r, index, pl.ds(s0, ls)] = v

  def parts():
    start = jnp.minimum(j * block, max_len - block)    # the last block overlaps the one before
    keys = [k_cache_ref[r, pl.ds(start, block), pl.ds(s0, ls)] for s0, ls in head]
    values = [v_cache_ref[r, pl.ds(start, block), pl.ds(s0, ls)] for s0, ls in head]
    root = float(q_ref.shape[-1]) ** 0.5
    own = sum(jnp.sum(q * f32(k)) for q, k in zip(qs, ks)) / root   # the token as cached
    position = start + jnp.arange(block)
    valid = (position >= j * block) & (position < index)
    score = jnp.where(valid, sum(jnp.sum(f32(k) * q[None, :], axis=1)
                                 for q, k in zip(qs, keys)) / root, _EMPTY)
    top = jnp.maximum(jnp.max(score), jnp.where(first, own, _EMPTY))
    p = jnp.where(valid, jnp.exp(score - top), 0.0)                        # [block]
    p_own = jnp.where(first, jnp.exp(own - top), 0.0)
    top_ref[r, j] = top
    total_ref[r, j] = jnp.sum(p) + p_own
    for (s0, ls), value, v in zip(head, values, vs):
      weighted = jnp.sum(p[:, None] * jnp.where(valid[:, None], f32(value), 0.0), axis=0)
      out_ref[r, j, pl.ds(s0, ls)] = weighted + p_own * f32(v)

  if not skip:
    parts()
    return
  live = first | (j * block < index)
  pl.when(live)(parts)

  @pl.when(jnp.logical_not(live))
  def _():
    zero = f32(j - j)   # computed: Triton's lowering stores no constant here
    top_ref[r, j] = zero + _EMPTY
    total_ref[r, j] = zero
    for s0, ls in head:
      out_ref[r, j, pl.ds(s0, ls)] = jnp.broadcast_to(zero, (ls,))


def _attention_split(q, k, v, k_cache, v_cache, index, interpret):
  """`attention_step` as SPLIT programs, each writing its block's parts (largest score and
  Σ exp(score − largest) [B·H, blocks], weighted values [B·H, blocks, d_head], in float32),
  and XLA's sum of the parts."""
  _, n_heads, d_head = q.shape
  rows, max_len = k_cache.shape[:2]
  block, starts = decode_kernels.cache_blocks(max_len, POSITIONS)
  kernel = functools.partial(_split_kernel, n_heads=n_heads, block=block, max_len=max_len,
                             skip=SKIP)
  parts = (rows, len(starts))
  top, total, out, k_cache, v_cache = _call(
      kernel, parts, (jax.ShapeDtypeStruct(parts, jnp.float32),
                      jax.ShapeDtypeStruct(parts, jnp.float32),
                      jax.ShapeDtypeStruct(parts + (d_head,), jnp.float32)),
      q, k, v, k_cache, v_cache, index, interpret)
  scale = jnp.exp(top - jnp.max(top, axis=1, keepdims=True))             # [rows, blocks]
  out = jnp.sum(scale[..., None] * out, axis=1) / jnp.sum(scale * total, axis=1)[:, None]
  return out.reshape(q.shape).astype(q.dtype), k_cache, v_cache


def attention_step(q, k, v, k_cache, v_cache, index, interpret=False):
  """Attention output of one token per row, and the caches with its key and value.

  Args:
    q, k, v: [B, H, d_head], the token's projections split into heads.
    k_cache, v_cache: [B·H, max_len, d_head], valid before `index`.
    index: int32 scalar, the token's position; past the caches' end, their last position
      (as XLA's in-place update clamps it: a benchmark's loop of one block runs on past it).
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    (out [B, H, d_head] in q's dtype, k_cache, v_cache), the caches updated in place.
  """
  if SPLIT:
    return _attention_split(q, k, v, k_cache, v_cache, index, interpret)
  batch, n_heads, _ = q.shape
  max_len = k_cache.shape[1]
  block, starts = decode_kernels.cache_blocks(max_len, POSITIONS)
  width = value_width(q.shape[-1])
  kernel = functools.partial(_kernel, n_heads=n_heads, block=block, starts=starts, width=width)
  return _call(kernel, (batch * n_heads, q.shape[-1] // width),
               (jax.ShapeDtypeStruct(q.shape, q.dtype),), q, k, v, k_cache, v_cache, index,
               interpret)


def _call(kernel, grid, out_shape, q, k, v, k_cache, v_cache, index, interpret):
  """`kernel`'s pallas_call over `grid`: its outputs `out_shape`, then the caches, written in
  place (aliased to the inputs' caches); its inputs the position, q, k, v and the caches."""
  n = len(out_shape)
  return pl.pallas_call(
      kernel, grid=grid,
      out_shape=(*out_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      input_output_aliases={4: n, 5: n + 1},
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(WARPS),
  )(jnp.reshape(index, (1,)).astype(jnp.int32), q, k, v, k_cache, v_cache)
