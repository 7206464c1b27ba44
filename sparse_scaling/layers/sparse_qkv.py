"""Sparse QKV attention: Q, K and V from a multiplicative layer and a causal 2-D convolution.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3.2 "Sparse QKV Layer". One
multiplicative layer (`multiplicative_dense.py`) mixes the d_model inputs into S modules of
size M = d_model / S. Its output, viewed as an image [length, S] with M channels, goes through
a 2-D convolution that is causal along the length: Q and K with a (length_kernel_size, 3)
kernel, V with (length_kernel_size, 1). The convolution weights are shared across modules.
The results split into heads for causal dot-product attention; there is no output projection.

Per token, decoding reads d_model·(S + M) multiplicative weights and three small kernels
instead of the 4·d_model² of dense Q, K, V and output projections. In predict mode the
convolutions keep their last length_kernel_size − 1 input positions as state, and attention
keeps a KV cache.
"""

import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base

from sparse_scaling.layers import concat_decoder
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.multiplicative_dense import MultiplicativeDense


def SparseQKVAttention(d_model, n_heads=1, sparsity=None, length_kernel_size=3,
                       module_kernel_size=3, dropout=0.0, max_inference_length=2048,
                       packed=False, mode='train'):
  """Returns causal self-attention with Sparse QKV projections and no output projection.

  Input and output: activations [batch, length, d_model]; with `packed`, the input is
  (activations, mask [batch, length]) of a Terraformer decoder (`concat_decoder.py`).

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    sparsity: S, the number of modules; must divide d_model (None: n_heads, as trax).
    length_kernel_size: Kernel extent along the length (causal; 1 means no look-back).
    module_kernel_size: Kernel extent along the modules for Q and K (odd; V uses 1).
    dropout: Dropout on the attention weights in training.
    max_inference_length: Size of the KV cache in predict mode.
    packed: Whether the input is a packed [encoder; decoder] sequence and its mask: attention
      skips masked keys and the convolutions' predict state skips masked positions.
    mode: 'train', 'eval' or 'predict'.
  """
  sparsity = n_heads if sparsity is None else sparsity
  check_divides('n_heads', n_heads, 'd_model', d_model)
  check_divides('sparsity', sparsity, 'd_model', d_model)
  check_mode(mode)

  def Conv(module_kernel):
    return [ModuleConv(d_model, sparsity, length_kernel_size, module_kernel, mode, packed),
            tl.SplitIntoHeads(n_heads)]                      # [batch·heads, length, d/heads]

  if packed:
    projections = [tl.Parallel(MultiplicativeDense(sparsity, d_model), []),   # mixed, mask
                   tl.Branch(Conv(module_kernel_size), Conv(module_kernel_size), Conv(1),
                             tl.Select([1], n_in=2))]       # q, k, v, mask
    attention = concat_decoder.PackedCausalAttention(n_heads, dropout, max_inference_length,
                                                     mode)
  else:
    projections = [MultiplicativeDense(sparsity, d_model),  # mixed [batch, length, d_model]
                   tl.Branch(Conv(module_kernel_size), Conv(module_kernel_size), Conv(1))]
    attention = tl.DotProductCausalAttention(dropout=dropout,
                                             max_inference_length=max_inference_length,
                                             mode=mode)
  return tl.Serial(
      projections,                                           # q, k, v [batch·heads, ...]
      attention,
      tl.MergeHeads(n_heads),                                # [batch, length, d_model]
      name=f'SparseQKVAttention_{sparsity}')


def SparseEncDecAttention(d_model, n_heads=1, sparsity=None, length_kernel_size=3,
                          dropout=0.0, mode='train'):
  """Encoder-decoder attention with a Sparse QKV query projection and no output projection.

  Inputs: decoder activations [batch, length_d, d_model], encoder activations
  [batch, length_e, d_model] (twice: keys and values) and the encoder-decoder mask. Outputs:
  [batch, length_d, d_model] and the mask. Q is the multiplicative layer and a causal
  (length_kernel_size, 3) convolution; K and V are dense projections of the encoder output,
  computed once and cached in predict mode.

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    sparsity: S, the modules of the query projection; must divide d_model (None: n_heads).
    length_kernel_size: Kernel extent of the query convolution along the decoder length.
    dropout: Dropout on the attention weights in training.
    mode: 'train', 'eval' or 'predict'.
  """
  sparsity = n_heads if sparsity is None else sparsity
  check_divides('n_heads', n_heads, 'd_model', d_model)
  check_divides('sparsity', sparsity, 'd_model', d_model)
  check_mode(mode)

  def KeysOrValues():
    dense = tl.Dense(d_model)
    return tl.Cache(dense) if mode == 'predict' else dense

  return tl.Serial(                                  # dec, enc, enc, mask
      tl.Parallel([MultiplicativeDense(sparsity, d_model),
                   ModuleConv(d_model, sparsity, length_kernel_size, 3, mode)],
                  KeysOrValues(), KeysOrValues()),   # q, k, v, mask
      tl.PureAttention(n_heads=n_heads, dropout=dropout, mode=mode),   # out, mask
      name=f'SparseEncDecAttention_{sparsity}')


def ModuleConv(d_model, n_modules, length_kernel_size, module_kernel_size, mode,
               packed=False):
  """2-D convolution over (length, modules), causal along the length, shared by modules.

  Input and output [batch, length, d]: d is viewed as n_modules modules of d / n_modules
  channels; the kernel is [length_kernel_size, module_kernel_size, d / n_modules,
  d / n_modules]. Modules are zero-padded on both sides (so module_kernel_size is odd), the
  length on the left: with zeros, or in predict mode with the previous positions. With
  `packed`, the input is (x, mask [batch, length]) and the previous positions are real ones.

  Args:
    d_model: d, the width of input and output.
    n_modules: S.
    length_kernel_size: Kernel extent along the length (>= 1).
    module_kernel_size: Kernel extent along the modules (odd).
    mode: 'train', 'eval' or 'predict'.
    packed: Whether a mask comes with the input (see `CausalPad`).
  """
  if length_kernel_size < 1:
    raise ValueError(f'length_kernel_size must be >= 1, got {length_kernel_size}')
  if module_kernel_size < 1 or module_kernel_size % 2 == 0:
    raise ValueError(f'module_kernel_size must be odd (padded equally on both sides), got '
                     f'{module_kernel_size}')
  half = module_kernel_size // 2

  def pad_modules(x):                                        # [batch, length, S, M]
    return jnp.pad(x, [(0, 0), (0, 0), (half, half), (0, 0)])

  split = [tl.SplitLastAxis(n_modules),                      # [batch, length, S, M]
           tl.Fn('PadModules', pad_modules)]                 # [batch, length, S + 2·half, M]
  return tl.Serial(
      tl.Parallel(split, []) if packed else split,
      CausalPad(length_kernel_size - 1, mode, packed),       # [batch, lks − 1 + length, ...]
      tl.Conv(d_model // n_modules, (length_kernel_size, module_kernel_size)),  # [b, l, S, M]
      tl.MergeLastTwoAxes(),                                 # [batch, length, d]
      name='ModuleConv')


class CausalPad(base.Layer):
  """Left-pads axis 1 with n positions: zeros, or in predict mode the previous inputs.

  Input [batch, length, ...] (and with `packed` a mask [batch, length] whose zeros all
  follow its ones); output [batch, n + length, ...]. In predict mode the state holds the last n
  positions seen ([batch, n, ...], zeros at first); with `packed`, the last n real ones.
  """

  def __init__(self, n, mode, packed=False):
    super().__init__(n_in=2 if packed else 1, name=f'CausalPad_{n}')
    self._n = n
    self._mode = mode
    self._packed = packed

  def forward(self, inputs):
    x, mask = inputs if self._packed else (inputs, None)
    if self._mode != 'predict':
      return jnp.pad(x, [(0, 0), (self._n, 0)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.concatenate([self.state, x.astype(self.state.dtype)], axis=1)
    if mask is None:
      self.state = x[:, x.shape[1] - self._n:]
    else:
      end = self._n + jnp.sum(mask != 0, axis=1, dtype=jnp.int32)           # [batch]
      index = end[:, None] - self._n + jnp.arange(self._n)[None, :]         # [batch, n]
      index = index.reshape(index.shape + (1,) * (x.ndim - 2))
      self.state = jnp.take_along_axis(x, index, axis=1)
    return x

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      x = input_signature[0] if self._packed else input_signature
      self.state = jnp.zeros((x.shape[0], self._n) + tuple(x.shape[2:]), x.dtype)
