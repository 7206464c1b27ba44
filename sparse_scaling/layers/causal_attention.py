"""Causal attention whose decoding reads only the filled part of its KV cache.

trax's `DotProductCausalAttention` attends over its whole `max_inference_length` cache at
every decoded token: at d_model 1024 and 2048 positions that is 16 MB per layer and token,
more than a sparse block's weights. In predict mode this layer writes the new keys and values
into the cache and attends chunk by chunk (`CHUNK` positions at a time, online softmax) over
the positions written so far only, so the cost follows the sequence decoded, not the cache.
Train and eval run trax's `DotProductCausalAttention`.

Inputs and outputs, as trax's: q, k, v [batch·heads, length, d_head] -> [batch·heads, length,
d_head].
"""

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base

CHUNK = 128  # positions read per step of the cache loop


def CausalAttention(d_model, n_heads=1, dropout=0.0, max_len=2048, mode='train'):
  """Dense causal self-attention ([batch, length, d_model] in and out), trax's layout.

  Q, K, V and output projections are Dense layers in trax `CausalAttention`'s order, so
  trax's weights load as they are; the attention itself is `CausalAttentionCore`.

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads (divides d_model).
    dropout: Dropout on the attention weights in training.
    max_len: Longest sequence decoded in predict mode (the KV cache's size).
    mode: 'train', 'eval' or 'predict'.
  """
  def Projection():
    return [tl.Dense(d_model), tl.SplitIntoHeads(n_heads)]   # [b·heads, l, d/heads]

  return tl.Serial(
      tl.Branch(Projection(), Projection(), Projection()),   # q, k, v
      CausalAttentionCore(dropout, max_len, mode),
      tl.MergeHeads(n_heads),                                # [batch, length, d_model]
      tl.Dense(d_model),
      name='CausalAttention')


def CausalAttentionCore(dropout=0.0, max_len=2048, mode='train'):
  """q, k, v [b·heads, length, d_head] -> causal attention [b·heads, length, d_head]."""
  if mode == 'predict':
    return CachedCausalAttention(max_len)
  return tl.DotProductCausalAttention(dropout=dropout, mode=mode)


class CachedCausalAttention(base.Layer):
  """Predict-mode causal attention over a KV cache, reading only its filled chunks.

  State: k and v caches [b·heads, max_len rounded up to CHUNK, d_head] and the number of
  positions written. A call with t new positions writes them, then each query attends to the
  cache up to its own position.
  """

  def __init__(self, max_len):
    super().__init__(n_in=3, n_out=1, name='CachedCausalAttention')
    self._cache_len = -(-max_len // CHUNK) * CHUNK

  def forward(self, inputs):
    q, k, v = inputs                                          # [bh, t, d]
    k_cache, v_cache, start = self.state
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
    end = start + q.shape[1]
    self.state = (k_cache, v_cache, end)
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    query_pos = start + jnp.arange(q.shape[1])                # [t]

    def attend_chunk(chunk, carry):                           # online softmax over chunks
      running_max, total, out = carry                         # [bh, t], [bh, t], [bh, t, d]
      keys = jax.lax.dynamic_slice_in_dim(k_cache, chunk * CHUNK, CHUNK, 1)  # [bh, C, d]
      values = jax.lax.dynamic_slice_in_dim(v_cache, chunk * CHUNK, CHUNK, 1)
      scores = jnp.einsum('btd,bcd->btc', q, keys).astype(jnp.float32)
      key_pos = chunk * CHUNK + jnp.arange(CHUNK)             # [C]
      scores = jnp.where(key_pos[None, :] <= query_pos[:, None], scores, -1e9)
      new_max = jnp.maximum(running_max, scores.max(-1))
      scale = jnp.exp(running_max - new_max)
      weights = jnp.exp(scores - new_max[..., None])          # [bh, t, C]
      out = out * scale[..., None] + jnp.einsum('btc,bcd->btd', weights,
                                                values.astype(jnp.float32))
      return new_max, total * scale + weights.sum(-1), out

    bh, t, d = q.shape
    carry = (jnp.full((bh, t), -jnp.inf), jnp.zeros((bh, t)), jnp.zeros((bh, t, d)))
    n_chunks = (end + CHUNK - 1) // CHUNK
    _, total, out = jax.lax.fori_loop(0, n_chunks, attend_chunk, carry)
    return (out / total[..., None]).astype(q.dtype)

  def init_weights_and_state(self, input_signature):
    q_signature = input_signature[0]
    bh, _, d = q_signature.shape
    cache = jnp.zeros((bh, self._cache_len, d), q_signature.dtype)
    self.state = (cache, cache, jnp.int32(0))
