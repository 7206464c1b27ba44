"""The feed-forward layer of a block: dense, or Sparse FF when the block is sparse.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3: the dense baseline's FF is
trax's (Dense, dropout, ReLU, Dense, dropout); `ff_sparsity` replaces it with the Sparse FF of
§3.1 (`sparse_ff.py`). Input and output: [..., d_model].
"""

import jax
from trax import layers as tl
from trax.layers.assert_shape import assert_shape

from sparse_scaling.layers import components
from sparse_scaling.layers.sparse_ff import SparseFF

# The dense FF's ReLU as JAX's `jax.nn.relu`, max(x, 0), not trax's where(x <= 0, 0, x): the
# same values (NaN included) and gradients, and on a GPU XLA takes a maximum into the product
# after it, where the select stays a kernel of its own: an 800M dense block decoding a token,
# compiled for an H100 (`bench/compile_only.py --blocks model --variant dense`), is 13 kernels
# with it and 14 without (docs/decoding_gpu.md). Read when the layer is built.
RELU_AS_MAXIMUM = True


def FeedForward(d_model, d_ff, dropout, ff_sparsity, mode):
  """The FF of a block, [..., d_model] -> [..., d_model], ending in dropout.

  Dense: trax's layout (Dense, dropout, ReLU, Dense, dropout). Sparse: `SparseFF`.

  Args:
    d_model: Width of input and output.
    d_ff: Hidden units.
    dropout: Dropout rate on the hidden activations (dense) and on the output.
    ff_sparsity: 0, N, or (N, d_lowrank); see `ScalingTransformerLM`.
    mode: 'train', 'eval' or 'predict'.
  """
  if not ff_sparsity:
    return components.DenseFF(
        tl.Dense(d_ff), tl.Dropout(rate=dropout, shared_axes=[-2], mode=mode), Relu(),
        tl.Dense(d_model), tl.Dropout(rate=dropout, mode=mode), name='FeedForward')
  n, d_lowrank = ff_sparsity if isinstance(ff_sparsity, (tuple, list)) else (ff_sparsity, None)
  return SparseFF(d_ff, n, d_lowrank=d_lowrank, dropout_rate=dropout, mode=mode)


def Relu():
  """trax's `Relu` (its layers, values and gradients); with RELU_AS_MAXIMUM, `jax.nn.relu`."""
  return _MaximumRelu() if RELU_AS_MAXIMUM else tl.Relu()


@assert_shape('...->...')   # as trax's: the same layers, so the same weights tree
def _MaximumRelu():
  return tl.Fn('Relu', lambda x: jax.nn.relu(x))   # trax's Fn takes no keyword arguments
