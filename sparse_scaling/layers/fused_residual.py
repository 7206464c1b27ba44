"""A residual block that can decode a token through kernels fused across its layers.

`tl.Residual(LayerNorm, ..., layer)` computes x + layer(LayerNorm(x)). Decoding one token, each
of its layers is a few small XLA kernels on a GPU, and the block's time is their number, not
its bytes (docs/decoding_gpu.md). `FusedResidual` is that block, built from the same
sublayers as `tl.Residual` (so the same weights and state trees, and the same outputs in
every mode), whose forward hands a one-token predict call to `fused`: a subclass computes the
whole block there, in a few Pallas kernels, from the weights and states of the sublayers it
names in PARTS. Where `fused` declines (returns None), the block runs its layers as usual.
"""

from trax import layers as tl


class FusedResidual(tl.Serial):
  """x + layer(x) as `tl.Residual(*layers)`; one decoded token through `fused`."""

  PARTS = ()  # classes of the sublayers whose weights and states `fused` reads, in order

  def __init__(self, *layers, mode='predict'):
    super().__init__(*tl.Residual(*layers).sublayers)
    self._mode = mode
    self._paths = tuple(_path(self, cls) for cls in self.PARTS)

  def part(self, i):
    """The sublayer of PARTS[i]."""
    layer = self
    for step in self._paths[i]:
      layer = layer.sublayers[step]
    return layer

  def forward(self, x):
    if self._mode == 'predict' and x.ndim == 3 and x.shape[1] == 1:
      parts = [(_get(self.weights, path), _get(self.state, path)) for path in self._paths]
      result = self.fused(x, parts)
      if result is not None:
        out, states = result
        state = self.state
        for path, part_state in zip(self._paths, states):
          state = _put(state, path, part_state)
        self.state = state
        return out
    return super().forward(x)

  def fused(self, x, parts):
    """(out, new states of PARTS) for x [batch, 1, d] and (weights, state) of PARTS; or None."""
    raise NotImplementedError


def _path(layer, cls):
  """Sublayer indices from `layer` to its only sublayer of class `cls`."""
  found = []

  def visit(node, path):
    if isinstance(node, cls):
      found.append(path)
    for i, sub in enumerate(node.sublayers):
      visit(sub, path + (i,))

  for i, sub in enumerate(layer.sublayers):
    visit(sub, (i,))
  if len(found) != 1:
    raise ValueError(f'a fused block needs exactly one {cls.__name__} layer, found '
                     f'{len(found)}')
  return found[0]


def _get(tree, path):
  for step in path:
    tree = tree[step]
  return tree


def _put(tree, path, value):
  if not path:
    return value
  items = list(tree)
  items[path[0]] = _put(items[path[0]], path[1:], value)
  return tuple(items)
