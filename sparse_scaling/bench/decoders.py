"""The decoders that the decoding benchmarks time: Table 1's variants, ours and trax's.

Each variant of the paper's Table 1 is a gin file (`gin_configs/paper/c4_800m_*.gin`: the
800M model's decoder; `paper/timing_17b_*.gin`: 17B, blocks of d_model 9216), built here as
our `ScalingTransformerLM` or as trax's `ConfigurableTransformerLM` (ff_sparsity,
`MultiplicativeConvCausalAttention`, loss_sparsity) with the same shapes, in predict mode, with
random weights (timing only). `table1.py`, `block_profile.py` and `decode_profile.py` use it.
"""

import functools

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity as trax_sparsity
from trax.models.research import configurable_transformer as trax_ct

from sparse_scaling.bench import common
from sparse_scaling.models import ScalingTransformerLM

VARIANTS = ('dense', 'ff', 'qkv', 'ffqkv', 'ffqkvloss')
_GIN_VARIANT = {'dense': 'dense', 'ff': 'ff', 'qkv': 'qkv', 'ffqkv': 'ff_qkv',
                'ffqkvloss': 'ff_qkv_loss'}
# shape -> (gin file pattern, dtype, depths timed, whole-model depth)
SHAPES = {
    '800m': ('paper/c4_800m_{}.gin', 'float32', (2, 24), 24),
    '17b': ('paper/timing_17b_{}.gin', 'float32', (1, 2), 2),
}
MAX_LEN = 168  # Table 1's caches: a 128-token prompt, 32 tokens and 8 spare
_MACROS = ('D_MODEL', 'D_FF', 'N_HEADS', 'VOCAB_SIZE', 'FF_SPARSITY', 'ATTENTION_SPARSITY',
           'LOSS_SPARSITY', 'LENGTH_KERNEL_SIZE')


def dimensions(shape, variant):
  """The model macros of the variant's paper gin file."""
  common.parse_gin([SHAPES[shape][0].format(_GIN_VARIANT[variant])])
  dims = common.macros(_MACROS)
  ff = dims['ff_sparsity']
  if ff and not isinstance(ff, (tuple, list)):
    dims['ff_sparsity'] = (ff, max(1, dims['d_model'] // ff))  # the paper's rank, for both
  return dims


def build(impl, dims, n_layers, max_len, mode='predict'):
  """An LM of `impl` ('ours', 'ours-xla' or 'trax') with the given dimensions."""
  common_args = dict(d_model=dims['d_model'], d_ff=dims['d_ff'], n_layers=n_layers,
                     n_heads=dims['n_heads'], max_len=max_len, dropout=0.0,
                     ff_sparsity=tuple(dims['ff_sparsity']) if dims['ff_sparsity'] else 0,
                     loss_sparsity=dims['loss_sparsity'], mode=mode)
  if impl.startswith('ours'):
    return ScalingTransformerLM(dims['vocab_size'], attention_sparsity=dims['attention_sparsity'],
                                length_kernel_size=dims['length_kernel_size'], **common_args)
  attention = functools.partial(tl.CausalAttention, max_inference_length=max_len)
  if dims['attention_sparsity']:
    attention = functools.partial(trax_sparsity.MultiplicativeConvCausalAttention,
                                  sparsity=dims['attention_sparsity'],
                                  length_kernel_size=dims['length_kernel_size'],
                                  max_inference_length=max_len)
  return trax_ct.ConfigurableTransformerLM(dims['vocab_size'], attention_type=attention,
                                           **common_args)


def scope_labels(model):
  """A label per top-level layer of an LM: embed, block<i>/attention, block<i>/ff, output.

  A block is a layer holding attention and the layer right after it (its feed-forward), in
  our models and in trax's alike.
  """
  labels, block = [], -1
  for layer in model.sublayers:
    if any('Attention' in name for name in _names(layer)):
      block += 1
      labels.append(f'block{block}/attention')
    elif labels and labels[-1] == f'block{block}/attention':
      labels.append(f'block{block}/ff')
    else:
      labels.append('output' if block >= 0 else 'embed')
  return labels


def _names(layer):
  out = [layer.name]
  for sub in layer.sublayers:
    out += _names(sub)
  return out


def random_weights_and_state(model, dtype, batch=1, seed=0):
  """Random weights of `dtype` and fresh predict state, without a float32 init: the state's
  floating-point arrays (KV caches, convolution states) also in `dtype`, as the `Decoder`
  keeps them, so that a block's output has its input's dtype."""
  signature = shapes.ShapeDtype((batch, 1), jnp.int32)
  weights_sig, state_sig = model.weights_and_state_signature(signature)
  leaves, treedef = jax.tree.flatten(weights_sig)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(1, len(leaves)))
  weights = [0.02 * jax.random.normal(k, s.shape, dtype) if jnp.issubdtype(s.dtype, jnp.floating)
             else jnp.zeros(s.shape, s.dtype) for k, s in zip(keys, leaves)]
  state_dtype = lambda s: dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, state_dtype(s)), state_sig)
  return jax.tree.unflatten(treedef, weights), state
