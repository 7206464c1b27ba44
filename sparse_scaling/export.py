"""Trained weights -> one .npz file with a stable name per weight array, and back.

  python -m sparse_scaling.export --output_dir=runs/tiny_lm --to=weights.npz

reads the last checkpoint of a run (`checkpoints.load_latest`, which runs no code from the
file; its weights are checked against the model) and the run's operative config (`config.gin`),
and writes every weight array under a name made of its place in the model's layer tree: the
index and name of each layer on the path (trax's sizes after the name, as in `SparseFF_64_8`,
dropped), then the array's index in its layer, e.g.

  03_Serial/00_Branch/01_Parallel/01_Serial/01_SparseFF/02_ChosenUnitsFF/0   (block 0's W1)

The same model always gives the same names (sizes do not enter them), so a file loads back by name
(`load_weights`) into the model built from that config, whatever the order of the file.
A layer used twice (a shared embedding) is named where it first occurs. Arrays keep their
dtype, except bfloat16 (which .npz cannot hold): it is written as float32.
"""

import os
import re
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from trax import shapes

from sparse_scaling.bench import common
from sparse_scaling import checkpoints
from sparse_scaling import configs
from sparse_scaling import data  # pylint: disable=unused-import  (gin registrations)
from sparse_scaling import models  # pylint: disable=unused-import  (gin registrations)


def weight_names(model, weights):
  """Stable names of the arrays of `weights`, in `jax.tree.leaves(weights)` order.

  Args:
    model: The layer whose weights these are (its layer tree gives the names).
    weights: Its weights, or their signature (`model.weights_and_state_signature`).

  Returns:
    A list of str, one per array.
  """
  names = []

  def walk(layer, layer_weights, path):
    subs = layer.sublayers
    if subs and isinstance(layer_weights, (tuple, list)) and len(layer_weights) == len(subs):
      for i, (sub, sub_weights) in enumerate(zip(subs, layer_weights)):
        walk(sub, sub_weights, f'{path}{i:02d}_{re.sub(r"(_[0-9]+)+$", "", sub.name)}/')
    else:  # a leaf layer (or one that keeps its own weights): its arrays by index
      names.extend(f'{path}{j}' for j in range(len(jax.tree.leaves(layer_weights))))

  walk(model, weights, '')
  return names


def save_weights(model, weights, path, structure=None):
  """Writes `weights` (nested, or the flat list of a checkpoint) of `model` to `path`.

  Args:
    model: The layer the weights belong to.
    weights: The arrays: nested as `model.weights`, or flat in layer order.
    path: The .npz file to write.
    structure: The nested weights or their signature, which name the arrays (default:
      `model.weights` of an initialized model).

  Raises:
    ValueError: the weights do not fit the model.
  """
  names = weight_names(model, model.weights if structure is None else structure)
  leaves = jax.tree.leaves(weights)
  if len(leaves) != len(names):
    raise ValueError(f'{len(leaves)} weight arrays for a model of {len(names)}: the '
                     'checkpoint was not trained with this config')
  arrays = {}
  for name, leaf in zip(names, leaves):
    array = np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16 else leaf)
    arrays[name] = array
  with open(path, 'wb') as f:
    np.savez(f, **arrays)


def load_weights(model, path):
  """Sets the weights of the initialized `model` from a file of `save_weights`, by name.

  Raises:
    ValueError: a weight is missing from the file, left over, or of another shape.
  """
  names = weight_names(model, model.weights)
  leaves, treedef = jax.tree.flatten(model.weights)
  with np.load(path) as data:
    extra = sorted(set(data.files) - set(names))
    missing = [name for name in names if name not in data.files]
    if missing or extra:
      raise ValueError(f'{path} does not fit the model: missing {missing[:3]}, '
                       f'extra {extra[:3]} ({len(missing)} and {len(extra)} in all)')
    arrays = []
    for name, leaf in zip(names, leaves):
      array = data[name]
      if array.shape != leaf.shape:
        raise ValueError(f'{path}: weight {name} has shape {array.shape}, the model '
                         f'{leaf.shape}')
      arrays.append(jnp.asarray(array, leaf.dtype))
  model.weights = jax.tree.unflatten(treedef, arrays)


def model_signature(model, length):
  """Token ids of `length` for `model`'s inputs (an LM's, or an encoder-decoder's pair)."""
  tokens = shapes.ShapeDtype((1, length), np.int32)
  return tokens if model.n_in == 1 else (tokens, tokens)


def export_run(output_dir, to, gin_file=None, length=32):
  """Writes the last checkpoint of `output_dir` to `to`, named by its config's model.

  Args:
    output_dir: A run directory of main.py (config.gin and checkpoint/).
    to: The .npz file to write.
    gin_file: The config whose model the weights belong to (default: the run's config.gin).
    length: Token length used to build the model's weight shapes (they do not depend on
      it); any length the model accepts.

  Returns:
    The number of arrays written.
  """
  gin_file = gin_file or os.path.join(output_dir, 'config.gin')
  checkpoint = checkpoints.load_latest(output_dir, n_tasks=0)
  if checkpoint is None:
    raise FileNotFoundError(f'no checkpoint in {output_dir}: train first')
  configs.parse([gin_file])
  model = configs.configured_model()(mode='eval')
  signature = checkpoints.weights_signature(model, model_signature(model, length))
  checkpoints.check_fits(checkpoint.weights, model, checkpoint.directory, signature)
  weights = checkpoints.from_bits(checkpoint.weights)
  save_weights(model, weights, to, structure=signature)
  return len(weights)


def _define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  flags.DEFINE_string('output_dir', None, 'The run directory (config.gin, checkpoint/).')
  flags.DEFINE_string('to', None, 'The .npz file to write.')
  flags.DEFINE_string('gin_file', None, "The model's config (default: the run's config.gin).")
  flags.DEFINE_integer('length', 32, 'A token length the model accepts (for shapes only).',
                       lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if not args.output_dir or not args.to:
    raise app.UsageError('--output_dir and --to are required')
  try:
    n = export_run(args.output_dir, args.to, args.gin_file, args.length)
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  print(f'wrote {n} weight arrays to {args.to}')


if __name__ == '__main__':
  common.run(main, _define_flags)
