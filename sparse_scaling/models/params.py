"""Parameter counts by component, from shapes alone (nothing is allocated).

  counts = parameter_counts(ScalingTransformer(mode='eval'), input_signature)
  # {'decoder/self_attention': ..., 'decoder/feed_forward': ..., 'total': ...}
"""

import collections
import copy

import numpy as np
from trax.layers import attention
from trax.layers import core
from trax.layers import normalization
from trax.layers.research import efficient_attention

from sparse_scaling.layers import components
from sparse_scaling.layers import sparse_ff

# Layer classes -> component; the first layer of one of these classes walking from a weight up
# to the root decides. Names play no part: a renamed layer keeps its weights' component. trax's
# classes are those of their modules: `tl.LayerNorm` and `tl.PositionalEncoding` are gin's
# wrappers, of which no layer is an instance.
_COMPONENTS = (
    (normalization.LayerNorm, 'layer_norm'),
    (sparse_ff.SparseFFController, 'ff_controller'),
    ((sparse_ff.ChosenUnitsFF, sparse_ff.SparseFFDecode, components.DenseFF), 'feed_forward'),
    ((components.SelfAttention, efficient_attention.SelfAttention,
      efficient_attention.LSHSelfAttention), 'self_attention'),
    (components.EncDecAttention, 'enc_dec_attention'),
    (components.SRUBranch, 'sru'),
    ((core.Embedding, attention.PositionalEncoding), 'embedding'),
)


def parameter_counts(model, input_signature):
  """Number of weights in each component of `model`, and their total.

  Components are named `<part>/<component>`: part is 'encoder' inside a
  `layers.components.Encoder` and 'decoder' elsewhere; component is layer_norm, ff_controller,
  feed_forward (Sparse FF's W1, b1, W2, b2 or the dense FF), self_attention,
  enc_dec_attention, sru (the Terraformer's SRU branch), embedding (tokens and positions), or
  output (the vocabulary projection, or any other weights). Layers are told apart by their
  classes (`_COMPONENTS`), never by their names.

  Args:
    model: A model of `sparse_scaling.models` (any mode).
    input_signature: Its input shapes (`trax.shapes.ShapeDtype` or a tuple of them).

  Returns:
    An ordered dict: component -> count, then 'total'.
  """
  # On a copy, unsafe: restoring an uninitialized ReversibleHalfResidual's state fails.
  weights, _ = copy.deepcopy(model).weights_and_state_signature(input_signature, unsafe=True)
  counts = collections.Counter()
  _count(model, weights, (), counts)
  result = collections.OrderedDict(sorted(counts.items()))
  result['total'] = sum(counts.values())
  return result


def _count(layer, weights, path, counts):
  path = path + (layer,)
  if layer.sublayers:
    for sub, sub_weights in zip(layer.sublayers, weights):
      _count(sub, sub_weights, path, counts)
    return
  n = sum(int(np.prod(w.shape)) for w in _leaves(weights))
  if n:
    counts[_component(path)] += n


def _component(path):
  """`<part>/<component>` of the weights of the last layer of `path` (root first)."""
  part = 'encoder' if any(isinstance(layer, components.Encoder) for layer in path) else 'decoder'
  for layer in reversed(path):
    for classes, component in _COMPONENTS:
      if isinstance(layer, classes):
        return f'{part}/{component}'
  return f'{part}/output'


def _leaves(weights):
  if isinstance(weights, (tuple, list)):
    return [leaf for w in weights for leaf in _leaves(w)]
  return [] if weights is None or isinstance(weights, dict) else [weights]
