"""SRU (paper §4.3): parity with trax's SRU, masked positions keep the state, predict == eval."""

import jax
import numpy as np
from trax import layers as tl
from trax import shapes

from sparse_scaling.layers.sru import SRU
from tests.utils import random_inputs


def _sru(mode, x, mask, weights=None):
  layer = SRU(8, mode=mode)
  layer.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(0))
  if weights is not None:
    layer.weights = weights
  return layer


def test_matches_trax_sru_without_padding():
  x, mask = random_inputs(2, 7, 8), np.ones((2, 7), np.float32)
  theirs = tl.SRU(8, mode='eval')
  theirs.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
  ours = _sru('eval', x, mask)
  ours.weights = jax.tree.unflatten(jax.tree.structure(ours.weights),
                                    jax.tree.leaves(theirs.weights))
  np.testing.assert_allclose(ours((x, mask)), theirs(x), atol=1e-5)


def test_masked_positions_do_not_change_later_outputs():
  x, mask = random_inputs(1, 6, 8), np.ones((1, 6), np.float32)
  layer = _sru('eval', x, mask)
  gapped, gap_mask = np.insert(x, 3, 100.0, axis=1), np.insert(mask, 3, 0.0, axis=1)
  np.testing.assert_allclose(layer((gapped, gap_mask))[:, 4:], layer((x, mask))[:, 3:],
                             atol=1e-5)


def test_predict_continues_after_a_padded_first_call():
  x = random_inputs(2, 8, 8)
  full_mask = np.ones((2, 8), np.float32)
  evaluate = _sru('eval', x, full_mask)
  predict = _sru('predict', x[:, :1], full_mask[:, :1], evaluate.weights)
  # Row 0 has 3 real positions in a first call of 5; row 1 has 5.
  first_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  predict((x[:, :5], first_mask))
  step = np.asarray(predict((x[:, 5:6], full_mask[:, :1])))
  row0 = np.concatenate([x[:1, :3], x[:1, 5:6]], axis=1)
  np.testing.assert_allclose(step[0, 0], evaluate((row0, np.ones((1, 4), np.float32)))[0, -1],
                             atol=1e-5)
  np.testing.assert_allclose(step[1, 0], evaluate((x[1:, :6], full_mask[1:, :6]))[0, -1],
                             atol=1e-5)
