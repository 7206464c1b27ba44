"""A decoder over [encoder output; decoder input] instead of encoder-decoder attention.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §4 (Terraformer): the decoder has
no cross-attention. Each example's decoder vectors are written right after its last real
encoder vector, the decoder runs causal self-attention over the packed sequence, and the
encoder part is stripped before the output layer:

  packed[b] = [enc[b, :len_b]; dec[b]; zeros]        len_b = true encoder length of row b
  mask[b]   = [1] * (len_b + length_d) + [0] * (length_e - len_b)

Padding is always after the real positions, so causal layers never see it in training. In
predict mode the first call packs the encoder and the decoder prompt as above; later calls
append one decoder position per row at a shared cache index, behind the first call's padding.
The layers that mix positions therefore take the mask: attention keeps a validity cache
beside its KV cache (`PackedCausalAttention`), the convolution of Sparse QKV keeps its last
*real* inputs (`PackedModuleConv`) and the SRU keeps its state over padding (`sru.py`),
so decoding a batch of documents of different lengths equals the full forward pass.
"""

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base

from sparse_scaling.layers import components
from sparse_scaling.layers.checks import check_chunks
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.multiplicative_dense import MultiplicativeDense
from sparse_scaling.layers.sparse_qkv import ModuleConv


def _true_lengths(mask_e):
  """Real positions per row of an encoder mask [b, le]: [b, 1] int32."""
  return jnp.sum(mask_e != 0, axis=1, dtype=jnp.int32)[:, None]


class _PacksOnce(base.Layer):
  """A layer that packs or strips in its first predict-mode call and passes through after.

  The state's shape is the flag (a scalar until the first call, then [1]): it is known while
  tracing, unlike its value, and the first call and the later ones (one position each) have
  different output shapes.
  """

  def __init__(self, n_in, n_out, name, mode):
    super().__init__(n_in=n_in, n_out=n_out, name=name)
    check_mode(mode)
    self._mode = mode

  def _passes_through(self):
    """Whether this call passes through (predict mode after the first call); marks the call."""
    if self._mode != 'predict':
      return False
    if self.state.shape:
      return True
    self.state = jnp.zeros((1,), jnp.int32)
    return False

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      self.state = jnp.zeros((), jnp.int32)


class ConcatEncoderDecoder(_PacksOnce):
  """Packs (vec_e [b, le, d], mask_e [b, le], vec_d [b, ld, d]) into (vec_ed, mask_ed).

  Outputs: vec_ed [b, le + ld, d] in vec_d's dtype (the layout in the module docstring) and
  mask_ed [b, le + ld] float32. In predict mode, calls after the first return vec_d and ones
  [b, ld]. With `chunk_len` (the chunks of the decoder's chunked or LSH attention), le + ld
  must be a multiple of it outside predict mode (ValueError naming `targets`).
  """

  def __init__(self, mode='train', chunk_len=None):
    super().__init__(3, 2, 'ConcatEncoderDecoder', mode)
    self._chunk_len = chunk_len

  def forward(self, inputs):
    vec_e, mask_e, vec_d = inputs
    if self._passes_through():
      return vec_d, jnp.ones(vec_d.shape[:2], jnp.float32)
    len_e, len_d = vec_e.shape[1], vec_d.shape[1]
    if self._mode != 'predict':
      check_chunks('targets', "the encoder's and the decoder's lengths together", len_e + len_d,
                   self._chunk_len)
    lengths = _true_lengths(mask_e)                                       # [b, 1]
    positions = jnp.arange(len_e + len_d)[None, :]                        # [1, le + ld]
    from_dec = jnp.clip(positions - lengths, 0, len_d - 1)                # [b, le + ld]
    dec = jnp.take_along_axis(vec_d, from_dec[..., None], axis=1)
    enc = jnp.pad(vec_e, [(0, 0), (0, len_d), (0, 0)])
    is_enc = positions < lengths
    is_dec = (positions >= lengths) & (positions < lengths + len_d)
    vec_ed = jnp.where(is_enc[..., None], enc, jnp.where(is_dec[..., None], dec, 0.0))
    # In the decoder's dtype: a bfloat16 decoder's encoder hands on float32 (trax's attention
    # returns float32), which would make the packed pass, and the SRU state it leaves,
    # float32.
    return vec_ed.astype(vec_d.dtype), (is_enc | is_dec).astype(jnp.float32)


class StripEncoder(_PacksOnce):
  """The decoder part of a packed sequence: (vec_ed [b, le + ld, d], mask_e [b, le]) -> vec_d.

  Output [b, ld, d]; in predict mode, calls after the first pass vec_ed through.
  """

  def __init__(self, mode='train'):
    super().__init__(2, 1, 'StripEncoder', mode)

  def forward(self, inputs):
    vec_ed, mask_e = inputs
    if self._passes_through():
      return vec_ed
    len_d = vec_ed.shape[1] - mask_e.shape[1]
    index = _true_lengths(mask_e) + jnp.arange(len_d)[None, :]           # [b, ld]
    return jnp.take_along_axis(vec_ed, index[..., None], axis=1)


class PackedCausalAttention(base.Layer):
  """Causal dot-product attention that skips masked keys, with a KV cache in predict mode.

  Inputs: q, k, v [b·heads, length, d_head] (as `tl.SplitIntoHeads` makes them) and mask
  [b, length]. Output: [b·heads, length, d_head]. A query attends to earlier-or-equal
  positions whose mask is 1. Predict-mode state: K and V caches [b·heads, max_len, d_head], the
  mask cache [b, max_len] and the next position.
  """

  def __init__(self, n_heads, dropout=0.0, max_inference_length=2048, mode='train'):
    super().__init__(n_in=4, n_out=1, name='PackedCausalAttention')
    check_mode(mode)
    self._n_heads = n_heads
    self._dropout = dropout
    self._max_len = max_inference_length
    self._mode = mode

  def forward(self, inputs):
    q, k, v, mask = inputs
    length = q.shape[1]
    start = 0
    if self._mode == 'predict':
      k_cache, v_cache, mask_cache, start = self.state
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
      mask = jax.lax.dynamic_update_slice_in_dim(mask_cache, mask.astype(mask_cache.dtype),
                                                 start, 1)
      self.state = (k, v, mask, start + length)
    query_pos = start + jnp.arange(length)[:, None]                      # [lq, 1]
    key_pos = jnp.arange(k.shape[1])[None, :]                            # [1, lk]
    keys = jnp.repeat(mask != 0, self._n_heads, axis=0)[:, None, :]       # [b·h, 1, lk]
    allowed = (key_pos <= query_pos)[None] & keys                        # [b·h, lq, lk]
    dots = jnp.einsum('bqd,bkd->bqk', q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    dots = jnp.where(allowed, dots, jnp.finfo(dots.dtype).min)
    weights = jax.nn.softmax(dots, axis=-1)
    if self._mode == 'train' and self._dropout:
      keep = jax.random.bernoulli(self.rng, 1.0 - self._dropout, weights.shape)
      weights = jnp.where(keep, weights / (1.0 - self._dropout), 0.0)
    return jnp.einsum('bqk,bkd->bqd', weights, v)

  def positions_held(self):
    """In predict mode (max_len, True): the caches hold max_len positions of [encoder;
    decoder], the encoder's padded length among them (`decoding.Decoder` checks a generation
    against it); else None."""
    return (self._max_len, True) if self._mode == 'predict' else None

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      q, _, _, mask = input_signature
      cache = jnp.zeros((q.shape[0], self._max_len, q.shape[2]), q.dtype)
      self.state = (cache, cache, jnp.zeros((mask.shape[0], self._max_len), jnp.float32),
                    jnp.array(0, jnp.int32))


def PackedDenseAttention(d_model, n_heads, dropout=0.0, max_inference_length=2048,
                         mode='train'):
  """Causal self-attention over a packed sequence: (x [b, l, d_model], mask [b, l]) -> [b, l, d_model].

  Dense Q, K, V and output projections (weights in the order of trax's `tl.CausalAttention`)
  around `PackedCausalAttention`.
  """
  def Projection():
    return [tl.Dense(d_model), tl.SplitIntoHeads(n_heads)]

  return components.SelfAttention(                              # x, mask
      tl.Branch(Projection(), Projection(), Projection(), tl.Select([1], n_in=2)),  # q k v mask
      PackedCausalAttention(n_heads, dropout, max_inference_length, mode),
      tl.MergeHeads(n_heads),
      tl.Dense(d_model),
      name='PackedDenseAttention')


def PackedSparseQKVAttention(d_model, n_heads, sparsity, length_kernel_size=3,
                             module_kernel_size=3, dropout=0.0, max_inference_length=2048,
                             mode='train'):
  """Sparse QKV self-attention (`sparse_qkv.py`) over a packed sequence.

  Inputs (x [b, l, d_model], mask [b, l]); output [b, l, d_model]. The weights of
  `SparseQKVAttention`, in its order; attention skips masked keys and, in predict mode, the
  convolutions' state holds the last real positions.
  """
  check_divides('n_heads', n_heads, 'd_model', d_model)
  check_divides('sparsity', sparsity, 'd_model', d_model)
  heads = lambda: tl.SplitIntoHeads(n_heads)
  return components.SelfAttention(                                    # x, mask
      tl.Parallel(MultiplicativeDense(sparsity, d_model), []),        # mixed, mask
      PackedModuleConv(d_model, sparsity, length_kernel_size,
                       (module_kernel_size, module_kernel_size, 1), mode),   # q k v mask
      tl.Parallel(heads(), heads(), heads(), []),                     # [b·heads, l, d/heads]
      PackedCausalAttention(n_heads, dropout, max_inference_length, mode),
      tl.MergeHeads(n_heads),                                         # [b, l, d_model]
      name=f'PackedSparseQKVAttention_{sparsity}')


class PackedModuleConv(ModuleConv):
  """`ModuleConv` of a packed sequence: (x [b, l, d], mask [b, l]) -> (outputs..., mask).

  The mask's zeros all follow its ones. In predict mode the state holds the last
  length_kernel_size − 1 *real* inputs of each row, so that a row's next position (written
  behind its padding) sees its own last positions.
  """

  def __init__(self, d_model, n_modules, length_kernel_size, module_kernel_size, mode):
    super().__init__(d_model, n_modules, length_kernel_size, module_kernel_size, mode, n_in=2)

  def forward(self, inputs):
    x, mask = inputs
    return (*self._convolve(x, mask), mask)

  def _last_inputs(self, window, mask):
    n = self._lks - 1
    end = n + jnp.sum(mask != 0, axis=1, dtype=jnp.int32)              # [b]
    index = end[:, None] - n + jnp.arange(n)[None, :]                  # [b, n]
    return jnp.take_along_axis(window, index[:, :, None, None], axis=1)
