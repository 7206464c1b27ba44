"""Trax checkpoints → sparse_scaling: map the weights of trax's reference layers onto ours.

Users with models trained by trax's official code (`trax.layers.research.sparsity`,
`trax.models.research`) load them here. Each function takes an initialized trax layer and an
initialized layer of ours with the same configuration, and sets our weights so that both
compute the same function in eval mode.
"""

import jax.numpy as jnp


def load_sparse_ff(ours, theirs):
  """Copies a trax `SparseFF`'s weights into our `SparseFF`.

  trax keeps W1 as [d_model, d_ff/N, N] and W2 as [N, d_ff/N, d_model] (the d_ff index is
  grouped differently in the two), and has no first-layer bias. Ours keeps both unit-major,
  [d_ff/N, N, d_model], with b1 [d_ff/N, N] (set to zero here).

  Args:
    ours: an initialized `sparse_scaling.layers.SparseFF`.
    theirs: an initialized `trax.layers.research.sparsity.SparseFF` of the same d_ff, N and
      d_lowrank.
  """
  (controller,) = sublayers_named(ours, 'SparseFFController')
  (units,) = sublayers_named(ours, 'ChosenUnitsFF')
  (their_controller,) = sublayers_named(theirs, '_SparseFFController')
  (their_main,) = sublayers_named(theirs, '_SparseFFMain')
  m1, m2, mb = their_controller.weights
  _check_shapes('SparseFF controller', controller.weights, (m1, m2, mb))
  controller.weights = (m1, m2, mb)
  w1, w2, b2 = their_main.weights
  new = (jnp.transpose(w1, (1, 2, 0)), jnp.zeros_like(mb), jnp.transpose(w2, (1, 0, 2)), b2)
  _check_shapes('SparseFF main', units.weights, new)
  units.weights = new


def sublayers_named(layer, name):
  """All layers named `name` inside `layer` (itself included), depth-first."""
  found = [layer] if layer.name.startswith(name) else []
  for sub in layer.sublayers:
    found += sublayers_named(sub, name)
  return found


def _check_shapes(what, ours, theirs):
  ours_shapes = [w.shape for w in ours]
  their_shapes = [w.shape for w in theirs]
  if ours_shapes != their_shapes:
    raise ValueError(f'{what}: trax weights of shapes {their_shapes} do not fit our layer of '
                     f'shapes {ours_shapes}; build ours with the same d_ff, N and d_lowrank')
