"""The control of Sparse QKV's sparsity (Sparse QKV with a dense projection): Sparse QKV itself
at the multiplicative layer's dense weight, causal, predict == eval, gradients, the LM's knob
and its parameter count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import shapes

from sparse_scaling.layers import DenseConvAttention
from sparse_scaling.layers import SparseQKVAttention
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts
from tests.utils import assert_predict_equals_eval
from tests.utils import initialized as _init
from tests.utils import random_inputs as _inputs

D_MODEL, N_HEADS, S = 16, 2, 4
VOCAB = 32


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_equals_sparse_qkv_at_the_multiplicative_layers_dense_weight(length_kernel_size):
  x = _inputs(2, 7, D_MODEL)
  sparse = _init(SparseQKVAttention(D_MODEL, N_HEADS, S, length_kernel_size, mode='eval'), x)
  ours = _init(DenseConvAttention(D_MODEL, N_HEADS, S, length_kernel_size, mode='eval'), x,
               seed=1)
  (d, e, bias), convolutions, core = sparse.weights
  dense = np.einsum('si,im->ism', d, e).reshape(D_MODEL, D_MODEL)  # W[i, (s, m)] = D[s, i] E[i, m]
  ours.weights = ((jnp.asarray(dense), bias), convolutions, core)
  np.testing.assert_allclose(ours(x), sparse(x), atol=1e-5)
  assert not np.allclose(_init(DenseConvAttention(D_MODEL, N_HEADS, S, length_kernel_size,
                                                  mode='eval'), x, seed=1)(x), sparse(x))


def test_is_causal():
  x = _inputs(1, 8, D_MODEL)
  layer = _init(DenseConvAttention(D_MODEL, N_HEADS, S, mode='eval'), x)
  changed = x.copy()
  changed[:, 5:] -= 2.0
  y, y_changed = np.asarray(layer(x)), np.asarray(layer(changed))
  np.testing.assert_allclose(y[:, :5], y_changed[:, :5], atol=1e-6)
  assert not np.allclose(y[:, 5], y_changed[:, 5])


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_predict_equals_eval(length_kernel_size):
  model_fn = functools.partial(DenseConvAttention, D_MODEL, N_HEADS, S, length_kernel_size,
                               max_inference_length=16)
  assert_predict_equals_eval(model_fn, _inputs(2, 8, D_MODEL))


def test_lm_predict_equals_eval():
  tokens = np.random.RandomState(0).randint(1, VOCAB, (2, 9)).astype(np.int32)
  model_fn = functools.partial(ScalingTransformerLM, vocab_size=VOCAB, d_model=D_MODEL, d_ff=32,
                               n_layers=2, n_heads=N_HEADS, max_len=16, dropout=0.0,
                               attention_conv=S)
  assert_predict_equals_eval(model_fn, tokens, shifted=True)


def test_gradients_reach_every_weight_and_match_finite_differences():
  x = _inputs(2, 6, D_MODEL)
  layer = _init(DenseConvAttention(D_MODEL, N_HEADS, S, mode='eval'), x)
  target = _inputs(2, 6, D_MODEL, seed=1)

  def loss(weights):
    y, _ = layer.pure_fn(x, weights, layer.state, jax.random.PRNGKey(0))
    return jnp.mean((y - target) ** 2)

  grads = jax.grad(loss)(layer.weights)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 2 + 3 * 2  # Dense w, b; kernel and bias of Q, K and V
  for g in leaves:
    assert np.isfinite(g).all() and np.abs(g).max() > 0
  direction = jax.tree.map(lambda w: _inputs(*w.shape, seed=2), layer.weights)
  eps = 1e-3
  moved = [loss(jax.tree.map(lambda w, d, s=s: w + s * eps * d, layer.weights, direction))
           for s in (1, -1)]
  numeric = (moved[0] - moved[1]) / (2 * eps)
  analytic = sum(np.vdot(g, d) for g, d in zip(leaves, jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_lm_has_one_dense_projection_and_the_convolutions_instead_of_four_projections():
  signature = shapes.ShapeDtype((1, 8), np.int32)
  counts = {conv: parameter_counts(ScalingTransformerLM(
      vocab_size=VOCAB, d_model=D_MODEL, d_ff=32, n_layers=2, n_heads=N_HEADS, max_len=16,
      attention_conv=conv, mode='eval'), signature) for conv in (0, S)}
  m = D_MODEL // S
  convolutions = 2 * (3 * 3 * m * m + m) + (3 * 1 * m * m + m)  # Q, K (3, 3); V (3, 1)
  per_layer = convolutions - 3 * (D_MODEL * D_MODEL + D_MODEL)  # one Dense of four
  assert counts[S]['total'] - counts[0]['total'] == 2 * per_layer
  assert (counts[S]['decoder/self_attention'] - counts[0]['decoder/self_attention'] ==
          2 * per_layer)


@pytest.mark.parametrize('make, parameter', [
    (lambda: ScalingTransformerLM(d_model=16, n_heads=2, attention_conv=4,
                                  attention_sparsity=4), 'attention_sparsity'),
    (lambda: ScalingTransformerLM(d_model=16, n_heads=2, attention_conv=3), 'attention_conv'),
    (lambda: DenseConvAttention(16, 2, n_modules=5), 'n_modules'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(make, parameter):
  with pytest.raises(ValueError, match=parameter):
    make()
