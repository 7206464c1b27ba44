"""Parameter counts by component, from shapes alone (nothing is allocated).

  counts = parameter_counts(ScalingTransformer(mode='eval'), input_signature)
  # {'decoder/self_attention': ..., 'decoder/feed_forward': ..., 'total': ...}
"""

import collections
import copy

import numpy as np

# Innermost named layer -> component; the first match walking from a weight up to the root.
_COMPONENTS = (
    ('LayerNorm', 'layer_norm'),
    ('SparseFFController', 'ff_controller'),
    ('SparseFF_', 'feed_forward'),
    ('FeedForward', 'feed_forward'),
    ('SelfAttention', 'self_attention'),
    ('EncDecAttention', 'enc_dec_attention'),
    ('SRUSideBranch', 'sru'),
    ('PackedDenseAttention', 'self_attention'),
    ('SparseQKVAttention', 'self_attention'),
    ('PackedSparseQKVAttention', 'self_attention'),
    ('LSHSelfAttention', 'self_attention'),
    ('Embedder', 'embedding'),
)


def parameter_counts(model, input_signature):
  """Number of weights in each component of `model`, and their total.

  Components are named `<part>/<component>`: part is 'encoder' inside a layer named
  'Encoder' and 'decoder' elsewhere; component is layer_norm, ff_controller, feed_forward
  (Sparse FF's W1, b1, W2, b2 or the dense FF), self_attention, enc_dec_attention, sru (the
  Terraformer's SRU branch), embedding (tokens and positions), or output (the vocabulary
  projection).

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
  path = path + (layer.name,)
  if layer.sublayers:
    for sub, sub_weights in zip(layer.sublayers, weights):
      _count(sub, sub_weights, path, counts)
    return
  n = sum(int(np.prod(w.shape)) for w in _leaves(weights))
  if n:
    counts[_component(path)] += n


def _component(path):
  part = 'encoder' if any(name == 'Encoder' for name in path) else 'decoder'
  for name in reversed(path):
    for prefix, component in _COMPONENTS:
      if name.startswith(prefix):
        return f'{part}/{component}'
  return f'{part}/output'


def _leaves(weights):
  if isinstance(weights, (tuple, list)):
    return [leaf for w in weights for leaf in _leaves(w)]
  return [] if weights is None or isinstance(weights, dict) else [weights]
