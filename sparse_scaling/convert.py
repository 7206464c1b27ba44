"""Trax checkpoints → sparse_scaling: load weights of trax's reference models into ours.

Users with models trained by trax's official code (`ConfigurableTransformerLM`,
`ConfigurableTransformer`, or single layers of `trax.layers.research.sparsity`) load them
here. trax stores weights as one flat list in layer-tree order (its checkpoints'
`.weights.npy.gz`); our models lay their layers out in the same order, so the list is consumed
layer by layer, and the layers whose weights differ are mapped:

  trax                                   ours
  SparseFF: C1, C2, c; W1 [d, d_ff/N, N],  SparseFF: C1, C2, c; W1 [d_ff/N, N, d], b1 = 0,
            W2 [N, d_ff/N, d], b2                    W2 [d_ff/N, N, d], b2

Every other layer is copied as it is: trax's own layers (embeddings, LayerNorm, Dense) and
ours that keep trax's layout (`FactoredDense`'s G [S, d], P [d, M], b are
`MultiplicativeDense`'s D, E, b; the attention projections and the module convolutions keep
`tl.Dense` and `tl.Conv` weights in trax's order). Shapes are checked at every step.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from sparse_scaling import checkpoints
from sparse_scaling.layers import sparse_ff


def load_trax_weights(ours, trax_weights):
  """Sets the weights of our initialized model from the weights of the same trax model.

  Args:
    ours: An initialized layer or model of ours.
    trax_weights: The weights of the corresponding trax layer or model (a nested tuple, as
      `layer.weights`, or the flat list of a checkpoint).

  Raises:
    ValueError: the weights do not fit our model (a different configuration).
  """
  remaining = _load(ours, jax.tree.leaves(trax_weights), set())
  if remaining:
    raise ValueError(f'{len(remaining)} trax weights left over after filling our model; '
                     'build ours with the configuration of the trax model')


def load_trax_checkpoint(ours, path):
  """Loads the weights of a trax checkpoint (`.../model.pkl.gz`) into our initialized model.

  The checkpoint is read by `checkpoints.read`, which runs no code from the file.

  Args:
    ours: An initialized model of ours with the configuration of the checkpoint's model.
    path: The checkpoint's `.pkl.gz` file, as written by `trax.supervised.training.Loop`.

  Raises:
    checkpoints.CheckpointError: the checkpoint is damaged or holds a type not admitted.
  """
  directory, name = os.path.split(path)
  checkpoint = checkpoints.read(directory, n_tasks=0, basename=name.removesuffix('.pkl.gz'))
  load_trax_weights(ours, checkpoints.from_bits(checkpoint.weights))


def _load(layer, arrays, seen):
  """Fills `layer`'s weights from the front of `arrays`; returns the rest.

  A layer used twice (a shared embedding) has its weights once in trax's list, where it
  first occurs; `seen` holds the ids of the layers filled so far.
  """
  if id(layer) in seen:
    return arrays
  seen.add(id(layer))
  if _is_sparse_ff(layer):
    return _load_sparse_ff(layer, arrays)
  if layer.sublayers:
    for sub in layer.sublayers:
      arrays = _load(sub, arrays, seen)
    return arrays
  n = len(jax.tree.leaves(layer.weights))
  if n:
    taken, arrays = _take(arrays, n, layer.name)
    _set(layer, jax.tree.unflatten(jax.tree.structure(layer.weights), taken))
  return arrays


def _is_sparse_ff(layer):
  """Whether `layer` is one Sparse FF (`sparse_ff.SparseFF`), known by its layers' classes."""
  return isinstance(layer, sparse_ff.SparseFFDecode) or any(
      isinstance(sub, sparse_ff.SparseFFController) for sub in layer.sublayers)


def _load_sparse_ff(layer, arrays):
  """trax's six SparseFF weights into our controller and units (`SparseFFDecode` in predict
  mode)."""
  (m1, m2, mb, w1, w2, b2), arrays = _take(arrays, 6, 'SparseFF')
  if w1.ndim != 3 or w2.ndim != 3:
    raise ValueError(f'{layer.name}: trax weights of shapes {w1.shape}, {w2.shape} are no '
                     'SparseFF; build ours with the configuration of the trax model')
  ours = ((m1, m2, mb), (jnp.transpose(w1, (1, 2, 0)), jnp.zeros_like(mb),
                         jnp.transpose(w2, (1, 0, 2)), b2))
  if not layer.sublayers:  # SparseFFDecode: one layer with the tree of the Serial
    _set(layer, ((), *ours, ()))
    return arrays
  for part, weights in zip([sub for sub in layer.sublayers if sub.weights], ours):
    _set(part, weights)
  return arrays


def _take(arrays, n, what):
  if len(arrays) < n:
    raise ValueError(f'trax weights ran out at {what}: build ours with the configuration of '
                     'the trax model')
  return [jnp.asarray(a) for a in arrays[:n]], arrays[n:]


def _set(layer, weights):
  ours = [np.shape(w) for w in jax.tree.leaves(layer.weights)]
  theirs = [np.shape(w) for w in jax.tree.leaves(weights)]
  if ours != theirs:
    raise ValueError(f'{layer.name}: trax weights of shapes {theirs} do not fit our shapes '
                     f'{ours}; build ours with the configuration of the trax model')
  layer.weights = weights
