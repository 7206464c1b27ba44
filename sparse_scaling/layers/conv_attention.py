"""The convolution control: dense attention with Sparse QKV's causal convolution, not a paper idea.

Sparse QKV (`sparse_qkv.py`, paper §3.2) changes two things at once: a multiplicative layer
instead of dense Q, K, V projections (the sparsity), and a causal (length x module) convolution
after it (a local prior: each query, key and value also reads the length_kernel_size − 1
positions before it). This layer keeps dense attention whole, Q, K, V and output projections
as `causal_attention.CausalAttention`, and adds only the convolution: the same `ModuleConv`
with the same kernels (Q and K (length_kernel_size, 3), V (length_kernel_size, 1)) after each
projection. Trained at the dense parameter count (`reproduce/quality.py`'s `dense_conv` arm), it
tells which of the two changes a Sparse QKV gain comes from.

Weights: dense's four (Dense [d_model, d_model] + bias each) and three convolutions
(kernel [length_kernel_size, k, M, M], bias [M], M = d_model / S). In predict mode each
convolution keeps its last length_kernel_size − 1 inputs and the attention its KV cache.
"""

from trax import layers as tl

from sparse_scaling.layers.causal_attention import CausalAttentionCore
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.sparse_qkv import ModuleConv


def DenseConvAttention(d_model, n_heads=1, n_modules=None, length_kernel_size=3,
                       module_kernel_size=3, dropout=0.0, max_inference_length=2048,
                       mode='train'):
  """Causal self-attention: dense Q, K, V, each followed by a causal module convolution.

  Input and output: activations [batch, length, d_model].

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    n_modules: S, the modules the convolutions see d_model as (None: n_heads); divides d_model.
    length_kernel_size: Kernel extent along the length (causal).
    module_kernel_size: Kernel extent along the modules for Q and K (odd; V uses 1).
    dropout: Dropout on the attention weights in training.
    max_inference_length: Size of the KV cache in predict mode.
    mode: 'train', 'eval' or 'predict'.
  """
  n_modules = n_heads if n_modules is None else n_modules
  check_divides('n_heads', n_heads, 'd_model', d_model)
  check_divides('n_modules', n_modules, 'd_model', d_model)
  check_mode(mode)

  def projection(size):                     # [batch, length, d_model] -> the same
    return [tl.Dense(d_model), ModuleConv(d_model, n_modules, length_kernel_size, size, mode)]

  return tl.Serial(
      tl.Branch(projection(module_kernel_size), projection(module_kernel_size),
                projection(1)),                                        # q, k, v
      CausalAttentionCore(n_heads, dropout, max_inference_length, mode),
      tl.Dense(d_model),
      name=f'DenseConvAttention_{n_modules}')
