"""The decoder over [encoder; decoder]: packing, stripping, masked causal attention."""

import jax
import numpy as np
from trax import layers as tl
from trax import shapes

from sparse_scaling.layers import concat_decoder
from tests.utils import assert_predict_equals_eval
from tests.utils import random_inputs


def test_packs_decoder_after_each_rows_true_length_and_strips_it_back():
  vec_e, vec_d = random_inputs(2, 4, 3, seed=1), random_inputs(2, 2, 3, seed=2)
  mask_e = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  vec_ed, mask_ed = concat_decoder.ConcatEncoderDecoder()((vec_e, mask_e, vec_d))
  np.testing.assert_array_equal(mask_ed, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_allclose(vec_ed[0], np.concatenate([vec_e[0, :2], vec_d[0],
                                                         np.zeros((2, 3))]))
  np.testing.assert_allclose(vec_ed[1], np.concatenate([vec_e[1], vec_d[1]]))
  np.testing.assert_allclose(concat_decoder.StripEncoder()((vec_ed, mask_e)), vec_d)


def test_dense_attention_matches_trax_causal_attention_on_unmasked_input():
  x, mask = random_inputs(2, 6, 16), np.ones((2, 6), np.float32)
  theirs = tl.CausalAttention(16, n_heads=4, mode='eval')
  theirs.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
  ours = concat_decoder.PackedDenseAttention(16, 4, mode='eval')
  ours.init(shapes.signature((x, mask)))
  ours.weights = jax.tree.unflatten(jax.tree.structure(ours.weights),
                                    jax.tree.leaves(theirs.weights))
  np.testing.assert_allclose(ours((x, mask)), theirs(x), atol=1e-5)


def test_masked_keys_are_skipped():
  x, mask = random_inputs(1, 6, 16), np.ones((1, 6), np.float32)
  layer = concat_decoder.PackedDenseAttention(16, 4, mode='eval')
  layer.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(0))
  gapped, gap_mask = np.insert(x, 2, 50.0, axis=1), np.insert(mask, 2, 0.0, axis=1)
  np.testing.assert_allclose(layer((gapped, gap_mask))[:, 3:], layer((x, mask))[:, 2:],
                             atol=1e-5)


def test_attention_predict_equals_eval():
  x, mask = random_inputs(2, 7, 16), np.ones((2, 7), np.float32)
  assert_predict_equals_eval(
      lambda mode: concat_decoder.PackedDenseAttention(16, 4, max_inference_length=16,
                                                       mode=mode), (x, mask), seq_input=0)
