"""The convolution control: Sparse QKV with a dense projection, not a paper idea.

Sparse QKV (`sparse_qkv.py`, paper §3.2) changes two things against dense attention: its Q, K,
V projection is a multiplicative layer (the sparsity: d_model·(S + M) weights instead of
d_model²), and a causal (length x module) convolution follows it (a local prior: each query,
key and value also reads the length_kernel_size − 1 positions before it), with no output
projection. This layer keeps all of that but the sparsity: one dense d_model x d_model
projection, then the same `ModuleConv` with the same kernels (Q and K (length_kernel_size, 3),
V (length_kernel_size, 1)) and the same attention core. Against `qkv` at equal parameters
(`reproduce/quality.py`'s `dense_conv` arm) it tells whether a Sparse QKV gain needs the
sparse projection or comes with the convolution.

A first version kept dense attention whole (dense Q, K, V and output projections) and put the
convolution after each of Q, K and V. At the cpu quality size (constant learning rate 0.032
from step 1) it stalled at 5.7 nats against dense's 4.7: by step 800 its queries and keys had
an RMS of 16-50 and its attention was one-hot (entropy 0.003 nats). Sparse QKV's attention is
nearly as sharp there at step 240 (attention logits' spread 49-244 against this layer's 47-204)
yet it trains on; the first version, with two trained linear maps in series before every dot
product, stalled instead. It is left out: it measured the recipe, not the convolution.

Weights: Dense [d_model, d_model] + bias, then the convolutions (kernel
[length_kernel_size, k, M, M], bias [M], M = d_model / S). In predict mode the convolutions
share their state (the last length_kernel_size − 1 projections) and the attention keeps its KV
cache.
"""

from trax import layers as tl

from sparse_scaling.layers.causal_attention import CausalAttentionCore
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.sparse_qkv import ModuleConv


def DenseConvAttention(d_model, n_heads=1, n_modules=None, length_kernel_size=3,
                       module_kernel_size=3, dropout=0.0, max_inference_length=2048,
                       mode='train'):
  """Causal self-attention: a dense projection, Sparse QKV's convolution, no output projection.

  Input and output: activations [batch, length, d_model].

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    n_modules: S, the modules the convolution sees d_model as (None: n_heads); divides d_model.
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
  return tl.Serial(
      tl.Dense(d_model),                                               # [batch, length, d_model]
      ModuleConv(d_model, n_modules, length_kernel_size,
                 (module_kernel_size, module_kernel_size, 1), mode),   # q, k, v
      CausalAttentionCore(n_heads, dropout, max_inference_length, mode),
      name=f'DenseConvAttention_{n_modules}')
