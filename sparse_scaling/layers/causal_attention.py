"""Causal multi-head attention with a KV cache, as one layer behind its projections.

The attention of the Transformer baseline (Vaswani et al., 2017), computing what trax's
`tl.CausalAttention` computes (same weights, same outputs), with the heads split and merged
inside the attention layer itself:

  CausalAttentionCore:  q, k, v [batch, length, d_model] -> [batch, length, d_model]
  CausalAttention:      x [batch, length, d_model] -> [batch, length, d_model]
                        (dense Q, K, V and output projections around the core)

The Sparse QKV layer (`sparse_qkv.py`) puts its own projections in front of the same core.
In predict mode the caches are [batch·heads, max_len, d_head], written in place at the step's
position: with the heads merged into the batch axis, both products of a step read a cache as
it lies (with batch and heads as two axes, XLA copies the whole cache at every step to reach
the layout of a batched product). A call of one token per row can decode through one Pallas
kernel instead (`attention_kernel.py`; on a GPU where a step attends from many heads,
`decode_kernels.py` says why and where), and on a CPU reads a long cache only as far as it is
filled (`attend_filled`).
"""

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base

from sparse_scaling import decoding
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode


def one_query_as_reductions():
  """Whether a decoding step's products over the KV cache, one query per row, are written as
  elementwise products and sums rather than as batched matrix products: where decoding
  programs compile with XLA's dot-strength-reduction off (`decoding.compiler_options`, on
  GPUs, for the weights' products).

  A query of one position makes both products matrix-vector products over the cache, which
  that pass would have rewritten as reductions. Without it they run as matrix-product kernels
  and the softmax as a kernel of its own, where the reductions fuse the softmax into the
  weighted sum of the values (docs/decoding_gpu.md). Elsewhere the products stay (on the CPU
  they are the faster form).
  """
  options = decoding.compiler_options() or {}
  return 'dot-strength-reduction' in options.get('xla_disable_hlo_passes', '')


# On a CPU a one-token step over caches of at least FILLED_MIN_LEN positions reads them in
# blocks of FILLED_BLOCK, only as many as hold positions up to the token's (`attend_filled`),
# where the whole-cache products read every position at every token: a generation with the
# gin files' caches of 2048 reads what it has decoded, not 2048 positions a token. On a
# 2-core Xeon, 800M FF+QKV, caches of 2048: a 6-block generation (a 128-token prompt, 32
# tokens) took 7.63-8.00 ms a token against 12.33-12.50 (with Table 1's caches of 168,
# 6.52-7.17); one block looped 0.459-0.487 ms against 0.666-0.672 (blocks of 128: 0.546-0.573,
# of 256: 0.637-0.645); caches of 512, a 2-block generation 5.25-5.36 against 5.77-5.97 (of
# 256, within the spread: not taken). Table 1's caches keep the whole-cache products
# (docs/speed.md). GPUs read long caches through the attention kernel's SKIP
# (`attention_kernel.py`) or XLA's products; other backends through the products.
FILLED_BLOCK, FILLED_MIN_LEN = 64, 512
# ... while the token lies in the first FILLED_UNTIL percent of the caches; past them the
# whole-cache products again, which cost the same at any position where the loop's cost
# grows with it: on the 2-core Xeon, 800M's caches of 2048 (16 heads of 64), twelve layers'
# caches read in turn (a scratch script), ms a layer, the loop against the products: 0.175
# against 0.703 at position 128, 0.622 against 0.734 at 512, 0.773 against 0.772 at 640,
# 0.959 against 0.772 at 768, 2.158 against 0.805 at 1920; a 6-block 800M FF+QKV generation
# at 1920 took 9.12-14.98 ms a token against 19.79-20.56 with the loop at every position
# (docs/speed.md, "Tokens late in the caches"). The 2-core EPYC's crossover lies nearer 17%
# (the same script); 30 is the Xeon's. 100: the loop at every position.
FILLED_UNTIL = 30


def reads_filled(max_len):
  """Whether a one-token step over caches of `max_len` positions takes `attend_filled` (while
  its position lies in their first FILLED_UNTIL percent)."""
  return jax.default_backend() == 'cpu' and max_len >= max(FILLED_MIN_LEN, 2 * FILLED_BLOCK)


def attend_filled(q, k_cache, v_cache, index, block):
  """softmax(q·kᵀ / √d_head)·v over the caches' positions 0..index, reading them in blocks
  of `block` positions and only the blocks that hold those (a loop of index // block + 1
  steps), the softmax merged block by block as flash-decoding does, in float32.

  Args:
    q: [B·H, 1, d_head], one query per row.
    k_cache, v_cache: [B·H, max_len, d_head], holding the token's key and value at `index`;
      max_len at least `block`.
    index: int32 scalar, the token's position (past the caches' end: all of them).
    block: Positions a step reads; the last block overlaps the one before where max_len is
      not a multiple.

  Returns:
    [B·H, 1, d_head] in v_cache's dtype.
  """
  rows, max_len, d_head = k_cache.shape
  n_blocks = jnp.minimum(index // block + 1, -(-max_len // block))

  def step(j, carry):
    top, total, out = carry                                   # [rows], [rows], [rows, d]
    first = jnp.minimum(j * block, max_len - block)
    keys = jax.lax.dynamic_slice_in_dim(k_cache, first, block, axis=1)
    values = jax.lax.dynamic_slice_in_dim(v_cache, first, block, axis=1)
    position = first + jnp.arange(block)
    valid = (position >= j * block) & (position <= index)     # [block]
    dots = jnp.einsum('bqd,bkd->bqk', q, keys)[:, 0].astype(jnp.float32) / jnp.sqrt(
        jnp.float32(d_head))
    dots = jnp.where(valid, dots, -jnp.inf)                   # [rows, block]
    new_top = jnp.maximum(top, jnp.max(dots, axis=-1))
    p = jnp.exp(dots - new_top[:, None])                      # 0 where masked
    scale = jnp.exp(top - new_top)
    weighted = jnp.einsum('bk,bkd->bd', p.astype(values.dtype), values)
    return (new_top, total * scale + jnp.sum(p, axis=-1),
            out * scale[:, None] + weighted.astype(jnp.float32))

  zeros = jnp.zeros((rows,), jnp.float32)
  top, total, out = jax.lax.fori_loop(
      0, n_blocks, step, (zeros - jnp.inf, zeros, jnp.zeros((rows, d_head), jnp.float32)))
  return (out / total[:, None])[:, None, :].astype(v_cache.dtype)


class CausalAttentionCore(base.Layer):
  """softmax(q·kᵀ / √d_head + causal mask)·v, per head; no weights.

  Inputs q, k, v [batch, length, d_model]; output [batch, length, d_model]. In predict mode the
  state is (k_cache, v_cache [batch·heads, max_len, d_head], index int32): a call of `length`
  positions writes its keys and values at `index` and attends to the cache up to them.
  """

  def __init__(self, n_heads, dropout=0.0, max_inference_length=2048, mode='train'):
    super().__init__(n_in=3, n_out=1, name='CausalAttentionCore')
    check_mode(mode)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout}')
    self._n_heads = n_heads
    self._dropout = dropout
    self._max_len = max_inference_length
    self._mode = mode

  def forward(self, inputs):
    q, k, v = inputs
    batch, length, d_model = q.shape
    n_heads, d_head = self._n_heads, d_model // self._n_heads
    kernel = decode_kernels.active('attention',
                                   attention_kernel.pays(batch, n_heads, self._max_len))
    if self._mode == 'predict' and length == 1 and kernel != 'xla':   # any d_head: in pieces
      k_cache, v_cache, start = self.state
      split = lambda a: a.reshape(batch, n_heads, d_head)
      out, k_cache, v_cache = attention_kernel.attention_step(
          split(q), split(k), split(v), k_cache, v_cache, start,
          interpret=kernel == 'interpret')
      self.state = (k_cache, v_cache, start + 1)
      return out.reshape(batch, 1, d_model)

    def heads(a):                                                 # [batch·heads, len, d_head]
      a = a.reshape(batch, length, n_heads, d_head).transpose(0, 2, 1, 3)
      return a.reshape(batch * n_heads, length, d_head)

    q, k, v = heads(q), heads(k), heads(v)
    start = 0
    if self._mode == 'predict':
      k_cache, v_cache, start = self.state
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
      self.state = (k, v, start + length)
      if length == 1 and reads_filled(self._max_len):
        out = jax.lax.cond(                                       # [b·heads, 1, d_head]
            start * 100 < FILLED_UNTIL * self._max_len,
            lambda: attend_filled(q, k, v, start, FILLED_BLOCK),
            lambda: self._attend_all(q, k, v, start, length))
        return out.reshape(batch, 1, d_model)
    out = self._attend_all(q, k, v, start, length)
    out = out.reshape(batch, n_heads, length, d_head).transpose(0, 2, 1, 3)
    return out.reshape(batch, length, d_model)

  def _attend_all(self, q, k, v, start, length):
    """softmax(q·kᵀ / √d_head)·v over every position of k and v, masked past each query's
    (start + its row): q [B·H, length, d_head], k and v [B·H, positions, d_head] ->
    [B·H, length, d_head]."""
    d_head = q.shape[-1]
    reduce = self._mode == 'predict' and length == 1 and one_query_as_reductions()
    if reduce:   # q [b·h, 1, d_head]; the products in float32 inside the reductions
      dots = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1)[:, None, :]
      dots = dots / jnp.sqrt(d_head).astype(jnp.float32)
    else:
      dots = jnp.einsum('bqd,bkd->bqk', q, k) / jnp.sqrt(d_head).astype(q.dtype)
    query_pos = start + jnp.arange(length)[:, None]               # [lq, 1]
    key_pos = jnp.arange(k.shape[1])[None, :]                     # [1, lk]
    dots = jnp.where(key_pos <= query_pos, dots, jnp.finfo(dots.dtype).min)
    weights = jax.nn.softmax(dots, axis=-1)                       # [batch·heads, lq, lk]
    if self._mode == 'train' and self._dropout:
      keep = jax.random.bernoulli(self.rng, 1.0 - self._dropout, weights.shape)
      weights = jnp.where(keep, weights / (1.0 - self._dropout), 0.0)
    if reduce:
      out = jnp.sum(weights[:, 0, :, None] * v.astype(jnp.float32), axis=1)[:, None, :]
      out = out.astype(v.dtype)
    else:
      out = jnp.einsum('bqk,bkd->bqd', weights.astype(v.dtype), v)  # [b·heads, lq, d_head]
    return out

  def positions_held(self):
    """In predict mode (max_len, False): the KV cache holds max_len decoded positions, the
    encoder's none (`decoding.Decoder` checks a generation against it); else None."""
    return (self._max_len, False) if self._mode == 'predict' else None

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      q = input_signature[0]
      shape = (q.shape[0] * self._n_heads, self._max_len, q.shape[2] // self._n_heads)
      self.state = (jnp.zeros(shape, q.dtype), jnp.zeros(shape, q.dtype),  # two buffers
                    jnp.array(0, jnp.int32))


def CausalAttention(d_model, n_heads=1, dropout=0.0, max_inference_length=2048, mode='train'):
  """Dense causal self-attention: [batch, length, d_model] -> [batch, length, d_model].

  The weights of trax's `tl.CausalAttention`, in its order: Q, K, V and output `tl.Dense`.

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    dropout: Dropout on the attention weights in training.
    max_inference_length: Size of the KV cache in predict mode.
    mode: 'train', 'eval' or 'predict'.
  """
  check_divides('n_heads', n_heads, 'd_model', d_model)
  return tl.Serial(
      tl.Branch(tl.Dense(d_model), tl.Dense(d_model), tl.Dense(d_model)),   # q, k, v
      CausalAttentionCore(n_heads, dropout, max_inference_length, mode),
      tl.Dense(d_model),
      name='CausalAttention')
