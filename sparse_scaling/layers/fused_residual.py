"""A residual block that can decode a token through kernels fused across its layers.

`tl.Residual(LayerNorm, ..., layer)` computes x + layer(LayerNorm(x)). Decoding one token, each
of its layers is a few small XLA kernels on a GPU, and the block's time is their number, not
its bytes (docs/decoding_gpu.md). `FusedResidual` is that block, built from the same
sublayers as `tl.Residual` (so the same weights and state trees, and the same outputs in
every mode), whose forward hands a one-token predict call to `fused`: a subclass computes the
whole block there, in a few Pallas kernels, from the weights and states of the sublayers it
names in PARTS. Where `fused` declines (returns None), the block runs its layers as usual.

`FusedDecoder` is a predict-mode model's top level, `tl.Serial` of the same sublayers. With
CHAIN on, its one-token calls run each attention block that is followed by an FF block as
one chain: the attention kernel's programs also write the partial sums from which the FF
block's units programs finish its LayerNorm, so that the FF block needs no kernel of its own
for it (a trax layer hands the next one a single array; these sums cross the boundary here).

A fused block may pay only up to a cache position (`late_position`): `decoding.Decoder` then
runs a generation's later tokens in a second loop traced within `late()`, where such blocks
decline.
"""

import contextlib

from trax import layers as tl
from trax.layers import combinators

# Whether `FusedDecoder` chains an attention block and the FF block after it (on an H200 at
# 800M, 2-5% faster per token than each block alone: docs/decoding_gpu.md).
CHAIN = True
_LATE = [False]   # within `late()`


@contextlib.contextmanager
def late():
  """Within the block, blocks traced anew that decline late (`late_position`) decline."""
  previous, _LATE[0] = _LATE[0], True
  try:
    yield
  finally:
    _LATE[0] = previous


def is_late():
  """Whether blocks traced now decline from their late position on (`late()`)."""
  return _LATE[0]


def late_position(layer):
  """The first cache position from which some fused block of `layer` declines (the least
  of their `late_position()`), or None."""
  own = layer.late_position() if isinstance(layer, FusedResidual) else None
  found = [p for p in [own, *map(late_position, layer.sublayers)] if p is not None]
  return min(found, default=None)


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

  def part_weights(self, weights, i):
    """The weights of PARTS[i] in the block's `weights`."""
    return _get(weights, self._paths[i])

  def forward(self, x):
    result = self.fused_call(x, self.weights, self.state)
    if result is None:
      return super().forward(x)
    out, self.state, _ = result
    return out

  def fused_call(self, x, weights, state, **chain):
    """(out, new state, what `fused` returns beside them) of a one-token predict call of the
    block with these weights and state through `fused`; None where it declines."""
    if not (self._mode == 'predict' and x.ndim == 3 and x.shape[1] == 1):
      return None
    parts = [(_get(weights, path), _get(state, path)) for path in self._paths]
    result = self.fused(x, parts, **chain)
    if result is None:
      return None
    out, states, *more = result
    for path, part_state in zip(self._paths, states):
      state = _put(state, path, part_state)
    return out, state, more

  def late_position(self):
    """The cache position from which a generation's tokens should decline `fused`
    (`late()`), or None: never."""
    return None

  def fused(self, x, parts, **chain):
    """(out, new states of PARTS, ...) for x [batch, 1, d] and (weights, state) of PARTS; or
    None. `chain`: what `FusedDecoder` passes between chained blocks."""
    raise NotImplementedError


class FusedDecoder(tl.Serial):
  """A predict-mode model's top level: `tl.Serial` of the same sublayers (the same weights
  and state trees). With CHAIN, a one-token call runs each block with `chain_norm` (the FF
  block) after one that takes `ff_norm` (the attention block) as one chain: the attention
  block returns partial sums for the FF block's LayerNorm (`fused(..., ff_norm=...)`), which
  the FF block finishes in its units kernel (`fused(..., partials=...)`)."""

  def forward(self, xs):
    if not CHAIN:
      return super().forward(xs)
    self._validate_forward_inputs(xs)
    rngs = combinators._split_rngs(self.rng, self._n_layers)  # pylint: disable=protected-access
    stack, self.state = run_layers(self.sublayers, xs, self.weights, self.state, rngs,
                                   use_cache=True)
    return stack


def run_layers(layers, xs, weights, state, rngs=None, scope=None, use_cache=False,
               wrap=False):
  """(outputs, new state) of `layers` in series on xs, as `tl.Serial`'s forward, chaining
  an attention block and the FF block after it where CHAIN lets them (`FusedDecoder`; the
  benchmarks time and profile blocks through it too). A fused block's call (chained or
  not) also gets the next block's fixed weights (`ahead_arrays`), which with
  `decode_kernels.PREFETCH` its kernels ask the L2 cache for; with `wrap` the layers run in
  a loop (a benchmark's block looped), the first coming after the last. `scope(i)`, if
  given, is a context (a profile's named scope) around what layer i computes, its half of a
  chain too; `use_cache` as `pure_fn`'s (True only inside a combinator's own `pure_fn`, as
  `tl.Serial` has it)."""
  scope = scope or (lambda i: contextlib.nullcontext())
  rngs = [None] * len(layers) if rngs is None else rngs
  stack, new_state, layers = xs, [], list(layers)

  def ahead(j):   # the fixed weights of layer j's first kernel, or ()
    j = j % len(layers) if wrap else j
    after = layers[j] if j < len(layers) else None
    return after.ahead_arrays(weights[j]) if hasattr(after, 'ahead_arrays') else ()

  i = 0
  while i < len(layers):
    if CHAIN and i + 1 < len(layers) and hasattr(layers[i + 1], 'chain_norm'):
      chained = _chain(layers[i], layers[i + 1], stack, weights[i:i + 2], state[i:i + 2],
                       (scope(i), scope(i + 1)), ahead(i + 2))
      if chained is not None:
        stack = chained[0]
        new_state += chained[1]
        i += 2
        continue
    layer = layers[i]
    with scope(i):
      fused = (layer.fused_call(stack, weights[i], state[i], ahead=ahead(i + 1))
               if _fusable(layer, stack) else None)
      if fused is None:
        inputs = combinators.inputs_from_stack(stack, layer.n_in)
        outputs, s = layer.pure_fn(inputs, weights[i], state[i], rngs[i], use_cache=use_cache)
        stack = combinators.outputs_onto_stack(outputs, stack, layer.n_in)
      else:
        stack, s, _ = fused
    new_state.append(s)
    i += 1
  return stack, tuple(new_state)


def _fusable(layer, x):
  """Whether `run_layers` hands x to `layer.fused_call`: a fused block, and one array on
  the stack (what a block takes)."""
  return isinstance(layer, FusedResidual) and not isinstance(x, (tuple, list))


def _chain(attention, ff, x, weights, state, scopes, ahead=()):
  """(out, [attention's state, ff's state]) of the two blocks chained, or None. `scopes`: a
  context for each block's half; `ahead`: the next block's fixed weights, which with
  `decode_kernels.PREFETCH` the FF block's kernel asks the L2 cache for, as the attention
  block's does for the FF block's (the kernels' wrappers read the switch)."""
  if not _fusable(attention, x):
    return None
  ff_norm = ff.chain_norm(x, weights[1])
  if ff_norm is None:
    return None
  with scopes[0]:
    first = attention.fused_call(x, weights[0], state[0], ff_norm=ff_norm,
                                 ahead=ff.ahead_arrays(weights[1]))
  if first is None:
    return None
  out, attention_state, (partials,) = first
  with scopes[1]:
    second = ff.fused_call(out, weights[1], state[1], partials=partials, ahead=ahead)
  return second[0], [attention_state, second[1]]


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
