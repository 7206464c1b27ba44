"""Causal attention of one decoded token over its KV cache as one Pallas kernel.

The decoding half of `CausalAttentionCore` (`causal_attention.py`) for one token per row:
write the token's key and value into the caches at `index`, then

  out = softmax(q·Kᵀ / √d_head)·V       over the cache's positions 0..index

per row and head. XLA runs this as about six kernels (two in-place cache updates, the scores,
the softmax's max and sum, the weighted sum), each of one or two microseconds on a GPU while a
head's cache is tens of kilobytes. Here one program per (row, head) does all of it: it loads
the head's cache in blocks of up to 64 positions, all at once, masks the positions from
`index` on, and writes the token's key and value in place (the kernel's outputs alias its
cache inputs). On an H200 at the 800M shape it takes 4.2 µs and a whole generation is no
faster with it, so `decode_kernels.py` leaves it off by default.

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where the attention calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels

POSITIONS = 64  # cache positions read per block, at most


def fits(d_head, max_len):
  """Whether the kernel takes these shapes: d_head a power of 2 (Triton's blocks)."""
  return decode_kernels.is_power_of_2(d_head) and max_len >= 1


def _kernel(index_ref, q_ref, k_ref, v_ref, k_cache_ref, v_cache_ref, out_ref, k_out_ref,
            v_out_ref, *, n_heads, block, starts):
  """One (row, head) program. Shapes in `attention_step`.

  The whole cache of the head is loaded first, in blocks (the last may overlap the one
  before), all in flight at once; positions from `index` on are masked out of the softmax.
  """
  decode_kernels.launch_dependents()
  program = pl.program_id(0)                      # row · heads + head: the caches' row
  b, h = program // n_heads, program % n_heads
  index = index_ref[0]
  keys = [k_cache_ref[program, pl.ds(start, block), :] for start in starts]    # [block, d_head]
  values = [v_cache_ref[program, pl.ds(start, block), :] for start in starts]
  q = q_ref[b, h, :].astype(jnp.float32)           # [d_head]
  k, v = k_ref[b, h, :], v_ref[b, h, :]
  k_out_ref[program, index, :] = k.astype(k_out_ref.dtype)
  v_out_ref[program, index, :] = v.astype(v_out_ref.dtype)
  root = float(q_ref.shape[-1]) ** 0.5           # scores are q·k / √d_head, as the layer's
  k = k.astype(k_out_ref.dtype).astype(jnp.float32)   # the token as the cache holds it
  v = v.astype(v_out_ref.dtype).astype(jnp.float32)
  own = jnp.sum(q * k) / root
  scores, masks = [], []
  for i, start in enumerate(starts):
    position = start + jnp.arange(block)
    valid = (position >= i * block) & (position < index)
    scores.append(jnp.where(valid, jnp.sum(keys[i].astype(jnp.float32) * q[None, :], axis=1)
                            / root, -jnp.inf))
    masks.append(valid)
  top = own
  for score in scores:
    top = jnp.maximum(top, jnp.max(score))
  total = jnp.exp(own - top)
  out = total * v
  for score, valid, value in zip(scores, masks, values):
    p = jnp.exp(score - top)                                              # [block]; 0 masked
    total += jnp.sum(p)
    out += jnp.sum(p[:, None] * jnp.where(valid[:, None], value.astype(jnp.float32), 0.0),
                   axis=0)
  out_ref[b, h, :] = (out / total).astype(out_ref.dtype)


def attention_step(q, k, v, k_cache, v_cache, index, interpret=False):
  """Attention output of one token per row, and the caches with its key and value.

  Args:
    q, k, v: [B, H, d_head], the token's projections split into heads.
    k_cache, v_cache: [B·H, max_len, d_head], valid before `index`.
    index: int32 scalar, the token's position (< max_len).
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    (out [B, H, d_head] in q's dtype, k_cache, v_cache), the caches updated in place.
  """
  batch, n_heads, _ = q.shape
  max_len = k_cache.shape[1]
  block, starts = decode_kernels.cache_blocks(max_len, POSITIONS)
  kernel = functools.partial(_kernel, n_heads=n_heads, block=block, starts=starts)
  return pl.pallas_call(
      kernel, grid=(batch * n_heads,),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      input_output_aliases={4: 1, 5: 2},
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(8),
  )(jnp.reshape(index, (1,)).astype(jnp.int32), q, k, v, k_cache, v_cache)
