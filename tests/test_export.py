"""sparse_scaling.export: weights to .npz under stable per-layer names, and back."""

import functools

import jax
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import export
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models import Terraformer

LM = functools.partial(ScalingTransformerLM, vocab_size=32, d_model=16, d_ff=64, n_layers=2,
                       n_heads=2, max_len=32, dropout=0.0, ff_sparsity=8,
                       attention_sparsity=4, loss_sparsity=4)
TOKENS = np.array([[3, 4, 5, 6, 7, 8]], np.int32)


def _initialized(model_fn, x, seed):
  model = model_fn(mode='eval')
  model.init(shapes.signature(x), rng=jax.random.PRNGKey(seed))
  return model


def test_names_are_unique_per_array_and_follow_the_layer_tree():
  model = _initialized(LM, TOKENS, 0)
  names = export.weight_names(model, model.weights)
  assert len(names) == len(set(names)) == len(jax.tree.leaves(model.weights))
  assert any('SparseFF' in name for name in names)
  assert names[0].startswith('01_') and names[0].split('/')[-1] == '0'  # after ShiftRight
  # From the shape signature alone (no weights allocated): the same names.
  signature, _ = LM(mode='eval').weights_and_state_signature(shapes.signature(TOKENS))
  assert export.weight_names(LM(mode='eval'), signature) == names


@pytest.mark.parametrize('model_fn, x', [
    (LM, TOKENS),
    (functools.partial(Terraformer, input_vocab_size=32, d_model=16, d_ff=64,
                       n_encoder_layers=1, n_decoder_layers=1, n_heads=2, max_len=32,
                       dropout=0.0, ff_sparsity=8, attention_sparsity=4, loss_sparsity=4,
                       ff_use_sru=(1, 4)), (TOKENS, TOKENS)),
], ids=['sparse_lm', 'terraformer_shared_embedding'])
def test_saved_weights_load_back_by_name_with_equal_outputs(tmp_path, model_fn, x):
  trained = _initialized(model_fn, x, 0)
  path = tmp_path / 'weights.npz'
  export.save_weights(trained, trained.weights, path)
  fresh = _initialized(model_fn, x, 1)
  # Both models' forward pass as one compiled program of their weights (the same layers): the
  # outputs of `model(x)`, compiled faster than eager calls, which compile each operation apart.
  forward = jax.jit(lambda weights, state: jax.tree.leaves(
      fresh.pure_fn(x, weights, state, None)[0]))
  outputs = lambda model: forward(model.weights, model.state)
  before = outputs(fresh)[0]
  export.load_weights(fresh, path)
  for ours, theirs in zip(outputs(fresh), outputs(trained)):
    np.testing.assert_array_equal(ours, theirs)
  assert not np.allclose(before, outputs(trained)[0])  # the load changed them


def test_a_file_of_another_model_is_refused_with_the_weight_named(tmp_path):
  small = _initialized(LM, TOKENS, 0)
  path = tmp_path / 'weights.npz'
  export.save_weights(small, small.weights, path)
  other_vocab = _initialized(functools.partial(LM, vocab_size=40), TOKENS, 0)
  with pytest.raises(ValueError, match=r'weight \S+ has shape'):
    export.load_weights(other_vocab, path)
  deeper = _initialized(functools.partial(LM, n_layers=3), TOKENS, 0)
  with pytest.raises(ValueError, match='does not fit the model: missing'):
    export.load_weights(deeper, path)
