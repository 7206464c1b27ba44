"""Multiplicative dense layer: a Dense-like mixing with about 1/M of the weights.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3.2 "Sparse QKV Layer". The
output is split into S modules of size M = d_out / S, and

  y[s, m] = Σ_i x_i · D[s, i] · E[i, m]       (+ bias[s, m])

with D [S, d_in] and E [d_in, M]: d_in·(S + M) weights instead of d_in·d_out, and it can still
represent any permutation (paper, Fig. 4a). One token reads D and E once, so decoding costs
d_in·(S + M) weight reads. A call of more than M tokens (training) forms the dense weight
D ⊙ E [d_in, d_out] once instead: the same function, computed as one ordinary product.
"""

import jax
import jax.numpy as jnp
from trax.layers import base
from trax.layers import initializers as init

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import multiplicative_kernel
from sparse_scaling.layers.checks import check_divides

# The few-token product's form: 0, one einsum (XLA: x·D written out, then its product with E);
# 1, D @ (x·E); 2, one reduction of x·D·E over d_in. One 17B FF+QKV block looped on an H200
# took 0.0541-0.0543 ms with 0, 0.0571 with 1 and 0.0987 with 2 (docs/decoding_gpu.md); on a
# CPU both others were slower too (docs/speed.md). 3 and 4 are 0 with float32 weights
# multiplied on a GPU's tensor cores at about float32's accuracy: x·D's product with E as six
# bfloat16 products (3) or three TF32 products (4; GPUs only), XLA's dot algorithms; bfloat16
# weights multiply as 0 does. Both slower on an H100 at 17B: the block looped 0.0618-0.0621
# ms with 3 and 0.0625 with 4 against 0.0570-0.0576 (docs/decoding_gpu.md).
DECODE_FORM = 0
_ALGORITHMS = {3: jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
               4: jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


class MultiplicativeDense(base.Layer):
  """y[..., s, m] = Σ_i x[..., i]·D[s, i]·E[i, m] + b, flattened to [..., d_out].

  Weights: D [S, d_in] (normal, stddev 0.5, as trax's gating; the layout of trax's
  `FactoredDense`, whose rows a token scales before one [S, d_in] x [d_in, M] product),
  E [d_in, d_out / S] (Glorot), and b [d_out] if `use_bias`.
  """

  def __init__(self, n_modules, d_out, use_bias=True):
    """Builds the layer.

    Args:
      n_modules: S, the number of output modules; divides d_out.
      d_out: Output width.
      use_bias: Whether to add a bias.
    """
    check_divides('n_modules', n_modules, 'd_out', d_out)
    super().__init__(name=f'MultiplicativeDense_{n_modules}')
    self._n_modules = n_modules
    self._d_out = d_out
    self._use_bias = use_bias

  def forward(self, x):
    d, e = self.weights[:2]
    n_tokens = x.size // x.shape[-1]
    if n_tokens > e.shape[1]:
      # Many tokens (training, a prompt): the same product through the dense weight
      # W[i, s, m] = D[s, i]·E[i, m], built once per call (d_in·S·M products, fewer than the
      # tokens·d_in·S of scaling every token's input by D once tokens > M), then one
      # [tokens, d_in] x [d_in, d_out] product: no [tokens, S, d_in] intermediate to lay out
      # in either pass.
      w = (d.T[:, :, None] * e[:, None, :]).reshape(x.shape[-1], self._d_out)
      y = x @ w                                         # [..., d_out]
    else:
      # Few tokens (decoding): read D and E only, d_in·(S + M) weights; where
      # `decode_kernels` says so, as one Pallas kernel (`multiplicative_kernel.py`; 'auto'
      # does not take it: slower than XLA's ops at 17B on an H100).
      kernel = decode_kernels.active('multiplicative', multiplicative_kernel.pays(x.shape[-1]))
      if kernel != 'xla' and n_tokens <= multiplicative_kernel.MAX_TOKENS:
        y = multiplicative_kernel.product(x.reshape(n_tokens, x.shape[-1]), d, e,
                                          interpret=kernel == 'interpret')
      elif DECODE_FORM == 1:
        y = jnp.einsum('si,...im->...sm', d, x[..., :, None] * e)
      elif DECODE_FORM == 2:
        y = jnp.sum(x[..., None, :, None] * d[:, :, None] * e[None], axis=-2)
      elif DECODE_FORM in _ALGORITHMS and e.dtype == jnp.float32:
        y = jnp.einsum('...si,im->...sm', x[..., None, :] * d, e,
                       precision=_ALGORITHMS[DECODE_FORM])
      else:
        y = jnp.einsum('...i,si,im->...sm', x, d, e)
      # y [..., S, M]
      y = y.reshape(x.shape[:-1] + (self._d_out,))      # [..., d_out]
    return y + self.weights[2] if self._use_bias else y

  def decode_parts(self, x, weights, n_parts):
    """A token's product before the bias, in parts: x [B, 1, d_in] -> [P, B, S, M] float32,
    part p the sum over d_in's slice p of P (`sparse_qkv_fields_kernel.py` adds them), as one
    product batched over the slices (XLA splits the einsum of `forward` alike); and the
    bias [S, M] (zeros without one)."""
    d, e = weights[:2]
    batch, d_in = x.shape[0], x.shape[-1]
    n_modules, channels = d.shape[0], e.shape[1]
    scaled = (x.reshape(batch, 1, d_in) * d).reshape(batch, n_modules, n_parts, -1)
    parts = jnp.einsum('bspk,pkm->pbsm', scaled, e.reshape(n_parts, -1, channels),
                       preferred_element_type=jnp.float32)
    bias = (weights[2] if self._use_bias else jnp.zeros((self._d_out,), x.dtype))
    return parts, bias.reshape(n_modules, channels)

  def init_weights_and_state(self, input_signature):
    d_in = input_signature.shape[-1]
    rng_d, rng_e, rng_b = jax.random.split(self.rng, 3)
    d = init.RandomNormalInitializer(0.5)((self._n_modules, d_in), rng_d)
    e = init.GlorotUniformInitializer()((d_in, self._d_out // self._n_modules), rng_e)
    bias = init.RandomNormalInitializer(1e-6)((self._d_out,), rng_b)
    self.weights = (d, e, bias) if self._use_bias else (d, e)
